"""The daemon's lifecycle, in the manner of uvicorn's Server:

lock the sessions directory → open the control socket → restore phase → watcher, periodic
pass, restore drills → WhatsApp clients (one at a time) → READY=1 → main loop (heartbeat:
watchdog pings gated on health, STATUS) → SIGTERM: STOPPING=1, stop the clients, final backups
of changed accounts, exit 0.
SIGHUP: RELOADING=1, reload what can change live, READY=1.

The parts it composes: `boot_restore` (restores), `account_backups` (which changes are backed
up, and which accounts this instance drives), `store_health`, `account_records`, `drills`, and
`account_actions` (what the control socket and the WhatsApp runners ask of one account).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wadaemon import __version__
from wadaemon.account_actions import AccountActions
from wadaemon.account_backups import AccountBackups
from wadaemon.account_records import AccountRecords
from wadaemon.backup import BackupEngine
from wadaemon.boot_restore import BootRestore
from wadaemon.config import Config, load_config
from wadaemon.control_socket import ControlServer
from wadaemon.drills import Drills
from wadaemon.errors import EXIT_FAILURE, ConfigError, WadaemonError
from wadaemon.health import alive, core_checks, drills_check, heads_check, report, status_line
from wadaemon.key_watch import KEY_FILES_EVERY_S, KeyWatch, key_file_problems
from wadaemon.keyring import Keyring, load_keyring_for
from wadaemon.layout import SessionsLayout
from wadaemon.logs import setup_logging
from wadaemon.metrics import Metrics
from wadaemon.notify import Notifier
from wadaemon.replica import Replica
from wadaemon.restore import Restorer
from wadaemon.runtime import Runtime
from wadaemon.state import AccountState, DaemonState
from wadaemon.store import Store, open_store
from wadaemon.store_health import StoreHealth
from wadaemon.watcher import SessionWatcher
from wadaemon.whatsapp.pairing import Pairing

if TYPE_CHECKING:
    from wadaemon.driven_accounts import DrivenAccounts
    from wadaemon.messaging import Messaging
    from wadaemon.whatsapp.supervisor import Supervisor

log = logging.getLogger("wadaemon")

HEARTBEAT_S = 0.5
STATUS_EVERY_S = 2.0
FAULTS_ENV = "WADAEMON_FAULTS"  # "1" enables POST /debug/hang/{loop,watcher,backup} (tests only)


def keyring_for(config: Config) -> Keyring | None:
    return None if config.backup.target == "none" else load_keyring_for(config)


class Daemon:
    def __init__(self, config: Config, keyring: Keyring | None) -> None:
        layout = SessionsLayout(config.sessions_path)
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
            self.engine = BackupEngine(layout, self.replica)
            self.restorer = Restorer(layout, self.replica)
        target = store.describe() if store else "none"
        state = DaemonState(__version__, target)
        state.store.target = target
        self.rt = Runtime(config, layout, state, Metrics(state), self.replica)
        self.layout, self.state, self.metrics = layout, state, self.rt.metrics
        counters = getattr(store, "counters", None)
        if counters is not None:
            self.metrics.count_store_operations(counters)
        self.stop_event = self.rt.stop_event
        self.notifier = Notifier()
        self.faults_enabled = os.environ.get(FAULTS_ENV) == "1"
        self._lock_fd: int | None = None
        self._key_files_check: asyncio.Task[None] | None = None
        self._last_ping_ok = True
        self.supervisor: Supervisor | None = None
        if config.whatsapp.enabled:
            from wadaemon.whatsapp.supervisor import Supervisor

            self.supervisor = Supervisor(self, config.whatsapp)
        rt, supervisor = self.rt, self.supervisor
        self.store_health = StoreHealth(rt)
        self.records = AccountRecords(rt)
        self.backups = AccountBackups(rt, self.engine, self.store_health, self.records, supervisor)
        self.restores = BootRestore(
            rt, self.restorer, self.keys, self.store_health, self.records, self.backups, supervisor
        )
        self.drills = Drills(rt, self.backups)
        self.actions = AccountActions(
            rt, self.store_health, self.records, self.backups, self.restores, supervisor
        )
        self.driving: DrivenAccounts | None = None
        if config.backup.target == "firestore" and supervisor is not None:
            self.driving = self._leases(store)
        self.messaging: Messaging | None = None
        if config.messages.enabled and supervisor is not None:
            self.messaging = self._messaging(store, supervisor)
        self.watcher = SessionWatcher(layout, self.backups.changed)
        self.control = ControlServer(config.socket_path, self, faults=self.faults_enabled)

    @property
    def config(self) -> Config:
        return self.rt.config

    def _leases(self, store: Store | None) -> DrivenAccounts:
        """With Firestore and WhatsApp clients, accounts are shared with the other instances
        that use the same project: this one drives only those whose lease it holds."""
        # imported here, as the store itself: only this target needs the Google client library
        from wadaemon.driven_accounts import DrivenAccounts
        from wadaemon.lease_ownership import LeaseOwnership, process_name
        from wadaemon.store.firestore import FirestoreStore
        from wadaemon.store.firestore_leases import FirestoreLeases

        assert isinstance(store, FirestoreStore) and self.replica is not None
        config, rt = self.config, self.rt
        instance = config.instance.id
        leases = FirestoreLeases(store, instance, process_name(instance), config.leases.ttl_seconds)
        driving = DrivenAccounts(rt, self.backups, self.restores, self.supervisor)
        ownership = LeaseOwnership(
            leases, config, driving, lambda event: rt.metrics.lease_events.labels(event).inc()
        )
        driving.ownership = rt.ownership = ownership
        self.replica.fence = ownership.token
        self.state.leased, self.state.instance = True, instance
        return driving

    def _messaging(self, store: Store | None, supervisor: Supervisor) -> Messaging:
        """Messages in and out of the accounts this instance drives (the clients' events and
        the outbox)."""
        from wadaemon.lease_ownership import process_name
        from wadaemon.messaging import Messaging

        metrics = self.metrics

        def counted(account: str, event: str, n: int) -> None:
            metrics.messages.labels(account, event).inc(n)

        messaging = Messaging(
            self.config,
            store,
            supervisor,
            process_name(self.config.instance.id),
            keyring=self.replica.keyring if self.replica is not None else None,
            local_accounts=self.layout.local_accounts,
            leased=self.driving is not None,
            counted=counted,
        )
        metrics.count_messages(messaging.gauges)
        return messaging

    # --- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, sig.name)
        loop.add_signal_handler(signal.SIGHUP, lambda: self.rt.spawn(self.reload(), "reload"))
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
            self.restores.shutdown()

    async def _serve(self) -> int:
        self.rt.spawn(self._heartbeat(), "heartbeat")
        if self.driving is not None:
            log.info(
                "leases: instance %s shares the accounts of %s with the other instances",
                self.config.instance.id,
                self.state.target,
            )
            self.rt.spawn(self.driving.start(), "take-leases")
            await self._wait_leases()
        if self.restorer and self.config.restore.on_boot:
            self.state.phase = "restoring"
            self.notifier.status(status_line(self.state))
            await self.restores.phase()
        elif self.keys is not None:
            self.rt.spawn(self.restores.read_boot_heads(None), "boot-heads")
        if self.engine:
            self.rt.spawn(self.watcher.run(self.stop_event), "watcher")
            self.rt.spawn(self.backups.periodic(), "periodic")
            await asyncio.sleep(0.1)  # let the watcher subscribe before the first pass
            self.backups.sweep("startup", force=True)
            self.rt.spawn(self.drills.run(), "drills")
        else:
            self.watcher.down_since = None
        if self.driving is not None:
            self.driving.booted()
        if self.messaging is not None:
            self.rt.spawn(self.messaging.run(), "messages")
        if self.supervisor is not None and not self.stop_event.is_set():
            self.supervisor.start(self.restores.restored_accounts())
        if not self.stop_event.is_set():
            self.state.phase = "running"
            log.info("ready: %s", status_line(self.state))
            self.notifier.ready(status_line(self.state))
        await self.stop_event.wait()
        return await self._stop()

    async def _stop(self) -> int:
        """The stop, step by step. A step that fails unexpectedly (a bug) is logged with its
        traceback and the others still run: the hand-overs, the final backups, the pending
        records and the store's last writes do not depend on one another. The exit status then
        says the stop failed."""
        self.state.phase = "stopping"
        self.notifier.stopping()
        self.notifier.status(status_line(self.state))
        failed: list[str] = []

        async def step(what: str, run: Callable[[], Awaitable[object]]) -> None:
            try:
                await run()
            except asyncio.CancelledError:
                task = asyncio.current_task()
                # Python 3.10 has no Task.cancelling() to tell a stray CancelledError from a
                # cancellation of the stop itself: there the stop goes on (its final backups
                # matter more; systemd's TimeoutStopSec ends a stop that hangs)
                cancelling = getattr(task, "cancelling", None)
                if cancelling is not None and cancelling():
                    raise  # this task itself is cancelled
                log.error("stopping: %s was cancelled; the stop goes on", what, exc_info=True)
                failed.append(what)
            except Exception:
                log.exception("stopping: %s failed; the stop goes on", what)
                failed.append(what)

        async def final_sweep() -> None:
            log.info("stopping: final backups of changed accounts")
            if self.engine is not None:
                # Changes the watcher has not reported (it stops with the signal, and may have
                # missed some): compared with the fingerprints, a clean account costs a stat per
                # file.
                self.backups.sweep("final")

        async def close_store() -> None:
            if self.replica is not None:
                try:
                    await asyncio.to_thread(self.replica.store.close)
                except (WadaemonError, OSError) as exc:
                    log.warning("cannot write the pending account records: %s", exc)

        if self.messaging is not None:
            # sends in flight finish, none starts
            await step("stopping the sends", self.messaging.stop_sending)
        if self.rt.ownership is not None:
            # each account: client stopped, last backup, released
            await step("handing the accounts over", self.rt.ownership.stop)
        if self.supervisor is not None:
            await step("stopping the clients", self.supervisor.stop)
        if self.messaging is not None:
            # what the journal holds goes to the store
            await step("writing the waiting messages", self.messaging.close)
        await step("the final pass", final_sweep)
        await step("the final backups", self.backups.scheduler.flush)
        await step("writing the account records", self.records.flush)
        await step("closing the store", close_store)
        await step("ending the background tasks", self.rt.cancel_all)
        if failed:
            log.error("stopped, but the stop went wrong in: %s (see above)", "; ".join(failed))
            return EXIT_FAILURE
        log.info("stopped")
        return 0

    async def _wait_leases(self) -> None:
        """The first leases, for at most restore.timeout_seconds (the store may be down)."""
        assert self.driving is not None
        started = asyncio.ensure_future(self.driving.started.wait())
        loop = asyncio.get_running_loop()
        await self.rt.wait_all([started], loop.time() + self.config.restore.timeout_seconds)
        started.cancel()

    def request_stop(self, why: str = "request") -> None:
        if not self.stop_event.is_set():
            log.info("received %s", why)
            self.stop_event.set()

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
        last_key_files = time.monotonic()
        self.store_health.watch_from(last_key_files)
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
                if self.driving is not None:
                    self.driving.sync()
                self.notifier.status(status_line(self.state))
                last_status = now
            self.store_health.beat(now)

    async def _check_key_files(self) -> None:
        """Has a key file been deleted, made unreadable or overwritten (the `keys` check)?"""
        if self.keys is not None:
            files = self.keys.files
            problems = await asyncio.to_thread(key_file_problems, files)
            self.keys.files_checked(files, problems)

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
        self.backups.scheduler.debounce = new.backup.debounce_seconds
        if self.replica is not None and keyring is not None:
            self.replica.keep_generations = new.backup.keep_generations
            if keyring.current.key_id != self.replica.keyring.current.key_id:
                log.info("reload: new encryption key %s", keyring.current.key_id)
            self.replica.keyring = keyring
            if self.keys is not None:
                self.keys.reload(new, keyring)
                self.rt.spawn(self._check_key_files(), "key-files")
        self.rt.config = new  # what every part reads from now on
        log.info("reload: done")

    # --- control socket API (ControlApi) -----------------------------------------------------

    def health(self) -> tuple[int, dict[str, Any]]:
        if self.driving is not None:
            self.driving.sync()
        messages = self.messaging.check() if self.messaging is not None else None
        if self.replica is None:
            return report(self.state, self.core(), messages=messages)
        return report(
            self.state,
            self.core(),
            self.keys.check() if self.keys else None,
            heads_check(dict(self.replica.head_problems)),
            drills_check(self.state, self.config.verify.interval_hours),
            messages,
        )

    def metrics_text(self) -> bytes:
        return self.metrics.render()

    def accounts(self) -> list[dict[str, Any]]:
        _, body = self.health()
        return [{"account": name, **info} for name, info in body["accounts"].items()]

    async def inject_fault(self, part: str, seconds: float) -> dict[str, Any]:
        if part == "loop":
            asyncio.get_running_loop().call_later(0.1, time.sleep, seconds)
        elif part == "watcher":
            self.watcher.suspend(seconds)
        elif part == "backup":
            self.backups.hang(seconds)
        else:
            return {"error": f"unknown part {part!r}: loop, watcher or backup"}
        log.warning("fault injected: %s hangs for %.0f s", part, seconds)
        return {"part": part, "seconds": seconds}

    async def backup_now(self, account: str) -> dict[str, Any]:
        return await self.actions.backup_now(account)

    async def verify(self, account: str) -> dict[str, Any]:
        return await self.actions.verify(account)

    async def resolve(self, account: str, keep: str) -> dict[str, Any]:
        return await self.actions.resolve(account, keep)

    async def pair(self, account: str, phone: str | None) -> Pairing:
        if self.rt.ownership is not None:
            await self.rt.ownership.claim(account)  # before its client starts
        return self.actions.pair(account, phone)

    async def move(self, account: str, to: str) -> dict[str, Any]:
        if self.rt.ownership is None:
            raise WadaemonError(
                "accounts move needs leases: they exist with backup.target firestore and "
                "whatsapp.enabled true, where several instances share the accounts; this "
                "instance drives every account under its sessions directory"
            )
        return await self.rt.ownership.move(account, to)

    async def remove(self, account: str) -> dict[str, Any]:
        return await self.actions.remove(account)

    # --- what the WhatsApp account runners ask of the daemon (RunnerHost) ---------------------

    def account_state(self, account: str) -> AccountState:
        return self.state.account(account)

    def account_dir(self, account: str) -> Path:
        return self.layout.account_dir(account)

    def can_restore(self) -> bool:
        return self.restorer is not None

    async def restore_missing(self, account: str) -> tuple[str, str]:
        outcome = await self.restores.restore(account)
        return outcome.status, outcome.line()

    async def backup_at_once(self, account: str, why: str) -> dict[str, Any]:
        return await self.backups.backup_at_once(account, why)

    def hold_backups(self, account: str, held: bool) -> None:
        self.backups.hold_backups(account, held)

    def quarantine(self, account: str, reason: str) -> Path | None:
        return self.actions.quarantine(account, reason)

    async def mark_head(self, account: str, state: str) -> None:
        await self.actions.mark_head(account, state)

    def record(self, account: str, fields: dict[str, object]) -> None:
        self.records.record(account, fields)

    def message_event(self, account: str, event: Any) -> None:
        if self.messaging is not None:
            self.messaging.message_event(account, event)

    def stream_replaced(self, account: str) -> None:
        if self.rt.ownership is not None:
            self.rt.spawn(self.rt.ownership.check(account), f"check-lease-{account}")
