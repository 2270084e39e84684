"""Webhooks against a real HTTP receiver (an aiohttp server on 127.0.0.1): retries, restarts,
duplicates, drops, Retry-After, signatures."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import stat
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from wadaemon import __version__
from wadaemon.config import WebhookConfig
from wadaemon.errors import ConfigError
from wadaemon.messages.webhooks import (
    QUEUE_FILE,
    WebhookQueue,
    Webhooks,
    event_body,
    sign,
    verify_signature,
)

SECRET = b"0123456789abcdef0123456789abcdef"
FAST = {"base_delay": 0.01, "max_delay": 0.05}  # the production defaults are 1 s and 300 s


@dataclass
class Seen:
    id: str
    attempt: int
    at: float  # time.monotonic() on arrival
    status: int | str
    signed: bool
    body: bytes
    headers: dict[str, str]


class Receiver:
    """A webhook receiver: `plan(event_id, attempt)` answers a status, (status, headers) or
    "close" (the connection is closed without an answer). Its port is bound from the start but
    listens only after start(): before, connections are refused."""

    def __init__(self, plan: Callable[[str, int], Any] = lambda _id, _n: 200) -> None:
        self.plan = plan
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/hook"
        self.seen: list[Seen] = []
        self.attempts: Counter[str] = Counter()
        self.runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.SockSite(self.runner, self.sock).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
        self.sock.close()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = dict(request.headers)
        event_id = headers["X-Wadaemon-Event-Id"]
        signed = verify_signature(
            SECRET, headers["X-Wadaemon-Timestamp"], body, headers["X-Wadaemon-Signature"]
        )
        self.attempts[event_id] += 1
        n = self.attempts[event_id]
        answer = self.plan(event_id, n)
        status = answer[0] if isinstance(answer, tuple) else answer
        self.seen.append(Seen(event_id, n, time.monotonic(), status, signed, body, headers))
        if answer == "close":
            assert request.transport is not None
            request.transport.close()
            return web.Response()
        if isinstance(answer, tuple):
            return web.Response(status=answer[0], headers=answer[1])
        if answer == "slow":
            await asyncio.sleep(1.0)
            return web.Response()
        return web.Response(status=answer)

    def delivered(self) -> Counter[str]:
        """Event id -> 2xx answers given."""
        return Counter(s.id for s in self.seen if isinstance(s.status, int) and s.status < 300)


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "webhook.key"
    path.write_bytes(SECRET + b"\n")
    path.chmod(0o600)
    return path


def config(url: str, secret_file: Path, **kw: Any) -> WebhookConfig:
    return WebhookConfig(url=url, secret_file=secret_file, **kw)


def events(n: int) -> list[dict[str, Any]]:
    return [{"id": f"ev-{i}", "kind": "message", "text": f"héllo {i}", "n": i} for i in range(n)]


async def run_until(hooks: Webhooks, done: Callable[[], bool], timeout: float = 30.0) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(hooks.run(stop))
    deadline = time.monotonic() + timeout
    try:
        while not done():
            assert not task.done(), task.exception()
            assert time.monotonic() < deadline, "timed out"
            await asyncio.sleep(0.01)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


def test_every_event_arrives_signed_through_503_closed_connections_and_400(
    tmp_path: Path, secret_file: Path
) -> None:
    answers = {1: 503, 2: "close", 3: 400}
    sent = events(50)

    async def main() -> tuple[Receiver, Webhooks]:
        receiver = Receiver(lambda _id, n: answers.get(n, 200))
        await receiver.start()
        queue = WebhookQueue(tmp_path / "messages" / QUEUE_FILE)
        hooks = Webhooks(config(receiver.url, secret_file), queue, **FAST)
        assert hooks.enqueue(sent) == 50
        assert hooks.backlog() == 50
        age = hooks.oldest_age()
        assert age is not None and age >= 0
        try:
            await run_until(hooks, lambda: len(receiver.delivered()) == 50)
        finally:
            await receiver.stop()
        assert hooks.backlog() == 0 and hooks.oldest_age() is None
        queue.close()
        return receiver, hooks

    receiver, hooks = asyncio.run(main())
    assert set(receiver.delivered()) == {e["id"] for e in sent}
    assert all(count == 1 for count in receiver.delivered().values())  # retries only
    assert all(receiver.attempts[e["id"]] == 4 for e in sent)
    assert all(s.signed for s in receiver.seen)
    by_id = {e["id"]: e for e in sent}
    for s in receiver.seen:
        assert s.body == event_body(by_id[s.id]) and json.loads(s.body) == by_id[s.id]
        assert s.headers["Content-Type"] == "application/json"
        assert s.headers["User-Agent"] == f"wadaemon/{__version__}"
        assert s.headers["X-Wadaemon-Signature"] == sign(
            SECRET, s.headers["X-Wadaemon-Timestamp"], s.body
        )
    assert (hooks.delivered, hooks.failed_attempts, hooks.dropped) == (50, 150, 0)


def test_the_queue_survives_a_restart(tmp_path: Path, secret_file: Path) -> None:
    path = tmp_path / "messages" / QUEUE_FILE
    sent = events(20)

    async def main() -> Receiver:
        receiver = Receiver()  # down: connections refused
        queue = WebhookQueue(path)
        hooks = Webhooks(config(receiver.url, secret_file), queue, **FAST)
        assert hooks.enqueue(sent) == 20
        await run_until(hooks, lambda: hooks.failed_attempts >= 3)
        assert hooks.delivered == 0 and hooks.dropped == 0
        queue.close()

        queue = WebhookQueue(path)  # the daemon restarted
        assert queue.backlog() == 20
        hooks = Webhooks(config(receiver.url, secret_file), queue, **FAST)
        await receiver.start()
        try:
            await run_until(hooks, lambda: hooks.backlog() == 0)
        finally:
            await receiver.stop()
            queue.close()
        return receiver

    receiver = asyncio.run(main())
    assert set(receiver.delivered()) == {e["id"] for e in sent}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_an_event_enqueued_twice_is_delivered_once(tmp_path: Path, secret_file: Path) -> None:
    event = {"id": "same", "text": "once"}

    async def main() -> Receiver:
        receiver = Receiver()
        await receiver.start()
        queue = WebhookQueue(tmp_path / QUEUE_FILE)
        hooks = Webhooks(config(receiver.url, secret_file), queue, **FAST)
        assert hooks.enqueue([event, dict(event)]) == 1
        assert hooks.enqueue([event]) == 0
        assert hooks.enqueue([{"id": "other"}]) == 1
        assert hooks.backlog() == 2
        try:
            await run_until(hooks, lambda: hooks.backlog() == 0)
            await asyncio.sleep(0.2)  # time for a duplicate to show up, if there were one
        finally:
            await receiver.stop()
            queue.close()
        return receiver

    receiver = asyncio.run(main())
    assert receiver.attempts == Counter({"same": 1, "other": 1})


def test_an_event_is_dropped_after_max_attempts(
    tmp_path: Path, secret_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dropped: list[str] = []

    async def main() -> tuple[Receiver, Webhooks]:
        receiver = Receiver(lambda event_id, _n: 500 if event_id == "doomed" else 200)
        await receiver.start()
        queue = WebhookQueue(tmp_path / QUEUE_FILE)
        hooks = Webhooks(
            config(receiver.url, secret_file, max_attempts=3),
            queue,
            on_dropped=dropped.append,
            **FAST,
        )
        hooks.enqueue([{"id": "doomed"}])
        try:
            await run_until(hooks, lambda: hooks.dropped == 1)
            assert hooks.backlog() == 0
            # deliveries work again: logged once, at INFO (an enqueue while running wakes run)
            stop = asyncio.Event()
            task = asyncio.create_task(hooks.run(stop))
            await asyncio.sleep(0.05)
            await asyncio.to_thread(hooks.enqueue, [{"id": "fine"}])
            deadline = time.monotonic() + 10
            while hooks.delivered < 1:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            stop.set()
            await task
        finally:
            await receiver.stop()
            queue.close()
        return receiver, hooks

    with caplog.at_level(logging.INFO, logger="wadaemon"):
        receiver, hooks = asyncio.run(main())
    assert dropped == ["doomed"]
    assert receiver.attempts["doomed"] == 3
    assert (hooks.failed_attempts, hooks.dropped, hooks.delivered) == (3, 1, 1)
    ours = [r for r in caplog.records if r.name == "wadaemon"]
    errors = [r.getMessage() for r in ours if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "doomed" in errors[0] and receiver.url in errors[0] and "HTTP 500" in errors[0]
    assert len([r for r in ours if r.levelno == logging.WARNING]) == 1  # not one per attempt
    infos = [r.getMessage() for r in ours if r.levelno == logging.INFO]
    assert len(infos) == 1 and "work again" in infos[0]


def test_retry_after_is_honoured(tmp_path: Path, secret_file: Path) -> None:
    def plan(event_id: str, n: int) -> Any:
        return (429, {"Retry-After": "1"}) if event_id == "first" and n == 1 else 200

    async def main() -> Receiver:
        receiver = Receiver(plan)
        await receiver.start()
        queue = WebhookQueue(tmp_path / QUEUE_FILE)
        hooks = Webhooks(config(receiver.url, secret_file), queue, **FAST)
        hooks.enqueue([{"id": "first"}])
        hooks.enqueue([{"id": "second"}])
        try:
            await run_until(hooks, lambda: hooks.backlog() == 0)
        finally:
            await receiver.stop()
            queue.close()
        return receiver

    receiver = asyncio.run(main())
    refused, *later = receiver.seen
    assert (refused.id, refused.status) == ("first", 429)
    assert {s.id for s in later} == {"first", "second"}
    # the receiver asked for a pause: no request at all (either event) before it is over
    assert all(s.at - refused.at >= 0.95 for s in later)


def test_a_receiver_that_does_not_answer_in_time_is_retried(
    tmp_path: Path, secret_file: Path
) -> None:
    async def main() -> Receiver:
        receiver = Receiver(lambda _id, n: "slow" if n == 1 else 200)
        await receiver.start()
        queue = WebhookQueue(tmp_path / QUEUE_FILE)
        hooks = Webhooks(config(receiver.url, secret_file, timeout_seconds=0.2), queue, **FAST)
        hooks.enqueue([{"id": "late"}])
        try:
            await run_until(hooks, lambda: hooks.backlog() == 0)
        finally:
            await receiver.stop()
            queue.close()
        assert hooks.failed_attempts == 1
        return receiver

    receiver = asyncio.run(main())
    assert receiver.attempts["late"] == 2


def test_the_secret_file(tmp_path: Path, secret_file: Path) -> None:
    queue = WebhookQueue(tmp_path / QUEUE_FILE)
    try:
        assert Webhooks(config("http://x", secret_file), queue).load_secret() == SECRET
        missing = tmp_path / "nope.key"
        with pytest.raises(ConfigError, match=r"nope\.key not found.*head -c 32"):
            Webhooks(config("http://x", missing), queue).load_secret()
        empty = tmp_path / "empty.key"
        empty.write_bytes(b" \n")
        empty.chmod(0o600)
        with pytest.raises(ConfigError, match=r"empty\.key is empty"):
            Webhooks(config("http://x", empty), queue).load_secret()
        secret_file.chmod(0o644)
        with pytest.raises(ConfigError, match="chmod 600"):
            Webhooks(config("http://x", secret_file), queue).load_secret()
    finally:
        queue.close()


def test_verify_signature() -> None:
    body = event_body({"id": "x", "text": "ü"})
    header = sign(SECRET, "1700000000", body)
    assert verify_signature(SECRET, "1700000000", body, header)
    assert not verify_signature(SECRET, "1700000001", body, header)  # another timestamp
    assert not verify_signature(SECRET, "1700000000", body + b" ", header)
    assert not verify_signature(b"other", "1700000000", body, header)
    assert not verify_signature(SECRET, "1700000000", body, "sha256=ünicode")
