"""The outbox: messages to send, from the control socket, the CLI and Firestore, in one queue.

    queued -> sending -> sent     (WhatsApp's id and timestamp)
                      -> failed   (the reason: invalid number, not on WhatsApp, logged out, or
                                   transient failures past messages.send_attempts)
                      -> unknown  (it may or may not have been sent)
                      -> queued   (a transient failure: again after a backoff with jitter)

An entry is claimed by a compare-and-swap on its state before the send call, with this daemon
run's name in `process`, so two senders never send one entry. neonize cannot send with a chosen
message id, so a send that might have reached WhatsApp is never repeated on its own: an entry
found `sending` by another process (this daemon crashed, or another instance lost the account's
lease mid-send) and a send whose acknowledgement timed out become `unknown`, unless the entry
asks for `resend`. Only accounts this instance drives, connected, are sent for; each account
sends one entry at a time, at least messages.send_gap_seconds apart, and at most
messages.per_recipient_per_hour to one recipient (fast bulk sending gets numbers banned).

Entries are kept in memory between reads: the store is listed when an account starts being
driven here and every RELIST_S as a safety net, and otherwise followed through its listener
(Firestore) or this daemon's own writes; nothing is polled in a tight loop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from wadaemon.config import MessagesConfig
from wadaemon.errors import WadaemonError
from wadaemon.messages.store import (
    FINAL_STATES,
    OutboxConflict,
    OutboxEntry,
    OutboxStore,
    check_entry,
    invalid_reason,
)
from wadaemon.whatsapp.client import SendFailed, Sent

log = logging.getLogger("wadaemon.outbox")

RELIST_S = 300.0  # a safety net: the listener (or this daemon's own writes) tells the rest
LOOK_EVERY_S = 2.0  # accounts that became ready to send (connected, driven here), in memory
RETRY_FIRST_S = 2.0
RETRY_MAX_S = 300.0
STATE_WRITE_RETRY_S = 2.0
HOUR = 3600.0


class SenderHost(Protocol):
    def driven_accounts(self) -> set[str]:
        """The accounts this instance drives (with leases: holds)."""
        ...

    def send_ready(self, account: str) -> str | None:
        """None: the account is driven here and connected; "wait: why" to wait; anything else
        is why it can never send (logged out)."""
        ...

    async def send_text(self, account: str, to: str, text: str, reply_to: str) -> Sent: ...

    def sent(self, entry: OutboxEntry, sent: Sent) -> None:
        """A message went out: store it as the account's own message (receipts find it)."""
        ...

    def outbox_changed(self, entry: OutboxEntry) -> None:
        """An entry reached a new state (for the event stream and webhooks)."""
        ...


class Pace:
    """The least gap between two sends of one account, and a cap per recipient and hour."""

    def __init__(self, gap: float, per_recipient: int) -> None:
        self.gap = gap
        self.per_recipient = per_recipient
        self._last: dict[str, float] = {}
        self._recent: dict[tuple[str, str], collections.deque[float]] = {}

    def wait(self, account: str, to: str, now: float) -> float:
        """Seconds until this account may send to `to` (0: now)."""
        wait = self._last.get(account, -1e18) + self.gap - now
        recent = self._recent.get((account, to))
        if recent:
            while recent and recent[0] <= now - HOUR:
                recent.popleft()
            if len(recent) >= self.per_recipient:
                wait = max(wait, recent[0] + HOUR - now)
        return max(0.0, wait)

    def record(self, account: str, to: str, now: float) -> None:
        self._last[account] = now
        self._recent.setdefault((account, to), collections.deque()).append(now)


class Outbox:
    def __init__(
        self,
        store: OutboxStore,
        config: MessagesConfig,
        process: str,
        host: SenderHost,
        counted: Callable[[str, str], None] | None = None,
    ) -> None:
        self.store = store
        self.config = config
        self.process = process
        self.host = host
        self.pace = Pace(config.send_gap_seconds, config.per_recipient_per_hour)
        self._count = counted or (lambda account, what: None)
        self._entries: dict[str, OutboxEntry] = {}  # queued and sending, by key
        self._sending: set[str] = set()  # accounts with a send in flight
        self._recovered: set[str] = set()  # accounts whose leftovers were looked at
        self._wake = asyncio.Event()
        self._stopping = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.listed_at = 0.0

    # --- entries in ----------------------------------------------------------------------------

    async def submit(self, entry: OutboxEntry) -> tuple[OutboxEntry, bool]:
        """A new entry from the control socket or the CLI (the same key twice: one entry)."""
        check_entry(entry)
        now = time.time()
        entry = OutboxEntry(**{**entry.to_json(), "created_at": now, "updated_at": now})
        stored, created = await asyncio.to_thread(self.store.add, entry)
        if created:
            log.info("%s: outbox %s queued (to %s)", stored.account, stored.key, stored.to)
            self._seen(stored)
        return stored, created

    async def get(self, key: str) -> OutboxEntry | None:
        return await asyncio.to_thread(self.store.get, key)

    def _seen(self, entry: OutboxEntry) -> None:
        if entry.state in FINAL_STATES:
            self._entries.pop(entry.key, None)
        else:
            self._entries[entry.key] = entry
        self._wake.set()

    def _seen_threadsafe(self, entry: OutboxEntry) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._seen, entry)

    def wake(self) -> None:
        """Accounts were connected or started being driven here: look again."""
        self._wake.set()

    # --- the loop ------------------------------------------------------------------------------

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        unwatch = await self._watch()
        try:
            while not self._stopping:
                now = time.time()
                if time.monotonic() - self.listed_at >= RELIST_S or self._new_accounts():
                    await self._list()
                delay = self._start_due(now)
                self._wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=min(delay, LOOK_EVERY_S))
        finally:
            unwatch()

    async def _watch(self) -> Callable[[], None]:
        try:
            return await asyncio.to_thread(self.store.watch, self._seen_threadsafe)
        except (WadaemonError, OSError) as exc:
            log.warning("outbox: cannot listen for new entries (%s); listing them instead", exc)
            return lambda: None

    def _ready(self, accounts: set[str]) -> set[str]:
        return {a for a in accounts if self.host.send_ready(a) is None}

    def _new_accounts(self) -> bool:
        driven = self.host.driven_accounts()
        self._recovered &= driven  # an account driven elsewhere meanwhile is looked at again
        return bool(self._ready(driven) - self._recovered)

    async def _list(self) -> None:
        accounts = self.host.driven_accounts()
        try:
            entries = await asyncio.to_thread(self.store.pending, accounts)
        except (WadaemonError, OSError) as exc:
            log.warning("outbox: cannot list pending entries: %s", exc)
            self.listed_at = time.monotonic() - RELIST_S + 5.0  # again in 5 s
            return
        self.listed_at = time.monotonic()
        for entry in entries:
            self._entries[entry.key] = entry
        for account in accounts - self._recovered:
            if self.host.send_ready(account) is None:
                await self._recover(account)

    async def _recover(self, account: str) -> None:
        """Entries left `sending` by another process: that process is gone (or lost the
        account): it may or may not have sent them."""
        self._recovered.add(account)
        for entry in list(self._entries.values()):
            if entry.account != account or entry.state != "sending":
                continue
            if entry.process == self.process:
                continue
            if entry.resend:
                why = f"{entry.process} stopped while sending it; sent again (resend is set)"
                await self._move(entry, "sending", state="queued", reason=why, next_at=0.0)
            else:
                why = (
                    f"{entry.process} stopped while sending it: it may or may not have reached "
                    "WhatsApp; set resend: true on the entry to send it again"
                )
                await self._move(entry, "sending", state="unknown", reason=why)

    def _start_due(self, now: float) -> float:
        """Start the sends that are due; seconds until the next one may be."""
        delay = RELIST_S
        for entry in sorted(self._entries.values(), key=lambda e: e.created_at):
            if entry.state != "queued" or entry.account in self._sending:
                continue
            ready = self.host.send_ready(entry.account)
            if ready is not None:
                if not ready.startswith("wait"):
                    self._sending.add(entry.account)
                    self._spawn(self._fail(entry, ready))
                continue
            if entry.account not in self._recovered:
                continue
            problem = _invalid(entry)
            wait = max(entry.next_at - now, self.pace.wait(entry.account, entry.to, now))
            if problem is None and wait > 0:
                delay = min(delay, wait)
                continue
            self._sending.add(entry.account)
            self._spawn(self._fail(entry, problem) if problem else self._send(entry))
        return max(delay, 0.05)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- one entry -----------------------------------------------------------------------------

    async def _fail(self, entry: OutboxEntry, why: str) -> None:
        try:
            await self._move(entry, "queued", state="failed", reason=why)
        finally:
            self._sending.discard(entry.account)
            self._wake.set()

    async def _send(self, entry: OutboxEntry) -> None:
        try:
            claimed = await self._move(
                entry, "queued", state="sending", process=self.process, attempts=entry.attempts + 1
            )
            if claimed is None:
                return
            self.pace.record(entry.account, entry.to, time.time())
            try:
                to = claimed.to.strip().lstrip("+").replace(" ", "").replace("-", "")
                sent = await self.host.send_text(
                    claimed.account, to, claimed.text, claimed.reply_to
                )
            except SendFailed as exc:
                await self._after_failure(claimed, exc)
                return
            log.info("%s: outbox %s sent (WhatsApp id %s)", claimed.account, claimed.key, sent.id)
            self._count(claimed.account, "sent")
            self.host.sent(claimed, sent)
            await self._move(
                claimed, "sending", must=True, state="sent", wa_id=sent.id, sent_at=sent.timestamp
            )
        finally:
            self._sending.discard(entry.account)
            self._wake.set()

    async def _after_failure(self, entry: OutboxEntry, exc: SendFailed) -> None:
        if exc.kind == "transient" and entry.attempts < self.config.send_attempts:
            backoff = min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** (entry.attempts - 1))
            wait = random.uniform(backoff / 2, backoff)
            log.warning(
                "%s: outbox %s: attempt %d failed (%s); again in %.0f s",
                entry.account,
                entry.key,
                entry.attempts,
                exc,
                wait,
            )
            await self._move(
                entry,
                "sending",
                must=True,
                state="queued",
                reason=str(exc),
                next_at=time.time() + wait,
            )
        elif exc.kind == "ambiguous" and not entry.resend:
            why = f"{exc}: it may or may not have reached WhatsApp; set resend: true to send again"
            await self._move(entry, "sending", must=True, state="unknown", reason=why)
        elif exc.kind == "ambiguous":
            await self._move(entry, "sending", must=True, state="queued", reason=str(exc))
        else:
            if exc.kind == "transient":
                exc = SendFailed(f"{exc} (after {entry.attempts} attempts)", "permanent")
            await self._move(entry, "sending", must=True, state="failed", reason=str(exc))

    async def _move(
        self, entry: OutboxEntry, expected: str, *, must: bool = False, **fields: object
    ) -> OutboxEntry | None:
        """Compare-and-swap the entry into its next state; None if someone else moved it.
        `must`: this process holds the entry (it is `sending` here): retry until written."""
        new = entry.moved(**fields)
        while True:
            try:
                stored = await asyncio.to_thread(self.store.update, new, expected, entry.updated_at)
            except OutboxConflict as exc:
                log.info("%s: outbox %s changed meanwhile (%s)", entry.account, entry.key, exc)
                current = await asyncio.to_thread(self.store.get, entry.key)
                if current is not None:
                    self._seen(current)
                return None
            except (WadaemonError, OSError) as exc:
                if not must or self._stopping:
                    log.warning("%s: outbox %s: %s", entry.account, entry.key, exc)
                    return None
                log.warning(
                    "%s: outbox %s is %s but cannot be marked so yet (%s); retrying",
                    entry.account,
                    entry.key,
                    new.state,
                    exc,
                )
                await asyncio.sleep(STATE_WRITE_RETRY_S)
                continue
            self._seen(stored)
            if stored.state in ("failed", "unknown"):
                log.warning(
                    "%s: outbox %s %s: %s", stored.account, stored.key, stored.state, stored.reason
                )
                self._count(stored.account, stored.state)
            self.host.outbox_changed(stored)
            return stored

    # --- seen from outside ---------------------------------------------------------------------

    def stats(self) -> tuple[int, float | None]:
        """(entries waiting, age in seconds of the oldest)."""
        if not self._entries:
            return 0, None
        oldest = min(e.created_at for e in self._entries.values())
        return len(self._entries), max(0.0, time.time() - oldest)

    async def stop(self, timeout: float) -> None:
        """Let sends in flight finish (their state must be written), for at most `timeout`."""
        self._stopping = True
        self._wake.set()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)


def _invalid(entry: OutboxEntry) -> str | None:
    problem = invalid_reason(entry)
    if problem:
        return problem
    digits = entry.to.strip().lstrip("+").replace(" ", "").replace("-", "")
    if "@" not in entry.to and not digits.isdigit():
        return (
            f"{entry.to!r} is neither a phone number (digits with country code) nor a JID "
            "(such as 4915112345678@s.whatsapp.net or 1203630...@g.us)"
        )
    return None
