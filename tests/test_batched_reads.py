"""Pieces are read back in batches (Store.read_pieces, Replica.read_pieces): a restore asks the
store for READ_BATCH pieces per call, not one call per piece, and checks every piece as before.
Each test runs against the directory store and the real Firestore emulator."""

from __future__ import annotations

import math
import os
import sqlite3
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import make_db
from firestore_emulator import Emulator

from wadaemon.backup import BackupEngine
from wadaemon.errors import IntegrityError
from wadaemon.file_entries import PIECE_SIZE
from wadaemon.keyring import Keyring
from wadaemon.layout import SessionsLayout
from wadaemon.replica import READ_BATCH, Replica, piece_context
from wadaemon.restore import Restorer, build_generation
from wadaemon.store import NotFound, Store
from wadaemon.store.base import StoreDamaged
from wadaemon.store.firestore import GET_PIECES, FirestoreStore


def spy(monkeypatch: pytest.MonkeyPatch, obj: object, name: str, calls: Counter[str]) -> None:
    """Count the calls of obj.name (an instance attribute shadows the method)."""
    real: Callable[..., Any] = getattr(obj, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[name] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(obj, name, counted)


def spied(monkeypatch: pytest.MonkeyPatch, store: Store) -> Counter[str]:
    """Calls of the store's piece reads, and of Firestore's batched reads (get_all)."""
    calls: Counter[str] = Counter()
    spy(monkeypatch, store, "read_piece", calls)
    spy(monkeypatch, store, "read_pieces", calls)
    if isinstance(store, FirestoreStore):
        spy(monkeypatch, store.client, "get_all", calls)
    return calls


def piece_ids(n: int, start: int = 0) -> list[str]:
    return [f"{i:064x}" for i in range(start, start + n)]


# --- the store call -----------------------------------------------------------------------------


def test_read_pieces_returns_what_was_written_in_few_calls(
    any_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    blobs = {p: os.urandom(70_000) for p in piece_ids(2 * GET_PIECES + 5)}
    for p, blob in blobs.items():
        any_store.write_piece("a", p, blob)
    wanted = [*blobs, *list(blobs)[:7]]  # ids given twice are read once
    calls = spied(monkeypatch, any_store)
    assert any_store.read_pieces("a", wanted) == blobs
    assert any_store.read_pieces("a", []) == {}
    assert calls["read_pieces"] == 2
    if isinstance(any_store, FirestoreStore):
        # one round trip per GET_PIECES documents, each document read (and billed) once
        assert calls["get_all"] == math.ceil(len(blobs) / GET_PIECES) == 3
        assert calls["read_piece"] == 0
        before = any_store.counters["reads"]
        any_store.read_pieces("a", list(blobs)[:10])
        assert any_store.counters["reads"] == before + 10


def test_a_missing_piece_fails_read_pieces_as_it_fails_read_piece(any_store: Store) -> None:
    present = piece_ids(5)
    for p in present:
        any_store.write_piece("a", p, b"blob " + p.encode())
    gone = "e" * 64
    with pytest.raises(NotFound) as single:
        any_store.read_piece("a", gone)
    with pytest.raises(NotFound) as batched:
        any_store.read_pieces("a", [*present[:2], gone, *present[2:]])
    assert str(batched.value) == str(single.value)
    assert "missing" in str(batched.value)
    with pytest.raises(NotFound):
        any_store.read_pieces("other-account", present)


def test_a_piece_document_without_its_blob_is_damaged_in_both_calls(
    firestore_emulator: Emulator,
) -> None:
    store = FirestoreStore(firestore_emulator.project)
    try:
        good, bad = piece_ids(2)
        store.write_piece("a", good, b"fine")
        store.flush()
        store._pieces("a").document(bad).set({"size": 4})  # a malformed document
        with pytest.raises(StoreDamaged) as single:
            store.read_piece("a", bad)
        with pytest.raises(StoreDamaged) as batched:
            store.read_pieces("a", [good, bad])
        assert str(batched.value) == str(single.value)
        assert "has no blob field" in str(batched.value)
    finally:
        store.client.close()  # type: ignore[no-untyped-call]


# --- restores through the batched path ------------------------------------------------------


def backed_up(tmp_path: Path, store: Store, keyring: Keyring) -> tuple[Replica, SessionsLayout]:
    """An account with a session database (pieces fixed by their ids: no whole-file SHA-256)
    and a 4.3 MB file of which three 64 KiB blocks repeat (one piece id several times)."""
    layout = SessionsLayout(tmp_path / "sessions")
    layout.prepare()
    replica = Replica(store, keyring, keep_generations=5)
    account = layout.account_dir("alice")
    make_db(account / "session.db", rows=4000, row_bytes=400)  # ~1.8 MB
    same = os.urandom(PIECE_SIZE)
    (account / "media.bin").write_bytes(same * 3 + os.urandom(4_000_000) + same)
    (account / "creds.json").write_text('{"me": "1555"}')
    result = BackupEngine(layout, replica).backup("alice")
    assert result.status == "created", result
    store.flush()
    return replica, layout


def test_a_restore_reads_batches_and_gives_identical_bytes(
    any_store: Store, keyring: Keyring, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    replica, layout = backed_up(tmp_path, any_store, keyring)
    manifest = replica.load_manifest("alice", 1)
    entries = {e.path: e for e in manifest.files}
    media, db = entries["media.bin"], entries["session.db"]
    assert len(media.pieces) > READ_BATCH and len(set(media.pieces)) < len(media.pieces)
    assert db.sha256 == "" and len(db.pieces) > 1  # checked by its piece ids and size only
    src = layout.account_dir("alice")
    calls = spied(monkeypatch, any_store)

    outcome = Restorer(layout, replica).restore_to("alice", tmp_path / "restored")

    assert outcome.status == "restored"
    # one store call per READ_BATCH pieces of each file, none per piece
    batches = sum(math.ceil(len(e.pieces) / READ_BATCH) for e in manifest.files)
    assert calls["read_pieces"] == batches < sum(len(e.pieces) for e in manifest.files) / 10
    if isinstance(any_store, FirestoreStore):
        assert calls["get_all"] == batches  # one round trip per batch
        assert calls["read_piece"] == 0
    for name in ("media.bin", "creds.json"):
        assert (tmp_path / "restored" / name).read_bytes() == (src / name).read_bytes()
    restored_db = tmp_path / "restored" / "session.db"
    assert restored_db.read_bytes() == b"".join(replica.read_piece("alice", p) for p in db.pieces)
    conn = sqlite3.connect(f"file:{restored_db}?immutable=1", uri=True)
    try:
        rows = conn.execute("SELECT count(*), sum(length(v)) FROM t").fetchone()
    finally:
        conn.close()
    assert rows == (4000, 4000 * 400)


def test_a_tampered_piece_fails_the_restore_with_an_integrity_error(
    any_store: Store, keyring: Keyring, tmp_path: Path
) -> None:
    replica, _ = backed_up(tmp_path, any_store, keyring)
    media = {e.path: e for e in replica.load_manifest("alice", 1).files}["media.bin"]
    # a piece of the second batch replaced by another piece of the account, sealed for it:
    # it authenticates, but holds other content than its id says
    victim = media.pieces[READ_BATCH + 2]
    other = media.pieces[3]
    assert victim != other
    blob = keyring.seal(replica.read_piece("alice", other), piece_context("alice"))
    any_store.write_piece("alice", victim, blob)
    any_store.flush()
    with pytest.raises(IntegrityError, match=f"piece {victim[:16]}… holds other content"):
        replica.write_file("alice", media, tmp_path / "media.bin")
    with pytest.raises(IntegrityError, match=f"piece {victim[:16]}… holds other content"):
        replica.read_piece("alice", victim)  # the message read_piece has always given
    with pytest.raises(IntegrityError, match="holds other content"):
        build_generation(replica, "alice", 1, tmp_path / "rebuilt")
    # a drill's piece-by-piece check names it, and a missing piece in another batch too
    gone = media.pieces[-2]
    any_store.delete_piece("alice", gone)
    assert replica.damaged_pieces("alice", 1) == sorted({victim, gone})
