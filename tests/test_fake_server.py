"""The fake WhatsApp server and the fake client's connection to it.

Most tests need no daemon: clients are raw sockets in this process, or fake clients in processes
of their own (killed, stopped). The last one runs the real daemon with its client on the server.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import DaemonProcess, Env, wait_until
from fake_server import FakeServer, Replacement
from fake_whatsapp import FAKE_DIR_ENV, INSTANCE_ENV, SERVER_ENV, calls
from test_whatsapp import WhatsAppEnv

from wadaemon.restore import Restorer

TESTS = Path(__file__).parent
FAKE_CLIENT = TESTS / "fake_whatsapp.py"


class RawClient:
    """A client of the fake server speaking the protocol by hand, in this process."""

    def __init__(self, path: Path, account: str, instance: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(path))
        hello = {"hello": {"account": account, "instance": instance}}
        self.sock.sendall(json.dumps(hello).encode() + b"\n")
        self.file = self.sock.makefile("rb")
        assert self.read() == {"event": "connected"}

    def read(self) -> Any:
        """The next message, or None at EOF."""
        line = self.file.readline()
        return json.loads(line) if line else None

    def leave(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)
        while self.read() is not None:
            pass
        self.close()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


class ClientProcess:
    """fake_whatsapp.FakeClient in a process of its own: another host's client."""

    def __init__(self, server: Path, account: str, db: Path, instance: str, fake_dir: Path):
        environ = {
            **os.environ,
            FAKE_DIR_ENV: str(fake_dir),
            SERVER_ENV: str(server),
            INSTANCE_ENV: instance,
        }
        self.proc = subprocess.Popen(
            [sys.executable, str(FAKE_CLIENT), account, str(db)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=environ,
        )
        self.events: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.events.put(line.strip())

    def expect(self, event: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(seen.startswith(event) for seen in self.seen):
            try:
                self.seen.append(self.events.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                raise AssertionError(f"no {event} within {timeout} s: {self.seen}") from None

    def drain(self) -> list[str]:
        while True:
            try:
                self.seen.append(self.events.get_nowait())
            except queue.Empty:
                return self.seen

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)


RAW_CLIENT = """
import json, socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
hello = {"hello": {"account": sys.argv[2], "instance": sys.argv[3]}}
s.sendall(json.dumps(hello).encode() + b"\\n")
print(s.makefile("rb").readline().decode().strip(), flush=True)
time.sleep(3600)
"""


@pytest.fixture
def server(tmp_path: Path) -> Iterator[FakeServer]:
    with FakeServer(tmp_path / "wa.sock") as s:
        yield s


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()  # also ends a stopped one
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def paired_db(path: Path, phone: str = "15551234567") -> Path:
    """A session database holding a paired device, as whatsmeow leaves it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    conn.executescript(
        "CREATE TABLE whatsmeow_device (jid TEXT PRIMARY KEY, push_name TEXT, noise_key BLOB);"
        "CREATE TABLE whatsmeow_sessions (their_id TEXT PRIMARY KEY, session BLOB);"
    )
    conn.execute("INSERT INTO whatsmeow_device VALUES (?, 'Fake Phone', x'00')", (f"{phone}:7@s",))
    conn.commit()
    conn.close()
    return path


def client_process(
    server: FakeServer,
    processes: list[subprocess.Popen[str]],
    tmp_path: Path,
    instance: str,
    account: str = "acc1",
) -> ClientProcess:
    host = tmp_path / instance
    client = ClientProcess(
        server.path, account, paired_db(host / "session.db"), instance, host / "fake"
    )
    processes.append(client.proc)
    return client


# --- the server alone --------------------------------------------------------------------------


def test_a_second_client_replaces_the_first(server: FakeServer) -> None:
    a = RawClient(server.path, "acc1", "host-a")
    other = RawClient(server.path, "acc2", "host-a")
    assert server.connected("acc1") == "host-a"
    assert server.live() == {"acc1": "host-a", "acc2": "host-a"}
    assert server.replacements() == []
    b = RawClient(server.path, "acc1", "host-b")
    # the old one is told, then closed; the new one is live
    assert a.read() == {"event": "replaced"}
    assert a.read() is None
    a.close()
    assert server.connected("acc1") == "host-b"
    assert server.live() == {"acc1": "host-b", "acc2": "host-a"}
    [replacement] = server.replacements()
    assert replacement == Replacement("acc1", "host-a", "host-b", replacement.at)
    assert server.overlaps() == [replacement]
    first, second = server.intervals("acc1")
    assert (first.instance, first.ended, first.disconnected_at) == (
        "host-a",
        "replaced",
        replacement.at,
    )
    assert second.instance == "host-b" and second.live and second.connected_at == replacement.at
    assert first.connected_at < second.connected_at
    # a client that leaves ends its interval as closed; the account has no client then
    b.leave()
    wait_until(lambda: server.connected("acc1") is None, timeout=5)
    assert server.intervals("acc1")[1].ended == "closed"
    assert server.connects("acc1") == ["host-a", "host-b"]
    assert server.send_message("acc1") is None
    assert server.wait_connected("acc2") == "host-a"
    with pytest.raises(AssertionError, match="no connection of host-b"):
        server.wait_connected("acc2", "host-b", timeout=0.2)
    server.stop()
    assert other.read() is None
    other.close()
    assert [i.ended for i in server.intervals()] == ["replaced", "server-stop", "closed"]
    assert not server.path.exists()


def test_send_message_reaches_the_live_client(
    server: FakeServer, processes: list[subprocess.Popen[str]], tmp_path: Path
) -> None:
    client = client_process(server, processes, tmp_path, "host-m")
    client.expect("Connected")
    # Connected comes only after the server has the connection
    assert server.connected("acc1") == "host-m"
    assert server.send_message("acc1", chat="15550001111") == "host-m"
    client.expect("Message")
    db = sqlite3.connect(tmp_path / "host-m" / "session.db")
    assert db.execute("SELECT their_id FROM whatsmeow_sessions").fetchall() == [("15550001111",)]
    db.close()
    assert "event Message" in calls(tmp_path / "host-m" / "fake", "acc1")
    assert server.send_message("nobody") is None
    # stop() leaves the server: the interval ends as closed, and no StreamReplaced is reported
    client.signal(signal.SIGTERM)
    assert client.proc.wait(20) == 0
    assert server.connected("acc1") is None
    [interval] = server.intervals("acc1")
    assert interval.ended == "closed"
    assert "StreamReplaced" not in client.drain()


def test_a_killed_client_ends_its_interval(
    server: FakeServer, processes: list[subprocess.Popen[str]], tmp_path: Path
) -> None:
    client = client_process(server, processes, tmp_path, "host-k")
    client.expect("Connected")
    assert server.wait_connected("acc1", "host-k") == "host-k"
    client.signal(signal.SIGKILL)
    client.proc.wait(10)
    wait_until(lambda: server.connected("acc1") is None, timeout=10)
    [interval] = server.intervals("acc1")
    assert interval.ended == "closed" and interval.disconnected_at is not None
    assert server.replacements() == []


def test_a_stopped_client_does_not_block_the_server(
    server: FakeServer, processes: list[subprocess.Popen[str]]
) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", RAW_CLIENT, str(server.path), "acc1", "host-s"],
        stdout=subprocess.PIPE,
        text=True,
    )
    processes.append(proc)
    assert proc.stdout is not None
    assert json.loads(proc.stdout.readline()) == {"event": "connected"}
    os.kill(proc.pid, signal.SIGSTOP)
    # far more than the socket's buffers hold: it never reads them
    started = time.monotonic()
    for n in range(10000):
        assert server.send_message("acc1", chat=f"chat-{n}-{'x' * 100}") == "host-s"
    assert time.monotonic() - started < 30
    # the socket of a stopped process stays open: it is replaced all the same
    started = time.monotonic()
    b = RawClient(server.path, "acc1", "host-b")
    assert time.monotonic() - started < 5
    assert server.connected("acc1") == "host-b"
    assert server.send_message("acc1") == "host-b"
    assert b.read() == {"event": "message", "chat": "someone"}
    assert [(r.old, r.new) for r in server.replacements()] == [("host-s", "host-b")]
    assert [i.ended for i in server.intervals("acc1")] == ["replaced", None]
    b.leave()
    os.kill(proc.pid, signal.SIGCONT)


def test_a_replaced_fake_client_reports_it_and_stays_off(
    server: FakeServer, processes: list[subprocess.Popen[str]], tmp_path: Path
) -> None:
    a = client_process(server, processes, tmp_path, "host-a")
    a.expect("Connected")
    a.signal(signal.SIGSTOP)
    b = client_process(server, processes, tmp_path, "host-b")
    b.expect("Connected")
    assert server.connected("acc1") == "host-b"
    a.signal(signal.SIGCONT)
    a.expect("StreamReplaced")
    time.sleep(1.5)  # it does not come back by itself
    assert server.connects("acc1") == ["host-a", "host-b"]
    assert server.connected("acc1") == "host-b"
    assert "StreamReplaced" not in b.drain()
    # when the server goes away, a client cannot tell it from a replacement: it stays off too
    server.stop()
    b.expect("StreamReplaced")
    assert [i.ended for i in server.intervals("acc1")] == ["replaced", "server-stop"]


def test_an_unreachable_server_is_a_connect_error(
    processes: list[subprocess.Popen[str]], tmp_path: Path
) -> None:
    host = tmp_path / "host"
    client = ClientProcess(
        tmp_path / "nothing.sock", "acc1", paired_db(host / "session.db"), "host", host / "fake"
    )
    processes.append(client.proc)
    assert client.proc.wait(20) == 1
    client.expect("ConnectError cannot reach the fake server: FileNotFoundError")


# --- with the daemon -----------------------------------------------------------------------------


@pytest.mark.slow
def test_the_daemons_client_on_the_server_is_replaced_by_another_host(
    env: Env,
    daemon_factory: type[DaemonProcess],
    monkeypatch: pytest.MonkeyPatch,
    processes: list[subprocess.Popen[str]],
    tmp_path: Path,
) -> None:
    server = FakeServer(tmp_path / "wa.sock").start()
    try:
        # the daemon process inherits these
        monkeypatch.setenv(SERVER_ENV, str(server.path))
        monkeypatch.setenv(INSTANCE_ENV, "host-a")
        wa = WhatsAppEnv(env, daemon_factory)
        wa.start()
        wa.pair("acc1")
        assert server.connected("acc1") == "host-a"
        wa.settled("acc1")
        before = env.head_generation("acc1")
        assert before is not None
        # a message changes the session: a new generation
        assert server.send_message("acc1", chat="15550001111") == "host-a"
        wait_until(lambda: (env.head_generation("acc1") or 0) > before)
        # another host restores the session from the backup and connects with it
        host_b = tmp_path / "host-b"
        Restorer(env.layout(), env.replica()).restore_to("acc1", host_b / "session")
        db = sqlite3.connect(host_b / "session" / "session.db")
        assert db.execute("SELECT their_id FROM whatsmeow_sessions").fetchall() == [
            ("15550001111",)
        ]
        db.close()
        b = ClientProcess(
            server.path, "acc1", host_b / "session" / "session.db", "host-b", host_b / "fake"
        )
        processes.append(b.proc)
        b.expect("Connected")
        wa.wait_state("acc1", "replaced")
        assert wa.daemon is not None
        wa.daemon.wait_for("acc1: another client took over this session (stream replaced)")
        wait_until(lambda: calls(wa.fake, "acc1")[-1] == "stopped")
        # the daemon does not fight over it
        time.sleep(3)
        assert server.connects("acc1") == ["host-a", "host-b"]
        assert server.connected("acc1") == "host-b"
        assert wa.client_state("acc1") == "replaced"
        assert [(r.account, r.old, r.new) for r in server.overlaps()] == [
            ("acc1", "host-a", "host-b")
        ]
        assert [i.ended for i in server.intervals("acc1")] == ["replaced", None]
    finally:
        server.stop()
