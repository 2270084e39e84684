"""Commits, incremental uploads, retention and garbage collection, against real files and SQLite."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import make_db, run_sql

from wadaemon.backup import BackupEngine
from wadaemon.keyring import Keyring
from wadaemon.layout import SessionsLayout
from wadaemon.replica import Replica
from wadaemon.store import DirectoryStore, HeadConflict
from wadaemon.store.base import Head


def setup_engine(tmp_path: Path, keyring: Keyring, keep: int = 5) -> tuple[BackupEngine, Replica]:
    layout = SessionsLayout(tmp_path / "sessions")
    layout.prepare()
    (tmp_path / "backups").mkdir()
    replica = Replica(DirectoryStore(tmp_path / "backups"), keyring, keep_generations=keep)
    return BackupEngine(layout, replica), replica


def test_first_backup_then_unchanged_then_incremental(tmp_path: Path, keyring: Keyring) -> None:
    engine, replica = setup_engine(tmp_path, keyring)
    db = tmp_path / "sessions" / "alice" / "session.db"
    make_db(db, rows=50_000, row_bytes=400)  # ~20 MB
    (db.parent / "creds.json").write_text('{"me": "1555"}')

    first = engine.backup("alice")
    assert first.status == "created" and first.commit is not None
    assert first.commit.generation == 1
    assert first.commit.size > 20_000_000
    assert first.commit.uploaded_pieces == first.commit.pieces

    again = engine.backup("alice")
    assert again.status == "unchanged"
    assert replica.store.list_generations("alice") == [1]

    run_sql(db, "UPDATE t SET v = x'00' WHERE id = 4242")
    third = engine.backup("alice")
    assert third.status == "created" and third.commit is not None
    assert third.commit.generation == 2
    # a one-row change to a 20 MB session uploads a few pieces, not the session
    assert third.commit.uploaded_pieces <= 3
    assert third.commit.uploaded_bytes < 600_000


def test_nothing_in_the_store_is_plaintext(tmp_path: Path, keyring: Keyring) -> None:
    engine, _ = setup_engine(tmp_path, keyring)
    db = tmp_path / "sessions" / "alice" / "session.db"
    make_db(db, rows=2000)
    secret = "phone-number-15551234567"
    (db.parent / "creds.json").write_text(f'{{"me": "{secret * 3}"}}')
    engine.backup("alice")
    blobs = [p for p in (tmp_path / "backups").rglob("*") if p.is_file()]
    assert len(blobs) > 3
    for blob in blobs:
        data = blob.read_bytes()
        assert b"SQLite format 3" not in data, blob
        assert secret.encode() not in data, blob
        assert b"alice" not in data or blob.name == "HEAD.json", blob


def test_missing_or_empty_account_is_never_committed(tmp_path: Path, keyring: Keyring) -> None:
    engine, replica = setup_engine(tmp_path, keyring)
    account = tmp_path / "sessions" / "bob"
    make_db(account / "session.db", rows=10)
    assert engine.backup("bob").status == "created"
    (account / "session.db").unlink()
    (account / "session.db-wal").unlink(missing_ok=True)
    (account / "session.db-shm").unlink(missing_ok=True)
    assert engine.backup("bob").status == "skipped"
    account.rmdir()
    assert engine.backup("bob").status == "skipped"
    assert replica.store.list_generations("bob") == [1]


def test_retention_keeps_newest_and_collects_unreferenced_pieces(
    tmp_path: Path, keyring: Keyring
) -> None:
    engine, replica = setup_engine(tmp_path, keyring, keep=3)
    store = replica.store
    notes = tmp_path / "sessions" / "carol" / "notes.txt"
    notes.parent.mkdir(parents=True)
    for i in range(6):
        notes.write_text(f"version {i}")
        result = engine.backup("carol")
        assert result.commit is not None and result.commit.generation == i + 1
    assert store.list_generations("carol") == [4, 5, 6]
    head = store.read_head("carol")
    assert head is not None and head.generation == 6
    referenced = {
        p for g in (4, 5, 6) for f in replica.load_manifest("carol", g).files for p in f.pieces
    }
    assert store.list_pieces("carol") == referenced
    assert len(referenced) == 3


def test_crash_before_head_switch_keeps_old_head(
    tmp_path: Path, keyring: Keyring, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, replica = setup_engine(tmp_path, keyring)
    f = tmp_path / "sessions" / "dave" / "state.txt"
    f.parent.mkdir(parents=True)
    f.write_text("one")
    engine.backup("dave")

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("simulated crash before the head switch")

    monkeypatch.setattr(replica.store, "switch_head", crash)
    f.write_text("two")
    with pytest.raises(OSError):
        engine.backup("dave")
    monkeypatch.undo()
    head = replica.store.read_head("dave")
    assert head is not None and head.generation == 1
    assert replica.store.list_generations("dave") == [1, 2]  # orphan manifest, not a generation
    assert [i.generation for i in replica.generations("dave")] == [1]

    result = engine.backup("dave")  # the next commit skips the orphan's number
    assert result.commit is not None and result.commit.generation == 3
    assert [i.generation for i in replica.generations("dave")] == [3, 1]
    replica.collect_garbage("dave")  # a full collection (first commit, then daily) drops it
    assert replica.store.list_generations("dave") == [1, 3]


def test_head_compare_and_swap(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path)

    def head(g: int) -> Head:
        return Head(g, "d", "k", "active", "now", "test")

    store.switch_head("a", None, head(1))
    with pytest.raises(HeadConflict):
        store.switch_head("a", None, head(2))  # a second writer that believed there was no head
    store.switch_head("a", 1, head(2))
    with pytest.raises(HeadConflict):
        store.switch_head("a", 2, head(1))  # never backwards
    assert store.create_manifest("a", 2, b"x") is True
    assert store.create_manifest("a", 2, b"y") is False  # manifests are never rewritten
    assert store.read_manifest("a", 2) == b"x"
    assert store.list_accounts() == ["a"]


def test_unreadable_kept_generation_blocks_piece_collection(
    tmp_path: Path, keyring: Keyring
) -> None:
    engine, replica = setup_engine(tmp_path, keyring, keep=2)
    f = tmp_path / "sessions" / "erin" / "x.bin"
    f.parent.mkdir(parents=True)
    for i in range(2):
        f.write_bytes(bytes([i]) * 1000)
        engine.backup("erin")
    manifest_file = tmp_path / "backups" / "erin" / "generations" / f"{1:012d}.bin"
    manifest_file.write_bytes(b"garbage")
    pieces_before = replica.store.list_pieces("erin")
    fresh = Replica(replica.store, keyring, keep_generations=2)  # as a new process would
    gc = fresh.collect_garbage("erin")
    assert gc.skipped and gc.deleted_pieces == 0
    assert replica.store.list_pieces("erin") == pieces_before


def test_steady_state_commits_do_not_list_the_store(
    tmp_path: Path, keyring: Keyring, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, replica = setup_engine(tmp_path, keyring, keep=2)
    f = tmp_path / "sessions" / "hana" / "x.bin"
    f.parent.mkdir(parents=True)
    f.write_bytes(b"0" * 1000)
    engine.backup("hana")  # the first commit in a process does a full collection
    listings: list[str] = []
    for name in ("list_pieces", "list_generations", "read_manifest"):
        real = getattr(replica.store, name)

        def counting(*args: object, _real: object = real, _name: str = name) -> object:
            listings.append(_name)
            return _real(*args)  # type: ignore[operator]

        monkeypatch.setattr(replica.store, name, counting)
    for i in range(1, 6):
        f.write_bytes(bytes([i]) * 1000)
        result = engine.backup("hana")
        assert result.commit is not None and result.commit.created
    assert listings == []  # retention worked from memory
    assert replica.store.list_generations("hana") == [5, 6]
    referenced = {
        p for g in (5, 6) for fe in replica.load_manifest("hana", g).files for p in fe.pieces
    }
    assert replica.store.list_pieces("hana") == referenced


def test_temporary_files_of_a_dead_writer_are_swept(tmp_path: Path, keyring: Keyring) -> None:
    engine, replica = setup_engine(tmp_path, keyring)
    f = tmp_path / "sessions" / "gina" / "x.txt"
    f.parent.mkdir(parents=True)
    f.write_text("1")
    engine.backup("gina")
    account = tmp_path / "backups" / "gina"
    leftovers = [account / ".HEAD.json.1.ab.tmp", account / "generations" / ".x.1.cd.tmp"]
    for path in leftovers:
        path.write_bytes(b"partial")
    f.write_text("2")
    # the next process sweeps at its first commit (this one swept at its own first)
    replica = Replica(DirectoryStore(tmp_path / "backups"), keyring, keep_generations=5)
    engine = BackupEngine(SessionsLayout(tmp_path / "sessions"), replica)
    engine.backup("gina")
    assert not any(p.exists() for p in leftovers)
    assert replica.store.read_head("gina") is not None
