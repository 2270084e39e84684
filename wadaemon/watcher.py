"""Watch the sessions directory (inotify through watchfiles) and report which accounts changed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from watchfiles import Change, awatch

from wadaemon.layout import SessionsLayout

log = logging.getLogger(__name__)

GROUP_MS = 200  # longest time watchfiles groups changes before handing them over
QUIET_MS = 20  # handed over once no new change arrived for this long
RESTART_DELAY_S = 1.0


class SessionWatcher:
    def __init__(self, layout: SessionsLayout, on_change: Callable[[str], None]) -> None:
        self.layout = layout
        self.on_change = on_change
        self.running = False
        self.batches = 0

    def _wanted(self, change: Change, path: str) -> bool:
        return self.layout.account_of(path) is not None

    async def run(self, stop: asyncio.Event) -> None:
        """Watch until `stop` is set; restart after errors (the periodic pass covers the gap)."""
        while not stop.is_set():
            try:
                self.layout.root.mkdir(mode=0o700, parents=True, exist_ok=True)
                self.running = True
                async for changes in awatch(
                    self.layout.root,
                    watch_filter=self._wanted,
                    stop_event=stop,
                    debounce=GROUP_MS,
                    step=QUIET_MS,
                    recursive=True,
                    force_polling=False,
                    ignore_permission_denied=True,
                ):
                    self.batches += 1
                    accounts = {self.layout.account_of(p) for _, p in changes}
                    for account in sorted(a for a in accounts if a is not None):
                        self.on_change(account)
            except Exception as exc:
                log.error("watching %s failed: %s; restarting the watcher", self.layout.root, exc)
            finally:
                self.running = False
            if not stop.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), RESTART_DELAY_S)
