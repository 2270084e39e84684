"""The health, metrics and control socket, driven by curl and raw sockets as users would."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import DaemonProcess, Env, make_db, wait_until

pytestmark = pytest.mark.slow


def curl(
    sock: Path, url: str, method: str = "GET", user: str | None = None, groups: str = ""
) -> tuple[int, str]:
    cmd = [
        "curl",
        "-s",
        "-X",
        method,
        "--unix-socket",
        str(sock),
        "-w",
        "\n%{http_code}",
        f"http://localhost{url}",
    ]
    if user:
        grouping = [f"--groups={groups}"] if groups else ["--clear-groups"]
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", *grouping, *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
    body, _, code = out.rpartition("\n")
    return int(code or 0), body  # 000: could not connect


@pytest.fixture
def running(env: Env, daemon_factory: type[DaemonProcess]) -> DaemonProcess:
    make_db(env.sessions / "alice" / "session.db", rows=100)
    daemon = daemon_factory()
    daemon.wait_for("ready")
    wait_until(lambda: env.head_generation("alice") == 1)
    return daemon


def test_health_metrics_accounts_backup_and_verify(env: Env, running: DaemonProcess) -> None:
    mode = stat.S_IMODE(env.socket.stat().st_mode)
    assert mode == 0o660
    code, body = curl(env.socket, "/health")
    assert code == 200
    health = json.loads(body)
    assert health["status"] == "ok" and health["phase"] == "running"
    assert set(health["checks"]) >= {"event_loop", "watcher", "backup_engine", "store", "accounts"}
    alice = health["accounts"]["alice"]
    assert alice["generation"] == 1 and alice["state"] == "protected"
    assert alice["seconds_since_last_backup"] is not None

    code, metrics = curl(env.socket, "/metrics")
    assert code == 200
    assert 'wadaemon_accounts{state="protected"} 1.0' in metrics
    assert 'wadaemon_backups_total{account="alice",result="created"} 1.0' in metrics
    assert 'wadaemon_seconds_since_last_backup{account="alice"}' in metrics
    assert "wadaemon_restores_total" in metrics or "wadaemon_restores" in metrics
    assert "wadaemon_store_up 1.0" in metrics

    code, body = curl(env.socket, "/accounts")
    assert code == 200 and json.loads(body)["accounts"][0]["account"] == "alice"
    code, body = curl(env.socket, "/accounts/alice/backup", "POST")
    assert code == 200 and json.loads(body)["ok"] is True
    code, body = curl(env.socket, "/accounts/alice/verify", "POST")
    assert code == 200 and json.loads(body)["ok"] is True and json.loads(body)["generation"] == 1
    code, body = curl(env.socket, "/accounts/nobody/backup", "POST")
    assert code == 409 and "no such account" in json.loads(body)["error"]
    code, body = curl(env.socket, "/accounts/..%2Fetc/backup", "POST")
    assert code in (400, 404)
    assert curl(env.socket, "/nothing-here")[0] == 404
    assert curl(env.socket, "/health", "DELETE")[0] == 405


def test_unprivileged_peer_sees_health_but_not_control(
    env: Env, daemon_factory: type[DaemonProcess]
) -> None:
    nobody = "65534"
    public = Path(tempfile.mkdtemp(prefix="wadaemon-test-", dir="/tmp"))
    public.chmod(0o755)
    env.extra["socket"] = public / "wadaemon.sock"
    env.write_config()
    running = daemon_factory()
    running.wait_for("ready")
    # a member of nobody's world cannot even connect to the 0660 socket
    assert curl(env.socket, "/health", user=nobody)[0] == 0
    os.chmod(env.socket, 0o666)  # let an outsider connect, so the peer check is what refuses
    assert curl(env.socket, "/health", user=nobody)[0] == 200
    code, body = curl(env.socket, "/accounts", user=nobody)
    assert code == 403
    assert "permission denied" in json.loads(body)["error"]
    assert curl(env.socket, "/accounts/alice/backup", "POST", user=nobody)[0] == 403
    assert "denied GET /accounts to uid 65534" in running.log()
    # a member of the daemon's group (a supplementary group, as `adduser USER wadaemon` makes)
    member = curl(env.socket, "/accounts", user=nobody, groups=str(os.getgid()))
    assert member[0] == 200, member
    assert running.stop() == 0
    shutil.rmtree(public)


def raw(sock_path: Path, data: bytes, timeout: float = 5.0) -> bytes:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(str(sock_path))
    s.sendall(data)
    chunks = []
    try:
        while chunk := s.recv(65536):
            chunks.append(chunk)
    except (TimeoutError, ConnectionResetError):
        pass
    s.close()
    return b"".join(chunks)


def test_garbage_oversized_slow_and_many_clients_never_stall_it(
    env: Env, running: DaemonProcess
) -> None:
    assert raw(env.socket, b"\x00\xff\xfe garbage \r\n\r\n").split(b" ")[1] == b"400"
    assert raw(
        env.socket, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n"
    ).split(b" ")[1] in (b"400", b"431")
    # slow clients that never finish their request, and many idle connections
    idle = []
    for i in range(300):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(env.socket))
        if i % 3 == 0:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # headers never end
        idle.append(s)
    started = time.monotonic()
    code, _ = curl(env.socket, "/health")
    assert code == 200
    assert time.monotonic() - started < 5
    for s in idle:
        s.close()
    # and the daemon still backs up
    (env.sessions / "alice" / "creds.json").write_text("{}")
    wait_until(lambda: env.head_generation("alice") == 2)
    assert running.proc.poll() is None
    assert "Traceback" not in running.log() and "ERROR" not in running.log()


def test_stale_socket_is_replaced_and_a_foreign_file_refused(
    env: Env, daemon_factory: type[DaemonProcess], running: DaemonProcess
) -> None:
    running.kill()
    assert env.socket.is_socket()  # left behind by SIGKILL
    again = daemon_factory()
    again.wait_for("ready")
    assert "replacing the stale socket" in again.log()
    assert curl(env.socket, "/health")[0] == 200
    assert again.stop() == 0
    assert not env.socket.exists()  # removed on a clean stop

    env.socket.write_text("not a socket")
    third = daemon_factory()
    assert third.proc.wait(30) == 1
    assert "exists and is not a socket" in third.log()
    assert env.socket.read_text() == "not a socket"


def test_status_command(env: Env, daemon_factory: type[DaemonProcess]) -> None:
    proc = env.cli("status")
    assert proc.returncode == 3
    assert "not running" in proc.stderr
    make_db(env.sessions / "alice" / "session.db", rows=10)
    daemon = daemon_factory()
    daemon.wait_for("ready")
    wait_until(lambda: env.head_generation("alice") == 1)
    proc = env.cli("status")
    assert proc.returncode == 0, proc.stderr
    assert ": ok (running)" in proc.stdout
    assert "alice" in proc.stdout and "protected" in proc.stdout
    proc = env.cli("status", "--json")
    assert json.loads(proc.stdout)["accounts"]["alice"]["generation"] == 1
    assert daemon.stop() == 0
    assert env.cli("status").returncode == 3
    assert sys.executable  # the CLI ran with this interpreter
