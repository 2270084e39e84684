"""The daemon against the real Firestore emulator: kill -9 mid-commit, and an outage mid-run."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time

import pytest
from conftest import WRITER, DaemonProcess, Env, committed_ids, make_db, read_ids, wait_until
from firestore_emulator import Emulator

from wadaemon.store.firestore import FirestoreStore

pytestmark = pytest.mark.slow


def firestore_config(env: Env, emulator: Emulator, **backup: object) -> None:
    settings = {"target": "firestore", "debounce_seconds": 0.1, **backup}
    env.config.write_text(
        "\n".join(
            [
                f"sessions_path: {env.sessions}",
                f"socket_path: {env.socket}",
                f"encryption: {{key_file: {env.key}}}",
                "backup:",
                *(f"  {k}: {v}" for k, v in settings.items()),
                "firestore:",
                f"  project: {emulator.project}",
                "restore: {timeout_seconds: 60}",
                "whatsapp: {enabled: false}",
            ]
        )
        + "\n"
    )


def head_generation(emulator: Emulator, account: str) -> int:
    try:
        head = FirestoreStore(emulator.project).read_head(account)
    except Exception:
        return 0
    return head.generation if head else 0


def test_kill_9_mid_commit_leaves_a_restorable_head(
    env: Env, daemon_factory: type[DaemonProcess], firestore_emulator: Emulator
) -> None:
    firestore_config(env, firestore_emulator, keep_generations=20)
    db = env.sessions / "alice" / "session.db"
    make_db(db, rows=10_000, row_bytes=400)  # ~4 MB: each commit uploads for a while
    writer = subprocess.Popen([sys.executable, str(WRITER), str(db), "--rate", "200"])
    rng = random.Random(7)
    heads = []
    try:
        for _ in range(5):
            daemon = daemon_factory()
            daemon.wait_for("ready", timeout=60)
            time.sleep(rng.uniform(0.5, 2.5))
            daemon.kill()
            heads.append(head_generation(firestore_emulator, "alice"))
    finally:
        writer.terminate()
        writer.wait()
    assert heads == sorted(heads) and heads[-1] >= 2, heads
    verify = env.cli("verify", "--all-generations")
    assert verify.returncode == 0, verify.stderr
    dest = env.root / "restored"
    env.cli("restore", "alice", "--to", str(dest), check=True)
    ids = read_ids(dest / "session.db")
    assert ids == list(range(1, len(ids) + 1))


def test_emulator_outage_mid_run_then_the_daemon_catches_up(
    env: Env, daemon_factory: type[DaemonProcess], firestore_emulator: Emulator
) -> None:
    firestore_config(env, firestore_emulator)
    db = env.sessions / "alice" / "session.db"
    make_db(db, rows=500)
    writer = subprocess.Popen([sys.executable, str(WRITER), str(db), "--rate", "20"])
    daemon = daemon_factory()
    try:
        daemon.wait_for("ready", timeout=60)
        wait_until(lambda: head_generation(firestore_emulator, "alice") >= 2, timeout=60)
        firestore_emulator.stop()  # the emulator keeps data in memory: it comes back empty
        wait_until(lambda: "alice: backup failed" in daemon.log(), timeout=60)
        health = json.loads(env.cli("status", "--json").stdout)
        assert health["status"] == "degraded"
        assert health["checks"]["store"]["status"] == "degraded"
        assert health["accounts"]["alice"]["pending_since_seconds"] is not None
        time.sleep(3)
        firestore_emulator.start()
        wait_until(lambda: "reachable again" in daemon.log(), timeout=90)
        wait_until(lambda: head_generation(firestore_emulator, "alice") >= 1, timeout=60)
    finally:
        writer.terminate()
        writer.wait()
    written = committed_ids(db)
    assert daemon.stop() == 0  # the final backup holds every row the writer committed
    dest = env.root / "restored"
    env.cli("restore", "alice", "--to", str(dest), check=True)
    assert read_ids(dest / "session.db") == written
    assert len(written) > 500
