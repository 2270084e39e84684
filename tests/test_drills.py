"""Pieces are checked and restore drills run by themselves: a damaged piece is found by a drill,
uploaded again from a healthy local session, and the drill repeated; a drill or a `verify` that
loses a race with retention is not a failure."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import WRITER, DaemonProcess, Env, make_db, wait_until
from firestore_emulator import Emulator
from test_firestore_daemon import firestore_config

from wadaemon.backup import BackupEngine
from wadaemon.config import load_config
from wadaemon.errors import ConfigError
from wadaemon.keyring import Keyring, load_keyring
from wadaemon.layout import SessionsLayout
from wadaemon.replica import Replica
from wadaemon.restore import drill
from wadaemon.store import DirectoryStore, Store
from wadaemon.store.firestore import FirestoreStore

DRILL_HOURS = 0.0005  # a drill of each account every 1.8 s


def corrupt_piece(store: Store, account: str, piece_id: str) -> bytes:
    """Flip bytes in the middle of a stored piece (a bad disk, a bad copy); returns the blob."""
    if isinstance(store, DirectoryStore):
        path = store.root / account / "pieces" / piece_id[:2] / piece_id
        blob = path.read_bytes()
    else:
        assert isinstance(store, FirestoreStore)
        blob = store.read_piece(account, piece_id)
    data = bytearray(blob)
    for i in range(len(data) // 2, len(data) // 2 + 4):
        data[i] ^= 0xFF
    if isinstance(store, DirectoryStore):
        path.write_bytes(bytes(data))
    else:
        assert isinstance(store, FirestoreStore)
        store._pieces(account).document(piece_id).update({"blob": bytes(data)})
    return blob


def session(layout: SessionsLayout, account: str) -> Path:
    db = layout.account_dir(account) / "session.db"
    make_db(db, rows=1000, row_bytes=300)  # several pieces
    (db.parent / "creds.json").write_text('{"me": "1555"}')
    return db


def test_a_damaged_piece_is_named_by_the_drill_and_uploaded_again_by_a_backup(
    any_store: Store, keyring: Keyring, tmp_path: Path
) -> None:
    layout = SessionsLayout(tmp_path / "sessions")
    layout.prepare()
    replica = Replica(any_store, keyring, keep_generations=5)
    engine = BackupEngine(layout, replica)
    session(layout, "alice")
    assert engine.backup("alice").generation == 1
    pieces = [p for f in replica.load_manifest("alice", 1).files for p in f.pieces]
    assert len(pieces) > 3
    damaged = pieces[2]
    corrupt_piece(any_store, "alice", damaged)

    result = drill(replica, "alice")
    assert not result.ok and result.generation == 1
    assert "authentication failed" in result.error
    assert result.damaged == (damaged,)
    assert "1 damaged pieces in generation 1" in result.error
    # the store has the piece, so an ordinary backup would not upload it again
    assert engine.backup("alice", force=True).status == "unchanged"
    assert not drill(replica, "alice").ok

    repair = engine.backup("alice", force=True, reupload=result.damaged)
    assert repair.status == "unchanged" and repair.commit is not None
    assert repair.commit.uploaded_pieces == 1
    assert "uploaded 1 damaged pieces again" in repair.line()
    again = drill(replica, "alice")
    assert again.ok and again.generation == 1


def test_a_drill_that_loses_a_race_with_retention_drills_the_new_head(
    any_store: Store, keyring: Keyring, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = SessionsLayout(tmp_path / "sessions")
    layout.prepare()
    replica = Replica(any_store, keyring, keep_generations=1)
    engine = BackupEngine(layout, replica)
    notes = layout.account_dir("alice") / "notes.txt"
    notes.parent.mkdir(parents=True)
    notes.write_text("one")
    engine.backup("alice")
    real = replica.load_manifest
    race: list[str] = []

    def racing(account: str, generation: int) -> Any:
        """A commit lands (and retention drops the generation being drilled) just before the
        drill reads its manifest."""
        if race:
            notes.write_text(race.pop())
            assert engine.backup("alice").status == "created"
        return real(account, generation)

    monkeypatch.setattr(replica, "load_manifest", racing)
    race.append("two")
    result = drill(replica, "alice")
    assert result.ok and result.generation == 2, result

    race.append("three")
    given = drill(replica, "alice", 2)  # a given generation: dropped, which is no failure
    assert not given.ok and given.dropped and "no longer kept" in given.error, given

    race.extend(["six", "five", "four"])  # the head moves on at every try
    result = drill(replica, "alice")
    assert result.ok and result.generation == 6, result


def test_verify_interval_is_validated(tmp_path: Path) -> None:
    path = tmp_path / "w.yaml"
    path.write_text("backup: {target: none}\n")
    assert load_config(path).verify.interval_hours == 24.0
    path.write_text("backup: {target: none}\nverify:\n  interval_hours: 0.25\n")
    assert load_config(path).verify.interval_hours == 0.25
    path.write_text("backup: {target: none}\nverify:\n  interval_hours: -1\n")
    with pytest.raises(ConfigError, match=r"w.yaml:3: verify.interval_hours must be a number of"):
        load_config(path)
    path.write_text("backup: {target: none}\nverify:\n  every: 3\n")
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(path)


def test_drills_are_spread_over_the_interval() -> None:
    from wadaemon.drills import drill_offset, next_drill_at

    offsets = [drill_offset(f"account{i}") for i in range(200)]
    assert all(0 <= o < 1 for o in offsets)
    assert max(offsets) - min(offsets) > 0.9  # spread over the whole interval
    assert sum(o < 0.1 for o in offsets) < 40  # not bunched
    now = 1_700_000_000.0
    at = next_drill_at("alice", 3600.0, now)
    assert now < at <= now + 3600.0
    assert next_drill_at("alice", 3600.0, at) == at + 3600.0  # the same moment every interval


# --- the daemon -----------------------------------------------------------------------------------


def http(env: Env, method: str, path: str) -> tuple[int, str]:
    url = f"http://localhost{path}"
    out = subprocess.run(
        ["curl", "-s", "-X", method, "--unix-socket", str(env.socket), "-w", "\n%{http_code}", url],
        capture_output=True,
        text=True,
        timeout=30,
    )
    body, _, code = out.stdout.rpartition("\n")
    return int(code), body


def health(env: Env) -> dict[str, Any]:
    code, body = http(env, "GET", "/health")
    data: dict[str, Any] = json.loads(body)
    assert code == (503 if data["status"] == "failing" else 200)
    return data


def last_drill(env: Env, account: str) -> dict[str, Any]:
    drilled: dict[str, Any] = health(env)["accounts"].get(account, {}).get("last_drill") or {}
    return drilled


@pytest.mark.slow
@pytest.mark.parametrize("target", ["directory", "firestore"])
def test_daemon_drills_find_a_damaged_piece_and_repair_it(
    env: Env, daemon_factory: type[DaemonProcess], request: pytest.FixtureRequest, target: str
) -> None:
    store: Store
    if target == "firestore":
        emulator: Emulator = request.getfixturevalue("firestore_emulator")
        firestore_config(env, emulator)
        store = FirestoreStore(emulator.project)
    else:
        env.write_config()
        store = DirectoryStore(env.backups)
    env.config.write_text(env.config.read_text() + f"verify:\n  interval_hours: {DRILL_HOURS}\n")
    session(SessionsLayout(env.sessions), "alice")
    daemon = daemon_factory(extra_env={"WADAEMON_FAULTS": "1"})
    daemon.wait_for("ready")
    wait_until(lambda: last_drill(env, "alice").get("result") == "ok", timeout=30)
    assert health(env)["checks"]["drills"]["status"] == "ok"
    head = store.read_head("alice")
    assert head is not None
    replica = Replica(store, load_keyring(env.key, [], environ={}), 5)
    pieces = [p for f in replica.load_manifest("alice", head.generation).files for p in f.pieces]
    damaged = pieces[len(pieces) // 2]
    plain = replica.read_piece("alice", damaged)

    # backups hang for a while, so that the failure shows before the repair's backup runs
    assert http(env, "POST", "/debug/hang/backup?seconds=12")[0] == 200
    corrupt_piece(store, "alice", damaged)
    wait_until(lambda: last_drill(env, "alice").get("result") == "failed", timeout=30)
    body = health(env)
    assert body["status"] == "failing"
    check = body["checks"]["drills"]
    assert check["status"] == "failing"
    assert "alice" in check["detail"] and "authentication failed" in check["detail"]
    assert "1 damaged pieces" in check["detail"]

    wait_until(lambda: last_drill(env, "alice").get("result") == "repaired", timeout=60)
    assert health(env)["checks"]["drills"]["status"] == "ok"
    assert replica.read_piece("alice", damaged) == plain  # uploaded again
    after = store.read_head("alice")
    assert after is not None and after.generation == head.generation  # no new generation needed
    metrics = http(env, "GET", "/metrics")[1]
    assert 'wadaemon_drills_total{result="repaired"} 1.0' in metrics
    assert 'wadaemon_drills_total{result="ok"}' in metrics
    log = daemon.log()
    assert f"drill: alice: generation {head.generation} has 1 damaged pieces in the store" in log
    assert "uploaded 1 damaged pieces again" in log
    assert daemon.stop() == 0


@pytest.mark.slow
def test_verify_all_generations_on_a_busy_daemon_reports_no_false_failure(
    env: Env, daemon_factory: type[DaemonProcess]
) -> None:
    env.write_config(debounce_seconds=0.05, keep_generations=2)
    db = env.sessions / "alice" / "session.db"
    make_db(db, rows=4000, row_bytes=300)  # ~1.3 MB: a drill takes a moment
    writer = subprocess.Popen([sys.executable, str(WRITER), str(db), "--rate", "100"])
    daemon = daemon_factory()
    runs = []
    try:
        daemon.wait_for("ready")
        wait_until(lambda: (env.head_generation("alice") or 0) >= 3, timeout=60)
        deadline = time.monotonic() + 25
        while time.monotonic() < deadline:
            start = env.head_generation("alice") or 0
            proc = env.cli("verify", "--all-generations")
            runs.append((start, env.head_generation("alice") or 0))
            assert proc.returncode == 0, proc.stdout + proc.stderr
            assert "(head): ok" in proc.stdout or "not checked" in proc.stdout
    finally:
        writer.terminate()
        writer.wait()
    moved = sum(1 for start, end in runs if end > start)
    print(f"\n{len(runs)} verify runs, the head moved during {moved}")
    assert moved >= len(runs) // 2  # the daemon was really committing meanwhile
    assert daemon.stop() == 0
