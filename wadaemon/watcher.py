"""Watch the sessions directory (inotify through watchfiles) and report which accounts changed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from watchfiles import Change, awatch

from wadaemon.layout import SessionsLayout

log = logging.getLogger(__name__)

GROUP_MS = 200  # longest time watchfiles groups changes before handing them over
# handed over once no new change arrived for this long; watchfiles' thread wakes (and takes the
# GIL) this often even when nothing changes: 2.1 ms of CPU a second at 20 ms, 0.6 at 100 ms.
# Backups wait for a quiet second anyway (backup.debounce_seconds).
QUIET_MS = 100
RESTART_DELAY_S = 1.0


class SessionWatcher:
    def __init__(self, layout: SessionsLayout, on_change: Callable[[str], None]) -> None:
        self.layout = layout
        self.on_change = on_change
        self.down_since: float | None = time.monotonic()  # monotonic; None while watching
        self._interrupt = asyncio.Event()
        self._suspended_until = 0.0

    def _wanted(self, change: Change, path: str) -> bool:
        return self.layout.account_of(path) is not None

    def suspend(self, seconds: float) -> None:
        """Stop watching for a while (fault injection for tests of the watchdog)."""
        self._suspended_until = time.monotonic() + seconds
        self._interrupt.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Watch until `stop` is set; restart after errors (the periodic pass covers the gap)."""
        forward = asyncio.create_task(self._forward(stop))
        try:
            while not stop.is_set():
                pause = self._suspended_until - time.monotonic()
                if pause > 0:
                    await self._wait(stop, pause)
                    continue
                self._interrupt.clear()
                try:
                    self.layout.root.mkdir(mode=0o700, parents=True, exist_ok=True)
                    self.down_since = None  # watchfiles subscribes as the loop below starts
                    async for changes in awatch(
                        self.layout.root,
                        watch_filter=self._wanted,
                        stop_event=self._interrupt,
                        debounce=GROUP_MS,
                        step=QUIET_MS,
                        recursive=True,
                        force_polling=False,
                        ignore_permission_denied=True,
                    ):
                        if not changes:
                            continue
                        accounts = {self.layout.account_of(p) for _, p in changes}
                        for account in sorted(a for a in accounts if a is not None):
                            self.on_change(account)
                except Exception as exc:
                    log.error(
                        "watching %s failed: %s; restarting the watcher", self.layout.root, exc
                    )
                if self.down_since is None:
                    self.down_since = time.monotonic()
                if not stop.is_set() and not self._interrupt.is_set():
                    await self._wait(stop, RESTART_DELAY_S)
        finally:
            forward.cancel()

    async def _forward(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._interrupt.set()

    @staticmethod
    async def _wait(stop: asyncio.Event, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)
