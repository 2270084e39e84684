"""What the daemon's parts share: the running configuration, the sessions, the state /health
reports, the metrics, the backup store, and the background tasks with the stop they end with."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from wadaemon.config import Config
from wadaemon.layout import SessionsLayout
from wadaemon.metrics import Metrics
from wadaemon.replica import Replica
from wadaemon.state import DaemonState

if TYPE_CHECKING:
    from wadaemon.lease_ownership import LeaseOwnership


class Runtime:
    def __init__(
        self,
        config: Config,
        layout: SessionsLayout,
        state: DaemonState,
        metrics: Metrics,
        replica: Replica | None,
    ) -> None:
        self.config = config  # replaced by a reload
        self.layout = layout
        self.state = state
        self.metrics = metrics
        self.replica = replica  # None: backup.target is none
        # the account leases (Firestore target with WhatsApp clients); None: this instance
        # drives every account under its sessions directory
        self.ownership: LeaseOwnership | None = None
        self.stop_event = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run `coro` in the background; it is cancelled at the end of the stop."""
        self._tasks = [t for t in self._tasks if not t.done()]
        task = asyncio.create_task(coro, name=name)
        self._tasks.append(task)
        return task

    def track(self, task: asyncio.Task[Any]) -> None:
        """Cancel `task` at the end of the stop too."""
        self._tasks.append(task)

    async def cancel_all(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def sleep(self, seconds: float) -> None:
        """Sleep, but wake when stopping."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.stop_event.wait(), timeout=seconds)

    async def wait_all(self, aws: list[asyncio.Future[Any]], deadline: float) -> None:
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
