"""neonize events (the protobuf objects the client boundary delivers) to message-store changes.

    Message      -> one Message (text, media with type/mimetype/size/caption/file name, a
                    reaction, an edit, a revoke, a reply with the quoted id; from_me when the
                    account sent it from another device)
    Receipt      -> one Receipt (delivered / read / played) for ids this account sent, or a
                    ChatRead when the account read the chat on another device
    HistorySync  -> the Messages of every conversation it carries (source "history")

Only fields are read, nothing is fetched: media content is downloaded elsewhere, and only when
messages.download_media is on. Events the store has no use for (sender-key distribution, app
state keys, other protocol messages) give no change.
"""

from __future__ import annotations

from typing import Any

from wadaemon.messages.model import ME, Change, ChatRead, Media, Message, Receipt

MEDIA_FIELDS = (
    ("imageMessage", "image"),
    ("videoMessage", "video"),
    ("ptvMessage", "video"),
    ("audioMessage", "audio"),
    ("documentMessage", "document"),
    ("stickerMessage", "sticker"),
)
WRAPPERS = (
    "ephemeralMessage",
    "viewOnceMessage",
    "viewOnceMessageV2",
    "viewOnceMessageV2Extension",
    "documentWithCaptionMessage",
    "editedMessage",
)
REVOKE, MESSAGE_EDIT = 0, 14  # ProtocolMessage.Type
RECEIPTS = {"DELIVERED": "delivered", "READ": "read", "PLAYED": "played"}


def jid(j: Any) -> str:
    """A neonize JID as 'user@server' (the device part dropped: one chat per person)."""
    if j is None or (not j.User and not j.Server):
        return ""
    return f"{j.User}@{j.Server}" if j.User else str(j.Server)


def plain(address: str) -> str:
    """'user:device@server' -> 'user@server' (a message key names a person, not a device)."""
    user, at, server = address.partition("@")
    return user.split(":", 1)[0] + at + server


def _sender(src: Any) -> str:
    """The sender's JID; its phone-number form when WhatsApp gives both (LID addressing), so
    that the same message keeps one key whichever form a redelivery uses."""
    sender = jid(src.Sender)
    if sender.endswith("@lid") and src.SenderAlt.User and src.SenderAlt.Server == "s.whatsapp.net":
        return jid(src.SenderAlt)
    return sender


def _unwrap(msg: Any) -> Any:
    for _ in range(4):  # wrappers nest (ephemeral view-once ...)
        for name in WRAPPERS:
            if msg.HasField(name) and msg_has(getattr(msg, name), "message"):
                msg = getattr(msg, name).message
                break
        else:
            return msg
    return msg


def msg_has(obj: Any, field: str) -> bool:
    try:
        return bool(obj.HasField(field))
    except ValueError:
        return False


def _context(msg: Any) -> Any:
    for name in ("extendedTextMessage", *(f for f, _ in MEDIA_FIELDS)):
        if msg.HasField(name) and msg_has(getattr(msg, name), "contextInfo"):
            return getattr(msg, name).contextInfo
    return None


def content(msg: Any, account: str, own: set[str]) -> tuple[str, str, Media | None, str, str, str]:
    """(kind, text, media, quoted id, target id, target sender) of an E2E Message."""
    msg = _unwrap(msg)
    ctx = _context(msg)
    quoted = ctx.stanzaID if ctx is not None and ctx.stanzaID else ""
    if msg.HasField("reactionMessage"):
        r = msg.reactionMessage
        return "reaction", r.text, None, "", r.key.ID, _key_sender(r.key, own)
    if msg.HasField("protocolMessage"):
        p = msg.protocolMessage
        if p.type == REVOKE and p.key.ID:
            return "revoke", "", None, "", p.key.ID, _key_sender(p.key, own)
        if p.type == MESSAGE_EDIT and p.key.ID:
            edited = _unwrap(p.editedMessage)
            text = edited.conversation or edited.extendedTextMessage.text
            return "edit", text, None, "", p.key.ID, _key_sender(p.key, own)
        return "", "", None, "", "", ""
    if msg.conversation:
        return "text", msg.conversation, None, quoted, "", ""
    if msg.HasField("extendedTextMessage"):
        return "text", msg.extendedTextMessage.text, None, quoted, "", ""
    for field, kind in MEDIA_FIELDS:
        if msg.HasField(field):
            m = getattr(msg, field)
            caption = getattr(m, "caption", "") if hasattr(m, "caption") else ""
            media = Media(
                type=kind,
                mimetype=m.mimetype,
                size=int(m.fileLength),
                caption=caption,
                file_name=getattr(m, "fileName", "") if kind == "document" else "",
                sha256=bytes(m.fileSHA256).hex(),
            )
            return kind, caption, media, quoted, "", ""
    if msg.HasField("locationMessage"):
        loc = msg.locationMessage
        text = f"{loc.degreesLatitude},{loc.degreesLongitude} {loc.name}".strip()
        return "location", text, None, quoted, "", ""
    if msg.HasField("contactMessage"):
        return "contact", msg.contactMessage.displayName, None, quoted, "", ""
    for field in ("pollCreationMessage", "pollCreationMessageV2", "pollCreationMessageV3"):
        if msg.HasField(field):
            return "poll", getattr(msg, field).name, None, quoted, "", ""
    if msg.HasField("senderKeyDistributionMessage") and len(msg.ListFields()) == 1:
        return "", "", None, "", "", ""  # key material only
    if msg.HasField("messageContextInfo") and len(msg.ListFields()) == 1:
        return "", "", None, "", "", ""
    return ("other", "", None, quoted, "", "") if msg.ListFields() else ("", "", None, "", "", "")


def _key_sender(key: Any, own: set[str]) -> str:
    """The sender of the message a MessageKey names: ME for ours, else the participant (in a
    group) or the chat (one to one)."""
    if key.fromMe:
        return ME
    who = plain(key.participant or key.remoteJID)
    return ME if who in own else who


def from_message(account: str, event: Any, own: set[str] | None = None) -> Message | None:
    """neonize.proto.Neonize_pb2.Message -> Message (None: nothing a person would see)."""
    info = event.Info
    src = info.MessageSource
    own = own or set()
    kind, text, media, quoted, target, target_sender = content(event.Message, account, own)
    if not kind or not info.ID:
        return None
    chat = jid(src.Chat)
    from_me = bool(src.IsFromMe)
    return Message(
        account=account,
        chat=chat,
        sender=ME if from_me else _sender(src) or chat,
        id=info.ID,
        timestamp=float(info.Timestamp) / (1000.0 if info.Timestamp > 10**11 else 1.0),
        kind=kind,
        from_me=from_me,
        text=text,
        push_name=info.Pushname,
        quoted_id=quoted,
        target=target,
        target_sender=target_sender if not (target_sender == chat and src.IsGroup) else chat,
        media=media,
        status="sent" if from_me else "",
    )


def from_receipt(account: str, event: Any) -> Change | None:
    """neonize.proto.Neonize_pb2.Receipt -> Receipt (ours, seen by them) or ChatRead (theirs,
    read by us on another device)."""
    from wadaemon.whatsapp.neonize_client import neonize_on_python310

    neonize_on_python310()
    from neonize.proto import Neonize_pb2 as pb

    name = pb.Receipt.ReceiptType.Name(event.Type)
    src = event.MessageSource
    chat = jid(src.Chat)
    at = float(event.Timestamp) / (1000.0 if event.Timestamp > 10**11 else 1.0)
    if name == "READ_SELF":
        return ChatRead(account, chat, at)
    status = RECEIPTS.get(name)
    if status is None or not event.MessageIDs or src.IsFromMe:
        return None
    return Receipt(account, chat, tuple(event.MessageIDs), status, at)


def from_history(account: str, event: Any, own: set[str] | None = None) -> list[Message]:
    """neonize.proto.Neonize_pb2.HistorySync -> the Messages of its conversations."""
    out: list[Message] = []
    own = own or set()
    for conv in event.Data.conversations:
        for item in conv.messages:
            web = item.message
            key = web.key
            kind, text, media, quoted, target, target_sender = content(web.message, account, own)
            if not kind or not key.ID:
                continue
            chat = plain(key.remoteJID)
            from_me = bool(key.fromMe)
            sender = ME if from_me else plain(web.participant or key.participant or chat)
            out.append(
                Message(
                    account=account,
                    chat=chat,
                    sender=sender,
                    id=key.ID,
                    timestamp=float(web.messageTimestamp),
                    kind=kind,
                    from_me=from_me,
                    text=text,
                    push_name=web.pushName,
                    quoted_id=quoted,
                    target=target,
                    target_sender=target_sender,
                    media=media,
                    status="sent" if from_me else "",
                    source="history",
                )
            )
    return out


def changes_of(account: str, event: Any, own: set[str] | None = None) -> list[Change]:
    """Every change one neonize event makes ([] for events that are not about messages)."""
    name = type(event).__name__
    if name == "Message":
        m = from_message(account, event, own)
        return [m] if m is not None else []
    if name == "Receipt":
        r = from_receipt(account, event)
        return [r] if r is not None else []
    if name == "HistorySync":
        return list(from_history(account, event, own))
    return []
