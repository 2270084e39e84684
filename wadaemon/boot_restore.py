"""Restores: the restore phase at boot (the local accounts and the store's active heads, each
restored if its local session needs it, retried until done), the head reads the `keys` check
needs, and one restore attempt at a time per account for whoever asks later (a WhatsApp client
whose session went missing, a conflict resolved by keeping the backup)."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from wadaemon.account_backups import AccountBackups
from wadaemon.account_records import AccountRecords
from wadaemon.errors import WadaemonError
from wadaemon.key_watch import KeyWatch
from wadaemon.lost_keys import sealed_heads
from wadaemon.restore import RestoreOutcome, Restorer
from wadaemon.runtime import Runtime
from wadaemon.state import iso_time
from wadaemon.store_health import StoreHealth

if TYPE_CHECKING:
    from wadaemon.whatsapp.supervisor import Supervisor

log = logging.getLogger("wadaemon")

RESTORE_RETRY_FIRST_S = 5.0
RESTORE_RETRY_MAX_S = 300.0


class BootRestore:
    def __init__(
        self,
        rt: Runtime,
        restorer: Restorer | None,
        keys: KeyWatch | None,
        store_health: StoreHealth,
        records: AccountRecords,
        backups: AccountBackups,
        supervisor: Supervisor | None,
    ) -> None:
        self.rt = rt
        self.restorer = restorer
        self.keys = keys
        self.store_health = store_health
        self.records = records
        self.backups = backups
        self.supervisor = supervisor
        self._pool = ThreadPoolExecutor(
            max_workers=rt.config.restore.parallelism, thread_name_prefix="restore"
        )
        self._first_restores: dict[str, asyncio.Future[RestoreOutcome]] = {}
        self._boot_heads: asyncio.Task[None] | None = None
        self._locks: dict[str, asyncio.Lock] = {}

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def phase(self) -> None:
        """Restore what needs it; wait at most restore.timeout_seconds for the first attempts.

        Accounts are the local directories plus the store's active heads. If the store cannot
        be listed yet, local accounts go ahead and the listing is retried in the background;
        accounts found later are restored then.
        """
        rt = self.rt
        loop = asyncio.get_running_loop()
        deadline = loop.time() + rt.config.restore.timeout_seconds
        for account in rt.layout.local_accounts():
            self._start(account)
        discovery = asyncio.create_task(self._discover_backed_up_accounts(), name="discovery")
        rt.track(discovery)
        await rt.wait_all([discovery], deadline)
        if not discovery.done() and not rt.stop_event.is_set():
            log.warning(
                "restore: the backup store cannot be listed yet; starting with the local "
                "accounts, the others are restored once it answers"
            )
        firsts = list(self._first_restores.values())
        heads = [self._boot_heads] if self._boot_heads is not None else []
        await rt.wait_all([*firsts, *heads], deadline)  # heads: read before any backup
        pending = sorted(a for a, f in self._first_restores.items() if not f.done())
        if pending:
            log.warning(
                "restore: %d accounts not restored within %.0f s (restore.timeout_seconds); "
                "starting anyway, they keep being retried: %s",
                len(pending),
                rt.config.restore.timeout_seconds,
                ", ".join(pending),
            )
        outcomes = [f.result() for f in firsts if f.done()]
        failed = sum(1 for o in outcomes if not o.ok)
        log.info(
            "restore: %d accounts checked, %d restored, %d failed%s",
            len(outcomes),
            sum(1 for o in outcomes if o.status == "restored"),
            failed,
            " (retrying in the background)" if failed else "",
        )

    def _start(self, account: str) -> None:
        if account in self._first_restores or not self.backups.drives(account):
            return
        first: asyncio.Future[RestoreOutcome] = asyncio.get_running_loop().create_future()
        self._first_restores[account] = first
        self.rt.state.account(account).state = "restoring"
        self.rt.spawn(self._until_done(account, first), f"restore-{account}")

    async def _discover_backed_up_accounts(self) -> None:
        assert self.rt.replica is not None
        delay = RESTORE_RETRY_FIRST_S
        while not self.rt.stop_event.is_set():
            try:
                accounts = await asyncio.to_thread(self.rt.replica.store.list_accounts)
            except (WadaemonError, OSError) as exc:
                self.store_health.failed(exc)
                wait = delay * random.uniform(0.5, 1.0)
                log.warning(
                    "restore: cannot list the backed-up accounts (%s); retrying in %.0f s",
                    exc,
                    wait,
                )
                await self.store_health.pause(wait)
                delay = min(RESTORE_RETRY_MAX_S, delay * 2)
                continue
            self.store_health.ok()
            for account in sorted(accounts):
                self._start(account)
            self._boot_heads = asyncio.create_task(self.read_boot_heads(accounts), name="heads")
            self.rt.track(self._boot_heads)
            return

    async def read_boot_heads(self, accounts: list[str] | None) -> None:
        """Which keys sealed the backups found at boot (the `keys` check): one head read per
        account, beside the first restores; retried until the store answers."""
        assert self.rt.replica is not None and self.keys is not None
        delay = RESTORE_RETRY_FIRST_S
        while not self.rt.stop_event.is_set():
            try:
                heads = await asyncio.to_thread(sealed_heads, self.rt.replica.store, accounts)
            except (WadaemonError, OSError) as exc:
                self.store_health.failed(exc)
                wait = delay * random.uniform(0.5, 1.0)
                log.warning(
                    "keys: cannot read the backup heads yet (%s); retrying in %.0f s", exc, wait
                )
                await self.store_health.pause(wait)
                delay = min(RESTORE_RETRY_MAX_S, delay * 2)
                continue
            self.store_health.ok()
            self.keys.heads_found(heads)
            return

    async def _until_done(self, account: str, first: asyncio.Future[RestoreOutcome]) -> None:
        assert self.restorer is not None
        stop_event = self.rt.stop_event
        delay = RESTORE_RETRY_FIRST_S
        while not stop_event.is_set():
            outcome = await self.restore(account)
            if not first.done():
                first.set_result(outcome)
            supervising = self.supervisor is not None and self.supervisor.started
            if (
                outcome.ok
                and supervising
                and account in self.rt.state.accounts
                and self.backups.drives(account)
            ):
                assert self.supervisor is not None
                self.supervisor.add(account)  # its client waited for this first restore
            if outcome.ok or outcome.status == "conflict" or stop_event.is_set():
                return
            wait = delay * random.uniform(0.5, 1.0)
            log.warning("%s: retrying the restore in %.0f s", account, wait)
            await self.store_health.pause(wait)
            delay = min(RESTORE_RETRY_MAX_S, delay * 2)

    async def restore(
        self, account: str, *, force: bool = False, takeover: bool = False
    ) -> RestoreOutcome:
        """One restore attempt (if the local session needs it, or `force`); one at a time per
        account. `takeover`: its lease was just taken from another instance (or from nobody):
        the head wins over a local copy that does not descend from it."""
        assert self.restorer is not None
        restorer = self.restorer
        ownership = self.rt.ownership
        if ownership is not None and account in ownership.taken_over:
            takeover = True
        lock = self._locks.setdefault(account, asyncio.Lock())
        async with lock:
            try:
                outcome = await asyncio.get_running_loop().run_in_executor(
                    self._pool,
                    lambda: restorer.restore_account(account, force=force, takeover=takeover),
                )
                if ownership is not None and outcome.ok:
                    ownership.taken_over.discard(account)
            except Exception as exc:  # a bug, not an expected failure: report it, keep going
                log.exception("%s: restore failed unexpectedly", account)
                outcome = RestoreOutcome(account, "failed", detail=repr(exc))
        self._record(outcome)
        return outcome

    def restored_accounts(self) -> list[str]:
        """Accounts whose clients may start: boot restore finished (or never needed), and
        driven by this instance."""
        return sorted(
            a
            for a, st in self.rt.state.accounts.items()
            if (a not in self._first_restores or self._first_restores[a].done())
            and st.state != "conflict"
            and self.backups.drives(a)
        )

    def _record(self, outcome: RestoreOutcome) -> None:
        rt = self.rt
        st = rt.state.account(outcome.account)
        st.last_restore = outcome.line()
        st.last_restore_at = time.time()
        if outcome.status == "restored":
            rt.metrics.restores.labels("restored").inc()
        elif not outcome.ok:
            rt.metrics.restores.labels("failed").inc()
        removed = outcome.head_state == "removed"
        if removed and not rt.layout.account_dir(outcome.account).exists():
            rt.state.accounts.pop(outcome.account, None)  # removed on purpose: not an account
            log.debug("restore: %s", outcome.line())
            return
        if outcome.backed_up is not None:
            st.last_backup_generation = outcome.backed_up
        if outcome.ok:
            self.backups.settle(st)
            log.info("restore: %s", outcome.line())
        elif outcome.status in ("unreadable", "conflict"):
            st.state = outcome.status
            st.last_error = outcome.detail
            log.error("restore: %s", outcome.line())
        else:
            st.state = "restore_failed"
            log.error("restore: %s", outcome.line())
        if outcome.status in ("restored", "failed"):
            fields: dict[str, object] = {"status": st.state, "host": self.records.host}
            if outcome.status == "restored":
                fields.update(
                    lastRestoreAt=iso_time(st.last_restore_at), generation=outcome.generation
                )
            else:
                fields["lastRestoreError"] = outcome.detail[:1000]
            rt.spawn(self.records.write(outcome.account, fields), "record")
