"""Messages with the Firestore target, against the real emulator: threads and messages land in
Firestore, an outbox document written there by another program is sent and its state updated
there, and with two instances only the lease holder sends."""

from __future__ import annotations

from typing import Any

import pytest
import wa_events as ev
from conftest import wait_until
from fake_whatsapp import send_event, sent_messages
from fleet import Fleet

pytestmark = pytest.mark.slow

ANN = "4915112345678@s.whatsapp.net"


def doc(fleet: Fleet, path: str) -> dict[str, Any]:
    snap = fleet.store.client.document(path).get()
    return snap.to_dict() or {} if snap.exists else {}


def test_messages_are_stored_in_threads_and_an_outbox_document_is_sent(fleet: Fleet) -> None:
    fleet.seed(["acc1"])
    fleet.start("i1")
    fleet.wait_all_connected(["acc1"])
    fake = fleet.root / "i1" / "fake"
    for n in range(20):
        send_event(fake, "acc1", ev.message(ANN, f"F{n:02d}", text=f"n{n}", ts=5000 + n))
    send_event(fake, "acc1", ev.message(ANN, "F00", text="n0", ts=5000))  # redelivered
    thread = f"threads/acc1:{ANN}"
    wait_until(lambda: doc(fleet, thread).get("messages") == 20, timeout=30)
    t = doc(fleet, thread)
    assert (t["account"], t["chat"], t["unread"]) == ("acc1", ANN, 20)
    msgs = fleet.store.client.collection(f"{thread}/messages").get()
    assert len(msgs) == 20
    # another program asks for a message to be sent: only account, to and text
    fleet.store.client.document("outbox/crm-4711").set(
        {"account": "acc1", "to": "4915112345678", "text": "your order shipped"}
    )
    wait_until(lambda: doc(fleet, "outbox/crm-4711").get("state") == "sent", timeout=30)
    entry = doc(fleet, "outbox/crm-4711")
    [sent] = sent_messages(fake, "acc1")
    assert sent["text"] == "your order shipped" and entry["waId"] == sent["id"]
    # an invalid one fails with the reason, in Firestore
    fleet.store.client.document("outbox/crm-4712").set({"account": "acc1", "to": "4915112345678"})
    wait_until(lambda: doc(fleet, "outbox/crm-4712").get("state") == "failed", timeout=30)
    assert "text" in doc(fleet, "outbox/crm-4712")["reason"]
    # the sent message is stored as ours; the account record follows
    wait_until(lambda: doc(fleet, thread).get("messages") == 21, timeout=30)
    wait_until(lambda: "lastMessageAt" in doc(fleet, "accounts/acc1"), timeout=30)


def test_only_the_lease_holder_sends(fleet: Fleet) -> None:
    fleet.seed(["acc1", "acc2"])
    fleet.start("i1")
    fleet.start("i2")
    fleet.wait_spread(["acc1", "acc2"], [1, 1])
    holder = {a: i for i, accounts in fleet.by_instance().items() for a in accounts}
    client = fleet.store.client
    for n in range(6):
        account = f"acc{n % 2 + 1}"
        client.document(f"outbox/k{n}").set(
            {"account": account, "to": "4915112345678", "text": f"t{n}"}
        )
    wait_until(
        lambda: all(doc(fleet, f"outbox/k{n}").get("state") == "sent" for n in range(6)),
        timeout=60,
    )
    for account in ("acc1", "acc2"):
        here = sent_messages(fleet.root / holder[account] / "fake", account)
        other = "i2" if holder[account] == "i1" else "i1"
        assert len(here) == 3 and not sent_messages(fleet.root / other / "fake", account)
