"""Is the backup store reachable? Every store call reports how it went; while the store is
unreachable each heartbeat logs the outage (once a minute) and probes it (every ten seconds),
and the waits of the store's retries end early when it answers again."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from wadaemon.errors import WadaemonError
from wadaemon.runtime import Runtime

log = logging.getLogger("wadaemon")

STORE_PROBE_EVERY_S = 10.0
OUTAGE_LOG_EVERY_S = 60.0


class StoreHealth:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self._back = asyncio.Event()  # set (and replaced) when the store answers again
        self._when_back: list[Callable[[], None]] = []
        self._probe: asyncio.Task[None] | None = None
        self._last_outage_log = self._last_probe = 0.0

    def when_back(self, callback: Callable[[], None]) -> None:
        """Call `callback` when the store answers again after an outage."""
        self._when_back.append(callback)

    def failed(self, exc: BaseException) -> None:
        store = self.rt.state.store
        if store.reachable is not False:
            log.error("backup store %s unreachable: %s", store.target, exc)
            store.unreachable_since = time.time()
        store.reachable = False
        store.last_error = str(exc)
        self.rt.metrics.store_errors.inc()

    def ok(self) -> None:
        """The store answered (never called for work that did not ask it)."""
        store = self.rt.state.store
        if store.reachable is False:
            log.info("backup store %s reachable again; catching up", store.target)
            for callback in self._when_back:
                callback()
            self._back.set()
            self._back = asyncio.Event()
        store.reachable = True
        store.last_ok_at = time.time()

    async def pause(self, seconds: float) -> None:
        """Sleep, but wake early when stopping or when the store answers again."""
        waits = [
            asyncio.create_task(self.rt.stop_event.wait()),
            asyncio.create_task(self._back.wait()),
        ]
        await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()

    def watch_from(self, now: float) -> None:
        """The heartbeat starts (monotonic clock): the outage log and the probe count from now."""
        self._last_outage_log = self._last_probe = now

    def beat(self, now: float) -> None:
        """Each heartbeat: while the store is unreachable, log the outage once a minute and
        probe the store."""
        if self.rt.replica is None or self.rt.state.store.reachable:
            return
        if (
            self.rt.state.store.reachable is False
            and now - self._last_outage_log >= OUTAGE_LOG_EVERY_S
        ):
            self._last_outage_log = now
            self._log_outage()
        if now - self._last_probe >= STORE_PROBE_EVERY_S and self._probe is None:
            self._last_probe = now
            self._probe = asyncio.create_task(self._probe_store())

    async def _probe_store(self) -> None:
        """While the store is unreachable: ask it something cheap, to notice its return."""
        assert self.rt.replica is not None
        try:
            await asyncio.to_thread(self.rt.replica.store.list_accounts)
        except (WadaemonError, OSError):
            pass
        else:
            self.ok()
        finally:
            self._probe = None

    def _log_outage(self) -> None:
        store = self.rt.state.store
        since = time.time() - (store.unreachable_since or time.time())
        now = time.monotonic()
        waiting = [a for a in self.rt.state.accounts.values() if a.pending_since is not None]
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
