"""Backups of a live WAL database by what changed: each generation restores to a committed
prefix of another process's writes, uploads only a few pieces, and retention always keeps a
generation whose databases passed integrity_check."""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from wadaemon import backup as backup_module
from wadaemon.backup import BackupEngine
from wadaemon.errors import IntegrityError
from wadaemon.keyring import Keyring
from wadaemon.layout import SessionsLayout
from wadaemon.manifest import Manifest
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
    # a few rows change a few pages: those pages are stored (one page set), not their pieces
    assert uploads[len(uploads) // 2] <= 1, uploads
    sent = sorted(r.commit.uploaded_bytes for r in deltas if r.commit is not None)
    assert sent[len(sent) // 2] < 32 * 1024, sent
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
    assert sum(bool(m.files[0].patches) for m in manifests) > 10


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


def test_patched_generations_restore_exactly_as_the_database_grows_and_shrinks(
    tmp_path: Path, keyring: Keyring
) -> None:
    engine, replica, db = setup(tmp_path, keyring, keep=100)
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA auto_vacuum=FULL")  # deletes shrink the file: the last pieces go
    conn.execute("VACUUM")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
    engine.backup("alice")
    expected: dict[int, list[tuple[int, bytes]]] = {}
    steps = [("insert", 1)] * 6 + [("insert", 40), ("delete", 30), ("insert", 2), ("update", 3)]
    steps += [("delete_filler", 2500), ("insert", 1), ("insert", 1)]
    for op, n in steps:
        if op == "insert":
            conn.executemany("INSERT INTO t (v) VALUES (?)", [(os.urandom(700),)] * n)
        elif op == "delete":
            conn.execute("DELETE FROM t WHERE id IN (SELECT id FROM t LIMIT ?)", (n,))
        elif op == "update":
            conn.execute("UPDATE t SET v = ? WHERE id IN (SELECT id FROM t LIMIT ?)", (b"x", n))
        else:
            conn.execute("DELETE FROM filler WHERE rowid <= ?", (n,))
        result = engine.backup("alice")
        assert result.status == "created" and result.generation is not None, result.line()
        expected[result.generation] = list(conn.execute("SELECT id, v FROM t ORDER BY id"))
    conn.close()
    manifests = {g: replica.load_manifest("alice", g) for g in expected}
    assert sum(bool(m.files[0].patches) for m in manifests.values()) >= 5
    sizes = [m.size for m in manifests.values()]
    assert sizes[-1] < max(sizes) - 1_000_000, sizes  # deleting the filler shrank it
    for generation, rows in expected.items():
        dest = tmp_path / f"restore-{generation}"
        build_generation(replica, "alice", generation, dest, owners=False)
        with sqlite3.connect(dest / "session.db") as c:
            assert list(c.execute("SELECT id, v FROM t ORDER BY id")) == rows, generation


def test_a_patch_that_does_not_rebuild_its_piece_fails_the_restore(
    tmp_path: Path, keyring: Keyring
) -> None:
    engine, replica, db = setup(tmp_path, keyring, keep=10)
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
    engine.backup("alice")
    conn.execute("INSERT INTO t (v) VALUES (?)", (b"row",))
    generation = engine.backup("alice").generation
    conn.close()
    assert generation is not None
    manifest = replica.load_manifest("alice", generation)
    (entry,) = manifest.files
    assert entry.patches and not replica.load_manifest("alice", generation - 1).files[0].patches
    # the patched piece, rebuilt on another stored piece, does not hash to what was captured
    patch = entry.patches[0]
    other = next(p for p in entry.pieces if p != entry.pieces[patch.index])
    pieces = list(entry.pieces)
    pieces[patch.index] = other
    bad = dataclasses.replace(entry, pieces=tuple(pieces))
    with pytest.raises(IntegrityError, match=f"piece {patch.index} as patched"):
        replica.write_file("alice", bad, tmp_path / "out.db")
    # a page set that lost pages fails it too
    short = dataclasses.replace(entry, pagesets=(entry.pieces[0],) * len(entry.pagesets))
    with pytest.raises(IntegrityError, match=f"piece {patch.index}"):
        replica.write_file("alice", short, tmp_path / "out2.db")
    # and a manifest whose patch names a page set it does not list is refused whole
    raw = json.loads(manifest.to_bytes())
    raw["files"][0]["patches"][0]["layers"][0][0] = len(entry.pagesets)
    with pytest.raises(IntegrityError, match="malformed"):
        Manifest.from_bytes(json.dumps(raw).encode(), "alice", generation)


def test_retention_keeps_the_page_sets_kept_generations_use_and_drops_the_rest(
    tmp_path: Path, keyring: Keyring
) -> None:
    engine, replica, db = setup(tmp_path, keyring, keep=2)
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
    engine.backup("alice")
    rows: dict[int, list[tuple[int, bytes]]] = {}
    for i in range(14):
        conn.execute("INSERT INTO t (v) VALUES (?)", (os.urandom(300),))
        conn.execute("UPDATE filler SET v = ? WHERE rowid = ?", (os.urandom(1000), 1 + i * 211))
        generation = engine.backup("alice").generation
        assert generation is not None
        rows[generation] = list(conn.execute("SELECT id, v FROM t ORDER BY id"))
    conn.close()
    replica.collect_garbage("alice")
    head = replica.read_head("alice")
    assert head is not None
    kept = [replica.load_manifest("alice", g) for g in head.history]
    assert any(m.files[0].pagesets for m in kept)
    used = set().union(*(f.stored_ids() for m in kept for f in m.files))
    assert replica.store.list_pieces("alice") == used  # nothing else is left, nothing is missing
    for m in kept:
        if m.generation in rows:
            dest = tmp_path / f"restore-{m.generation}"
            build_generation(replica, "alice", m.generation, dest, owners=False)
            with sqlite3.connect(dest / "session.db") as c:
                assert list(c.execute("SELECT id, v FROM t ORDER BY id")) == rows[m.generation]
