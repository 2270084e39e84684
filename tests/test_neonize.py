"""The real neonize client: its adapter, and the daemon running it where no route leads out.

WhatsApp's servers cannot be reached from here. What can be: neonize's own event entry points
(the functions the Go library calls) feeding the adapter, and the whole daemon with the real Go
client inside a network namespace with no route (`unshare -rn`), where every connect fails.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from conftest import DaemonProcess, Env, wait_until
from fake_whatsapp import complete
from neonize.proto import Neonize_pb2 as pb

from wadaemon.socket_client import request
from wadaemon.whatsapp.neonize_client import NeonizeClient

PHONE = "15551234567"


def test_events_from_the_go_library_reach_the_sink_as_neonize_objects(tmp_path: Path) -> None:
    """Drive the adapter through neonize's own callback entry points, as the Go side does."""
    received: list[Any] = []

    async def main() -> None:
        client = NeonizeClient("acc1", tmp_path / "session.db", received.append)
        loop = asyncio.get_running_loop()
        client._events_module.event_global_loop = loop  # as run() sets it
        inner = client._client
        for event, code in (
            (pb.LoggedOut(OnConnect=True, Reason=pb.ConnectFailureReason.LOGGED_OUT), 6),
            (pb.TemporaryBan(Code=pb.TemporaryBan.BLOCKED_BY_USERS, Expire=60), 8),
            (pb.StreamReplaced(), 7),
            (
                pb.PairStatus(
                    ID=pb.JID(User=PHONE, Server="s.whatsapp.net"), Status=pb.PairStatus.SUCCESS
                ),
                2,
            ),
        ):
            data = complete(event).SerializeToString()
            buf = ctypes.create_string_buffer(data, len(data))
            # the Go library calls Event.execute from one of its own threads
            await loop.run_in_executor(
                None, inner.event.execute, 0, ctypes.addressof(buf), len(data), code
            )
        qr = ctypes.create_string_buffer(b"2@abc,def,ghi")
        await loop.run_in_executor(None, inner._NewAClient__onQr, 0, ctypes.addressof(qr))
        deadline = time.monotonic() + 5
        while len(received) < 5 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        # nothing was started, so stopping must be a no-op, not a call into Go
        await client.stop()
        assert not await client.is_connected()

    asyncio.run(main())
    names = [type(e).__name__ for e in received]
    assert sorted(names) == sorted(
        ["LoggedOut", "TemporaryBan", "StreamReplaced", "PairStatus", "QR"]
    )
    by_name = {type(e).__name__: e for e in received}
    assert by_name["LoggedOut"].Reason == pb.ConnectFailureReason.LOGGED_OUT
    assert by_name["LoggedOut"].OnConnect is True
    assert by_name["TemporaryBan"].Expire == 60
    assert by_name["PairStatus"].ID.User == PHONE
    assert list(by_name["QR"].Codes) == ["2@abc,def,ghi"]


def paired_looking_session(db: Path) -> None:
    """A session database with whatsmeow's schema (made by the Go library itself) and a device
    row, so that the client tries to log in instead of asking for a QR code."""
    db.parent.mkdir(parents=True, exist_ok=True)
    code = "import sys\nfrom neonize.client import ClientFactory\n"
    code += "ClientFactory.get_all_devices_from_db(sys.argv[1])\n"
    subprocess.run([sys.executable, "-c", code, str(db)], check=True, capture_output=True)
    conn = sqlite3.connect(db)
    r = os.urandom
    conn.execute(
        "INSERT INTO whatsmeow_device (jid, registration_id, noise_key, identity_key, "
        "signed_pre_key, signed_pre_key_id, signed_pre_key_sig, adv_key, adv_details, "
        "adv_account_sig, adv_account_sig_key, adv_device_sig) "
        "VALUES (?, 1234, ?, ?, ?, 1, ?, ?, ?, ?, ?, ?)",
        (
            f"{PHONE}:7@s.whatsapp.net",
            r(32),
            r(32),
            r(32),
            r(64),
            r(32),
            r(40),
            r(64),
            r(32),
            r(64),
        ),
    )
    conn.commit()
    conn.close()


class Offline(DaemonProcess):
    """The daemon, with the real neonize client, in a network namespace with no route."""

    def __init__(self, env: Env) -> None:
        env.write_config(whatsapp={"health_check_seconds": 1})
        super().__init__(env, prefix=("unshare", "-rn"))

    def wait_for_all(self, pattern: str, count: int = 1, timeout: float = 60) -> list[str]:
        regex = re.compile(pattern)
        try:
            wait_until(lambda: len(regex.findall(self.log())) >= count, timeout=timeout)
        except AssertionError:
            raise AssertionError(f"{pattern!r} x{count} not logged:\n{self.log()}") from None
        return regex.findall(self.log())

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def timed_stop(self) -> tuple[int, float]:
        started = time.monotonic()
        code = self.stop()
        return code, time.monotonic() - started


def test_offline_connects_back_off_without_leaking_and_sigterm_stops_fast(env: Env) -> None:
    paired_looking_session(env.sessions / "acc1" / "session.db")
    daemon = Offline(env)
    try:
        daemon.wait_for("ready:", timeout=60)
        # the real Go client tried and failed: no route to WhatsApp
        daemon.wait_for_all(r"acc1: connect failed: .*(unreachable|no such host|dial)")
        first = daemon.fds()
        delays = [int(d) for d in daemon.wait_for_all(r"acc1: .*; retrying in (\d+) s", count=4)]
        assert delays[3] > delays[0], delays  # the backoff grows
        # retries ask whether WhatsApp can be reached before spending a descriptor on neonize
        assert daemon.fds() <= first, (first, daemon.fds())
        _, body = request(env.socket, "GET", "/accounts")
        wa = {a["account"]: a for a in body["accounts"]}["acc1"]["whatsapp"]
        assert wa["state"] == "offline" and wa["connect_failures"] >= 4
        assert wa["phone"] == PHONE
        _status, metrics = request(env.socket, "GET", "/metrics")
        assert 'wadaemon_whatsapp_accounts{state="offline"} 1.0' in metrics
        assert "process_open_fds" in metrics
        code, seconds = daemon.timed_stop()
        assert code == 0, daemon.log()
        assert seconds < 10, seconds
        assert "Traceback" not in daemon.log()
        # the session was never touched by the failures
        conn = sqlite3.connect(env.sessions / "acc1" / "session.db")
        assert conn.execute("SELECT count(*) FROM whatsmeow_device").fetchone()[0] == 1
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.close()
    finally:
        daemon.kill()


def test_pairing_offline_fails_fast_with_the_cause(env: Env) -> None:
    daemon = Offline(env)
    try:
        daemon.wait_for("ready:", timeout=60)
        started = time.monotonic()
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "wadaemon",
                "accounts",
                "add",
                "acc1",
                "--config",
                str(env.config),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 1
        assert "cannot connect to WhatsApp" in proc.stderr, proc.stderr
        assert time.monotonic() - started < 60
        _status, body = request(env.socket, "GET", "/accounts")
        assert {a["account"]: a for a in body["accounts"]}["acc1"]["whatsapp"][
            "state"
        ] == "needs_qr"
        code, seconds = daemon.timed_stop()
        assert code == 0 and seconds < 10
    finally:
        daemon.kill()
