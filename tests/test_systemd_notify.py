"""sd_notify against a real datagram socket: READY, STATUS, WATCHDOG, RELOADING, STOPPING."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import DaemonProcess, Env, make_db, wait_until

pytestmark = pytest.mark.slow


@dataclass
class NotifySocket:
    """What systemd would receive: every datagram, with the time it arrived."""

    path: Path
    messages: list[tuple[float, str]] = field(default_factory=list)
    session_at_ready: bool | None = None
    watch: Path | None = None

    def fields(self, key: str) -> list[tuple[float, str]]:
        out = []
        for t, msg in self.messages:
            for line in msg.splitlines():
                if line.startswith(key + "="):
                    out.append((t, line[len(key) + 1 :]))
        return out

    def count(self, line: str) -> int:
        return sum(1 for _, m in self.messages if line in m.splitlines())

    def pings(self, since: float = 0.0) -> list[float]:
        return [t for t, m in self.messages if "WATCHDOG=1" in m.splitlines() and t >= since]


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.2)
    ns = NotifySocket(path)
    stop = threading.Event()

    def receive() -> None:
        while not stop.is_set():
            try:
                data = sock.recv(4096)
            except TimeoutError:
                continue
            text = data.decode("utf-8")
            if "READY=1" in text.splitlines() and ns.session_at_ready is None and ns.watch:
                ns.session_at_ready = ns.watch.exists()
            ns.messages.append((time.monotonic(), text))

    thread = threading.Thread(target=receive, daemon=True)
    thread.start()
    yield ns
    stop.set()
    thread.join()
    sock.close()


def start(
    env: Env, daemon_factory: type[DaemonProcess], notify: NotifySocket, watchdog_usec: int
) -> DaemonProcess:
    return daemon_factory(
        env,
        {
            "NOTIFY_SOCKET": str(notify.path),
            "WATCHDOG_USEC": str(watchdog_usec),
            "WADAEMON_FAULTS": "1",
        },
    )


def curl(env: Env, method: str, url: str) -> tuple[int, str]:
    out = subprocess.run(
        [
            "curl",
            "-s",
            "-X",
            method,
            "--unix-socket",
            str(env.socket),
            "-w",
            "\n%{http_code}",
            f"http://localhost{url}",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    body, _, code = out.rpartition("\n")
    return int(code), body


def test_ready_only_after_restore_then_status_and_stopping(
    env: Env, daemon_factory: type[DaemonProcess], notify: NotifySocket
) -> None:
    db = env.sessions / "alice" / "session.db"
    make_db(db, rows=20_000)
    env.cli("backup", check=True)
    shutil.rmtree(env.sessions)
    notify.watch = db
    daemon = start(env, daemon_factory, notify, 0)
    wait_until(lambda: notify.count("READY=1") == 1, timeout=60)
    assert notify.session_at_ready is True  # restored before READY, never after
    log = daemon.log()
    assert log.index("restore: alice: restored") < log.index("ready:")
    statuses = [s for _, s in notify.fields("STATUS")]
    assert any(s.startswith("restoring") for s in statuses), statuses
    wait_until(
        lambda: (
            "last backup 0s ago" in notify.fields("STATUS")[-1][1]
            or "last backup 1s ago" in notify.fields("STATUS")[-1][1]
        ),
        timeout=20,
    )
    assert notify.fields("STATUS")[-1][1].startswith("1 account: 1 protected")
    assert daemon.stop() == 0
    assert notify.count("STOPPING=1") == 1
    stopping_at = next(t for t, m in notify.messages if "STOPPING=1" in m)
    ready_at = next(t for t, m in notify.messages if "READY=1" in m)
    assert stopping_at > ready_at
    assert not notify.pings()  # no WATCHDOG_USEC, no pings


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


def test_watchdog_pings_at_half_the_interval_and_stop_when_the_loop_hangs(
    env: Env, daemon_factory: type[DaemonProcess], notify: NotifySocket
) -> None:
    make_db(env.sessions / "alice" / "session.db", rows=10)
    daemon = start(env, daemon_factory, notify, 2_000_000)  # WatchdogSec=2 -> every ~1 s
    wait_until(lambda: notify.count("READY=1") == 1)
    time.sleep(4)
    pings = notify.pings()
    assert 3 <= len(pings) <= 8, pings
    assert max(gaps(pings)) < 2.0  # always inside WatchdogSec
    hung_at = time.monotonic()
    assert curl(env, "POST", "/debug/hang/loop?seconds=4")[0] == 200
    time.sleep(6)
    assert max(gaps(notify.pings(hung_at - 1.5))) > 3.5  # no ping while the loop was stuck
    assert notify.pings(time.monotonic() - 1.5)  # and pings again afterwards
    assert daemon.stop() == 0


def test_watchdog_stops_when_the_watcher_or_a_backup_hangs(
    env: Env, daemon_factory: type[DaemonProcess], notify: NotifySocket
) -> None:
    env.write_config(timeout_seconds=1)
    make_db(env.sessions / "alice" / "session.db", rows=10)
    daemon = start(env, daemon_factory, notify, 1_000_000)
    wait_until(lambda: notify.count("READY=1") == 1)
    wait_until(lambda: env.head_generation("alice") == 1)

    # a stuck backup: health says failing (503), pings stop, then resume once it finishes
    hung_at = time.monotonic()
    assert curl(env, "POST", "/debug/hang/backup?seconds=4")[0] == 200
    time.sleep(2.5)
    code, body = curl(env, "GET", "/health")
    assert code == 503
    health = json.loads(body)
    assert health["status"] == "failing"
    assert health["checks"]["backup_engine"]["status"] == "failing"
    wait_until(lambda: curl(env, "GET", "/health")[0] == 200, timeout=20)
    time.sleep(1.5)
    assert max(gaps(notify.pings(hung_at))) > 2.0
    assert notify.pings(time.monotonic() - 1.0)

    # a watcher that stopped watching: degraded at first, failing after the grace period
    hung_at = time.monotonic()
    assert curl(env, "POST", "/debug/hang/watcher?seconds=8")[0] == 200
    time.sleep(1)
    assert json.loads(curl(env, "GET", "/health")[1])["checks"]["watcher"]["status"] == "degraded"
    time.sleep(5.5)
    code, body = curl(env, "GET", "/health")
    assert code == 503 and json.loads(body)["checks"]["watcher"]["status"] == "failing"
    wait_until(lambda: curl(env, "GET", "/health")[0] == 200, timeout=20)
    time.sleep(1.0)
    assert max(gaps(notify.pings(hung_at))) > 1.5
    assert "watchdog: not pinging systemd" in daemon.log()
    assert daemon.stop() == 0


def test_sighup_reloads_a_valid_file_and_keeps_running_on_an_invalid_one(
    env: Env, daemon_factory: type[DaemonProcess], notify: NotifySocket
) -> None:
    daemon = start(env, daemon_factory, notify, 0)
    wait_until(lambda: notify.count("READY=1") == 1)

    env.write_config(debounce_seconds=0.5, keep_generations=2)
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: notify.count("READY=1") == 2)
    reloading = [m for _, m in notify.messages if "RELOADING=1" in m.splitlines()]
    assert len(reloading) == 1
    usec = int(
        next(
            line for line in reloading[0].splitlines() if line.startswith("MONOTONIC_USEC=")
        ).split("=")[1]
    )
    assert abs(usec / 1e6 - time.clock_gettime(time.CLOCK_MONOTONIC)) < 30
    wait_until(lambda: "reload: done" in daemon.log())

    good = env.config.read_text()
    env.config.write_text(good + "backup_typo: 1\n")
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: notify.count("READY=1") == 3)
    wait_until(lambda: "keeping the running configuration" in daemon.log())
    assert "backup_typo: unknown key" in daemon.log()
    assert daemon.proc.poll() is None

    # still working on the old configuration
    (env.sessions / "bob").mkdir(parents=True)
    (env.sessions / "bob" / "creds.json").write_text("{}")
    wait_until(lambda: env.head_generation("bob") == 1)
    assert daemon.stop() == 0


def test_sighup_applies_a_new_key_for_rotation(
    env: Env, daemon_factory: type[DaemonProcess], notify: NotifySocket
) -> None:

    state = env.sessions / "carol" / "creds.json"
    state.parent.mkdir(parents=True)
    state.write_text('{"v": 1}')
    daemon = start(env, daemon_factory, notify, 0)
    wait_until(lambda: env.head_generation("carol") == 1)
    env.rotate_key()
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "reload: new encryption key" in daemon.log())
    state.write_text('{"v": 2}')
    wait_until(lambda: env.head_generation("carol") == 2)
    assert daemon.stop() == 0
    gens = env.replica().generations("carol")
    assert gens[0].key_id == env.replica().keyring.current.key_id
    assert gens[1].key_id != gens[0].key_id


def test_journal_stream_gives_priority_prefixes_and_no_timestamps(env: Env) -> None:
    env.key.chmod(0o644)
    proc = subprocess.run(
        [sys.executable, "-m", "wadaemon", "run", "--config", str(env.config)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "JOURNAL_STREAM": "8:1234"},
    )
    assert proc.returncode == 78
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("<2>cannot continue: ")
    assert "chmod 600" in lines[-1]
    assert not any(line[3:4].isdigit() for line in lines)  # no timestamps


def test_a_deleted_key_file_fails_health_but_not_the_watchdog(
    env: Env, daemon_factory: type[DaemonProcess], notify: NotifySocket
) -> None:
    daemon = start(env, daemon_factory, notify, 1_000_000)
    wait_until(lambda: notify.count("READY=1") == 1)
    assert json.loads(curl(env, "GET", "/health")[1])["checks"]["keys"]["status"] == "ok"
    copy = env.root / "copy.key"
    env.key.rename(copy)
    deleted_at = time.monotonic()
    wait_until(lambda: curl(env, "GET", "/health")[0] == 503, timeout=25)  # checked every 10 s
    keys = json.loads(curl(env, "GET", "/health")[1])["checks"]["keys"]
    assert keys["status"] == "failing"
    assert f"encryption.key_file: key file {env.key} not found" in keys["detail"]
    assert "the daemon keeps using key" in keys["detail"]
    assert "put the file back from your copy before the next restart" in keys["detail"]
    time.sleep(11)  # checked again: still failing, logged once
    assert curl(env, "GET", "/health")[0] == 503
    assert daemon.log().count("keys: ") == 1
    assert max(gaps(notify.pings(deleted_at))) < 1.0  # a lost key is no reason for a restart

    copy.rename(env.key)
    wait_until(lambda: curl(env, "GET", "/health")[0] == 200, timeout=25)
    assert daemon.log().count(f"keys: key file {env.key}: ok again") == 1
    assert daemon.stop() == 0
