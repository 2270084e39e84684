"""Backups of a live WAL database by what changed: each generation restores to a committed
prefix of another process's writes, uploads only a few pieces, and retention always keeps a
generation whose databases passed integrity_check."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from wadaemon import backup as backup_module
from wadaemon.backup import BackupEngine
from wadaemon.keyring import Keyring
from wadaemon.layout import SessionsLayout
from wadaemon.replica import Replica
from wadaemon.restore import build_generation
from wadaemon.store.directory import DirectoryStore

HERE = Path(__file__).resolve().parent


def setup(tmp_path: Path, keyring: Keyring, keep: int) -> tuple[BackupEngine, Replica, Path]:
    layout = SessionsLayout(tmp_path / "sessions")
    layout.prepare()
    (tmp_path / "backups").mkdir()
    replica = Replica(DirectoryStore(tmp_path / "backups"), keyring, keep_generations=keep)
    account = layout.account_dir("alice")
    account.mkdir()
    db = account / "session.db"
    with sqlite3.connect(db) as c:  # about 3 MB: 48 pieces
        c.execute("PRAGMA journal_mode=WAL")
        c.execute("CREATE TABLE filler (v BLOB)")
        c.executemany("INSERT INTO filler VALUES (?)", [(os.urandom(1000),) for _ in range(3000)])
    return BackupEngine(layout, replica), replica, db


def start_writer(db: Path, rate: float) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, str(HERE / "writer.py"), str(db), "--rate", str(rate)])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with sqlite3.connect(db) as c:
            if c.execute("SELECT count(*) FROM sqlite_master WHERE name='t'").fetchone()[0]:
                return proc
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("the writer did not start")


def restored_rows(replica: Replica, generation: int, dest: Path) -> list[int]:
    build_generation(replica, "alice", generation, dest, owners=False)  # integrity_check too
    with sqlite3.connect(dest / "session.db") as c:
        return [r[0] for r in c.execute("SELECT id FROM t ORDER BY id")]


def test_every_generation_of_a_busy_database_restores_to_a_committed_prefix(
    tmp_path: Path, keyring: Keyring
) -> None:
    engine, replica, db = setup(tmp_path, keyring, keep=100)
    writer = start_writer(db, rate=100)
    results = []
    try:
        for _ in range(25):
            result = engine.backup("alice")
            assert result.status in ("created", "unchanged"), result.line()
            results.append(result)
            time.sleep(0.05)
    finally:
        writer.kill()
        writer.wait()
    final = engine.backup("alice")
    created = [r for r in [*results, final] if r.status == "created"]
    assert len(created) > 15
    deltas = [r for r in created[1:] if r.commit is not None]
    # a few rows change a few pages: a handful of the 48 pieces is uploaded, not the database
    uploads = sorted(r.commit.uploaded_pieces for r in deltas if r.commit is not None)
    assert uploads[len(uploads) // 2] <= 4, uploads
    seen = 0
    for r in created:
        assert r.generation is not None
        rows = restored_rows(replica, r.generation, tmp_path / f"restore-{r.generation}")
        assert rows == list(range(1, len(rows) + 1)), "not a committed prefix"
        assert len(rows) >= seen
        seen = len(rows)
    with sqlite3.connect(db) as c:
        assert seen == c.execute("SELECT max(id) FROM t").fetchone()[0]
    manifests = [replica.load_manifest("alice", r.generation or 0) for r in created]
    assert manifests[0].checked  # the first capture reads the database whole and checks it
    assert sum(not m.checked for m in manifests) > 10  # the others read what changed


def test_retention_keeps_the_newest_checked_generation(
    tmp_path: Path, keyring: Keyring, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, replica, db = setup(tmp_path, keyring, keep=3)
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
    generations = []
    for _ in range(8):
        conn.execute("INSERT INTO t (v) VALUES (?)", (os.urandom(500),))
        generations.append(engine.backup("alice").generation)
    head = replica.read_head("alice")
    assert head is not None
    assert head.history == (*generations[::-1][:3], generations[0])
    # only the first was read whole and checked; the three newest were read by what changed
    assert [replica.load_manifest("alice", g).checked for g in head.history] == [
        False,
        False,
        False,
        True,
    ]
    # the collector leaves it, and it restores
    assert generations[0] not in replica.collect_garbage("alice").dropped_generations
    assert restored_rows(replica, generations[0], tmp_path / "checked") == [1]
    # once a newer one is checked, the old one goes like any other
    monkeypatch.setattr(backup_module, "FULL_CHECK_EVERY_S", 0.0)
    conn.execute("INSERT INTO t (v) VALUES (?)", (os.urandom(500),))
    newest = engine.backup("alice").generation
    assert newest is not None and replica.load_manifest("alice", newest).checked
    head = replica.read_head("alice")
    assert head is not None and head.history == (newest, *generations[::-1][:2])
    conn.close()
