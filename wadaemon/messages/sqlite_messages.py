"""The embedded message store: one SQLite database (WAL, synchronous=FULL) on this host.

threads   (account, chat): name, last_message_at, last_message_id (WhatsApp's id of the newest
          message), messages (how many are stored), unread, last_seq (the thread's arrival
          counter: the seq given to its latest message; never reused)
messages  (account, chat, sender, id): timestamp, seq, message (the Message as JSON), status,
          reactions (JSON sender -> emoji), reactions_at (JSON sender -> the timestamp of that
          sender's latest reaction, kept after a removal), edited_text, edited_at (NULL: never
          edited), revoked
pending   (account, chat, sender, id): what arrived for a message not stored yet (a receipt, a
          reaction, an edit, a revoke), merged into one JSON record with the message's own
          fields; applied, then deleted, when the message arrives. At most PENDING_MAX per
          thread: the oldest are dropped (receipts for messages this store never gets).

A thread's unread count grows by one per new live message from the other side; a new live
message of this account, or a ChatRead, sets it to 0. History-sync messages, reactions, edits and
revokes leave it alone, and only messages that are none of the last three move lastMessageAt
(never back: a late, older message does not).

One write() is one transaction: all of its changes or none. The same state rules as the
Firestore backend (firestore_messages.py): a message is stored once per key; reactions and edits
from one sender keep the newest by WhatsApp's timestamp; a status only moves up.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from wadaemon.messages.model import (
    ME,
    Change,
    ChatRead,
    Message,
    Receipt,
    StoredMessage,
    Thread,
    status_rank,
)
from wadaemon.messages.store import WriteResult

ACTIONS = ("reaction", "edit", "revoke")
PENDING_MAX = 1000  # pending records kept per thread

SCHEMA = """
CREATE TABLE IF NOT EXISTS threads (
    account TEXT NOT NULL, chat TEXT NOT NULL, name TEXT NOT NULL DEFAULT '',
    last_message_at REAL NOT NULL DEFAULT 0, last_message_id TEXT NOT NULL DEFAULT '',
    messages INTEGER NOT NULL DEFAULT 0, unread INTEGER NOT NULL DEFAULT 0,
    last_seq INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (account, chat)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS messages (
    account TEXT NOT NULL, chat TEXT NOT NULL, sender TEXT NOT NULL, id TEXT NOT NULL,
    timestamp REAL NOT NULL, seq INTEGER NOT NULL, message TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT '', reactions TEXT NOT NULL DEFAULT '{}',
    reactions_at TEXT NOT NULL DEFAULT '{}', edited_text TEXT NOT NULL DEFAULT '',
    edited_at REAL, revoked INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (account, chat, sender, id)
);
CREATE INDEX IF NOT EXISTS messages_by_chat ON messages (account, chat, timestamp, seq);
CREATE INDEX IF NOT EXISTS messages_by_account ON messages (account, timestamp, seq, chat);
CREATE TABLE IF NOT EXISTS pending (
    account TEXT NOT NULL, chat TEXT NOT NULL, sender TEXT NOT NULL, id TEXT NOT NULL,
    at REAL NOT NULL, data TEXT NOT NULL,
    PRIMARY KEY (account, chat, sender, id)
) WITHOUT ROWID;
"""

THREAD_COLUMNS = "name, last_message_at, last_message_id, messages, unread, last_seq"
STATE_COLUMNS = "status, reactions, reactions_at, edited_text, edited_at, revoked"


# --- the state rules, shared with firestore_messages.py -----------------------------------


def blank_state(status: str = "") -> dict[str, Any]:
    """What happened to a message since it was sent: the record merged into it, or pending."""
    return {
        "status": status,
        "reactions": {},
        "reactionsAt": {},
        "editedText": "",
        "editedAt": None,
        "revoked": False,
    }


def effect_of(change: Message | Receipt) -> dict[str, Any]:
    """A receipt, reaction, edit or revoke as a state to merge into its target."""
    state = blank_state()
    if isinstance(change, Receipt):
        state["status"] = change.status
    elif change.kind == "reaction":
        state["reactionsAt"][change.sender] = change.timestamp
        if change.text:
            state["reactions"][change.sender] = change.text
    elif change.kind == "edit":
        state["editedText"], state["editedAt"] = change.text, change.timestamp
    elif change.kind == "revoke":
        state["revoked"] = True
    return state


def merge_state(into: dict[str, Any], effect: dict[str, Any]) -> bool:
    """Merge `effect` into `into`: the status moves up only, each sender's newest reaction and
    the newest edit win (equal timestamps: the later arrival). True if `into` changed."""
    changed = False
    if status_rank(effect["status"]) > status_rank(into["status"]):
        into["status"] = effect["status"]
        changed = True
    for sender, at in effect["reactionsAt"].items():
        text = effect["reactions"].get(sender, "")
        old = into["reactionsAt"].get(sender)
        same = at == old and into["reactions"].get(sender, "") == text
        if old is not None and (at < old or same):
            continue
        into["reactionsAt"][sender] = at
        if text:
            into["reactions"][sender] = text
        else:
            into["reactions"].pop(sender, None)
        changed = True
    at = effect["editedAt"]
    newer = at is not None and (into["editedAt"] is None or at >= into["editedAt"])
    if newer and (at, effect["editedText"]) != (into["editedAt"], into["editedText"]):
        into["editedText"], into["editedAt"] = effect["editedText"], at
        changed = True
    if effect["revoked"] and not into["revoked"]:
        into["revoked"] = changed = True
    return changed


def target_key(m: Message) -> tuple[str, str, str, str] | None:
    """The key of the message a reaction / edit / revoke acts on."""
    if m.kind not in ACTIONS or not m.target:
        return None
    return (m.account, m.chat, m.target_sender, m.target)


def touch_thread(thread: dict[str, Any], m: Message) -> None:
    """A new message in the thread: its counters, newest message and name."""
    thread["lastSeq"] += 1
    thread["messages"] += 1
    if m.chat_name:
        thread["name"] = m.chat_name
    elif m.push_name and m.sender == m.chat and not thread["name"]:
        thread["name"] = m.push_name
    if m.kind in ACTIONS:
        return  # neither unread nor newer activity
    if m.source != "history":
        if m.from_me:
            thread["unread"] = 0
        else:
            thread["unread"] += 1
    if m.timestamp >= thread["lastMessageAt"]:
        thread["lastMessageAt"], thread["lastMessageId"] = m.timestamp, m.id


def new_thread() -> dict[str, Any]:
    return {
        "name": "",
        "lastMessageAt": 0.0,
        "lastMessageId": "",
        "messages": 0,
        "unread": 0,
        "lastSeq": 0,
    }


# --- the store --------------------------------------------------------------------------------


class SqliteMessages:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not path.exists():
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(SCHEMA)

    def describe(self) -> str:
        return f"embedded message store {self.path}"

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # --- writing ------------------------------------------------------------------------------

    def write(self, changes: Sequence[Change]) -> WriteResult:
        counts = {"stored": 0, "duplicates": 0, "updates": 0}
        new: list[Change] = []  # what changed something, for the readers
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                touched: set[tuple[str, str]] = set()
                for change in changes:
                    touched.add((change.account, change.chat))
                    before = counts["stored"] + counts["updates"]
                    if isinstance(change, Message):
                        self._message(change, counts)
                    elif isinstance(change, Receipt):
                        effect = effect_of(change)
                        for wa_id in change.ids:
                            key = (change.account, change.chat, ME, wa_id)
                            counts["updates"] += self._apply(key, effect, change.timestamp)
                    else:
                        counts["updates"] += self._read(change)
                    if counts["stored"] + counts["updates"] > before:
                        new.append(change)
                for account, chat in touched:
                    self._trim_pending(account, chat)
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        return WriteResult(**counts, new=tuple(new))

    def _message(self, m: Message, counts: dict[str, int]) -> None:
        c = self._conn
        found = c.execute(
            "SELECT 1 FROM messages WHERE account=? AND chat=? AND sender=? AND id=?", m.key
        ).fetchone()
        if found:
            counts["duplicates"] += 1
            return
        thread = self._thread(m.account, m.chat) or new_thread()
        touch_thread(thread, m)
        state = blank_state(m.status)
        where = "WHERE account=? AND chat=? AND sender=? AND id=?"
        pending = c.execute(f"SELECT data FROM pending {where}", m.key).fetchone()
        if pending:
            c.execute(f"DELETE FROM pending {where}", m.key)
            counts["updates"] += merge_state(state, json.loads(pending[0]))
        c.execute(
            f"INSERT INTO messages (account, chat, sender, id, timestamp, seq, message, "
            f"{STATE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (*m.key, m.timestamp, thread["lastSeq"], json.dumps(m.to_json()), *_columns(state)),
        )
        c.execute(
            f"INSERT OR REPLACE INTO threads (account, chat, {THREAD_COLUMNS}) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (m.account, m.chat, *(thread[k] for k in new_thread())),
        )
        counts["stored"] += 1
        target = target_key(m)
        if target is not None:
            counts["updates"] += self._apply(target, effect_of(m), m.timestamp)

    def _apply(self, key: tuple[str, str, str, str], effect: dict[str, Any], at: float) -> int:
        """Merge an effect into a stored message, or keep it pending; 1 if a message changed."""
        c = self._conn
        where = "WHERE account=? AND chat=? AND sender=? AND id=?"
        row = c.execute(f"SELECT {STATE_COLUMNS} FROM messages {where}", key).fetchone()
        if row is not None:
            state = _state(row)
            if not merge_state(state, effect):
                return 0
            c.execute(
                "UPDATE messages SET status=?, reactions=?, reactions_at=?, edited_text=?, "
                "edited_at=?, revoked=? WHERE account=? AND chat=? AND sender=? AND id=?",
                (*_columns(state), *key),
            )
            return 1
        row = c.execute(
            "SELECT data, at FROM pending WHERE account=? AND chat=? AND sender=? AND id=?", key
        ).fetchone()
        pending = json.loads(row[0]) if row else blank_state()
        merge_state(pending, effect)
        c.execute(
            "INSERT OR REPLACE INTO pending (account, chat, sender, id, at, data) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (*key, max(at, row[1]) if row else at, json.dumps(pending)),
        )
        return 0

    def _read(self, read: ChatRead) -> int:
        cur = self._conn.execute(
            "UPDATE threads SET unread=0 WHERE account=? AND chat=? AND unread>0",
            (read.account, read.chat),
        )
        return 1 if cur.rowcount > 0 else 0

    def _trim_pending(self, account: str, chat: str) -> None:
        self._conn.execute(
            "DELETE FROM pending WHERE account=? AND chat=? AND (sender, id) NOT IN "
            "(SELECT sender, id FROM pending WHERE account=? AND chat=? ORDER BY at DESC LIMIT ?)",
            (account, chat, account, chat, PENDING_MAX),
        )

    def _thread(self, account: str, chat: str) -> dict[str, Any] | None:
        row = self._conn.execute(
            f"SELECT {THREAD_COLUMNS} FROM threads WHERE account=? AND chat=?", (account, chat)
        ).fetchone()
        return dict(zip(new_thread(), row, strict=True)) if row else None

    # --- reading ------------------------------------------------------------------------------

    def messages(
        self, account: str, chat: str | None = None, since: float = 0.0, limit: int = 100
    ) -> list[StoredMessage]:
        where, args = "account=? AND timestamp>=?", [account, since]
        if chat is not None:
            where, args = where + " AND chat=?", [*args, chat]
        sql = (
            f"SELECT message, seq, {STATE_COLUMNS} FROM messages WHERE {where} "
            "ORDER BY timestamp, seq, chat LIMIT ?"
        )
        with self._lock:
            rows = self._conn.execute(sql, (*args, limit)).fetchall()
        out = []
        for row in rows:
            state = _state(row[2:])
            out.append(
                StoredMessage(
                    message=Message.from_json(json.loads(row[0])),
                    status=state["status"],
                    reactions=state["reactions"],
                    edited_text=state["editedText"],
                    revoked=state["revoked"],
                    seq=row[1],
                )
            )
        return out

    def threads(self, account: str) -> list[Thread]:
        with self._lock:
            rows = self._conn.execute(
                f"SELECT chat, {THREAD_COLUMNS} FROM threads WHERE account=? AND messages>0 "
                "ORDER BY last_message_at DESC, chat",
                (account,),
            ).fetchall()
        return [Thread(account, *row[:-1]) for row in rows]


def _columns(state: dict[str, Any]) -> tuple[Any, ...]:
    return (
        state["status"],
        json.dumps(state["reactions"]),
        json.dumps(state["reactionsAt"]),
        state["editedText"],
        state["editedAt"],
        int(state["revoked"]),
    )


def _state(row: Sequence[Any]) -> dict[str, Any]:
    status, reactions, reactions_at, edited_text, edited_at, revoked = row
    return {
        "status": status,
        "reactions": json.loads(reactions),
        "reactionsAt": json.loads(reactions_at),
        "editedText": edited_text,
        "editedAt": edited_at,
        "revoked": bool(revoked),
    }
