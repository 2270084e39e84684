"""A captured file must be a state its writer meant: torn files are never committed or restored,
and a backup reads only the files that changed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import Env

from wadaemon.backup import BackupEngine
from wadaemon.errors import SnapshotError
from wadaemon.keyring import Keyring
from wadaemon.layout import SessionsLayout
from wadaemon.replica import Replica, TornFile
from wadaemon.restore import Restorer, drill
from wadaemon.snapshot import Owner, Snapshot, SnapshotFile, take_snapshot
from wadaemon.store import DirectoryStore

# Rewrites a JSON file in place as Baileys does: truncate, then write on a later turn.
IN_PLACE_WRITER = """
import os, sys, time, json
path, gap = sys.argv[1], float(sys.argv[2])
n = 0
while True:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    time.sleep(gap)
    os.write(fd, json.dumps({"n": n, "pad": "x" * 500}).encode())
    os.close(fd)
    n += 1
    time.sleep(0.002)
"""


def setup(tmp_path: Path, keyring: Keyring) -> tuple[BackupEngine, Replica, SessionsLayout]:
    layout = SessionsLayout(tmp_path / "sessions")
    layout.prepare()
    (tmp_path / "backups").mkdir()
    replica = Replica(DirectoryStore(tmp_path / "backups"), keyring, keep_generations=50)
    return BackupEngine(layout, replica), replica, layout


def age(path: Path, seconds: float = 60.0) -> None:
    """Make a file look written a while ago (not racily new)."""
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_a_file_rewritten_in_place_is_captured_whole(tmp_path: Path) -> None:
    src = tmp_path / "alice"
    src.mkdir()
    creds = src / "creds.json"
    creds.write_text('{"n": -1}')
    writer = subprocess.Popen([sys.executable, "-c", IN_PLACE_WRITER, str(creds), "0.02"])
    try:
        seen = set()
        i = 0
        ends = time.monotonic() + 1.5  # snapshots are fast: spread them over the writes
        while i < 40 or time.monotonic() < ends:
            i += 1
            snap = take_snapshot("alice", src)
            (f,) = snap.files
            assert f.status == "copied", f  # the writer completes within the re-read window
            data = json.loads(snap.content("creds.json"))
            seen.add(data["n"])
    finally:
        writer.kill()
        writer.wait()
    assert len(seen) > 5  # the snapshots did land during the writes


def test_a_file_that_stays_torn_is_reported_not_copied(tmp_path: Path) -> None:
    src = tmp_path / "alice"
    src.mkdir()
    (src / "creds.json").write_bytes(b"")
    (src / "keys.json").write_bytes(b'{"half": ')
    (src / "notes.txt").write_bytes(b"")  # no test for plain files: copied as it is
    snap = take_snapshot("alice", src)
    by_path = {f.path: f for f in snap.files}
    assert by_path["creds.json"].status == "torn"
    assert "0 bytes" in by_path["creds.json"].torn
    assert by_path["keys.json"].status == "torn"
    assert "creds.json" not in snap.copies
    assert by_path["notes.txt"].status == "copied"


def test_a_torn_file_keeps_its_last_whole_content(tmp_path: Path, keyring: Keyring) -> None:
    engine, replica, layout = setup(tmp_path, keyring)
    acct = layout.account_dir("alice")
    acct.mkdir()
    (acct / "creds.json").write_text('{"v": 1}')
    (acct / "pre-key-1.json").write_text('{"k": 1}')
    assert engine.backup("alice").generation == 1

    (acct / "creds.json").write_bytes(b"")  # truncated, the write not there yet
    (acct / "pre-key-1.json").write_text('{"k": 2}')
    result = engine.backup("alice")
    assert result.status == "created" and result.generation == 2
    assert any("creds.json: being written" in w for w in result.warnings)
    dest = tmp_path / "out"
    Restorer(layout, replica).restore_to("alice", dest)
    assert json.loads((dest / "creds.json").read_text()) == {"v": 1}
    assert json.loads((dest / "pre-key-1.json").read_text()) == {"k": 2}


def test_a_torn_file_without_a_whole_copy_commits_nothing(tmp_path: Path, keyring: Keyring) -> None:
    engine, replica, layout = setup(tmp_path, keyring)
    acct = layout.account_dir("bob")
    acct.mkdir()
    (acct / "creds.json").write_bytes(b"")
    (acct / "app-state.json").write_text("{}")
    with pytest.raises(TornFile, match=r"creds\.json is being written \(0 bytes"):
        engine.backup("bob")
    assert replica.store.read_head("bob") is None
    (acct / "creds.json").write_text('{"ok": true}')
    assert engine.backup("bob").status == "created"


def old_version_commit(replica: Replica, root: Path, account: str) -> int:
    """Commit `root` as an earlier version did: every file read as it was, a 0-byte JSON file
    included, kind "file", no owners."""
    files = tuple(
        SnapshotFile(p.name, "file", Owner(0o600)) for p in sorted(root.iterdir()) if p.is_file()
    )
    head = replica.store.read_head(account)
    copies = {f.path: (root / f.path).read_bytes() for f in files}
    snapshot = Snapshot(account, files, (), copies=copies)
    return replica.commit(snapshot, parent=head.generation if head else None).generation


def test_restore_falls_back_from_an_older_versions_torn_generation(env: Env) -> None:
    replica = env.replica()
    good = env.root / "good"
    good.mkdir()
    (good / "creds.json").write_text('{"me": "15551234567"}')
    (good / "session-1.json").write_text('{"s": 1}')
    assert old_version_commit(replica, good, "alice") == 1
    torn = env.root / "torn"
    torn.mkdir()
    (torn / "creds.json").write_bytes(b"")
    (torn / "session-1.json").write_text('{"s": 2}')
    assert old_version_commit(replica, torn, "alice") == 2

    bad = drill(replica, "alice")  # the head
    assert not bad.ok and "creds.json: 0 bytes, which is not JSON" in bad.error
    proc = env.cli("verify", "alice")
    assert proc.returncode == 1 and "creds.json: 0 bytes" in proc.stderr

    layout = env.layout()
    layout.prepare()
    outcome = Restorer(layout, replica).restore_account("alice")
    assert outcome.status == "restored" and outcome.generation == 1
    assert "generation 2" in outcome.detail and "creds.json: 0 bytes" in outcome.detail
    restored = env.sessions / "alice" / "creds.json"
    assert json.loads(restored.read_text()) == {"me": "15551234567"}


def test_an_unchanged_file_is_not_read_again(tmp_path: Path, keyring: Keyring) -> None:
    engine, replica, layout = setup(tmp_path, keyring)
    acct = layout.account_dir("carol")
    (acct / "keys").mkdir(parents=True)
    (acct / "creds.json").write_text('{"v": 0}')
    for i in range(300):
        (acct / "keys" / f"pre-key-{i}.json").write_text(json.dumps({"i": i}))
    for p in acct.rglob("*.json"):
        age(p)
    first = engine.backup("carol")
    assert first.files_read == 301

    for i in (3, 7):
        (acct / "keys" / f"pre-key-{i}.json").write_text(json.dumps({"i": -i}))
    (acct / "keys" / "pre-key-5.json").unlink()
    (acct / "creds.json").write_text('{"v": 1}')
    second = engine.backup("carol")
    assert second.status == "created" and second.files_read == 3
    dest = tmp_path / "out"
    Restorer(layout, replica).restore_to("carol", dest)
    assert json.loads((dest / "keys" / "pre-key-3.json").read_text()) == {"i": -3}
    assert json.loads((dest / "keys" / "pre-key-8.json").read_text()) == {"i": 8}
    assert not (dest / "keys" / "pre-key-5.json").exists()
    assert json.loads((dest / "creds.json").read_text()) == {"v": 1}

    # another writer moved the head: nothing is taken on trust, everything is read again
    other = BackupEngine(layout, Replica(DirectoryStore(tmp_path / "backups"), keyring, 50))
    (acct / "creds.json").write_text('{"v": 2}')
    assert other.backup("carol", force=True).generation == 3
    (acct / "creds.json").write_text('{"v": 3}')
    third = engine.backup("carol")
    assert third.generation == 4 and third.files_read == 300


def test_a_copy_the_worker_did_not_send_is_a_snapshot_error() -> None:
    # copies made in memory have no directory to fall back to: a missing one fails the backup
    snapshot = Snapshot("alice", (SnapshotFile("creds.json", "file", Owner(0o600)),), ())
    with pytest.raises(SnapshotError, match="sent no copy of it; the backup is retried"):
        snapshot.content("creds.json")
