"""Real neonize protobuf events (serialized and parsed back, as they cross the Go boundary) to
the changes the message store keeps."""

from __future__ import annotations

from typing import Any

import wa_events as ev
from neonize.proto import Neonize_pb2 as pb
from neonize.proto.waE2E import WAWebProtobufsE2E_pb2 as e2e

from wadaemon.messages.convert import changes_of
from wadaemon.messages.model import ME, ChatRead, Message, Receipt

ANN = "4915112345678@s.whatsapp.net"
GROUP = "120363000000000001@g.us"


def wire(event: Any) -> Any:
    return type(event).FromString(event.SerializeToString())


def one(event: Any) -> Any:
    changes = changes_of("acc", wire(event))
    assert len(changes) == 1, changes
    return changes[0]


def test_a_text_from_a_contact_is_keyed_by_chat_sender_and_id() -> None:
    m = one(ev.message(ANN, "3EB0A1", text="hello", push_name="Ann", ts=1_760_000_123))
    assert isinstance(m, Message)
    assert m.key == ("acc", ANN, ANN, "3EB0A1")
    assert (m.kind, m.text, m.push_name, m.timestamp, m.from_me) == (
        "text",
        "hello",
        "Ann",
        1_760_000_123.0,
        False,
    )


def test_in_a_group_the_sender_is_the_participant_without_its_device() -> None:
    m = one(ev.message(GROUP, "X1", text="hi all", sender="4916000000001:12@s.whatsapp.net"))
    assert (m.chat, m.sender) == (GROUP, "4916000000001@s.whatsapp.net")


def test_a_message_sent_from_the_phone_is_from_me_with_sender_me() -> None:
    m = one(ev.message(ANN, "M1", text="on my way", from_me=True))
    assert (m.sender, m.from_me, m.status) == (ME, True, "sent")


def test_media_keeps_type_mimetype_size_caption_and_file_name() -> None:
    m = one(ev.message(ANN, "I1", content=ev.image("look", size=34567)))
    assert m.kind == "image" and m.text == "look"
    assert m.media is not None and (m.media.mimetype, m.media.size, m.media.caption) == (
        "image/jpeg",
        34567,
        "look",
    )
    d = one(ev.message(ANN, "D1", content=ev.document("invoice.pdf", size=1000)))
    assert d.media is not None and (d.kind, d.media.file_name, d.media.size) == (
        "document",
        "invoice.pdf",
        1000,
    )


def test_a_reply_names_the_quoted_id() -> None:
    assert one(ev.message(ANN, "R1", content=ev.reply("yes", "3EB0A1"))).quoted_id == "3EB0A1"


def test_reactions_edits_and_revokes_name_their_target() -> None:
    r = one(ev.message(ANN, "X2", content=ev.reaction(ANN, "3EB0A1", "👍")))
    assert (r.kind, r.text, r.target, r.target_sender) == ("reaction", "👍", "3EB0A1", ANN)
    e = one(ev.message(ANN, "X3", from_me=True, content=ev.edit(ANN, "M1", "on my way!")))
    assert (e.kind, e.text, e.target, e.target_sender) == ("edit", "on my way!", "M1", ME)
    v = one(ev.message(ANN, "X4", content=ev.revoke(ANN, "3EB0A1")))
    assert (v.kind, v.target) == ("revoke", "3EB0A1")


def test_receipts_of_our_messages_and_reads_on_another_device() -> None:
    r = one(ev.receipt(ANN, ["M1", "M2"], "DELIVERED"))
    assert r == Receipt("acc", ANN, ("M1", "M2"), "delivered", 1_760_000_100.0)
    assert one(ev.receipt(ANN, ["M1"], "READ")).status == "read"
    assert isinstance(one(ev.receipt(ANN, ["3EB0A1"], "READ_SELF")), ChatRead)
    assert changes_of("acc", wire(ev.receipt(ANN, ["M1"], "RETRY"))) == []


def test_history_sync_gives_the_same_keys_as_live_delivery() -> None:
    sync = ev.history({ANN: [("3EB0A1", "hello", 1_760_000_123, False), ("M1", "hi", 5, True)]})
    changes = changes_of("acc", wire(sync))
    assert [c.key for c in changes if isinstance(c, Message)] == [
        ("acc", ANN, ANN, "3EB0A1"),
        ("acc", ANN, ME, "M1"),
    ]
    assert all(isinstance(c, Message) and c.source == "history" for c in changes)
    live = one(ev.message(ANN, "3EB0A1", text="hello"))
    assert live.key == changes[0].key


def test_events_that_carry_no_message_give_no_change() -> None:
    assert changes_of("acc", pb.Connected(status=True)) == []
    keys_only = e2e.Message(
        senderKeyDistributionMessage=e2e.SenderKeyDistributionMessage(groupID=GROUP)
    )
    assert changes_of("acc", wire(ev.message(GROUP, "K1", content=keys_only))) == []
