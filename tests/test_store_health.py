"""Store health tells the truth: "ok" only after the store answered, an outage stays an outage
while nothing needs uploading, and a store that lost what the daemon committed gets it again."""

from __future__ import annotations

import json
import os
import time

import pytest
from conftest import DaemonProcess, Env, wait_until
from firestore_emulator import Emulator
from tcp_proxy import TcpProxy
from test_firestore_daemon import firestore_config, head_generation

pytestmark = pytest.mark.slow


def store_check(env: Env) -> dict[str, str]:
    check: dict[str, str] = json.loads(env.cli("status", "--json").stdout)["checks"]["store"]
    return check


def test_an_outage_stays_an_outage_while_nothing_needs_uploading(
    env: Env, daemon_factory: type[DaemonProcess], firestore_emulator: Emulator
) -> None:
    proxy = TcpProxy(("127.0.0.1", int(firestore_emulator.address.rsplit(":", 1)[1])))
    firestore_config(env, firestore_emulator, interval_seconds=1)
    (env.sessions / "alice").mkdir(parents=True)
    (env.sessions / "alice" / "creds.json").write_text('{"me": 1}')
    old = time.time() - 60  # not racily new: the safety passes trust its fingerprint
    os.utime(env.sessions / "alice" / "creds.json", (old, old))
    daemon = daemon_factory(env, {"FIRESTORE_EMULATOR_HOST": proxy.address})
    daemon.wait_for("ready", timeout=60)
    wait_until(lambda: head_generation(firestore_emulator, "alice") == 1, 30)
    assert store_check(env)["status"] == "ok"

    proxy.cut()
    wait_until(lambda: store_check(env)["status"] == "degraded", 60)
    seen = set()
    deadline = time.monotonic() + 8  # several safety passes that find nothing to upload
    while time.monotonic() < deadline:
        seen.add(store_check(env)["status"])
        time.sleep(0.2)
    assert seen == {"degraded"}, seen
    proxy.restore()
    wait_until(lambda: store_check(env)["status"] == "ok", 60)
    assert daemon.stop() == 0


def test_a_store_that_lost_its_data_gets_every_session_again(
    env: Env, daemon_factory: type[DaemonProcess], firestore_emulator: Emulator
) -> None:
    firestore_config(env, firestore_emulator, interval_seconds=1)
    for account in ("alice", "bob"):
        (env.sessions / account).mkdir(parents=True)
        (env.sessions / account / "creds.json").write_text(json.dumps({"me": account}))
    daemon = daemon_factory()
    daemon.wait_for("ready", timeout=60)
    for account in ("alice", "bob"):
        wait_until(lambda a=account: head_generation(firestore_emulator, a) == 1, 30)  # type: ignore[misc]
    firestore_emulator.wipe()  # the store forgets everything; the sessions do not change
    for account in ("alice", "bob"):
        wait_until(lambda a=account: head_generation(firestore_emulator, a) == 1, 30)  # type: ignore[misc]
    assert "is gone; backing the session up again" in daemon.log()
    dest = env.root / "restored"
    env.cli("restore", "bob", "--to", str(dest), check=True)
    assert json.loads((dest / "creds.json").read_text()) == {"me": "bob"}
    assert daemon.stop() == 0
