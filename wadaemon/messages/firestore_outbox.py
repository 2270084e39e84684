"""The outbox in Firestore: {prefix}outbox/{key}, one document per entry, the key as its id.

Fields (camelCase): account, to, text, replyTo, state, attempts, nextAt, reason, waId, sentAt,
createdAt, updatedAt (epoch seconds), resend, process, source.

Other programs may queue messages by writing documents themselves, and are read leniently: a
document with only account, to and text is a queued entry (state missing: queued; createdAt
missing: the document's create time; updatedAt missing: its update time; `to` may be a number).
A document that cannot be sent as written (check_entry refuses it, or a field has the wrong
type) never breaks a read: it is read as an entry in state `queued` whose reason starts with
INVALID and says what is wrong, and invalid_reason() tells the sender to mark it failed (an
invalid document already in a final state keeps that state). update() writes only the fields
that differ from the stored entry (and always state, reason, updatedAt), so another program's fields
and values are kept where the sender did not change them.

Firestore queries never match documents that lack the queried field, and documents from other
programs may lack `state`: pending() therefore reads the whole collection (one billed read per
document; prune entries in a final state to keep it small) and filters on this side.

watch() listens to the whole collection (for the same reason). Across an outage, as seen with
the emulator stopped for 5 to 90 seconds and started again (empty): the library's listener kept
running and resumed by itself once the emulator answered again, delivering the documents written
after the restart within about 3 seconds; it was never found stopped. But during the outage it
reopened its stream in a tight loop (no backoff: 8 s of CPU in a 20 s outage), and the library
stops a listener for good, silently, on errors it does not count as transient: the listener is
a store.firestore_listener.SupervisedListener, which throttles the reopening and starts a new
listener when one stopped. A new listener first reports every pending entry again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import fields, replace
from datetime import datetime
from typing import Any

from google.api_core import exceptions as gexc
from google.cloud.firestore_v1.collection import CollectionReference
from google.cloud.firestore_v1.document import DocumentReference

from wadaemon.layout import is_account_id
from wadaemon.messages.store import (
    FINAL_STATES,
    INVALID,
    OUTBOX_STATES,
    InvalidEntry,
    OutboxConflict,
    OutboxEntry,
    check_entry,
    invalid_reason,
    stamped,
)
from wadaemon.store.firestore import CALL_TIMEOUT, RETRY, FirestoreStore
from wadaemon.store.firestore_listener import SupervisedListener

log = logging.getLogger(__name__)

OUTBOX = "outbox"
PENDING_STATES = ("queued", "sending")

# OutboxEntry field -> document field
FIELDS = {
    "account": "account",
    "to": "to",
    "text": "text",
    "reply_to": "replyTo",
    "state": "state",
    "attempts": "attempts",
    "next_at": "nextAt",
    "reason": "reason",
    "wa_id": "waId",
    "sent_at": "sentAt",
    "created_at": "createdAt",
    "updated_at": "updatedAt",
    "resend": "resend",
    "process": "process",
    "source": "source",
}
_TEXTS = ("account", "to", "text", "reply_to", "reason", "wa_id", "process", "source")
_NUMBERS = ("next_at", "sent_at", "created_at", "updated_at")


def document_of(entry: OutboxEntry) -> dict[str, Any]:
    return {field: getattr(entry, name) for name, field in FIELDS.items()}


def _seconds(value: Any) -> float | None:
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def entry_of(snap: Any) -> OutboxEntry:
    """The entry a document holds, read leniently (see the module's docstring)."""
    raw: dict[str, Any] = snap.to_dict() or {}
    problems: list[str] = []
    values: dict[str, Any] = {"key": snap.id}
    for name in _TEXTS:
        value = raw.get(FIELDS[name])
        if name == "to" and isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if value is None or isinstance(value, str):
            values[name] = value or ""
        else:
            values[name] = ""
            problems.append(f"`{FIELDS[name]}` is a {type(value).__name__}, not a string")
    defaults = {"created_at": snap.create_time, "updated_at": snap.update_time}
    for name in _NUMBERS:
        value = raw.get(FIELDS[name])
        if value is None:
            values[name] = _seconds(defaults.get(name)) or 0.0
        elif (seconds := _seconds(value)) is not None:
            values[name] = seconds
        else:
            values[name] = 0.0
            problems.append(f"`{FIELDS[name]}` is a {type(value).__name__}, not a time")
    attempts = raw.get("attempts", 0)
    if isinstance(attempts, (int, float)) and not isinstance(attempts, bool):
        values["attempts"] = int(attempts)
    else:
        values["attempts"] = 0
        problems.append(f"`attempts` is a {type(attempts).__name__}, not a number")
    resend = raw.get("resend", False)
    if resend is None or isinstance(resend, bool):
        values["resend"] = bool(resend)
    else:
        values["resend"] = False
        problems.append(f"`resend` is a {type(resend).__name__}, not a boolean")
    state = raw.get("state")
    values["state"] = "queued" if state is None else state
    if values["state"] not in OUTBOX_STATES:
        values["state"] = "queued"
        problems.append(f"state {state!r} is not one of " + ", ".join(OUTBOX_STATES))
    entry = OutboxEntry(**values)
    try:
        check_entry(entry)
    except InvalidEntry as exc:
        problems.insert(0, str(exc))
    if problems and entry.state not in FINAL_STATES:
        return replace(entry, state="queued", reason=INVALID + "; ".join(problems))
    return entry


def _changed(stored: OutboxEntry, entry: OutboxEntry) -> dict[str, Any]:
    """The document fields to write: those that differ, and always state, reason (an invalid
    entry's is only read as INVALID...) and updatedAt."""
    names = [
        f.name
        for f in fields(entry)
        if f.name in ("state", "reason", "updated_at")
        or (f.name != "key" and getattr(stored, f.name) != getattr(entry, f.name))
    ]
    return {FIELDS[name]: getattr(entry, name) for name in names}


def _conflict(key: str, found: OutboxEntry | None, state: str, updated_at: float | None) -> str:
    if found is None:
        return f"outbox entry {key}: no such entry"
    if found.state != state:
        return f"outbox entry {key}: its state is {found.state}, not {state}"
    return (
        f"outbox entry {key}: state {found.state}, but changed since it was read "
        f"(updatedAt {found.updated_at!r}, read {updated_at!r})"
    )


class FirestoreOutbox:
    """The outbox in the collection {prefix}outbox of `store`'s database (its client is
    shared: close() stops this outbox's listeners, the FirestoreStore closes the client)."""

    def __init__(self, store: FirestoreStore) -> None:
        self.store = store
        self.client = store.client
        self._listeners: set[SupervisedListener] = set()
        self._lock = threading.Lock()

    def describe(self) -> str:
        return f"firestore outbox {self.store.prefix}{OUTBOX} in {self.store.describe()}"

    def close(self) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            listener.stop()

    def _collection(self) -> CollectionReference:
        return self.client.collection(self.store.prefix + OUTBOX)

    def _ref(self, key: str) -> DocumentReference:
        return self._collection().document(key)

    def add(self, entry: OutboxEntry) -> tuple[OutboxEntry, bool]:
        """Create the document unless it exists (created_at/updated_at of 0 are set to now):
        (the stored entry, whether it was created). Raises InvalidEntry for an entry that
        check_entry refuses."""
        entry = stamped(entry)
        ref = self._ref(entry.key)
        with self.store._call(f"outbox entry {entry.key}: adding it"):
            try:
                ref.create(document_of(entry), retry=RETRY, timeout=CALL_TIMEOUT)
                self.store._count(writes=1)
                return entry, True
            except gexc.AlreadyExists:
                pass
            snap = ref.get(retry=RETRY, timeout=CALL_TIMEOUT)
            self.store._count(reads=1)
        if not snap.exists:
            raise OutboxConflict(f"outbox entry {entry.key}: deleted as it was added: add it again")
        stored = entry_of(snap)
        # equal: our own create landed, its answer was lost, and the retry found it
        return stored, stored == entry

    def get(self, key: str) -> OutboxEntry | None:
        if not key or "/" in key:
            return None
        with self.store._call(f"outbox entry {key}: reading it"):
            snap = self._ref(key).get(retry=RETRY, timeout=CALL_TIMEOUT)
        self.store._count(reads=1)
        return entry_of(snap) if snap.exists else None

    def pending(self, accounts: set[str]) -> list[OutboxEntry]:
        """The accounts' entries in state queued or sending, oldest created first; also the
        invalid entries whose account is not an account id (no instance drives them: any may
        mark them failed, the compare-and-swap lets one do it)."""
        with self.store._call("listing the pending outbox entries"):
            snaps = list(self._collection().stream(retry=RETRY, timeout=CALL_TIMEOUT))
        self.store._count(reads=max(1, len(snaps)))
        found = []
        for snap in snaps:
            entry = entry_of(snap)
            if entry.state not in PENDING_STATES:
                continue
            orphan = not is_account_id(entry.account) and invalid_reason(entry)
            if entry.account in accounts or orphan:
                found.append(entry)
        return sorted(found, key=lambda e: (e.created_at, e.key))

    def update(
        self, entry: OutboxEntry, expected_state: str, expected_updated_at: float | None = None
    ) -> OutboxEntry:
        """Compare-and-swap on the document's update time, after checking that the stored
        entry is in `expected_state` (and has `expected_updated_at` unless None); else
        OutboxConflict."""
        if entry.state not in OUTBOX_STATES:
            raise InvalidEntry(
                f"outbox entry {entry.key}: state {entry.state!r} is not one of "
                + ", ".join(OUTBOX_STATES)
            )
        if not entry.key or "/" in entry.key:
            raise OutboxConflict(_conflict(entry.key, None, expected_state, expected_updated_at))
        ref = self._ref(entry.key)
        with self.store._call(f"outbox entry {entry.key}: updating it"):
            snap = ref.get(retry=RETRY, timeout=CALL_TIMEOUT)
            self.store._count(reads=1)
            stored = entry_of(snap) if snap.exists else None
            if (
                stored is None
                or stored.state != expected_state
                or expected_updated_at not in (None, stored.updated_at)
            ):
                message = _conflict(entry.key, stored, expected_state, expected_updated_at)
                raise OutboxConflict(message)
            when = self.client.write_option(last_update_time=snap.update_time)
            try:
                ref.update(_changed(stored, entry), option=when, retry=RETRY, timeout=CALL_TIMEOUT)
                self.store._count(writes=1)
                return entry
            except (gexc.FailedPrecondition, gexc.NotFound):
                pass  # written by someone else since we read it, or by our own retried call
            again = ref.get(retry=RETRY, timeout=CALL_TIMEOUT)
            self.store._count(reads=1)
        now = entry_of(again) if again.exists else None
        if now == entry:
            return entry  # the first attempt landed; its answer was lost
        raise OutboxConflict(_conflict(entry.key, now, expected_state, expected_updated_at))

    def watch(self, changed: Callable[[OutboxEntry], None]) -> Callable[[], None]:
        """Call `changed` (from the library's thread) with every entry added or modified in
        state queued or sending (an invalid one as read by entry_of), first with all of those
        already there, again after a listener was restarted, and also for this store's own
        writes: the sender's compare-and-swap sorts those out. Returns the stop function."""

        def on_snapshot(docs: Any, changes: Any, read_time: Any) -> None:
            self.store._count(reads=len(changes))  # a listener is billed one read per change
            for change in changes:
                if listener.stopped:
                    return
                if change.type.name not in ("ADDED", "MODIFIED"):
                    continue
                try:
                    entry = entry_of(change.document)
                    if entry.state in PENDING_STATES:
                        changed(entry)
                except Exception:
                    log.exception("outbox entry %s: reporting a change", change.document.id)

        listener = SupervisedListener(
            self._collection,
            on_snapshot,
            self.describe(),
            name="outbox-listener",
            on_stop=self._forget,
        )
        with self._lock:
            self._listeners.add(listener)
        listener.start()
        return listener.stop

    def _forget(self, listener: SupervisedListener) -> None:
        with self._lock:
            self._listeners.discard(listener)
