"""The interfaces of the two message backends (embedded SQLite, Firestore) and of the outbox.

Both backends are called from worker threads (asyncio.to_thread), one call at a time per store
object, and only by the instance that drives the accounts concerned. A backend that cannot be
reached raises StoreUnavailable (wadaemon.store.base); the caller keeps the changes in its local
queue and retries. Every write is idempotent: writing the same changes again changes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

from wadaemon.errors import WadaemonError
from wadaemon.messages.model import Change, StoredMessage, Thread


@dataclass(frozen=True)
class WriteResult:
    stored: int  # new messages
    duplicates: int  # messages already stored (nothing changed)
    updates: int  # receipts, reactions, edits, revokes, reads applied
    # the changes that changed something (new messages, receipts that moved a status), for
    # the readers; None: the backend cannot tell, every change is passed on
    new: tuple[Change, ...] | None = field(default=None, compare=False)


class MessageStore(Protocol):
    # A backend may set `write_batch`: the changes per write() it prefers (the Inbox's own
    # default, inbox.BATCH, otherwise).

    def describe(self) -> str: ...

    def write(self, changes: Sequence[Change]) -> WriteResult:
        """Store the changes, in order, atomically per batch where the backend allows (a batch
        that fails may be written again: idempotency makes that safe)."""
        ...

    def messages(
        self, account: str, chat: str | None = None, since: float = 0.0, limit: int = 100
    ) -> list[StoredMessage]:
        """Messages with timestamp >= since, oldest first (per chat: WhatsApp's timestamp, then
        arrival order), at most `limit` (the oldest ones)."""
        ...

    def threads(self, account: str) -> list[Thread]:
        """The account's threads, newest activity first."""
        ...

    def close(self) -> None: ...


# --- the outbox -------------------------------------------------------------------------------

OUTBOX_STATES = ("queued", "sending", "sent", "failed", "unknown")
FINAL_STATES = ("sent", "failed", "unknown")


class OutboxConflict(WadaemonError):
    """The entry changed since it was read (another sender, an operator): read it again."""


class InvalidEntry(WadaemonError):
    """An outbox entry that cannot be sent as written (the message names the field and fix)."""


@dataclass(frozen=True)
class OutboxEntry:
    key: str  # the caller's idempotency key, the entry's id
    account: str
    to: str  # a phone number with country code (digits) or a JID
    text: str
    reply_to: str = ""  # the WhatsApp id of a message of that chat to reply to
    state: str = "queued"
    attempts: int = 0
    next_at: float = 0.0  # not before (epoch seconds): backoff and pacing
    reason: str = ""  # why it failed, is unknown, or waits
    wa_id: str = ""  # WhatsApp's id of the sent message
    sent_at: float = 0.0  # WhatsApp's timestamp of the sent message
    created_at: float = 0.0
    updated_at: float = 0.0
    resend: bool = False  # after a crash mid-send: queue it again rather than mark it unknown
    process: str = ""  # the daemon run that set `sending` (a crash leaves it behind)
    source: str = ""  # api | cli | firestore

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def moved(self, **fields: Any) -> OutboxEntry:
        return replace(self, updated_at=time.time(), **fields)


def check_entry(entry: OutboxEntry) -> None:
    """Raise InvalidEntry for an entry no sender could send."""
    from wadaemon.layout import is_account_id

    if not entry.key or "/" in entry.key or len(entry.key) > 500 or entry.key.startswith("."):
        raise InvalidEntry(
            f"outbox key {entry.key!r}: give an idempotency key of 1-500 characters without '/'"
        )
    if not is_account_id(entry.account):
        raise InvalidEntry(f"outbox entry {entry.key}: {entry.account!r} is not an account id")
    if not entry.to:
        raise InvalidEntry(f"outbox entry {entry.key}: `to` is empty: give a number or a JID")
    if not entry.text:
        raise InvalidEntry(f"outbox entry {entry.key}: `text` is empty")
    if entry.state not in OUTBOX_STATES:
        raise InvalidEntry(
            f"outbox entry {entry.key}: state {entry.state!r} is not one of "
            + ", ".join(OUTBOX_STATES)
        )


def stamped(entry: OutboxEntry) -> OutboxEntry:
    """An entry about to be added: checked (InvalidEntry), with created_at/updated_at of 0 set
    to now."""
    check_entry(entry)
    created_at = entry.created_at or time.time()
    return replace(entry, created_at=created_at, updated_at=entry.updated_at or created_at)


INVALID = "invalid entry: "  # the reason of an entry read from a document that cannot be sent


def invalid_reason(entry: OutboxEntry) -> str:
    """ "" for an entry a sender may send; else why it cannot be sent, for the sender to mark
    it failed with (`update(entry.moved(state="failed", reason=invalid_reason(entry)), ...)`).
    Works for the entries of any backend; only Firestore's can be invalid."""
    if entry.reason.startswith(INVALID):
        return entry.reason
    try:
        check_entry(entry)
    except InvalidEntry as exc:
        return INVALID + str(exc)
    return ""


class OutboxStore(Protocol):
    def describe(self) -> str: ...

    def add(self, entry: OutboxEntry) -> tuple[OutboxEntry, bool]:
        """Create the entry unless its key exists: (the stored entry, whether it was created).
        The same key never makes a second entry."""
        ...

    def get(self, key: str) -> OutboxEntry | None: ...

    def pending(self, accounts: set[str]) -> list[OutboxEntry]:
        """Entries of these accounts in state queued or sending, oldest first."""
        ...

    def update(
        self, entry: OutboxEntry, expected_state: str, expected_updated_at: float | None = None
    ) -> OutboxEntry:
        """Compare-and-swap: write `entry` (whole, under its key) only if the stored entry is
        still in `expected_state` and, unless `expected_updated_at` is None, still has the
        `updated_at` the caller read (entry.moved() sets a new one, so pass the one of the
        entry as read: `update(read.moved(state=...), read.state, read.updated_at)`). Else,
        or if there is no entry with that key, OutboxConflict naming the key and the state
        found. Returns what was written."""
        ...

    def watch(self, changed: Callable[[OutboxEntry], None]) -> Callable[[], None]:
        """Call `changed` (from any thread) for entries written by others (a listener, not a
        poll); returns a function that stops watching. A backend nobody else writes to
        returns a no-op."""
        ...

    def close(self) -> None: ...
