"""What is done to one account on request: over the control socket (back up or verify now,
resolve a conflict, pair, remove) and by its WhatsApp client's runner (quarantine the session,
mark the backup head after a logout)."""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wadaemon.account_backups import AccountBackups
from wadaemon.account_records import AccountRecords
from wadaemon.boot_restore import RESTORE_RETRY_FIRST_S, RESTORE_RETRY_MAX_S, BootRestore
from wadaemon.errors import WadaemonError
from wadaemon.lineage import ADOPTED
from wadaemon.restore import drill
from wadaemon.runtime import Runtime
from wadaemon.state import iso_time
from wadaemon.store import StoreError
from wadaemon.store_health import StoreHealth
from wadaemon.whatsapp.pairing import Pairing

if TYPE_CHECKING:
    from wadaemon.whatsapp.supervisor import Supervisor

log = logging.getLogger("wadaemon")


class AccountActions:
    def __init__(
        self,
        rt: Runtime,
        store_health: StoreHealth,
        records: AccountRecords,
        backups: AccountBackups,
        restores: BootRestore,
        supervisor: Supervisor | None,
    ) -> None:
        self.rt = rt
        self.store_health = store_health
        self.records = records
        self.backups = backups
        self.restores = restores
        self.supervisor = supervisor

    async def backup_now(self, account: str) -> dict[str, Any]:
        layout = self.rt.layout
        if self.backups.engine is None:
            raise WadaemonError("backup.target is none: there is nowhere to back up to")
        if not layout.account_dir(account).is_dir():
            raise WadaemonError(f"{account}: no such account under {layout.root}")
        return await self.backups.backup_at_once(account, "asked over the socket")

    async def verify(self, account: str) -> dict[str, Any]:
        if self.rt.replica is None:
            return {"account": account, "ok": False, "error": "backup.target is none"}
        result = await asyncio.to_thread(drill, self.rt.replica, account)
        if not result.ok:
            log.error("verify: %s: generation %s: %s", account, result.generation, result.verdict())
        return result.as_dict()

    async def resolve(self, account: str, keep: str) -> dict[str, Any]:
        """End a conflict between a local session and its backup head: keep the backup
        (restore the head; the local copy goes to .quarantine/) or keep the local copy (back it
        up as the next generation, on top of the head)."""
        st = self.rt.state.accounts.get(account)
        if st is None or st.state != "conflict":
            state = st.state if st else "unknown"
            raise WadaemonError(f"{account} is not in conflict (it is {state}): nothing to resolve")
        if self.restores.restorer is None:
            raise WadaemonError("backup.target is none: there is no backup to resolve with")
        if keep == "local":
            lineage = self.rt.layout.lineage
            descent = lineage.read(account)
            lineage.record(account, ADOPTED, descent.inode)
            self.backups.settle(st)
            st.last_error = ""
            log.warning("%s: conflict resolved: the local session is kept", account)
            result = await self.backups.backup_at_once(account, "conflict resolved: keeping local")
            return {"account": account, "kept": "local", **result}
        if self.supervisor is not None:
            await self.supervisor.pause(account)
        outcome = await self.restores.restore(account, force=True)
        log.warning("%s: conflict resolved: the backup is kept: %s", account, outcome.line())
        if self.supervisor is not None and outcome.ok:
            self.supervisor.add(account)
        return {
            "account": account,
            "kept": "backup",
            "ok": outcome.ok,
            "result": outcome.line(),
            "quarantined": str(outcome.quarantined) if outcome.quarantined else None,
        }

    def pair(self, account: str, phone: str | None) -> Pairing:
        if self.supervisor is None:
            raise WadaemonError(
                "whatsapp.enabled is false (sidecar mode): this daemon runs no WhatsApp clients, "
                "pair with the program that owns the sessions"
            )
        return self.supervisor.pair(account, phone)

    async def remove(self, account: str) -> dict[str, Any]:
        """Log out, stop the client, delete the remote backup, then the local session."""
        rt = self.rt
        known = account in rt.state.accounts or rt.layout.account_dir(account).exists()
        if not known:
            raise WadaemonError(f"{account}: no such account")
        self.backups.hold_backups(account, True)  # none of a session logged out and deleted
        said = "no WhatsApp client (sidecar mode)"
        if self.supervisor is not None:
            said = await self.supervisor.remove(account)
        deleted = 0
        if rt.replica is not None:
            try:
                deleted = await asyncio.to_thread(rt.replica.remove_account, account)
                if rt.ownership is not None:
                    await rt.ownership.retire(account)
            except (WadaemonError, OSError) as exc:
                self.backups.drop_hold(account)
                raise WadaemonError(
                    f"{account}: cannot delete the backups ({exc}); the local session is kept, "
                    "run the command again once the store answers"
                ) from None
        path = rt.layout.account_dir(account)
        if path.exists():
            await asyncio.to_thread(shutil.rmtree, path)
        rt.layout.lineage.forget(account)
        rt.state.accounts.pop(account, None)
        self.backups.drop_hold(account)
        self.records.forget(account)
        await self.records.write(account, {"status": "removed", "removedAt": iso_time(time.time())})
        log.warning(
            "%s: removed: %s; %d backup objects and the local session deleted",
            account,
            said,
            deleted,
        )
        return {"account": account, "removed": True, "logout": said, "deleted": deleted}

    def quarantine(self, account: str, reason: str) -> Path | None:
        if not self.rt.layout.account_dir(account).exists():
            return None
        return self.rt.layout.move_to_quarantine(account, reason)

    async def mark_head(self, account: str, state: str) -> None:
        """Mark the backup head; retried until the store takes it (a head left `active` after a
        logout would let an instance restore a dead session)."""
        if self.rt.replica is None:
            return
        replica = self.rt.replica
        delay = RESTORE_RETRY_FIRST_S
        while True:
            try:
                head = await asyncio.to_thread(replica.set_head_state, account, state)
            except (WadaemonError, OSError) as exc:
                if isinstance(exc, (StoreError, OSError)):
                    self.store_health.failed(exc)
                log.warning(
                    "%s: cannot mark the backup %s yet (%s); retrying in %.0f s",
                    account,
                    state,
                    exc,
                    delay,
                )
                await self.store_health.pause(delay)
                delay = min(RESTORE_RETRY_MAX_S, delay * 2)
                if self.rt.stop_event.is_set():
                    log.error("%s: stopping before the backup was marked %s", account, state)
                    return
                continue
            if head is not None:
                log.info(
                    "%s: backup marked %s; its %d generations are kept",
                    account,
                    state,
                    len(head.history),
                )
            return
