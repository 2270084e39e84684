"""The local durable queue between a WhatsApp event and the message store.

neonize acknowledges a message to WhatsApp's server before the daemon sees it (whatsmeow's
synchronous acknowledgement is not exposed), so the only defence against losing it is to make it
durable as soon as it arrives, before anything else is done with it: each event's changes are
appended here from the event callback itself, one small SQLite transaction in WAL mode, which
survives a crash of the daemon the moment it returns (synchronous=NORMAL: the WAL is in the
kernel's cache; `sync()` makes it survive a power loss too, and runs after every flush).

The flusher then moves the oldest entries to the message store in batches and removes them only
once the store has them: while the store is down, entries wait here and nothing is lost. The file
lives in messages.path (the daemon's state directory), never in an account's session directory,
and only the daemon opens it.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from wadaemon.errors import WadaemonError
from wadaemon.messages.model import Change, change_from_json, change_to_json

JOURNAL_FILE = "journal.db"


class JournalError(WadaemonError):
    pass


@dataclass(frozen=True)
class Entry:
    seq: int
    account: str
    change: Change


class Journal:
    def __init__(self, directory: Path) -> None:
        self.path = directory / JOURNAL_FILE
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS changes (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
                "account TEXT NOT NULL, body TEXT NOT NULL)"
            )
        except (OSError, sqlite3.Error) as exc:
            raise JournalError(
                f"cannot open the message journal {self.path}: {exc}; check that messages.path "
                "is on a writable disk with free space and owned by the daemon's user"
            ) from None
        self._lock = threading.Lock()
        self._unsynced = False
        self._bytes = self._count_bytes()

    def _count_bytes(self) -> int:
        row = self._db.execute("SELECT COALESCE(SUM(LENGTH(body)), 0) FROM changes").fetchone()
        return int(row[0])

    def put(self, changes: Sequence[Change]) -> None:
        """Append, durable against a crash of this process when it returns."""
        rows = [
            (c.account, json.dumps(change_to_json(c), separators=(",", ":"), ensure_ascii=False))
            for c in changes
        ]
        if not rows:
            return
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executemany("INSERT INTO changes (account, body) VALUES (?, ?)", rows)
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                with _quietly():
                    self._db.execute("ROLLBACK")
                raise JournalError(
                    f"cannot append to the message journal {self.path}: {exc}"
                ) from None
            self._bytes += sum(len(body) for _, body in rows)
            self._unsynced = True

    def oldest(self, limit: int) -> list[Entry]:
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, account, body FROM changes ORDER BY seq LIMIT ?", (limit,)
            ).fetchall()
        return [
            Entry(seq, account, change_from_json(json.loads(body))) for seq, account, body in rows
        ]

    def remove_through(self, seq: int) -> None:
        """The store has every entry up to `seq`."""
        with self._lock:
            self._db.execute("DELETE FROM changes WHERE seq <= ?", (seq,))
            self._bytes = self._count_bytes()

    def sync(self) -> None:
        """Make what was appended survive a power loss (a checkpoint fsyncs the WAL); nothing
        to do (no disk write) when nothing was appended since the last sync."""
        with self._lock, _quietly():
            if not self._unsynced:
                return
            self._unsynced = False
            self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")
            fd = os.open(self.path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def depth(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM changes").fetchone()[0])

    @property
    def bytes(self) -> int:
        return self._bytes

    def close(self) -> None:
        with self._lock, _quietly():
            self._db.close()


def _quietly() -> contextlib.suppress:
    return contextlib.suppress(sqlite3.Error, OSError)
