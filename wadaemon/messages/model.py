"""What the daemon keeps of WhatsApp messages, independent of where it keeps it.

A WhatsApp message id is unique only per chat and sender, so a stored message is keyed by
(account, chat, sender, id); messages this account sent (from the phone, or through the outbox)
use the sender "me", so that receipts, which name the chat and the ids only, find them. The
thread of a conversation is keyed by (account, chat).

Every change reaches a store as one of three records:
- Message: a message as received (or sent). Stored once per key: a redelivery (reconnect,
  offline sync, history sync, a crash before the acknowledgement) changes nothing. Reactions,
  edits and revokes are messages too (kind reaction / edit / revoke, with `target`, the id of
  the message they act on), stored under their own key, and also applied to their target when it
  is stored: reactions[sender] = emoji, the edited text, revoked.
- Receipt: delivered / read / played for ids of one chat; it only moves a message's status up.
- Read: the account read a chat on another device (unread count back to 0).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any

KINDS = (
    "text",
    "image",
    "video",
    "audio",
    "document",
    "sticker",
    "location",
    "contact",
    "poll",
    "reaction",
    "edit",
    "revoke",
    "other",
)
STATUSES = ("", "sent", "delivered", "read", "played")  # in order: a status only moves up
ME = "me"


def status_rank(status: str) -> int:
    return STATUSES.index(status) if status in STATUSES else 0


def thread_id(account: str, chat: str) -> str:
    """A document id: no '/', never '.' or '..' (JIDs contain neither '/' nor start with '.')."""
    return f"{account}:{chat}"


def message_id(sender: str, wa_id: str) -> str:
    """The document id of a message inside its thread. WhatsApp ids are [0-9A-F]{16,32} in
    practice; anything else (a '/' in a hostile id) is hashed so the id stays a valid name."""
    raw = f"{sender}:{wa_id}"
    if "/" in raw or raw.startswith(".") or len(raw) > 700:
        return "h-" + hashlib.sha256(raw.encode()).hexdigest()
    return raw


@dataclass(frozen=True)
class Media:
    type: str  # image | video | audio | document | sticker
    mimetype: str = ""
    size: int = 0
    caption: str = ""
    file_name: str = ""
    sha256: str = ""  # hex, of the plaintext file (WhatsApp's fileSHA256)
    path: str = ""  # where it was downloaded (messages.download_media), else ""


@dataclass(frozen=True)
class Message:
    account: str
    chat: str  # the conversation's JID (a person, a group, status@broadcast)
    sender: str  # ME, or the JID of who sent it
    id: str  # WhatsApp's message id
    timestamp: float  # WhatsApp's, seconds since the epoch
    kind: str
    from_me: bool = False
    text: str = ""  # the text, a caption, a reaction's emoji, an edit's new text
    push_name: str = ""  # the sender's display name
    chat_name: str = ""  # a group's subject or a contact's name, when the event tells
    quoted_id: str = ""  # the id of the message this one replies to
    target: str = ""  # reaction / edit / revoke: the id of the message it acts on
    target_sender: str = ""  # ... and that message's sender (ME when it was ours)
    media: Media | None = None
    status: str = ""  # from_me: sent | delivered | read | played
    source: str = "live"  # live | history

    @property
    def thread(self) -> str:
        return thread_id(self.account, self.chat)

    @property
    def doc_id(self) -> str:
        return message_id(self.sender, self.id)

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.account, self.chat, self.sender, self.id)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        if self.media is None:
            out.pop("media")
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Message:
        fields = dict(raw)
        media = fields.pop("media", None)
        known = cls.__dataclass_fields__
        kept = {k: v for k, v in fields.items() if k in known}
        return cls(**kept, media=Media(**media) if media else None)


@dataclass(frozen=True)
class Receipt:
    account: str
    chat: str
    ids: tuple[str, ...]  # of messages this account sent (sender ME)
    status: str  # delivered | read | played
    timestamp: float

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["ids"] = list(self.ids)
        return out


@dataclass(frozen=True)
class ChatRead:
    """The account read the chat (on the phone): its unread count goes back to 0."""

    account: str
    chat: str
    timestamp: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


Change = Message | Receipt | ChatRead


def change_to_json(change: Change) -> dict[str, Any]:
    return {"type": type(change).__name__, **change.to_json()}


def change_from_json(raw: dict[str, Any]) -> Change:
    raw = dict(raw)
    kind = raw.pop("type")
    if kind == "Message":
        return Message.from_json(raw)
    if kind == "Receipt":
        return Receipt(
            raw["account"], raw["chat"], tuple(raw["ids"]), raw["status"], raw["timestamp"]
        )
    if kind == "ChatRead":
        return ChatRead(raw["account"], raw["chat"], raw["timestamp"])
    raise ValueError(f"unknown change type {kind!r}")


@dataclass
class Thread:
    account: str
    chat: str
    name: str = ""
    last_message_at: float = 0.0
    last_message_id: str = ""
    messages: int = 0
    unread: int = 0

    @property
    def id(self) -> str:
        return thread_id(self.account, self.chat)


@dataclass
class StoredMessage:
    """A message as a store returns it: the message and what happened to it since."""

    message: Message
    status: str = ""
    reactions: dict[str, str] = field(default_factory=dict)  # sender -> emoji
    edited_text: str = ""
    revoked: bool = False
    seq: int = 0  # the store's arrival order within the thread (its order per chat)

    def to_json(self) -> dict[str, Any]:
        out = self.message.to_json()
        out.update(
            status=self.status or self.message.status,
            reactions=self.reactions,
            editedText=self.edited_text,
            revoked=self.revoked,
            seq=self.seq,
        )
        return out
