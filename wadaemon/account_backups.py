"""Backups of the accounts this instance drives: which changes are backed up (not those of a
gone, held or conflicting account), the safety passes over every account, the check that the
store kept the heads this daemon committed, and one backup (at most MAX_CONCURRENT_BACKUPS at
once) with what it leaves in the account's state, metrics and record."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from wadaemon.account_records import BACKUP_RECORD_EVERY_S, RECORD_COALESCE_S, AccountRecords
from wadaemon.backup import BackupEngine
from wadaemon.backup_scheduler import BackupScheduler
from wadaemon.errors import UnreadableSession, WadaemonError
from wadaemon.replica import Conflict
from wadaemon.runtime import Runtime
from wadaemon.snapshot import Snapshot
from wadaemon.state import AccountState, iso_time
from wadaemon.store import Fenced, HeadConflict, StoreError
from wadaemon.store_health import StoreHealth
from wadaemon.whatsapp.session_db import SESSION_DB

if TYPE_CHECKING:
    from wadaemon.whatsapp.supervisor import Supervisor

log = logging.getLogger("wadaemon")

MAX_CONCURRENT_BACKUPS = 4
FULL_PASS_EVERY_S = 24 * 3600.0


def unpaired_session(snapshot: Snapshot) -> str | None:
    """With WhatsApp clients: a session.db without a paired device is never backed up. It is a
    pairing that has not finished, or a session whose device the library deleted after a logout;
    as a backup it would only hide the last paired generation."""
    if snapshot.device_count(SESSION_DB) == 0:
        return "session.db holds no paired device (not paired yet, or logged out); not backed up"
    return None


class AccountBackups:
    def __init__(
        self,
        rt: Runtime,
        engine: BackupEngine | None,
        store_health: StoreHealth,
        records: AccountRecords,
        supervisor: Supervisor | None,
    ) -> None:
        self.rt = rt
        self.engine = engine
        self.store_health = store_health
        self.records = records
        self.supervisor = supervisor
        self.scheduler = BackupScheduler(self.backup, rt.config.backup.debounce_seconds)
        self._gate = threading.Event()  # closed only by fault injection in tests
        self._gate.set()
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_BACKUPS)
        self._force: set[str] = set()  # accounts whose next backup must not trust fingerprints
        self._held: set[str] = set()  # accounts whose backups wait (pairing, logout handling)
        self._held_changed: set[str] = set()
        self._reupload: dict[str, frozenset[str]] = {}  # damaged pieces for the next backup
        store_health.when_back(self._store_back)

    def drives(self, account: str) -> bool:
        """Which accounts this instance drives; with leases, only those it holds."""
        ownership = self.rt.ownership
        return ownership is None or ownership.drives(account)

    # --- gating ------------------------------------------------------------------------------

    def held(self, account: str) -> bool:
        return account in self._held

    def hold_backups(self, account: str, held: bool) -> None:
        if held:
            self._held.add(account)
        elif account in self._held:
            self._held.discard(account)
            if account in self._held_changed:
                self._held_changed.discard(account)
                self.changed(account)

    def drop_hold(self, account: str) -> None:
        """End the hold without backing up the changes it held back."""
        self._held.discard(account)

    def _gone(self, account: str) -> bool:
        """Neither known nor on disk (a removed account whose deletion the watcher reports)."""
        return (
            account not in self.rt.state.accounts
            and not self.rt.layout.account_dir(account).exists()
        )

    def changed(self, account: str) -> None:
        if self._gone(account) or not self.drives(account):
            return
        if self.supervisor is not None:
            self.supervisor.session_changed(account)
        st = self.rt.state.account(account)
        st.last_change_at = time.time()
        if st.pending_since is None:
            st.pending_since = time.monotonic()
        if st.state == "missing":
            self.settle(st)
        self.scheduler.touch(account)

    def settle(self, st: AccountState) -> None:
        """An account's protection once nothing is in progress: protected only with a committed
        generation (known from the boot restore or a backup), never merely because it exists."""
        if not self.rt.layout.account_dir(st.account).is_dir():
            st.state = "missing"
        elif st.last_backup_generation is None:
            st.state = "unprotected"
        else:
            st.state = "protected"

    # --- passes and the head check -----------------------------------------------------------

    def sweep(self, why: str, *, force: bool = False) -> None:
        """A pass over every local account this instance drives, as if each had changed."""
        accounts = self.rt.layout.local_accounts()
        log.debug("%s pass over %d accounts", why, len(accounts))
        for account in accounts:
            if not self.drives(account):
                continue
            if force:
                self._force.add(account)
            self.changed(account)

    async def periodic(self) -> None:
        """The safety pass: catches what the watcher missed. It trusts the stat fingerprints
        (an unchanged account costs a stat per file); once a day it snapshots every account
        regardless, in case a file changed behind an unchanged size, mtime and inode."""
        last_full = time.monotonic()
        while True:
            await asyncio.sleep(self.rt.config.backup.interval_seconds)
            full = time.monotonic() - last_full >= FULL_PASS_EVERY_S
            if full:
                last_full = time.monotonic()
            self.sweep("periodic", force=full)
            if self.rt.replica is not None:
                await self.check_heads()

    def _store_back(self) -> None:
        self.scheduler.retry_now()
        self.rt.spawn(self.check_heads(), "check-heads")  # did it keep what we committed?

    async def check_heads(self) -> None:
        """Is every head this daemon committed still there? A store that lost its data (or an
        account's backup deleted behind the daemon's back) would otherwise stay empty until
        the account changes: such an account is backed up again at once, whole."""
        assert self.rt.replica is not None
        replica = self.rt.replica
        known = {
            a: st.last_backup_generation
            for a, st in self.rt.state.accounts.items()
            if st.state == "protected" and st.last_backup_generation is not None and self.drives(a)
        }
        for account, generation in sorted(known.items()):
            try:
                head = await asyncio.to_thread(replica.read_head, account)
            except StoreError as exc:
                self.store_health.failed(exc)
                return
            except WadaemonError as exc:
                log.warning("%s: cannot read the backup head: %s", account, exc)
                continue
            self.store_health.ok()
            if head is not None and head.generation >= generation:
                continue
            found = "gone" if head is None else f"at generation {head.generation}"
            log.warning(
                "%s: the backup head this daemon committed (generation %d) is %s; backing the "
                "session up again",
                account,
                generation,
                found,
            )
            self._force.add(account)
            self.changed(account)

    # --- one backup --------------------------------------------------------------------------

    def hang(self, seconds: float) -> None:
        """Fault injection (tests): every backup waits `seconds` in its thread."""
        self._gate.clear()
        asyncio.get_running_loop().call_later(seconds, self._gate.set)
        self.sweep("fault", force=True)

    def _backup_in_thread(self, account: str, force: bool, reupload: frozenset[str]) -> Any:
        assert self.engine is not None
        self._gate.wait()
        refuse = unpaired_session if self.supervisor is not None else None
        return self.engine.backup(account, force=force, refuse=refuse, reupload=reupload)

    async def backup(self, account: str) -> bool:
        assert self.engine is not None
        if self._gone(account) or not self.drives(account):
            return True
        st = self.rt.state.account(account)
        if st.state == "conflict":
            st.pending_since = None
            log.debug("%s: in conflict with its backup: not backed up until resolved", account)
            return True
        if account in self._held:
            self._held_changed.add(account)
            st.pending_since = None
            log.debug("%s: backup held (pairing or logout in progress)", account)
            return True
        force = account in self._force
        self._force.discard(account)
        reupload = self._reupload.pop(account, frozenset())
        metrics = self.rt.metrics
        async with self._slots:
            started_at = time.time()
            covered, st.pending_since = st.pending_since, None
            st.backup_started = time.monotonic()
            try:
                result = await asyncio.to_thread(
                    self._backup_in_thread, account, force or bool(reupload), reupload
                )
            except (WadaemonError, OSError) as exc:
                if isinstance(exc, Fenced):
                    metrics.lease_events.labels("fenced").inc()
                    st.pending_since = None
                    log.error("%s: the store refused the commit: %s", account, exc)
                    if self.rt.ownership is not None:
                        self.rt.ownership.fenced(account, str(exc))
                    return True  # another instance drives it: nothing to retry here
                if isinstance(exc, HeadConflict):
                    log.warning("%s: another writer moved the head meanwhile: %s", account, exc)
                elif isinstance(exc, StoreError):
                    self.store_health.failed(exc)
                if isinstance(exc, UnreadableSession):
                    st.state = "unreadable"
                if isinstance(exc, Conflict):
                    st.state = "conflict"
                    st.last_error = str(exc)
                    st.pending_since = None
                    log.error("%s", exc)
                    return True  # nothing to retry until the conflict is resolved
                st.pending_since = min(filter(None, (covered, st.pending_since)), default=None)
                st.consecutive_failures += 1
                st.last_error = str(exc)
                st.last_backup_result = "failed"
                metrics.backups.labels(account, "failed").inc()
                log.error("%s: backup failed: %s", account, exc)
                return False
            finally:
                if st.backup_started is not None:
                    metrics.backup_seconds.observe(time.monotonic() - st.backup_started)
                st.backup_started = None
        for warning in result.warnings:
            log.warning("%s: %s", account, warning)
        for notice in result.notices:
            log.info("%s: %s", account, notice)
        metrics.backups.labels(account, result.status).inc()
        st.last_backup_result = result.status
        if result.status == "skipped":
            st.pending_since = None
            self.settle(st)
            log.warning("backup: %s", result.line())
            return True
        if result.commit is not None:  # the store answered (not a fingerprint shortcut)
            self.store_health.ok()
        st.consecutive_failures = 0
        st.last_error = ""
        first = st.last_backup_generation is None  # since this daemon started
        st.last_backup_at = time.time()
        if result.commit is not None and result.commit.created and st.last_change_at is None:
            # the snapshot found a change the watcher had not reported yet (a backup at once)
            st.last_change_at = started_at
        st.last_backup_generation = result.generation
        self.settle(st)
        if result.commit is not None and result.commit.created:
            metrics.uploaded_bytes.inc(result.commit.uploaded_bytes)
            log.info("backup: %s", result.line())
            fields: dict[str, object] = {
                "generation": result.generation,
                "lastBackupAt": iso_time(st.last_backup_at),
                "lastEventAt": iso_time(st.last_change_at),
            }
            if self.supervisor is None:  # with clients, their records say the status
                fields["status"] = st.state
            self.records.record(
                account,
                fields,
                within=RECORD_COALESCE_S if first else BACKUP_RECORD_EVERY_S,
                weak=("status",),
            )
        elif result.commit is not None and result.commit.uploaded_pieces:
            log.info("backup: %s", result.line())  # damaged pieces uploaded again
        else:
            log.debug("backup: %s", result.line())
        return True

    async def backup_at_once(self, account: str, why: str) -> dict[str, Any]:
        if self.engine is None:
            return {"account": account, "ok": True, "result": "off", "generation": None}
        log.info("%s: backing up at once (%s)", account, why)
        self._force.add(account)
        ok = await self.backup(account)
        st = self.rt.state.account(account)
        return {
            "account": account,
            "ok": ok,
            "result": st.last_backup_result,
            "generation": st.last_backup_generation,
            "error": st.last_error or None,
        }

    async def reupload(self, account: str, pieces: frozenset[str], why: str) -> dict[str, Any]:
        """Back up at once, uploading `pieces` again (damaged in the store) even if unchanged."""
        self._reupload[account] = pieces
        backup = await self.backup_at_once(account, why)
        if not backup["ok"] or backup["result"] == "skipped":
            self._reupload.pop(account, None)
        return backup
