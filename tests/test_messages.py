"""Messages in and out, end to end: the real daemon with the embedded store (directory target),
real neonize events through the client boundary, `wadaemon send` and `wadaemon messages`, the
control socket; the send call is the test client's (fake_whatsapp), which can fail on demand."""

from __future__ import annotations

import http.server
import itertools
import json
import re
import shutil
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import wa_events as ev
from conftest import DaemonProcess, Env, wait_until
from fake_whatsapp import sent_messages
from test_whatsapp import WhatsAppEnv

from wadaemon.messages.webhooks import verify_signature
from wadaemon.socket_client import request, stream

ANN = "4915112345678@s.whatsapp.net"
BOB = "4915187654321@s.whatsapp.net"


@pytest.fixture
def wa(env: Env, daemon_factory: type[DaemonProcess]) -> WhatsAppEnv:
    w = WhatsAppEnv(env, daemon_factory)
    env.write_config(
        whatsapp={"health_check_seconds": 0.5},
        messages={"send_gap_seconds": 0, "per_recipient_per_hour": 1000},
    )
    return w


def stored(wa: WhatsAppEnv, account: str, **query: str) -> list[dict[str, Any]]:
    q = "&".join(f"{k}={v}" for k, v in {"limit": "1000", **query}.items())
    status, body = request(wa.env.socket, "GET", f"/accounts/{account}/messages?{q}")
    assert status == 200, body
    return list(body["messages"])


def threads(wa: WhatsAppEnv, account: str) -> dict[str, dict[str, Any]]:
    status, body = request(wa.env.socket, "GET", f"/accounts/{account}/threads")
    assert status == 200, body
    return {t["chat"]: t for t in body["threads"]}


def send_cli(wa: WhatsAppEnv, *args: str) -> tuple[int, str, str]:
    proc = wa.cli("send", *args)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def test_incoming_messages_are_stored_once_with_their_threads(wa: WhatsAppEnv) -> None:
    wa.start()
    wa.pair("acc1")
    events = [
        ev.message(ANN, "A1", text="hello", push_name="Ann", ts=1000),
        ev.message(ANN, "A2", content=ev.image("a photo"), ts=1001),
        ev.message(BOB, "B1", text="hi", ts=1002),
        ev.message(ANN, "A1", text="hello", push_name="Ann", ts=1000),  # redelivered
        ev.message(ANN, "A3", content=ev.reaction(ANN, "A1", "👍"), ts=1003),
        ev.message(BOB, "B2", content=ev.reply("and?", "B1"), ts=1004),
    ]
    for e in events:
        wa.send("acc1", e)
    wait_until(lambda: len(stored(wa, "acc1")) == 5, timeout=30)
    ann = stored(wa, "acc1", chat=ANN)
    assert [m["id"] for m in ann] == ["A1", "A2", "A3"]
    assert ann[0]["reactions"] == {ANN: "👍"} and ann[0]["push_name"] == "Ann"
    assert ann[1]["kind"] == "image" and ann[1]["media"]["caption"] == "a photo"
    assert stored(wa, "acc1", chat=BOB)[1]["quoted_id"] == "B1"
    t = threads(wa, "acc1")
    assert (t[ANN]["messages"], t[ANN]["unread"], t[BOB]["messages"]) == (3, 2, 2)
    # read on the phone: unread back to 0
    wa.send("acc1", ev.receipt(ANN, ["A2"], "READ_SELF"))
    wait_until(lambda: threads(wa, "acc1")[ANN]["unread"] == 0)
    # the account record follows
    wait_until(lambda: "lastMessageAt" in (wa.store().read_account("acc1") or {}))
    # and `wadaemon messages` shows them
    out = wa.env.cli("messages", "acc1", "--chat", ANN, check=True).stdout
    assert "Ann: hello" in out and "[image] a photo" in out


def test_history_sync_after_pairing_fills_the_same_threads(wa: WhatsAppEnv) -> None:
    wa.start()
    wa.pair("acc1")
    wa.send("acc1", ev.message(ANN, "A9", text="live", ts=2000))
    wa.send("acc1", ev.history({ANN: [("A8", "older", 1500, False), ("A9", "live", 2000, False)]}))
    wait_until(lambda: len(stored(wa, "acc1")) == 2, timeout=30)
    assert [m["id"] for m in stored(wa, "acc1")] == ["A8", "A9"]
    assert threads(wa, "acc1")[ANN]["unread"] == 1  # history is not unread


def test_send_with_the_cli_is_marked_sent_and_stored_as_ours(wa: WhatsAppEnv) -> None:
    wa.start()
    wa.pair("acc1")
    code, out, err = send_cli(wa, "acc1", "+49 151 12345678", "hello there", "--key", "k1")
    assert code == 0, err
    assert out.startswith("k1: sent, WhatsApp id 3EB0"), out
    [sent] = sent_messages(wa.fake, "acc1")
    assert (sent["to"], sent["text"]) == ("4915112345678@s.whatsapp.net", "hello there")
    # the same key again: no second send, the first entry's state
    code, out, _ = send_cli(wa, "acc1", "4915112345678", "hello there", "--key", "k1")
    assert code == 0 and "(this key was queued before)" in out
    assert len(sent_messages(wa.fake, "acc1")) == 1
    # stored as the account's own message; a receipt moves its status
    wait_until(lambda: any(m["from_me"] for m in stored(wa, "acc1")))
    [mine] = [m for m in stored(wa, "acc1") if m["from_me"]]
    assert mine["id"] == sent["id"] and mine["status"] == "sent"
    wa.send("acc1", ev.receipt(ANN, [sent["id"]], "READ"))
    wait_until(lambda: stored(wa, "acc1")[0]["status"] == "read")


def test_transient_failures_are_retried_permanent_ones_fail_at_once(wa: WhatsAppEnv) -> None:
    wa.start()
    wa.pair("acc1")
    (wa.fake / "acc1" / "send_script").write_text("transient\ntransient\nok\n")
    code, out, err = send_cli(wa, "acc1", "4915112345678", "try again", "--key", "t1")
    assert code == 0, out + err
    _status, entry = request(wa.env.socket, "GET", "/outbox/t1")
    assert entry["state"] == "sent" and entry["attempts"] == 3, entry
    started = time.monotonic()
    code, out, _ = send_cli(wa, "acc1", "0001234", "nobody", "--key", "p1")
    assert code == 1 and "p1: failed: 0001234 is not on WhatsApp" in out, out
    assert time.monotonic() - started < 20  # not retried
    (wa.fake / "acc1" / "send_script").write_text("permanent\n")
    code, out, _ = send_cli(wa, "acc1", "4915112345678", "refused", "--key", "p2")
    assert code == 1 and "failed" in out and "479" in out
    code, out, _ = send_cli(wa, "acc1", "not-a-number", "x", "--key", "p3")
    assert code == 1 and "neither a phone number" in out, out
    texts = [s["text"] for s in sent_messages(wa.fake, "acc1")]
    assert texts == ["try again"]


def test_an_ambiguous_send_becomes_unknown_and_is_not_repeated(wa: WhatsAppEnv) -> None:
    wa.start()
    wa.pair("acc1")
    (wa.fake / "acc1" / "send_script").write_text("ambiguous\n")
    code, out, _ = send_cli(wa, "acc1", "4915112345678", "maybe", "--key", "u1")
    assert code == 1 and "u1: unknown" in out and "resend" in out, out
    time.sleep(2)
    assert len(sent_messages(wa.fake, "acc1")) == 1


def test_sends_are_paced_per_account_and_capped_per_recipient(
    env: Env, daemon_factory: type[DaemonProcess]
) -> None:
    wa = WhatsAppEnv(env, daemon_factory)
    env.write_config(
        whatsapp={"health_check_seconds": 0.5},
        messages={"send_gap_seconds": 1.5, "per_recipient_per_hour": 2},
    )
    wa.start()
    wa.pair("acc1")
    for n in range(3):
        code, _, err = send_cli(wa, "acc1", "4915112345678", f"m{n}", "--key", f"g{n}", "--no-wait")
        assert code == 0, err
    code, _, err = send_cli(wa, "acc1", "4915187654321", "other", "--key", "o1", "--no-wait")
    wait_until(lambda: len(sent_messages(wa.fake, "acc1")) == 3, timeout=30)
    time.sleep(3)
    sent = sent_messages(wa.fake, "acc1")
    assert [s["text"] for s in sent] == ["m0", "m1", "other"]  # m2: over the hourly cap
    gaps = [b["at"] - a["at"] for a, b in itertools.pairwise(sent)]
    assert all(g >= 1.4 for g in gaps), gaps
    _status, entry = request(wa.env.socket, "GET", "/outbox/g2")
    assert entry["state"] == "queued", entry


def test_the_event_stream_shows_new_messages_and_outbox_states(wa: WhatsAppEnv) -> None:
    wa.start()
    wa.pair("acc1")
    seen: list[dict[str, Any]] = []
    lines = stream(wa.env.socket, "GET", "/events?account=acc1", timeout=30)
    assert next(lines)["type"] == "subscribed"
    wa.send("acc1", ev.message(ANN, "S1", text="streamed"))
    for event in lines:
        seen.append(event)
        if event.get("type") == "message":
            break
    assert seen[-1]["id"] == f"message:acc1:{ANN}:{ANN}:S1" and seen[-1]["wa_id"] == "S1"
    assert seen[-1]["text"] == "streamed"
    # an outbox entry's states follow on the same stream
    status, _ = request(
        wa.env.socket,
        "POST",
        "/accounts/acc1/messages",
        body={"to": ANN, "text": "hi", "key": "e1"},
    )
    assert status == 201
    states = []
    for event in lines:
        if event.get("type") == "outbox":
            states.append(event["state"])
            if event["state"] == "sent":
                break
    assert states == ["sending", "sent"], states


def test_garbage_on_the_send_endpoint_gets_a_clear_error(wa: WhatsAppEnv) -> None:
    wa.start()
    wa.pair("acc1")
    for body, words in (
        ([1, 2], "JSON object"),
        ({"to": ANN}, "`text` is empty"),
        ({"to": ANN, "text": "x", "colour": "red"}, "unknown field(s) colour"),
        ({"to": 5, "text": "x"}, "`to` must be a string"),
    ):
        status, answer = request(
            wa.env.socket, "POST", "/accounts/acc1/messages", body=body, timeout=10
        )
        assert status == 400 and words in answer["error"], (body, answer)
    status, answer = request(
        wa.env.socket, "POST", "/accounts/nobody/messages", body={"to": ANN, "text": "x"}
    )
    assert status == 400 and "no account nobody here" in answer["error"], answer
    status, answer = request(wa.env.socket, "GET", "/accounts/acc1/messages?limit=x")
    assert status == 400 and "limit must be a number" in answer["error"]


def test_the_embedded_store_survives_losing_the_disk(wa: WhatsAppEnv) -> None:
    daemon = wa.start()
    wa.pair("acc1")
    for n in range(50):
        wa.send("acc1", ev.message(ANN, f"R{n:03d}", text=f"n{n}", ts=3000 + n))
    code, _, err = send_cli(wa, "acc1", "4915112345678", "kept", "--key", "kept-1")
    assert code == 0, err
    wait_until(lambda: len(stored(wa, "acc1")) == 51, timeout=30)
    assert daemon.stop() == 0  # its last act: a backup of the embedded store
    store = wa.env.root / "messages" / "protected" / "store"
    assert (store / "messages.db").exists()  # beside the sessions, not inside one
    assert (wa.env.backups / ".messages" / "store" / "HEAD.json").exists()
    shutil.rmtree(wa.env.root / "messages")  # the disk is gone (the sessions with it)
    shutil.rmtree(wa.env.sessions)
    daemon = wa.start()
    daemon.wait_for("messages: embedded store")
    assert re.search(r"messages: embedded store .*: store: restored", daemon.log()), daemon.log()
    wa.wait_state("acc1", "connected")
    assert [m["text"] for m in stored(wa, "acc1")][:50] == [f"n{n}" for n in range(50)]
    status, entry = request(wa.env.socket, "GET", "/outbox/kept-1")
    assert status == 200 and entry["state"] == "sent", entry
    # the same key after the loss still sends nothing new
    code, out, _ = send_cli(wa, "acc1", "4915112345678", "kept", "--key", "kept-1")
    assert code == 0 and "queued before" in out
    assert len(sent_messages(wa.fake, "acc1")) == 1


def test_media_is_downloaded_when_asked_up_to_its_cap(
    env: Env, daemon_factory: type[DaemonProcess]
) -> None:
    wa = WhatsAppEnv(env, daemon_factory)
    env.write_config(
        whatsapp={"health_check_seconds": 0.5},
        messages={"download_media": "true", "media_max_mb": 1},
    )
    wa.start()
    wa.pair("acc1")
    wa.send("acc1", ev.message(ANN, "P1", content=ev.image("cat", size=600_000)))
    wa.send("acc1", ev.message(ANN, "P2", content=ev.image("dog", size=600_000)))  # past 1 MiB
    wait_until(lambda: len(stored(wa, "acc1")) == 2, timeout=30)
    first, second = stored(wa, "acc1")
    path = first["media"]["path"]
    assert path.startswith(str(env.root / "messages" / "media" / "acc1")) and path.endswith(".jpg")
    wait_until(lambda: Path(path).exists(), timeout=30)
    assert Path(path).read_bytes()[:6] == b"catcat" and Path(path).stat().st_size == 600_000
    assert oct(Path(path).stat().st_mode & 0o777) == "0o600"
    assert wa.daemon is not None
    wa.daemon.wait_for("media is no longer downloaded", timeout=30)
    assert not Path(second["media"]["path"]).exists()


class HookReceiver(http.server.ThreadingHTTPServer):
    """A webhook receiver (the standard library's HTTP server, in a thread) that answers 503 to
    the first two deliveries of each event, then 200."""

    def __init__(self) -> None:
        self.got: list[tuple[dict[str, str], bytes]] = []
        self.tries: Counter[str] = Counter()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(handler) -> None:
                body = handler.rfile.read(int(handler.headers["Content-Length"]))
                event_id = handler.headers["X-Wadaemon-Event-Id"]
                self.tries[event_id] += 1
                ok = self.tries[event_id] > 2
                if ok:
                    self.got.append((dict(handler.headers), body))
                handler.send_response(200 if ok else 503)
                handler.send_header("Content-Length", "0")
                handler.end_headers()

            def log_message(handler, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook"


def test_a_webhook_that_fails_at_first_gets_every_event_signed(
    env: Env, daemon_factory: type[DaemonProcess]
) -> None:
    receiver = HookReceiver()
    secret = env.root / "webhook.secret"
    secret.write_text("s3cret-for-the-receiver\n")
    secret.chmod(0o600)
    wa = WhatsAppEnv(env, daemon_factory)
    env.write_config(
        whatsapp={"health_check_seconds": 0.5},
        messages={"webhook": {"url": receiver.url, "secret_file": secret}},
    )
    try:
        wa.start()
        wa.pair("acc1")
        for n in range(5):
            wa.send("acc1", ev.message(ANN, f"W{n}", text=f"w{n}", ts=4000 + n))
        wa.send("acc1", ev.message(ANN, "W0", text="w0", ts=4000))  # redelivered: no new event
        wait_until(lambda: len(receiver.got) >= 5, timeout=60)
        time.sleep(2)
        ids = [headers["X-Wadaemon-Event-Id"] for headers, _ in receiver.got]
        assert sorted(ids) == [f"message:acc1:{ANN}:{ANN}:W{n}" for n in range(5)]
        for headers, body in receiver.got:
            signature = headers["X-Wadaemon-Signature"]
            assert verify_signature(
                b"s3cret-for-the-receiver", headers["X-Wadaemon-Timestamp"], body, signature
            )
            assert json.loads(body)["text"].startswith("w")
        assert all(receiver.tries[i] == 3 for i in ids)
    finally:
        receiver.shutdown()
