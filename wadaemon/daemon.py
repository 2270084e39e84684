"""The daemon's lifecycle: prepare, restore, watch and back up, shut down with final backups."""

from __future__ import annotations

import asyncio
import logging
import signal
from concurrent.futures import ThreadPoolExecutor

from wadaemon import __version__
from wadaemon.backup import BackupEngine
from wadaemon.backup_scheduler import BackupScheduler
from wadaemon.config import Config
from wadaemon.errors import WadaemonError
from wadaemon.keyring import Keyring
from wadaemon.layout import SessionsLayout
from wadaemon.replica import Replica
from wadaemon.restore import RestoreOutcome, Restorer
from wadaemon.store import open_store
from wadaemon.watcher import SessionWatcher

log = logging.getLogger("wadaemon")

MAX_CONCURRENT_BACKUPS = 4


class Daemon:
    def __init__(self, config: Config, keyring: Keyring | None) -> None:
        self.config = config
        self.layout = SessionsLayout(config.sessions_path)
        store = open_store(config)
        self.replica: Replica | None = None
        self.engine: BackupEngine | None = None
        self.restorer: Restorer | None = None
        if store is not None:
            if keyring is None:
                raise WadaemonError("a backup target is configured but no key is loaded")
            self.replica = Replica(store, keyring, config.backup.keep_generations)
            self.engine = BackupEngine(self.layout, self.replica)
            self.restorer = Restorer(self.layout, self.replica)
        self.stop_event = asyncio.Event()
        self._lock_fd: int | None = None
        self._restore_pool = ThreadPoolExecutor(
            max_workers=config.restore.parallelism, thread_name_prefix="restore"
        )
        self._backup_slots = asyncio.Semaphore(MAX_CONCURRENT_BACKUPS)
        self.scheduler = BackupScheduler(self._backup, config.backup.debounce_seconds)
        self.watcher = SessionWatcher(self.layout, self.scheduler.touch)

    # --- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, sig.name)
        self._lock_fd = self.layout.lock()
        self.layout.prepare()
        target = self.replica.store.describe() if self.replica else "none (local sessions only)"
        log.info(
            "wadaemon %s starting: sessions %s, backup target %s",
            __version__,
            self.layout.root,
            target,
        )
        if self.config.whatsapp.enabled:
            log.warning(
                "whatsapp.enabled is true, but this version does not run WhatsApp clients yet; "
                "protecting the session directories only (sidecar mode)"
            )
        if self.restorer and self.config.restore.on_boot:
            await self._restore_phase()
        tasks: list[asyncio.Task[None]] = []
        if self.engine:
            tasks.append(asyncio.create_task(self.watcher.run(self.stop_event), name="watcher"))
            tasks.append(asyncio.create_task(self._periodic(), name="periodic"))
            await asyncio.sleep(0.1)  # let the watcher subscribe before the first pass
            self._pass("startup")
        log.info("ready: %d accounts", len(self.layout.local_accounts()))
        await self.stop_event.wait()
        log.info("stopping: final backups of changed accounts")
        for task in tasks:
            if task.get_name() == "periodic":
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.scheduler.flush()
        self._restore_pool.shutdown(wait=False, cancel_futures=True)
        log.info("stopped")
        return 0

    def request_stop(self, why: str = "request") -> None:
        if not self.stop_event.is_set():
            log.info("received %s", why)
            self.stop_event.set()

    # --- restore phase -----------------------------------------------------------------------

    async def _restore_phase(self) -> None:
        assert self.restorer is not None and self.replica is not None
        accounts = set(self.layout.local_accounts())
        try:
            accounts.update(self.replica.store.list_accounts())
        except WadaemonError as exc:
            log.error("cannot list the backed-up accounts (%s); checking local ones only", exc)
        if not accounts:
            log.info("restore: no accounts, locally or in the backup")
            return
        loop = asyncio.get_running_loop()
        futures = {
            loop.run_in_executor(self._restore_pool, self.restorer.restore_account, a): a
            for a in sorted(accounts)
        }
        for fut in futures:
            fut.add_done_callback(self._log_restore)
        timeout = self.config.restore.timeout_seconds
        done, pending = await asyncio.wait(futures, timeout=timeout)
        restored = sum(1 for f in done if not f.exception() and f.result().status == "restored")
        failed = sum(1 for f in done if f.exception() or not f.result().ok)
        if pending:
            log.warning(
                "restore: %d accounts still restoring after %.0f s (restore.timeout_seconds); "
                "continuing, they finish in the background: %s",
                len(pending),
                timeout,
                ", ".join(sorted(futures[f] for f in pending)),
            )
        log.info(
            "restore: %d accounts checked, %d restored, %d failed", len(done), restored, failed
        )

    @staticmethod
    def _log_restore(fut: asyncio.Future[RestoreOutcome]) -> None:
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            log.error("restore failed unexpectedly: %r", exc)
            return
        outcome = fut.result()
        level = logging.INFO if outcome.ok else logging.ERROR
        log.log(level, "restore: %s", outcome.line())

    # --- backups -----------------------------------------------------------------------------

    def _pass(self, why: str) -> None:
        accounts = self.layout.local_accounts()
        log.debug("%s pass over %d accounts", why, len(accounts))
        for account in accounts:
            self.scheduler.touch(account)

    async def _periodic(self) -> None:
        while True:
            await asyncio.sleep(self.config.backup.interval_seconds)
            self._pass("periodic")

    async def _backup(self, account: str) -> bool:
        assert self.engine is not None
        async with self._backup_slots:
            try:
                result = await asyncio.to_thread(self.engine.backup, account)
            except (WadaemonError, OSError) as exc:
                log.error("%s: backup failed: %s", account, exc)
                return False
            except Exception:
                log.exception("%s: backup failed unexpectedly", account)
                return False
        for warning in result.warnings:
            log.warning("%s: %s", account, warning)
        if result.status == "created":
            log.info("backup: %s", result.line())
        elif result.status == "skipped":
            log.warning("backup: %s", result.line())
        else:
            log.debug("backup: %s", result.line())
        return True
