"""The documents of the Firestore message store (firestore_messages.py): a Message as a
document and back, and one write()'s changes applied in memory to the documents it read."""

from __future__ import annotations

from typing import Any

from wadaemon.messages.model import (
    ME,
    Change,
    ChatRead,
    Media,
    Message,
    Receipt,
    StoredMessage,
    message_id,
    thread_id,
)
from wadaemon.messages.sqlite_messages import (
    PENDING_MAX,
    blank_state,
    effect_of,
    merge_state,
    target_key,
    touch_thread,
)

_FIELDS = {  # Message field -> document field
    "from_me": "fromMe",
    "push_name": "pushName",
    "chat_name": "chatName",
    "quoted_id": "quotedId",
    "target_sender": "targetSender",
}
_MEDIA = {"file_name": "fileName"}
_STATE = tuple(blank_state())
_MESSAGE_FIELDS = tuple(f for f in Message.__dataclass_fields__ if f not in ("status", "media"))
_MEDIA_FIELDS = tuple(Media.__dataclass_fields__)

MsgKey = tuple[str, str]  # (thread id, message document id)


def _camel(raw: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    return {names.get(k, k): v for k, v in raw.items()}


def _snake(raw: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    back = {v: k for k, v in names.items()}
    return {back.get(k, k): v for k, v in raw.items()}


def message_doc(m: Message, state: dict[str, Any], seq: int, prefix: str) -> dict[str, Any]:
    # the fields read directly: dataclasses.asdict's deep copy costs more than the rest here
    raw = {k: getattr(m, k) for k in _MESSAGE_FIELDS}
    if m.media is not None:
        raw["media"] = _camel({k: getattr(m.media, k) for k in _MEDIA_FIELDS}, _MEDIA)
    return {**_camel(raw, _FIELDS), "timestamp": float(m.timestamp), **state, "seq": seq,
            "prefix": prefix}  # fmt: skip


def stored_message(doc: dict[str, Any]) -> StoredMessage:
    raw = _snake({k: v for k, v in doc.items() if k not in (*_STATE, "seq", "prefix")}, _FIELDS)
    if raw.get("media"):
        raw["media"] = Media(**_snake(raw["media"], _MEDIA))
    message = Message(**{k: v for k, v in raw.items() if k in Message.__dataclass_fields__})
    return StoredMessage(
        message=message,
        status=doc.get("status", ""),
        reactions=dict(doc.get("reactions") or {}),
        edited_text=doc.get("editedText", ""),
        revoked=bool(doc.get("revoked")),
        seq=int(doc.get("seq", 0)),
    )


class Run:
    """One write(): the documents read, changed in memory in the order of the changes."""

    def __init__(
        self,
        threads: dict[str, dict[str, Any] | None],
        msgs: dict[MsgKey, dict[str, Any] | None],
        prefix: str,
    ) -> None:
        self.threads = threads
        self.msgs = msgs
        self.prefix = prefix
        self.dirty_threads: set[str] = set()
        self.dirty_msgs: set[MsgKey] = set()
        self.stored = self.duplicates = self.updates = 0

    def _thread(self, tid: str) -> dict[str, Any]:
        thread = self.threads[tid]
        assert thread is not None
        return thread

    def apply(self, change: Change) -> None:
        tid = thread_id(change.account, change.chat)
        if isinstance(change, Message):
            self._message(tid, change)
        elif isinstance(change, Receipt):
            for wa_id in change.ids:
                key = (tid, message_id(ME, wa_id))
                self.updates += self._effect(key, effect_of(change), change.timestamp)
        elif isinstance(change, ChatRead):
            thread = self._thread(tid)
            if thread["unread"] > 0:
                thread["unread"] = 0
                self.dirty_threads.add(tid)
                self.updates += 1

    def _message(self, tid: str, m: Message) -> None:
        key = (tid, m.doc_id)
        if self.msgs.get(key) is not None:
            self.duplicates += 1
            return
        thread = self._thread(tid)
        touch_thread(thread, m)
        state = blank_state(m.status)
        pending = thread["pending"].pop(m.doc_id, None)
        if pending is not None:
            self.updates += merge_state(state, {k: pending[k] for k in _STATE})
        self.msgs[key] = message_doc(m, state, thread["lastSeq"], self.prefix)
        self.dirty_msgs.add(key)
        self.dirty_threads.add(tid)
        self.stored += 1
        target = target_key(m)
        if target is not None:
            tkey = (tid, message_id(target[2], target[3]))
            self.updates += self._effect(tkey, effect_of(m), m.timestamp)

    def _effect(self, key: MsgKey, effect: dict[str, Any], at: float) -> int:
        doc = self.msgs.get(key)
        if doc is not None:
            if not merge_state(doc, effect):
                return 0
            self.dirty_msgs.add(key)
            return 1
        pending: dict[str, Any] = self._thread(key[0])["pending"]
        entry = pending.setdefault(key[1], {**blank_state(), "at": at})
        merge_state(entry, effect)
        entry["at"] = max(entry["at"], at)
        if len(pending) > PENDING_MAX:
            oldest = sorted(pending, key=lambda k: pending[k]["at"])
            for dropped in oldest[: len(pending) - PENDING_MAX]:
                del pending[dropped]
        self.dirty_threads.add(key[0])
        return 0
