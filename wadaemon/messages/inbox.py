"""Every message change of every driven account: journal first, then the store, then readers.

    event callback -> convert -> Journal.put (durable when it returns)
    flusher        -> the journal's oldest entries, up to BATCH, in one store write
                   -> removed from the journal once written
                   -> what was new goes to the readers (the event stream, the webhooks)

The store is written in batches, so its round trips do not bound the rate: BATCH changes per
write, or the store's own `write_batch` when it has one (Firestore's, larger: its cost is more
per call than per document). While it cannot be reached the flusher backs off (1 s doubling to
30 s) and the entries wait in the journal; the `messages` health check says so, and fails once
the journal passes messages.queue_max_mb.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence

from wadaemon.errors import WadaemonError
from wadaemon.messages.journal import Journal, JournalError
from wadaemon.messages.model import Change, Message
from wadaemon.messages.store import MessageStore

log = logging.getLogger("wadaemon.messages")

BATCH = 500
RETRY_FIRST_S = 1.0
RETRY_MAX_S = 30.0
SYNC_EVERY_S = 1.0

Readers = Callable[[Sequence[Change]], None]


class Inbox:
    def __init__(
        self,
        journal: Journal,
        store: MessageStore | None = None,
        *,
        max_bytes: int,
        readers: Readers | None = None,
        counted: Callable[[str, str, int], None] | None = None,
    ) -> None:
        self.journal = journal
        self.store = store
        self.max_bytes = max_bytes
        self.readers = readers
        self._count = counted or (lambda account, what, n: None)
        self._wake = asyncio.Event()
        self.down_since: float | None = None  # the store failed since (monotonic)
        self.last_error = ""
        self.journal_error = ""
        self._stopping = False

    # --- in: from the event callbacks, on the loop ----------------------------------------------

    def add(self, changes: Sequence[Change]) -> None:
        """Changes of a driven account (from its client's events): durable when this returns."""
        try:
            self.journal.put(changes)
        except JournalError as exc:
            # nothing else can keep it: say so loudly, once per cause
            if str(exc) != self.journal_error:
                log.error("%s; these messages are not stored", exc)
            self.journal_error = str(exc)
            for c in changes:
                self._count(c.account, "lost", 1)
            return
        if self.journal_error:
            log.info("the message journal takes messages again")
            self.journal_error = ""
        for c in changes:
            if isinstance(c, Message):
                self._count(c.account, "received", 1)
        self._wake.set()

    # --- out: to the store ------------------------------------------------------------------------

    async def run(self) -> None:
        delay = RETRY_FIRST_S
        last_sync = time.monotonic()
        while not self._stopping:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=SYNC_EVERY_S)
            self._wake.clear()
            while not self._stopping:
                try:
                    moved = await self.flush_once()
                except (WadaemonError, OSError) as exc:
                    self._failed(exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX_S)
                    continue
                delay = RETRY_FIRST_S
                if not moved:
                    break
            if time.monotonic() - last_sync >= SYNC_EVERY_S:
                last_sync = time.monotonic()
                await asyncio.to_thread(self.journal.sync)

    async def flush_once(self) -> int:
        """Move one batch from the journal to the store; the number of entries moved."""
        batch = int(getattr(self.store, "write_batch", BATCH))
        entries = await asyncio.to_thread(self.journal.oldest, batch)
        if not entries:
            return 0
        changes = [e.change for e in entries]
        assert self.store is not None, "flushing before the store is open"
        result = await asyncio.to_thread(self.store.write, changes)
        await asyncio.to_thread(self.journal.remove_through, entries[-1].seq)
        if self.down_since is not None:
            log.info(
                "message store %s reachable again; %d waiting changes written",
                self._describe(),
                len(entries),
            )
            self.down_since = None
            self.last_error = ""
        new = result.new if result.new is not None else changes
        by_account: dict[str, int] = {}
        for c in new:
            if isinstance(c, Message):
                by_account[c.account] = by_account.get(c.account, 0) + 1
        for account, n in by_account.items():
            self._count(account, "stored", n)
        if self.readers is not None and new:
            try:
                self.readers(new)
            except Exception:  # a reader's fault must not stop storing
                log.exception("passing stored messages on failed")
        return len(entries)

    def _failed(self, exc: BaseException) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
            log.warning(
                "cannot write messages to %s: %s; they wait in the journal %s and are written "
                "when it answers",
                self._describe(),
                exc,
                self.journal.path,
            )
        self.last_error = str(exc)

    def _describe(self) -> str:
        return self.store.describe() if self.store is not None else "the message store"

    async def drain(self, timeout: float) -> None:
        """On stop: write what waits, for at most `timeout` (the rest stays in the journal)."""
        self._stopping = True
        self._wake.set()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if not await asyncio.wait_for(self.flush_once(), deadline - time.monotonic()):
                    break
            except (WadaemonError, OSError, asyncio.TimeoutError):
                break
        await asyncio.to_thread(self.journal.sync)

    # --- seen from outside --------------------------------------------------------------------

    def check(self) -> tuple[str, str]:
        """(status, detail) for the `messages` health check."""
        waiting = self.journal.bytes
        if self.journal_error:
            return "failing", self.journal_error
        if waiting > self.max_bytes:
            return "failing", (
                f"{waiting // 2**20} MiB of messages wait in {self.journal.path}, more than "
                f"messages.queue_max_mb ({self.max_bytes // 2**20}): the store "
                f"{self._describe()} is not taking them ({self.last_error or 'slow'})"
            )
        if self.down_since is not None:
            return "degraded", (
                f"the message store cannot be written for {time.monotonic() - self.down_since:.0f}"
                f" s ({self.last_error}); messages wait in {self.journal.path}"
            )
        return "ok", "messages are stored as they arrive"
