"""The daemon's side of account leases: what happens to an account when this instance takes
its lease, gives it up or loses it, and what /health and `accounts list` say about each.

- taken over: restore its newest generation (a local copy is kept only if it descends from the
  head: Restorer.restore_account(takeover=True)), start its client, back it up under the new
  token;
- handed over (SIGTERM, `accounts move`, rebalancing): stop the client, commit the last changes
  while the lease is still held; the lease keeper then releases it;
- lost (another instance holds a newer token, or the lease ran out while this process was
  paused): stop the client at once; nothing more is committed (the backups are gated on
  `drives`, and the store refuses a lower token anyway).
Accounts another instance drives are `passive` here: no client, no backup, no drill.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import TYPE_CHECKING

from wadaemon.account_backups import AccountBackups
from wadaemon.boot_restore import BootRestore
from wadaemon.errors import WadaemonError
from wadaemon.lease_ownership import LeaseOwnership
from wadaemon.lease_policy import NOT_DRIVABLE
from wadaemon.runtime import Runtime

if TYPE_CHECKING:
    from wadaemon.whatsapp.supervisor import Supervisor

log = logging.getLogger("wadaemon.leases")

START_RETRY_FIRST_S = 2.0
START_RETRY_MAX_S = 30.0


class DrivenAccounts:
    """Implements lease_ownership.OwnershipHost for the daemon."""

    def __init__(
        self,
        rt: Runtime,
        backups: AccountBackups,
        restores: BootRestore,
        supervisor: Supervisor | None,
    ) -> None:
        self.rt = rt
        self.backups = backups
        self.restores = restores
        self.supervisor = supervisor
        self.ownership: LeaseOwnership | None = None  # set by the daemon
        self.started = asyncio.Event()  # the first leases are taken (or the store never said)
        self._booted = False  # the restore phase is over: new leases are taken over one by one

    # --- OwnershipHost --------------------------------------------------------------------------

    def known_accounts(self) -> set[str]:
        return set(self.rt.state.accounts) | set(self.rt.layout.local_accounts())

    async def take_over(self, account: str) -> bool:
        st = self.rt.state.account(account)
        st.state = "restoring"
        outcome = await self.restores.restore(account, takeover=True)
        if not outcome.ok:
            log.error("%s: not taken over: %s", account, outcome.line())
            return False
        return True

    def drive(self, account: str) -> None:
        if not self._booted:
            return  # the daemon starts every driven account's client after the restore phase
        if self.supervisor is not None and self.supervisor.started:
            self.supervisor.add(account)
        self.backups.changed(account)

    async def let_go(self, account: str, *, final_backup: bool) -> None:
        if self.supervisor is not None:
            await self.supervisor.pause(account)
        # what the watcher has not reported yet is found by its stat keys (an unchanged
        # session costs a stat per file): committed while the lease is still held
        if (
            final_backup
            and self.backups.engine is not None
            and not await self.backups.backup(account)
        ):
            st = self.rt.state.account(account)
            log.warning(
                "%s: handed over without its last changes: the final backup failed (%s)",
                account,
                st.last_error,
            )
        self._passive(account)

    async def restart(self, account: str) -> bool:
        runner = self.supervisor.runners.get(account) if self.supervisor is not None else None
        return runner is not None and runner.resume_replaced()

    def lost(self, account: str, why: str) -> None:
        self._passive(account)
        if self.supervisor is not None:
            self.rt.spawn(self.supervisor.pause(account), f"stop-{account}")

    def _passive(self, account: str) -> None:
        st = self.rt.state.account(account)
        st.state = "passive"
        st.client = ""
        st.client_detail = ""
        st.pending_since = None

    # --- start ----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Take the first leases, retried until the store answers. The daemon waits for this
        at most restore.timeout_seconds; leases taken later are taken over one by one."""
        assert self.ownership is not None
        delay = START_RETRY_FIRST_S
        while not self.rt.stop_event.is_set():
            try:
                await self.ownership.start()
            except (WadaemonError, OSError) as exc:
                wait = delay * random.uniform(0.5, 1.0)
                log.warning(
                    "leases: cannot take leases yet: %s; this instance drives nothing until it "
                    "can, retrying in %.0f s",
                    exc,
                    wait,
                )
                await self.rt.sleep(wait)
                delay = min(START_RETRY_MAX_S, delay * 2)
                continue
            log.info(
                "leases: instance %s holds %d accounts (%s)",
                self.ownership.instance,
                len(self.ownership.held),
                ", ".join(sorted(self.ownership.held)) or "none",
            )
            break
        self.sync()
        self.started.set()
        if self._booted:  # the restore phase did not wait for this: take the leases over now
            for account in sorted(self.ownership.held):
                if await self.take_over(account):
                    self.drive(account)
                else:
                    await self.ownership.hand_over(
                        account, why="it cannot be driven here", reason=NOT_DRIVABLE
                    )
        self.rt.spawn(self.ownership.run(self.rt.stop_event), "leases")

    def booted(self) -> None:
        self._booted = True

    # --- what /health shows --------------------------------------------------------------------

    def sync(self) -> None:
        """Every account the fleet knows, with its holder; those driven elsewhere passive."""
        ownership = self.ownership
        if ownership is None:
            return
        accounts = self.rt.state.accounts
        for account in ownership.removed():
            accounts.pop(account, None)  # removed on another instance
        for account in sorted(ownership.known() - set(accounts)):
            self.rt.state.account(account)
        for account, st in accounts.items():
            st.holder = ownership.holder(account)
            driven = ownership.drives(account) or account in ownership.busy
            if not driven and st.state != "passive":
                self._passive(account)
