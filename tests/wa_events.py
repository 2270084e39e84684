"""Real neonize event objects (neonize.proto.Neonize_pb2) as WhatsApp would deliver them, for
the message tests: texts, media, reactions, edits, revokes, receipts and history syncs."""

from __future__ import annotations

from typing import Any

from fake_whatsapp import complete
from neonize.proto import Neonize_pb2 as pb
from neonize.proto.waE2E import WAWebProtobufsE2E_pb2 as e2e
from neonize.proto.waHistorySync import WAWebProtobufsHistorySync_pb2 as hs

US = "s.whatsapp.net"
GROUP = "g.us"


def jid(address: str) -> Any:
    """'user[:device]@server' as the JID protobuf whatsmeow sends."""
    user, _, server = address.partition("@")
    user, _, device = user.partition(":")
    return pb.JID(User=user, Server=server or US, Device=int(device or 0))


def message(
    chat: str,
    msg_id: str,
    *,
    text: str = "",
    ts: int = 1_760_000_000,
    sender: str | None = None,
    from_me: bool = False,
    push_name: str = "",
    content: Any = None,
) -> Any:
    """A MessageEv: `text` (a conversation) or `content` (an E2E Message) from `sender` (default:
    the chat, a one-to-one conversation) in `chat`."""
    group = chat.endswith("@" + GROUP)
    ev = pb.Message(
        Info=pb.MessageInfo(
            MessageSource=pb.MessageSource(
                Chat=jid(chat),
                Sender=jid(sender or chat),
                IsFromMe=from_me,
                IsGroup=group,
            ),
            ID=msg_id,
            Timestamp=ts,
            Pushname=push_name,
        ),
        Message=content if content is not None else e2e.Message(conversation=text),
    )
    return complete(ev)


def reply(text: str, quoted_id: str) -> Any:
    return e2e.Message(
        extendedTextMessage=e2e.ExtendedTextMessage(
            text=text, contextInfo=e2e.ContextInfo(stanzaID=quoted_id)
        )
    )


def image(caption: str, mimetype: str = "image/jpeg", size: int = 34567) -> Any:
    return e2e.Message(
        imageMessage=e2e.ImageMessage(caption=caption, mimetype=mimetype, fileLength=size)
    )


def document(file_name: str, mimetype: str = "application/pdf", size: int = 1000) -> Any:
    return e2e.Message(
        documentMessage=e2e.DocumentMessage(fileName=file_name, mimetype=mimetype, fileLength=size)
    )


def _key(chat: str, target: str, from_me: bool, participant: str = "") -> Any:
    from neonize.proto.waCommon import WACommon_pb2 as wc

    return wc.MessageKey(remoteJID=chat, fromMe=from_me, ID=target, participant=participant)


def reaction(chat: str, target: str, emoji: str, *, target_from_me: bool = False) -> Any:
    return e2e.Message(
        reactionMessage=e2e.ReactionMessage(key=_key(chat, target, target_from_me), text=emoji)
    )


def edit(chat: str, target: str, new_text: str) -> Any:
    return e2e.Message(
        protocolMessage=e2e.ProtocolMessage(
            key=_key(chat, target, True),
            type=e2e.ProtocolMessage.MESSAGE_EDIT,
            editedMessage=e2e.Message(conversation=new_text),
        )
    )


def revoke(chat: str, target: str, *, target_from_me: bool = False) -> Any:
    return e2e.Message(
        protocolMessage=e2e.ProtocolMessage(
            key=_key(chat, target, target_from_me), type=e2e.ProtocolMessage.REVOKE
        )
    )


def receipt(chat: str, ids: list[str], kind: str = "READ", ts: int = 1_760_000_100) -> Any:
    ev = pb.Receipt(
        MessageSource=pb.MessageSource(Chat=jid(chat), Sender=jid(chat)),
        MessageIDs=ids,
        Timestamp=ts,
        Type=getattr(pb.Receipt, kind),
    )
    return complete(ev)


def history(conversations: dict[str, list[tuple[str, str, int, bool]]]) -> Any:
    """A HistorySync: {chat: [(id, text, ts, from_me), ...]}."""
    from neonize.proto.waCommon import WACommon_pb2 as wc
    from neonize.proto.waWeb import WAWebProtobufsWeb_pb2 as web

    data = hs.HistorySync(syncType=hs.HistorySync.INITIAL_BOOTSTRAP)
    for chat, items in conversations.items():
        conv = data.conversations.add(ID=chat)
        for n, (msg_id, text, ts, from_me) in enumerate(items):
            conv.messages.add(
                message=web.WebMessageInfo(
                    key=wc.MessageKey(remoteJID=chat, fromMe=from_me, ID=msg_id),
                    message=e2e.Message(conversation=text),
                    messageTimestamp=ts,
                ),
                msgOrderID=n,
            )
    return complete(pb.HistorySync(Data=data))
