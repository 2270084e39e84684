"""kill -9 of the daemon at random moments while messages arrive and the outbox sends: no stored
message lost or stored twice, no outbox entry sent twice, every entry ends sent, failed or
unknown. The embedded store (directory target); the test client acknowledges an event once the
daemon's callback returned (see fake_whatsapp), so what is acknowledged must be stored."""

from __future__ import annotations

import random
import time
from collections import Counter

import pytest
import wa_events as ev
from conftest import DaemonProcess, Env, wait_until
from fake_whatsapp import sent_messages
from test_whatsapp import WhatsAppEnv

from wadaemon.messages.sqlite_messages import SqliteMessages
from wadaemon.messages.sqlite_outbox import SqliteOutbox
from wadaemon.socket_client import request

pytestmark = pytest.mark.slow

TRIALS = 20
CHATS = [f"49151000000{n:02d}@s.whatsapp.net" for n in range(5)]


def test_kill_9_while_messages_arrive_and_the_outbox_sends(
    env: Env, daemon_factory: type[DaemonProcess]
) -> None:
    wa = WhatsAppEnv(env, daemon_factory)
    env.write_config(
        whatsapp={"health_check_seconds": 0.5},
        messages={"send_gap_seconds": 0, "per_recipient_per_hour": 10_000},
    )
    rng = random.Random(1313)
    wa.start()
    wa.pair("acc1")
    produced: set[str] = set()
    queued: set[str] = set()  # outbox keys the daemon confirmed
    n = 0
    for trial in range(TRIALS):
        daemon = wa.daemon
        assert daemon is not None
        wa.wait_state("acc1", "connected", timeout=60)
        script = ["hang 0.4" if rng.random() < 0.5 else "ok" for _ in range(6)]
        (wa.fake / "acc1" / "send_script").write_text("\n".join(script) + "\n")
        deadline = time.monotonic() + rng.uniform(0.2, 2.0)
        while time.monotonic() < deadline:
            n += 1
            chat = rng.choice(CHATS)
            msg_id = f"T{trial:02d}M{n:05d}"
            wa.send("acc1", ev.message(chat, msg_id, text=f"m{n}", ts=1_760_000_000 + n))
            produced.add(msg_id)
            if rng.random() < 0.2:  # a redelivery of an earlier one
                old = rng.choice(sorted(produced))
                wa.send("acc1", ev.message(rng.choice(CHATS), old, text="dup", ts=1))
            if rng.random() < 0.3:
                key = f"k{trial:02d}-{n}"
                try:
                    status, _ = request(
                        env.socket,
                        "POST",
                        "/accounts/acc1/messages",
                        body={"to": "4915112345678", "text": key, "key": key},
                        timeout=5,
                    )
                except Exception:
                    status = 0
                if status in (200, 201):
                    queued.add(key)
            time.sleep(0.01)
        daemon.kill()
        wa.start()
    # the last run takes what is left: every event delivered, every entry final
    inbox = wa.fake / "acc1" / "inbox"
    wait_until(lambda: not list(inbox.glob("*.pb")), timeout=60)
    outbox = SqliteOutbox(env.root / "messages" / "protected" / "store" / "outbox.db")

    def all_final() -> bool:
        pending = outbox.pending({"acc1"})
        return not pending

    wait_until(all_final, timeout=120)
    assert wa.daemon is not None and wa.daemon.stop() == 0
    store = SqliteMessages(env.root / "messages" / "protected" / "store" / "messages.db")
    stored = [m.message for m in store.messages("acc1", None, 0.0, 100_000)]
    theirs = [m for m in stored if not m.from_me]
    ids = Counter(m.id for m in theirs)
    assert set(ids) == produced, f"lost: {sorted(produced - set(ids))[:10]}"
    # a redelivery in another chat is another message (ids are unique per chat and sender);
    # the same chat, sender and id is stored once
    assert len({(m.chat, m.sender, m.id) for m in theirs}) == len(theirs)
    sends = Counter(s["text"] for s in sent_messages(wa.fake, "acc1"))
    twice = {text: c for text, c in sends.items() if c > 1}
    assert not twice, f"sent twice: {twice}"
    states = Counter()
    for key in queued:
        entry = outbox.get(key)
        assert entry is not None, key
        assert entry.state in ("sent", "failed", "unknown"), entry
        states[entry.state] += 1
        if entry.state == "sent":
            assert sends[key] == 1, entry
    assert states["sent"] >= len(queued) // 2, states
    print(f"{TRIALS} kills: {len(produced)} messages, {len(queued)} outbox entries: {dict(states)}")
    # own sent messages are stored too (receipts find them)
    mine = {m.id for m in stored if m.from_me}
    assert {s["id"] for s in sent_messages(wa.fake, "acc1")} >= mine
    store.close()
    outbox.close()
