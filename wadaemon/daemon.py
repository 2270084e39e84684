"""The daemon's lifecycle, in the manner of uvicorn's Server:

lock the sessions directory → open the control socket → restore phase → watcher, periodic
pass, restore drills → WhatsApp clients (one at a time) → READY=1 → main loop (heartbeat:
watchdog pings gated on health, STATUS) → SIGTERM: STOPPING=1, stop the clients, final backups
of changed accounts, exit 0.
SIGHUP: RELOADING=1, reload what can change live, READY=1.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
import random
import shutil
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wadaemon import __version__
from wadaemon.backup import BackupEngine
from wadaemon.backup_scheduler import BackupScheduler
from wadaemon.config import Config, load_config
from wadaemon.control_socket import ControlServer
from wadaemon.errors import ConfigError, UnreadableSession, WadaemonError
from wadaemon.health import alive, core_checks, drills_check, heads_check, report, status_line
from wadaemon.key_watch import KEY_FILES_EVERY_S, KeyWatch, key_file_problems
from wadaemon.keyring import Keyring, load_keyring_for
from wadaemon.layout import SessionsLayout
from wadaemon.lineage import ADOPTED
from wadaemon.logs import setup_logging
from wadaemon.lost_keys import sealed_heads
from wadaemon.metrics import Metrics
from wadaemon.notify import Notifier
from wadaemon.replica import Conflict, Replica
from wadaemon.restore import DrillResult, RestoreOutcome, Restorer, drill, inspect_local
from wadaemon.snapshot import Snapshot
from wadaemon.state import AccountState, DaemonState, iso_time
from wadaemon.store import HeadConflict, StoreError, open_store
from wadaemon.watcher import SessionWatcher
from wadaemon.whatsapp.pairing import Pairing
from wadaemon.whatsapp.session_db import SESSION_DB

if TYPE_CHECKING:
    from wadaemon.whatsapp.supervisor import Supervisor

log = logging.getLogger("wadaemon")

MAX_CONCURRENT_BACKUPS = 4
HEARTBEAT_S = 0.5
STATUS_EVERY_S = 2.0
FULL_PASS_EVERY_S = 24 * 3600.0
STORE_PROBE_EVERY_S = 10.0
OUTAGE_LOG_EVERY_S = 60.0
RESTORE_RETRY_FIRST_S = 5.0
RESTORE_RETRY_MAX_S = 300.0
RECORD_COALESCE_S = 1.0  # account records: at most one write per account per second
DRILL_POLL_S = 30.0  # the drill loop looks at the configuration and the accounts this often
FAULTS_ENV = "WADAEMON_FAULTS"  # "1" enables POST /debug/hang/{loop,watcher,backup} (tests only)


def unpaired_session(snapshot: Snapshot) -> str | None:
    """With WhatsApp clients: a session.db without a paired device is never backed up. It is a
    pairing that has not finished, or a session whose device the library deleted after a logout;
    as a backup it would only hide the last paired generation."""
    if snapshot.device_count(SESSION_DB) == 0:
        return "session.db holds no paired device (not paired yet, or logged out); not backed up"
    return None


def keyring_for(config: Config) -> Keyring | None:
    return None if config.backup.target == "none" else load_keyring_for(config)


def drill_offset(account: str) -> float:
    """Where in the drill interval an account's drill falls, from 0 to 1: the same on every
    host and after every restart, and spread from account to account."""
    return int.from_bytes(hashlib.sha256(account.encode()).digest()[:8], "big") / 2**64


def next_drill_at(account: str, interval: float, now: float) -> float:
    """The account's next drill time after `now` (wall clock): its offset in every interval."""
    offset = drill_offset(account) * interval
    return offset + (math.floor((now - offset) / interval) + 1) * interval


class Daemon:
    def __init__(self, config: Config, keyring: Keyring | None) -> None:
        self.config = config
        self.layout = SessionsLayout(config.sessions_path)
        store = open_store(config)
        self.replica: Replica | None = None
        self.engine: BackupEngine | None = None
        self.restorer: Restorer | None = None
        self.keys: KeyWatch | None = None
        if store is not None:
            if keyring is None:
                raise WadaemonError("a backup target is configured but no key is loaded")
            self.keys = KeyWatch(config, keyring)
            self.replica = Replica(store, keyring, config.backup.keep_generations)
            self.engine = BackupEngine(self.layout, self.replica)
            self.restorer = Restorer(self.layout, self.replica)
        target = store.describe() if store else "none"
        self.state = DaemonState(__version__, target)
        self.state.store.target = target
        self.metrics = Metrics(self.state)
        self.notifier = Notifier()
        self.faults_enabled = os.environ.get(FAULTS_ENV) == "1"
        self._backup_gate = threading.Event()
        self._backup_gate.set()
        self.stop_event = asyncio.Event()
        self._lock_fd: int | None = None
        self._restore_pool = ThreadPoolExecutor(
            max_workers=config.restore.parallelism, thread_name_prefix="restore"
        )
        self._backup_slots = asyncio.Semaphore(MAX_CONCURRENT_BACKUPS)
        self.scheduler = BackupScheduler(self._backup, config.backup.debounce_seconds)
        self.watcher = SessionWatcher(self.layout, self._changed)
        self.control = ControlServer(config.socket_path, self, faults=self.faults_enabled)
        self._tasks: list[asyncio.Task[Any]] = []
        self._force: set[str] = set()  # accounts whose next backup must not trust fingerprints
        self._first_restores: dict[str, asyncio.Future[RestoreOutcome]] = {}
        self._store_back = asyncio.Event()  # set (and replaced) when the store answers again
        self._probe: asyncio.Task[None] | None = None
        self._key_files_check: asyncio.Task[None] | None = None
        self._boot_heads: asyncio.Task[None] | None = None
        self._last_ping_ok = True
        self._host = socket.gethostname()
        self._held: set[str] = set()  # accounts whose backups wait (pairing, logout handling)
        self._held_changed: set[str] = set()
        self._restore_locks: dict[str, asyncio.Lock] = {}
        self._pending_records: dict[str, dict[str, object]] = {}
        self._reupload: dict[str, frozenset[str]] = {}  # damaged pieces for the next backup
        self.supervisor: Supervisor | None = None
        if config.whatsapp.enabled:
            from wadaemon.whatsapp.supervisor import Supervisor

            self.supervisor = Supervisor(self, config.whatsapp)

    # --- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, sig.name)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self.reload(), "reload"))
        self._lock_fd = self.layout.lock()
        adopted = self.layout.prepare()
        if adopted:
            log.info(
                "lineage: first start of this version on %s: %d local sessions are taken as "
                "descendants of their backup heads (%s)",
                self.layout.root,
                len(adopted),
                ", ".join(adopted),
            )
        log.info(
            "wadaemon %s starting: sessions %s, backup target %s",
            __version__,
            self.layout.root,
            self.state.target,
        )
        if self.supervisor is None:
            log.info("whatsapp.enabled is false: sidecar mode, protecting the session directories")
        for account in self.layout.local_accounts():
            self.state.account(account)
        await self.control.start()
        try:
            return await self._serve()
        finally:
            await self.control.stop()
            self._restore_pool.shutdown(wait=False, cancel_futures=True)

    async def _serve(self) -> int:
        self._spawn(self._heartbeat(), "heartbeat")
        if self.restorer and self.config.restore.on_boot:
            self.state.phase = "restoring"
            self.notifier.status(status_line(self.state))
            await self._restore_phase()
        elif self.keys is not None:
            self._spawn(self._read_boot_heads(None), "boot-heads")
        if self.engine:
            self._spawn(self.watcher.run(self.stop_event), "watcher")
            self._spawn(self._periodic(), "periodic")
            await asyncio.sleep(0.1)  # let the watcher subscribe before the first pass
            self._pass("startup", force=True)
            self._spawn(self._drills(), "drills")
        else:
            self.watcher.down_since = None
        if self.supervisor is not None and not self.stop_event.is_set():
            self.supervisor.start(self._restored_accounts())
        if not self.stop_event.is_set():
            self.state.phase = "running"
            log.info("ready: %s", status_line(self.state))
            self.notifier.ready(status_line(self.state))
        await self.stop_event.wait()

        self.state.phase = "stopping"
        self.notifier.stopping()
        self.notifier.status(status_line(self.state))
        if self.supervisor is not None:
            await self.supervisor.stop()
        log.info("stopping: final backups of changed accounts")
        if self.engine is not None:
            # Changes the watcher has not reported (it stops with the signal, and may have
            # missed some): compared with the fingerprints, a clean account costs a stat per file.
            self._pass("final")
        await self.scheduler.flush()
        for account in list(self._pending_records):
            await self._record(account, {"host": self._host, **self._pending_records.pop(account)})
        if self.replica is not None:
            try:
                await asyncio.to_thread(self.replica.store.close)
            except (WadaemonError, OSError) as exc:
                log.warning("cannot write the pending account records: %s", exc)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        log.info("stopped")
        return 0

    def request_stop(self, why: str = "request") -> None:
        if not self.stop_event.is_set():
            log.info("received %s", why)
            self.stop_event.set()

    def _spawn(self, coro: Any, name: str) -> None:
        self._tasks = [t for t in self._tasks if not t.done()]
        self._tasks.append(asyncio.create_task(coro, name=name))

    # --- heartbeat: loop lag, watchdog, STATUS ---------------------------------------------

    def core(self) -> dict[str, Any]:
        return core_checks(
            self.state,
            watcher_down_since=self.watcher.down_since,
            watching=self.engine is not None and self.state.phase != "restoring",
            backup_timeout=self.config.backup.timeout_seconds,
        )

    async def _heartbeat(self) -> None:
        interval = self.notifier.watchdog_interval
        last_ping = last_status = 0.0
        last_outage_log = last_probe = last_key_files = time.monotonic()
        expected = time.monotonic() + HEARTBEAT_S
        while True:
            await asyncio.sleep(max(0.0, expected - time.monotonic()))
            now = time.monotonic()
            self.state.loop_lag = max(0.0, now - expected)
            expected = now + HEARTBEAT_S
            if interval is not None and now - last_ping >= interval:
                checks = self.core()
                if alive(checks):
                    self.notifier.watchdog()
                    last_ping = now
                    if not self._last_ping_ok:
                        log.info("watchdog: every core part is alive again; pinging")
                    self._last_ping_ok = True
                elif self._last_ping_ok:
                    self._last_ping_ok = False
                    failing = "; ".join(
                        f"{n}: {c.detail}" for n, c in checks.items() if c.status == "failing"
                    )
                    log.error("watchdog: not pinging systemd: %s", failing)
            checking = self._key_files_check is not None and not self._key_files_check.done()
            if now - last_key_files >= KEY_FILES_EVERY_S and not checking:
                last_key_files = now
                self._key_files_check = asyncio.create_task(self._check_key_files())
            if now - last_status >= STATUS_EVERY_S:
                self.notifier.status(status_line(self.state))
                last_status = now
            if self.replica is not None and not self.state.store.reachable:
                if (
                    self.state.store.reachable is False
                    and now - last_outage_log >= OUTAGE_LOG_EVERY_S
                ):
                    last_outage_log = now
                    self._log_outage()
                if now - last_probe >= STORE_PROBE_EVERY_S and self._probe is None:
                    last_probe = now
                    self._probe = asyncio.create_task(self._probe_store())

    async def _probe_store(self) -> None:
        """While the store is unreachable: ask it something cheap, to notice its return."""
        assert self.replica is not None
        try:
            await asyncio.to_thread(self.replica.store.list_accounts)
        except (WadaemonError, OSError):
            pass
        else:
            self._store_ok()
        finally:
            self._probe = None

    async def _check_key_files(self) -> None:
        """Has a key file been deleted, made unreadable or overwritten (the `keys` check)?"""
        if self.keys is not None:
            files = self.keys.files
            problems = await asyncio.to_thread(key_file_problems, files)
            self.keys.files_checked(files, problems)

    def _log_outage(self) -> None:
        store = self.state.store
        since = time.time() - (store.unreachable_since or time.time())
        now = time.monotonic()
        waiting = [a for a in self.state.accounts.values() if a.pending_since is not None]
        oldest = max((now - a.pending_since for a in waiting if a.pending_since), default=0.0)
        log.warning(
            "backup store %s unreachable for %.0f s (%s); %d accounts wait for a backup, the "
            "oldest change is %.0f s old; local sessions keep working",
            store.target,
            since,
            store.last_error,
            len(waiting),
            oldest,
        )

    # --- reload ------------------------------------------------------------------------------

    async def reload(self) -> None:
        self.state.phase = "reloading"
        self.notifier.reloading()
        log.info("reloading the configuration from %s", self.config.path)
        try:
            new = await asyncio.to_thread(load_config, self.config.path)
            keyring = await asyncio.to_thread(keyring_for, new)
        except ConfigError as exc:
            log.error("reload: %s; keeping the running configuration", exc)
        else:
            self._apply(new, keyring)
        finally:
            self.state.phase = "running"
            self.notifier.ready(status_line(self.state))

    def _apply(self, new: Config, keyring: Keyring | None) -> None:
        old = self.config
        needs_restart = [
            name
            for name, a, b in (
                ("sessions_path", old.sessions_path, new.sessions_path),
                ("socket_path", old.socket_path, new.socket_path),
                ("backup.target", old.backup.target, new.backup.target),
                ("backup.directory", old.backup.directory, new.backup.directory),
                ("whatsapp", old.whatsapp, new.whatsapp),
            )
            if a != b
        ]
        if needs_restart:
            log.warning(
                "reload: %s changed; that takes effect after `systemctl restart wadaemon`",
                ", ".join(needs_restart),
            )
        setup_logging(new.log_level)
        self.scheduler.debounce = new.backup.debounce_seconds
        if self.replica is not None and keyring is not None:
            self.replica.keep_generations = new.backup.keep_generations
            if keyring.current.key_id != self.replica.keyring.current.key_id:
                log.info("reload: new encryption key %s", keyring.current.key_id)
            self.replica.keyring = keyring
            if self.keys is not None:
                self.keys.reload(new, keyring)
                self._spawn(self._check_key_files(), "key-files")
        self.config = new
        log.info("reload: done")

    # --- restore -----------------------------------------------------------------------------

    async def _restore_phase(self) -> None:
        """Restore what needs it; wait at most restore.timeout_seconds for the first attempts.

        Accounts are the local directories plus the store's active heads. If the store cannot
        be listed yet, local accounts go ahead and the listing is retried in the background;
        accounts found later are restored then.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.restore.timeout_seconds
        for account in self.layout.local_accounts():
            self._start_restore(account)
        discovery = asyncio.create_task(self._discover_backed_up_accounts(), name="discovery")
        self._tasks.append(discovery)
        await self._wait_all([discovery], deadline)
        if not discovery.done() and not self.stop_event.is_set():
            log.warning(
                "restore: the backup store cannot be listed yet; starting with the local "
                "accounts, the others are restored once it answers"
            )
        firsts = list(self._first_restores.values())
        heads = [self._boot_heads] if self._boot_heads is not None else []
        await self._wait_all([*firsts, *heads], deadline)  # heads: read before any backup
        pending = sorted(a for a, f in self._first_restores.items() if not f.done())
        if pending:
            log.warning(
                "restore: %d accounts not restored within %.0f s (restore.timeout_seconds); "
                "starting anyway, they keep being retried: %s",
                len(pending),
                self.config.restore.timeout_seconds,
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

    async def _wait_all(self, aws: list[asyncio.Future[Any]], deadline: float) -> None:
        """Wait for all of `aws` until the loop time `deadline`, or until asked to stop."""
        loop = asyncio.get_running_loop()
        pending: set[asyncio.Future[Any]] = {f for f in aws if not f.done()}
        stop = asyncio.ensure_future(self.stop_event.wait())
        try:
            while pending and not self.stop_event.is_set() and loop.time() < deadline:
                _, pending = await asyncio.wait(
                    pending | {stop},
                    timeout=deadline - loop.time(),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                pending.discard(stop)
        finally:
            stop.cancel()

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake early when stopping or when the store answers again."""
        waits = [
            asyncio.create_task(self.stop_event.wait()),
            asyncio.create_task(self._store_back.wait()),
        ]
        await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()

    def _start_restore(self, account: str) -> None:
        if account in self._first_restores:
            return
        first: asyncio.Future[RestoreOutcome] = asyncio.get_running_loop().create_future()
        self._first_restores[account] = first
        self.state.account(account).state = "restoring"
        self._spawn(self._restore_until_done(account, first), f"restore-{account}")

    async def _discover_backed_up_accounts(self) -> None:
        assert self.replica is not None
        delay = RESTORE_RETRY_FIRST_S
        while not self.stop_event.is_set():
            try:
                accounts = await asyncio.to_thread(self.replica.store.list_accounts)
            except (WadaemonError, OSError) as exc:
                self._store_failed(exc)
                wait = delay * random.uniform(0.5, 1.0)
                log.warning(
                    "restore: cannot list the backed-up accounts (%s); retrying in %.0f s",
                    exc,
                    wait,
                )
                await self._pause(wait)
                delay = min(RESTORE_RETRY_MAX_S, delay * 2)
                continue
            self._store_ok()
            for account in sorted(accounts):
                self._start_restore(account)
            self._boot_heads = asyncio.create_task(self._read_boot_heads(accounts), name="heads")
            self._tasks.append(self._boot_heads)
            return

    async def _read_boot_heads(self, accounts: list[str] | None) -> None:
        """Which keys sealed the backups found at boot (the `keys` check): one head read per
        account, beside the first restores; retried until the store answers."""
        assert self.replica is not None and self.keys is not None
        delay = RESTORE_RETRY_FIRST_S
        while not self.stop_event.is_set():
            try:
                heads = await asyncio.to_thread(sealed_heads, self.replica.store, accounts)
            except (WadaemonError, OSError) as exc:
                self._store_failed(exc)
                wait = delay * random.uniform(0.5, 1.0)
                log.warning(
                    "keys: cannot read the backup heads yet (%s); retrying in %.0f s", exc, wait
                )
                await self._pause(wait)
                delay = min(RESTORE_RETRY_MAX_S, delay * 2)
                continue
            self._store_ok()
            self.keys.heads_found(heads)
            return

    async def _restore_until_done(
        self, account: str, first: asyncio.Future[RestoreOutcome]
    ) -> None:
        assert self.restorer is not None
        delay = RESTORE_RETRY_FIRST_S
        while not self.stop_event.is_set():
            outcome = await self._restore(account)
            if not first.done():
                first.set_result(outcome)
            supervising = self.supervisor is not None and self.supervisor.started
            if outcome.ok and supervising and account in self.state.accounts:
                assert self.supervisor is not None
                self.supervisor.add(account)  # its client waited for this first restore
            if outcome.ok or outcome.status == "conflict" or self.stop_event.is_set():
                return
            wait = delay * random.uniform(0.5, 1.0)
            log.warning("%s: retrying the restore in %.0f s", account, wait)
            await self._pause(wait)
            delay = min(RESTORE_RETRY_MAX_S, delay * 2)

    async def _restore(self, account: str, *, force: bool = False) -> RestoreOutcome:
        """One restore attempt (if the local session needs it, or `force`); one at a time per
        account."""
        assert self.restorer is not None
        restorer = self.restorer
        lock = self._restore_locks.setdefault(account, asyncio.Lock())
        async with lock:
            try:
                outcome = await asyncio.get_running_loop().run_in_executor(
                    self._restore_pool, lambda: restorer.restore_account(account, force=force)
                )
            except Exception as exc:  # a bug, not an expected failure: report it, keep going
                log.exception("%s: restore failed unexpectedly", account)
                outcome = RestoreOutcome(account, "failed", detail=repr(exc))
        self._record_restore(outcome)
        return outcome

    def _restored_accounts(self) -> list[str]:
        """Accounts whose clients may start: boot restore finished (or never needed)."""
        return sorted(
            a
            for a, st in self.state.accounts.items()
            if (a not in self._first_restores or self._first_restores[a].done())
            and st.state != "conflict"
        )

    def _record_restore(self, outcome: RestoreOutcome) -> None:
        st = self.state.account(outcome.account)
        st.last_restore = outcome.line()
        st.last_restore_at = time.time()
        if outcome.status == "restored":
            self.metrics.restores.labels("restored").inc()
        elif not outcome.ok:
            self.metrics.restores.labels("failed").inc()
        removed = outcome.head_state == "removed"
        if removed and not self.layout.account_dir(outcome.account).exists():
            self.state.accounts.pop(outcome.account, None)  # removed on purpose: not an account
            log.debug("restore: %s", outcome.line())
            return
        if outcome.backed_up is not None:
            st.last_backup_generation = outcome.backed_up
        if outcome.ok:
            self._settle(st)
            log.info("restore: %s", outcome.line())
        elif outcome.status in ("unreadable", "conflict"):
            st.state = outcome.status
            st.last_error = outcome.detail
            log.error("restore: %s", outcome.line())
        else:
            st.state = "restore_failed"
            log.error("restore: %s", outcome.line())
        if outcome.status in ("restored", "failed"):
            fields: dict[str, object] = {"status": st.state, "host": self._host}
            if outcome.status == "restored":
                fields.update(
                    lastRestoreAt=iso_time(st.last_restore_at), generation=outcome.generation
                )
            else:
                fields["lastRestoreError"] = outcome.detail[:1000]
            self._spawn(self._record(outcome.account, fields), "record")

    def record(self, account: str, fields: dict[str, object]) -> None:
        """Merge fields into the account's record soon (at most one write per second)."""
        if self.replica is None:
            return
        pending = self._pending_records.get(account)
        if pending is not None:
            pending.update(fields)
            return
        self._pending_records[account] = dict(fields)
        self._spawn(self._write_record_later(account), f"record-{account}")

    async def _write_record_later(self, account: str) -> None:
        await asyncio.sleep(RECORD_COALESCE_S)
        fields = self._pending_records.pop(account, {})
        await self._record(account, {"host": self._host, **fields})

    async def _record(self, account: str, fields: dict[str, object]) -> None:
        """Update the account's metadata record in the store (accounts/{id} in Firestore)."""
        if self.replica is None:
            return
        try:
            await asyncio.to_thread(
                self.replica.store.record_account, account, {"accountId": account, **fields}
            )
        except (WadaemonError, OSError) as exc:
            self.metrics.store_errors.inc()
            log.warning("%s: cannot update the account record: %s", account, exc)

    # --- backups -----------------------------------------------------------------------------

    def _gone(self, account: str) -> bool:
        """Neither known nor on disk (a removed account whose deletion the watcher reports)."""
        return account not in self.state.accounts and not self.layout.account_dir(account).exists()

    def _changed(self, account: str) -> None:
        if self._gone(account):
            return
        if self.supervisor is not None:
            self.supervisor.session_changed(account)
        st = self.state.account(account)
        st.last_change_at = time.time()
        if st.pending_since is None:
            st.pending_since = time.monotonic()
        if st.state == "missing":
            self._settle(st)
        self.scheduler.touch(account)

    def _settle(self, st: AccountState) -> None:
        """An account's protection once nothing is in progress: protected only with a committed
        generation (known from the boot restore or a backup), never merely because it exists."""
        if not self.layout.account_dir(st.account).is_dir():
            st.state = "missing"
        elif st.last_backup_generation is None:
            st.state = "unprotected"
        else:
            st.state = "protected"

    def _pass(self, why: str, *, force: bool = False) -> None:
        accounts = self.layout.local_accounts()
        log.debug("%s pass over %d accounts", why, len(accounts))
        for account in accounts:
            if force:
                self._force.add(account)
            self._changed(account)

    async def _periodic(self) -> None:
        """The safety pass: catches what the watcher missed. It trusts the stat fingerprints
        (an unchanged account costs a stat per file); once a day it snapshots every account
        regardless, in case a file changed behind an unchanged size, mtime and inode."""
        last_full = time.monotonic()
        while True:
            await asyncio.sleep(self.config.backup.interval_seconds)
            full = time.monotonic() - last_full >= FULL_PASS_EVERY_S
            if full:
                last_full = time.monotonic()
            self._pass("periodic", force=full)
            if self.replica is not None:
                await self._check_heads()

    def _store_failed(self, exc: BaseException) -> None:
        store = self.state.store
        if store.reachable is not False:
            log.error("backup store %s unreachable: %s", store.target, exc)
            store.unreachable_since = time.time()
        store.reachable = False
        store.last_error = str(exc)
        self.metrics.store_errors.inc()

    def _store_ok(self) -> None:
        """The store answered (never called for work that did not ask it)."""
        store = self.state.store
        if store.reachable is False:
            log.info("backup store %s reachable again; catching up", store.target)
            self.scheduler.retry_now()
            self._store_back.set()
            self._store_back = asyncio.Event()
            self._spawn(self._check_heads(), "check-heads")  # did it keep what we committed?
        store.reachable = True
        store.last_ok_at = time.time()

    async def _check_heads(self) -> None:
        """Is every head this daemon committed still there? A store that lost its data (or an
        account's backup deleted behind the daemon's back) would otherwise stay empty until
        the account changes: such an account is backed up again at once, whole."""
        assert self.replica is not None
        replica = self.replica
        known = {
            a: st.last_backup_generation
            for a, st in self.state.accounts.items()
            if st.state == "protected" and st.last_backup_generation is not None
        }
        for account, generation in sorted(known.items()):
            try:
                head = await asyncio.to_thread(replica.read_head, account)
            except StoreError as exc:
                self._store_failed(exc)
                return
            except WadaemonError as exc:
                log.warning("%s: cannot read the backup head: %s", account, exc)
                continue
            self._store_ok()
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
            self._changed(account)

    def _backup_in_thread(self, account: str, force: bool, reupload: frozenset[str]) -> Any:
        assert self.engine is not None
        self._backup_gate.wait()  # closed only by fault injection in tests
        refuse = unpaired_session if self.supervisor is not None else None
        return self.engine.backup(account, force=force, refuse=refuse, reupload=reupload)

    async def _backup(self, account: str) -> bool:
        assert self.engine is not None
        if self._gone(account):
            return True
        st = self.state.account(account)
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
        async with self._backup_slots:
            covered, st.pending_since = st.pending_since, None
            st.backup_started = time.monotonic()
            try:
                result = await asyncio.to_thread(
                    self._backup_in_thread, account, force or bool(reupload), reupload
                )
            except (WadaemonError, OSError) as exc:
                if isinstance(exc, HeadConflict):
                    log.warning("%s: another writer moved the head meanwhile: %s", account, exc)
                elif isinstance(exc, StoreError):
                    self._store_failed(exc)
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
                self.metrics.backups.labels(account, "failed").inc()
                log.error("%s: backup failed: %s", account, exc)
                return False
            finally:
                if st.backup_started is not None:
                    self.metrics.backup_seconds.observe(time.monotonic() - st.backup_started)
                st.backup_started = None
        for warning in result.warnings:
            log.warning("%s: %s", account, warning)
        for notice in result.notices:
            log.info("%s: %s", account, notice)
        self.metrics.backups.labels(account, result.status).inc()
        st.last_backup_result = result.status
        if result.status == "skipped":
            st.pending_since = None
            self._settle(st)
            log.warning("backup: %s", result.line())
            return True
        if result.commit is not None:  # the store answered (not a fingerprint shortcut)
            self._store_ok()
        st.consecutive_failures = 0
        st.last_error = ""
        st.last_backup_at = time.time()
        st.last_backup_generation = result.generation
        self._settle(st)
        if result.commit is not None and result.commit.created:
            self.metrics.uploaded_bytes.inc(result.commit.uploaded_bytes)
            log.info("backup: %s", result.line())
            await self._record(
                account,
                {
                    "status": st.state,
                    "host": self._host,
                    "generation": result.generation,
                    "lastBackupAt": iso_time(st.last_backup_at),
                    "lastEventAt": iso_time(st.last_change_at),
                },
            )
        elif result.commit is not None and result.commit.uploaded_pieces:
            log.info("backup: %s", result.line())  # damaged pieces uploaded again
        else:
            log.debug("backup: %s", result.line())
        return True

    # --- restore drills ----------------------------------------------------------------------

    async def _drills(self) -> None:
        """Drill every backed-up account's head once per verify.interval_hours, one account at
        a time, each at its own offset in the interval (next_drill_at)."""
        due: dict[str, float] = {}
        interval = 0.0
        while not self.stop_event.is_set():
            hours = self.config.verify.interval_hours
            if hours * 3600.0 != interval:  # started, or changed by a reload
                interval = hours * 3600.0
                due.clear()
            if interval <= 0 or self.replica is None:
                await self._sleep(DRILL_POLL_S)
                continue
            now = time.time()
            drillable = {
                a
                for a, st in self.state.accounts.items()
                if st.last_backup_generation is not None and a not in self._held
            }
            for account in list(due):
                if account not in drillable:
                    del due[account]
            for account in drillable:
                due.setdefault(account, next_drill_at(account, interval, now))
            if not due:
                await self._sleep(min(DRILL_POLL_S, interval))
                continue
            account = min(due, key=lambda a: due[a])
            wait = due[account] - now
            if wait > 0:
                await self._sleep(min(wait, DRILL_POLL_S))
                continue
            await self._drill(account)
            due[account] = next_drill_at(account, interval, time.time())

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake when stopping."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.stop_event.wait(), timeout=seconds)

    async def _drill(self, account: str) -> None:
        """One drill of the account's head. Damaged pieces are uploaded again from a healthy
        local session and the drill repeated; the failure shows in /health meanwhile."""
        assert self.replica is not None
        result = await asyncio.to_thread(drill, self.replica, account)
        outcome, error = ("ok", "") if result.ok else ("failed", result.error)
        if not result.ok and result.damaged and account in self.state.accounts:
            self._drilled(account, result, "failed", result.error + "; repairing", final=False)
            repaired, error = await self._repair(account, result)
            if repaired is not None:
                result, outcome = repaired, "repaired"
        if self.stop_event.is_set() or account not in self.state.accounts:
            return  # stopping, or removed meanwhile
        self._drilled(account, result, outcome, error)
        if outcome == "failed":
            log.error("drill: %s: generation %s: %s", account, result.generation, error)
        elif outcome == "repaired":
            log.warning(
                "drill: %s: repaired: generation %s restores again (%d files, %d bytes)",
                account,
                result.generation,
                result.files,
                result.size,
            )
        else:
            log.info(
                "drill: %s: generation %s restores (%d files, %d bytes, %.2f s)",
                account,
                result.generation,
                result.files,
                result.size,
                result.seconds,
            )

    def _drilled(
        self, account: str, result: DrillResult, outcome: str, error: str, *, final: bool = True
    ) -> None:
        """What /health shows of the account's last drill; a final outcome is also counted."""
        st = self.state.account(account)
        st.last_drill_result = outcome
        st.last_drill_at = time.time()
        st.last_drill_generation = result.generation
        st.last_drill_error = error
        if final:
            self.metrics.drills.labels(outcome).inc()

    async def _repair(self, account: str, failed: DrillResult) -> tuple[DrillResult | None, str]:
        """Upload again the damaged pieces a drill found, from the local session if it is
        healthy, then drill again: (the passing drill, "") or (None, why it still fails)."""
        assert self.replica is not None
        n = len(failed.damaged)
        local = await asyncio.to_thread(inspect_local, self.layout.account_dir(account))
        if local.state != "healthy":
            return None, (
                f"{failed.error}; not repaired: the local session is {local.state}, so the "
                "damaged pieces cannot be uploaded again from it"
            )
        log.warning(
            "drill: %s: generation %s has %d damaged pieces in the store; uploading them again "
            "from the local session",
            account,
            failed.generation,
            n,
        )
        self._reupload[account] = frozenset(failed.damaged)
        backup = await self.backup_at_once(account, f"a restore drill found {n} damaged pieces")
        if not backup["ok"] or backup["result"] == "skipped":
            self._reupload.pop(account, None)
            why = backup["error"] or "the backup was skipped"
            return None, f"{failed.error}; not repaired: the backup that uploads them failed: {why}"
        again = await asyncio.to_thread(drill, self.replica, account)
        if again.ok:
            return again, ""
        return None, f"{again.error} (after {n} damaged pieces were uploaded again)"

    # --- control socket API (ControlApi) -----------------------------------------------------

    def health(self) -> tuple[int, dict[str, Any]]:
        if self.replica is None:
            return report(self.state, self.core())
        return report(
            self.state,
            self.core(),
            self.keys.check() if self.keys else None,
            heads_check(dict(self.replica.head_problems)),
            drills_check(self.state, self.config.verify.interval_hours),
        )

    def metrics_text(self) -> bytes:
        return self.metrics.render()

    def accounts(self) -> list[dict[str, Any]]:
        _, body = self.health()
        return [{"account": name, **info} for name, info in body["accounts"].items()]

    async def backup_now(self, account: str) -> dict[str, Any]:
        if self.engine is None:
            raise WadaemonError("backup.target is none: there is nowhere to back up to")
        if not self.layout.account_dir(account).is_dir():
            raise WadaemonError(f"{account}: no such account under {self.layout.root}")
        return await self.backup_at_once(account, "asked over the socket")

    async def verify(self, account: str) -> dict[str, Any]:
        if self.replica is None:
            return {"account": account, "ok": False, "error": "backup.target is none"}
        result = await asyncio.to_thread(drill, self.replica, account)
        if not result.ok:
            log.error("verify: %s: generation %s: %s", account, result.generation, result.verdict())
        return result.as_dict()

    async def inject_fault(self, part: str, seconds: float) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        if part == "loop":
            loop.call_later(0.1, time.sleep, seconds)
        elif part == "watcher":
            self.watcher.suspend(seconds)
        elif part == "backup":
            self._backup_gate.clear()
            loop.call_later(seconds, self._backup_gate.set)
            self._pass("fault", force=True)
        else:
            return {"error": f"unknown part {part!r}: loop, watcher or backup"}
        log.warning("fault injected: %s hangs for %.0f s", part, seconds)
        return {"part": part, "seconds": seconds}

    # --- what the WhatsApp account runners ask of the daemon (RunnerHost) ---------------------

    def account_state(self, account: str) -> AccountState:
        return self.state.account(account)

    def account_dir(self, account: str) -> Path:
        return self.layout.account_dir(account)

    def can_restore(self) -> bool:
        return self.restorer is not None

    async def restore_missing(self, account: str) -> tuple[str, str]:
        outcome = await self._restore(account)
        return outcome.status, outcome.line()

    async def backup_at_once(self, account: str, why: str) -> dict[str, Any]:
        if self.engine is None:
            return {"account": account, "ok": True, "result": "off", "generation": None}
        log.info("%s: backing up at once (%s)", account, why)
        self._force.add(account)
        ok = await self._backup(account)
        st = self.state.account(account)
        return {
            "account": account,
            "ok": ok,
            "result": st.last_backup_result,
            "generation": st.last_backup_generation,
            "error": st.last_error or None,
        }

    def hold_backups(self, account: str, held: bool) -> None:
        if held:
            self._held.add(account)
        elif account in self._held:
            self._held.discard(account)
            if account in self._held_changed:
                self._held_changed.discard(account)
                self._changed(account)

    def quarantine(self, account: str, reason: str) -> Path | None:
        if not self.layout.account_dir(account).exists():
            return None
        return self.layout.move_to_quarantine(account, reason)

    async def mark_head(self, account: str, state: str) -> None:
        """Mark the backup head; retried until the store takes it (a head left `active` after a
        logout would let an instance restore a dead session)."""
        if self.replica is None:
            return
        replica = self.replica
        delay = RESTORE_RETRY_FIRST_S
        while True:
            try:
                head = await asyncio.to_thread(replica.set_head_state, account, state)
            except (WadaemonError, OSError) as exc:
                if isinstance(exc, (StoreError, OSError)):
                    self._store_failed(exc)
                log.warning(
                    "%s: cannot mark the backup %s yet (%s); retrying in %.0f s",
                    account,
                    state,
                    exc,
                    delay,
                )
                await self._pause(delay)
                delay = min(RESTORE_RETRY_MAX_S, delay * 2)
                if self.stop_event.is_set():
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

    # --- accounts (control socket) -------------------------------------------------------------

    async def resolve(self, account: str, keep: str) -> dict[str, Any]:
        """End a conflict between a local session and its backup head: keep the backup
        (restore the head; the local copy goes to .quarantine/) or keep the local copy (back it
        up as the next generation, on top of the head)."""
        st = self.state.accounts.get(account)
        if st is None or st.state != "conflict":
            state = st.state if st else "unknown"
            raise WadaemonError(f"{account} is not in conflict (it is {state}): nothing to resolve")
        if self.restorer is None:
            raise WadaemonError("backup.target is none: there is no backup to resolve with")
        if keep == "local":
            descent = self.layout.lineage.read(account)
            self.layout.lineage.record(account, ADOPTED, descent.inode)
            self._settle(st)
            st.last_error = ""
            log.warning("%s: conflict resolved: the local session is kept", account)
            result = await self.backup_at_once(account, "conflict resolved: keeping local")
            return {"account": account, "kept": "local", **result}
        if self.supervisor is not None:
            await self.supervisor.pause(account)
        outcome = await self._restore(account, force=True)
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
        known = account in self.state.accounts or self.layout.account_dir(account).exists()
        if not known:
            raise WadaemonError(f"{account}: no such account")
        self._held.add(account)  # no backup of a session being logged out and deleted
        said = "no WhatsApp client (sidecar mode)"
        if self.supervisor is not None:
            said = await self.supervisor.remove(account)
        deleted = 0
        if self.replica is not None:
            try:
                deleted = await asyncio.to_thread(self.replica.remove_account, account)
            except (WadaemonError, OSError) as exc:
                self._held.discard(account)
                raise WadaemonError(
                    f"{account}: cannot delete the backups ({exc}); the local session is kept, "
                    "run the command again once the store answers"
                ) from None
        path = self.layout.account_dir(account)
        if path.exists():
            await asyncio.to_thread(shutil.rmtree, path)
        self.layout.lineage.forget(account)
        self.state.accounts.pop(account, None)
        self._held.discard(account)
        self._pending_records.pop(account, None)  # a late "stopped" must not follow "removed"
        await self._record(account, {"status": "removed", "removedAt": iso_time(time.time())})
        log.warning(
            "%s: removed: %s; %d backup objects and the local session deleted",
            account,
            said,
            deleted,
        )
        return {"account": account, "removed": True, "logout": said, "deleted": deleted}
