"""A fake WhatsApp server: what WhatsApp's servers do with several clients of one session.

WhatsApp keeps one live connection per linked device. When a second client connects with the
same session, the servers tell the first one its stream was replaced and close it; the first
client (whatsmeow) reports StreamReplaced and does not reconnect. Tests that run several daemon
instances against one account need to see who was connected when, and whether two clients of one
account were ever connected at once. This server plays that part in the test process.

Protocol: newline-delimited JSON over a UNIX stream socket.

    client -> server   {"hello": {"account": A, "instance": I}}   first line, once
    server -> client   {"event": "connected"}                     the session is live
    server -> client   {"event": "message", "chat": C}            an incoming message
    server -> client   {"event": "replaced"}                      then the server closes it

A client leaves by shutting down its writing side (EOF); the server then closes its side too.
Writes never block the server: a client that stops reading (SIGSTOP) only fills a buffer, and a
connection the server closes is aborted if its buffer does not drain in time.

The fake client (fake_whatsapp.FakeClient) connects when $FAKE_WHATSAPP_SERVER names the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

HELLO_TIMEOUT_S = 10.0
CLOSE_GRACE_S = 1.0  # a closed connection whose buffer has not drained by then is aborted
LINE_LIMIT = 1 << 20


@dataclass
class Interval:
    """One connection of one client: from its hello until it ended (time.monotonic())."""

    account: str
    instance: str
    connected_at: float
    disconnected_at: float | None = None
    ended: str | None = None  # closed | replaced | server-stop; None while live

    @property
    def live(self) -> bool:
        return self.disconnected_at is None


@dataclass(frozen=True)
class Replacement:
    """A client connected while another of the same account was live; the old one was replaced."""

    account: str
    old: str  # instance
    new: str  # instance
    at: float  # time.monotonic()


class _Conn:
    def __init__(self, writer: asyncio.StreamWriter, interval: Interval) -> None:
        self.writer = writer
        self.interval = interval

    def send(self, message: dict[str, Any]) -> None:
        """Queue a line; never waits for the client to read it."""
        if not self.writer.is_closing():
            self.writer.write(json.dumps(message).encode() + b"\n")

    def close(self) -> None:
        transport = self.writer.transport
        if transport.is_closing():
            return
        transport.close()  # flushes what is buffered, then closes
        asyncio.get_running_loop().call_later(CLOSE_GRACE_S, transport.abort)


class FakeServer:
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._cond = threading.Condition()
        self._intervals: list[Interval] = []
        self._replacements: list[Replacement] = []
        self._live: dict[str, _Conn] = {}
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> FakeServer:
        if self._thread is not None:
            raise RuntimeError("the fake server is already running")
        loop = asyncio.new_event_loop()
        ready: list[BaseException | None] = []
        started = threading.Event()

        def main() -> None:
            asyncio.set_event_loop(loop)
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_unix_server(self._handle, path=str(self.path), limit=LINE_LIMIT)
                )
                ready.append(None)
            except BaseException as exc:
                ready.append(exc)
                started.set()
                loop.close()
                return
            started.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=main, name=f"fake-server-{self.path}", daemon=True)
        self._thread.start()
        started.wait()
        if ready[0] is not None:
            self._thread.join()
            self._thread = self._loop = None
            raise ready[0]
        return self

    def stop(self) -> None:
        """Close every connection (their intervals end as "server-stop") and stop listening."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        self._loop = self._thread = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def __enter__(self) -> FakeServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._live.values()):
            self._ended(conn, "server-stop")
        for writer in list(self._writers):
            writer.transport.abort()
        # the handlers see their connections end; cancelled, asyncio's streams would complain
        if self._handlers:
            _, late = await asyncio.wait(set(self._handlers), timeout=5)
            for task in late:
                task.cancel()

    # --- the connections (on the server's loop) ----------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        conn: _Conn | None = None
        try:
            try:
                line = await asyncio.wait_for(reader.readline(), HELLO_TIMEOUT_S)
                hello = json.loads(line)["hello"]
                account, instance = str(hello["account"]), str(hello["instance"])
            except (asyncio.TimeoutError, ValueError, KeyError, TypeError, OSError):
                return  # not a client (or it died before saying who it is): nothing to record
            conn = self._connect(account, instance, writer)
            with contextlib.suppress(OSError, ValueError, asyncio.LimitOverrunError):
                while await reader.readline():
                    pass  # clients send nothing after the hello; EOF ends the connection
        finally:
            if conn is not None:
                self._ended(conn, "closed")
            self._writers.discard(writer)
            self._handlers.discard(task)
            transport = writer.transport
            if not transport.is_closing():
                transport.close()
                asyncio.get_running_loop().call_later(CLOSE_GRACE_S, transport.abort)

    def _connect(self, account: str, instance: str, writer: asyncio.StreamWriter) -> _Conn:
        now = time.monotonic()
        conn = _Conn(writer, Interval(account, instance, now))
        with self._cond:
            old = self._live.get(account)
            if old is not None:
                old.interval.disconnected_at, old.interval.ended = now, "replaced"
                self._replacements.append(
                    Replacement(account, old.interval.instance, instance, now)
                )
            self._intervals.append(conn.interval)
            self._live[account] = conn
            self._cond.notify_all()
        if old is not None:
            old.send({"event": "replaced"})
            old.close()
        conn.send({"event": "connected"})
        return conn

    def _ended(self, conn: _Conn, how: str) -> None:
        with self._cond:
            interval = conn.interval
            if interval.disconnected_at is None:
                interval.disconnected_at, interval.ended = time.monotonic(), how
            if self._live.get(interval.account) is conn:
                del self._live[interval.account]
            self._cond.notify_all()

    def _push(self, account: str, message: dict[str, Any]) -> str | None:
        conn = self._live.get(account)
        if conn is None or conn.writer.is_closing():
            return None
        conn.send(message)
        return conn.interval.instance

    # --- for tests (any thread) ------------------------------------------------------------------

    def connected(self, account: str) -> str | None:
        """The instance connected for the account now, if any."""
        with self._cond:
            conn = self._live.get(account)
            return conn.interval.instance if conn is not None else None

    def live(self) -> dict[str, str]:
        with self._cond:
            return {account: c.interval.instance for account, c in self._live.items()}

    def intervals(self, account: str | None = None) -> list[Interval]:
        """Every connection so far, in the order they said hello (copies)."""
        with self._cond:
            return [
                Interval(i.account, i.instance, i.connected_at, i.disconnected_at, i.ended)
                for i in self._intervals
                if account is None or i.account == account
            ]

    def replacements(self) -> list[Replacement]:
        with self._cond:
            return list(self._replacements)

    def overlaps(self) -> list[Replacement]:
        """The moments two clients of one account were connected at once: each replacement."""
        return self.replacements()

    def connects(self, account: str) -> list[str]:
        """The instances that connected for the account, in order (one entry per connection)."""
        return [i.instance for i in self.intervals(account)]

    def send_message(self, account: str, chat: str = "someone") -> str | None:
        """Push an incoming message to the client live for the account: its instance, or None."""
        loop = self._loop
        if loop is None:
            return None

        async def push() -> str | None:
            return self._push(account, {"event": "message", "chat": chat})

        return asyncio.run_coroutine_threadsafe(push(), loop).result(10)

    def wait_gone(self, instance: str, timeout: float = 10.0) -> None:
        """Wait until no connection of `instance` is live (the server has seen each one end)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                left_live = sorted(
                    a for a, c in self._live.items() if c.interval.instance == instance
                )
                if not left_live:
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"connections of {instance} still live after {timeout} s: {left_live}"
                    )
                self._cond.wait(left)

    def wait_connected(
        self, account: str, instance: str | None = None, timeout: float = 20.0
    ) -> str:
        """Wait until a client (`instance`, if given) is connected for the account; which one."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                conn = self._live.get(account)
                if conn is not None and instance in (None, conn.interval.instance):
                    return conn.interval.instance
                left = deadline - time.monotonic()
                if left <= 0:
                    now = conn.interval.instance if conn is not None else None
                    which = f" of {instance}" if instance else ""
                    raise AssertionError(
                        f"{account}: no connection{which} within {timeout} s "
                        f"(connected now: {now}; connects: "
                        f"{[i.instance for i in self._intervals if i.account == account]})"
                    )
                self._cond.wait(left)
