"""One pairing in progress: what `wadaemon accounts add` shows while the user scans or types.

The account runner publishes updates (the client starting, a new QR code, the phone pairing
code, the phone linked, the end); the control socket streams them to the command as JSON lines.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any


class Pairing:
    def __init__(self, account: str, phone: str | None, timeout: float) -> None:
        self.account = account
        self.phone = phone
        self.deadline = time.monotonic() + timeout
        self.code_requested = False
        self.paired = False
        self._updates: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._result: dict[str, Any] | None = None
        self.on_cancel: Callable[[], None] | None = None

    def cancel(self) -> None:
        """The user went away (closed the command): end the pairing."""
        if self._result is None and self.on_cancel is not None:
            self.on_cancel()

    @property
    def finished(self) -> bool:
        return self._result is not None

    def update(self, event: str, **fields: Any) -> None:
        if self._result is None:
            self._updates.put_nowait({"event": event, **fields})

    def finish(self, event: str, **fields: Any) -> None:
        """The last update: `paired` or `failed` (with an error naming the cause and the fix)."""
        if self._result is None:
            self._result = {"event": event, **fields}
            self._updates.put_nowait(self._result)

    async def updates(self) -> AsyncIterator[dict[str, Any]]:
        while True:
            item = await self._updates.get()
            yield item
            if item is self._result:
                return
