"""The outbox in an embedded SQLite database (one file, written by this daemon only).

WAL mode with synchronous=FULL: an entry whose add() or update() returned survives a power cut.
One connection shared by the worker threads (check_same_thread=False) behind a lock, so that
every call is one transaction. `update` is a compare-and-swap done by a conditional UPDATE: two
senders racing to claim an entry cannot both succeed.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from wadaemon.messages.store import (
    OUTBOX_STATES,
    InvalidEntry,
    OutboxConflict,
    OutboxEntry,
    stamped,
)

BUSY_TIMEOUT_S = 10.0
PENDING_STATES = ("queued", "sending")

# column name -> OutboxEntry field ("to" is an SQL keyword: the column is recipient)
_COLUMNS = {
    "key": "key",
    "account": "account",
    "recipient": "to",
    "text": "text",
    "reply_to": "reply_to",
    "state": "state",
    "attempts": "attempts",
    "next_at": "next_at",
    "reason": "reason",
    "wa_id": "wa_id",
    "sent_at": "sent_at",
    "created_at": "created_at",
    "updated_at": "updated_at",
    "resend": "resend",
    "process": "process",
    "source": "source",
}
_SELECT = "SELECT " + ", ".join(_COLUMNS) + " FROM outbox"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    key TEXT PRIMARY KEY,
    account TEXT NOT NULL,
    recipient TEXT NOT NULL,
    text TEXT NOT NULL,
    reply_to TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL DEFAULT 0,
    reason TEXT NOT NULL DEFAULT '',
    wa_id TEXT NOT NULL DEFAULT '',
    sent_at REAL NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    resend INTEGER NOT NULL DEFAULT 0,
    process TEXT NOT NULL DEFAULT '',
    source TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox (state, account, created_at);
"""


def _row_values(entry: OutboxEntry) -> list[Any]:
    values = entry.to_json()
    return [int(values[f]) if f == "resend" else values[f] for f in _COLUMNS.values()]


def _entry_of(row: sqlite3.Row | tuple[Any, ...]) -> OutboxEntry:
    fields = dict(zip(_COLUMNS.values(), row, strict=True))
    fields["resend"] = bool(fields["resend"])
    return OutboxEntry(**fields)


class SqliteOutbox:
    """The outbox in the SQLite database `path` (created, with its directory, mode 0700)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # create the file private before SQLite creates it with the umask's mode
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(
            path, timeout=BUSY_TIMEOUT_S, check_same_thread=False, isolation_level=None
        )
        try:
            mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"journal_mode is {mode}, not wal")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.executescript(_SCHEMA)
        except BaseException:
            self._conn.close()
            raise

    def describe(self) -> str:
        return f"sqlite outbox {self.path}"

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def add(self, entry: OutboxEntry) -> tuple[OutboxEntry, bool]:
        """Insert the entry unless its key exists (created_at/updated_at of 0 are set to now):
        (the stored entry, whether it was created). Raises InvalidEntry for an entry that
        check_entry refuses."""
        entry = stamped(entry)
        marks = ", ".join("?" for _ in _COLUMNS)
        sql = f"INSERT OR IGNORE INTO outbox ({', '.join(_COLUMNS)}) VALUES ({marks})"
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                created = self._conn.execute(sql, _row_values(entry)).rowcount == 1
                row = self._conn.execute(_SELECT + " WHERE key = ?", (entry.key,)).fetchone()
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        return _entry_of(row), created

    def get(self, key: str) -> OutboxEntry | None:
        with self._lock:
            row = self._conn.execute(_SELECT + " WHERE key = ?", (key,)).fetchone()
        return None if row is None else _entry_of(row)

    def pending(self, accounts: set[str]) -> list[OutboxEntry]:
        """The accounts' entries in state queued or sending, oldest created first."""
        if not accounts:
            return []
        names = sorted(accounts)
        sql = (
            _SELECT
            + f" WHERE state IN (?, ?) AND account IN ({', '.join('?' for _ in names)})"
            + " ORDER BY created_at, rowid"
        )
        with self._lock:
            rows = self._conn.execute(sql, [*PENDING_STATES, *names]).fetchall()
        return [_entry_of(row) for row in rows]

    def update(
        self, entry: OutboxEntry, expected_state: str, expected_updated_at: float | None = None
    ) -> OutboxEntry:
        """Write `entry` if the stored one is in `expected_state` (and, unless
        `expected_updated_at` is None, has that updated_at); else OutboxConflict."""
        if entry.state not in OUTBOX_STATES:
            raise InvalidEntry(
                f"outbox entry {entry.key}: state {entry.state!r} is not one of "
                + ", ".join(OUTBOX_STATES)
            )
        columns = [c for c in _COLUMNS if c != "key"]
        values = [v for c, v in zip(_COLUMNS, _row_values(entry), strict=True) if c != "key"]
        sql = f"UPDATE outbox SET {', '.join(c + ' = ?' for c in columns)} WHERE key = ?"
        sql += " AND state = ?"
        values += [entry.key, expected_state]
        if expected_updated_at is not None:
            sql += " AND updated_at = ?"
            values.append(expected_updated_at)
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                changed = self._conn.execute(sql, values).rowcount
                found = None
                if changed == 0:
                    found = self._conn.execute(
                        "SELECT state, updated_at FROM outbox WHERE key = ?", (entry.key,)
                    ).fetchone()
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        if changed == 0:
            raise OutboxConflict(_conflict(entry.key, expected_state, expected_updated_at, found))
        return entry

    def watch(self, changed: Callable[[OutboxEntry], None]) -> Callable[[], None]:
        """Nobody else writes this file: nothing to watch."""
        return lambda: None


def _conflict(key: str, expected_state: str, expected_updated_at: float | None, found: Any) -> str:
    if found is None:
        return f"outbox entry {key}: no such entry"
    state, updated_at = found
    if state != expected_state:
        return f"outbox entry {key}: its state is {state}, not {expected_state}"
    return (
        f"outbox entry {key}: state {state}, but changed since it was read "
        f"(updated_at {updated_at!r}, read {expected_updated_at!r})"
    )
