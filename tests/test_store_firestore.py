"""The Firestore backend against the real emulator: commits, restores, races, limits, outages.

Nothing here mocks Firestore: every test talks to the emulator that tests/firestore_emulator.py
starts, through the same client library production uses.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import make_db, run_sql
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from firestore_emulator import Emulator
from google.cloud.firestore_v1.batch import WriteBatch

from wadaemon.backup import BackupEngine
from wadaemon.config import load_config
from wadaemon.errors import ConfigError
from wadaemon.keyring import Keyring
from wadaemon.layout import SessionsLayout
from wadaemon.replica import GcResult, Replica
from wadaemon.restore import Restorer
from wadaemon.store import DirectoryStore, HeadConflict, NotFound, StoreUnavailable, open_store
from wadaemon.store import firestore as fsmod
from wadaemon.store.base import Head
from wadaemon.store.firestore import FirestoreStore


@pytest.fixture
def store(firestore_emulator: Emulator) -> Iterator[FirestoreStore]:
    s = FirestoreStore(firestore_emulator.project)
    yield s
    s.client.close()  # type: ignore[no-untyped-call]


@dataclass
class Setup:
    root: Path
    layout: SessionsLayout
    replica: Replica
    engine: BackupEngine

    def restorer(self) -> Restorer:
        return Restorer(self.layout, self.replica)

    def session(self, account: str) -> Path:
        return self.layout.account_dir(account)


def make_setup(root: Path, store: FirestoreStore, keyring: Keyring, keep: int = 5) -> Setup:
    layout = SessionsLayout(root / "sessions")
    layout.prepare()
    replica = Replica(store, keyring, keep_generations=keep)
    return Setup(root, layout, replica, BackupEngine(layout, replica))


def table_digest(db: Path) -> str:
    """The rows of a database (not its bytes: a snapshot is a page copy, not the live file)."""
    conn = sqlite3.connect(f"file:{db}?immutable=1", uri=True)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        h = hashlib.sha256()
        for row in conn.execute("SELECT id, v FROM t ORDER BY id"):
            h.update(repr(row).encode())
        return h.hexdigest()
    finally:
        conn.close()


def head(g: int, writer: str = "test") -> Head:
    return Head(g, f"digest-{g}", "key", "active", "now", writer)


# --- the store protocol, call by call ---------------------------------------------------------


def test_head_compare_and_swap_and_create_only_manifests(store: FirestoreStore) -> None:
    store.write_interval = 0.05  # pacing has its own test
    assert store.read_head("a") is None
    assert store.list_accounts() == []
    store.switch_head("a", None, head(1))
    with pytest.raises(HeadConflict, match="head is at generation 1, expected None"):
        store.switch_head("a", None, head(2))  # a second writer that believed there was no head
    store.switch_head("a", 1, head(2))
    with pytest.raises(HeadConflict, match="refusing to move the head back"):
        store.switch_head("a", 2, head(1))
    with pytest.raises(HeadConflict, match="expected 1"):
        store.switch_head("a", 1, head(3))
    current = store.read_head("a")
    assert current is not None and current.generation == 2 and current.digest == "digest-2"
    assert store.create_manifest("a", 2, b"x") is True
    assert store.create_manifest("a", 2, b"y") is False  # manifests are never rewritten
    assert store.read_manifest("a", 2) == b"x"
    assert store.list_generations("a") == [2]
    assert store.list_accounts() == ["a"]
    with pytest.raises(NotFound):
        store.read_manifest("a", 3)
    store.delete_manifest("a", 2)
    assert store.list_generations("a") == []


def test_pieces_are_batched_and_looked_up_without_their_blobs(store: FirestoreStore) -> None:
    blobs = {f"{i:064x}": bytes([i]) * 200_000 for i in range(60)}  # 12 MB: four batches
    for piece_id, blob in blobs.items():
        store.write_piece("a", piece_id, blob)
    assert store.counters["writes"] < 60  # queued, not sent one by one
    missing = store.missing_pieces("a", [*blobs, "f" * 64])  # sends the rest first
    assert missing == {"f" * 64}
    assert store.counters["writes"] == 60
    assert store.list_pieces("a") == set(blobs)
    assert store.read_piece("a", "0" * 63 + "7") == blobs["0" * 63 + "7"]
    store.delete_piece("a", "0" * 64)
    with pytest.raises(NotFound, match="missing"):
        store.read_piece("a", "0" * 64)
    assert len(store.list_pieces("a")) == 59


def test_a_switch_tries_the_version_its_commit_read_and_reads_again_when_another_wrote(
    firestore_emulator: Emulator, store: FirestoreStore
) -> None:
    store.write_interval = 0.0
    other = FirestoreStore(firestore_emulator.project, write_interval=0.0)

    def reads() -> int:
        return store.counters["reads"]

    try:
        store.switch_head("a", None, head(1))
        assert store.read_head("a", for_switch=True) == head(1)
        before = reads()
        store.switch_head("a", 1, head(2))  # on the version the commit's read saw: no read
        assert reads() == before
        assert store.read_head("a", for_switch=True) == head(2)
        other.switch_head("a", 2, head(3, writer="other"))  # after that read
        before = reads()
        stale = "head is at generation 3, active, expected generation 2"
        with pytest.raises(HeadConflict, match=stale):
            store.switch_head("a", 2, head(3))  # its version is stale: read again, refused
        assert reads() == before + 1
        assert store.read_head("a", for_switch=True) == head(3, writer="other")
        other.client.collection(fsmod.SESSIONS).document("a").update({"fence": 7})
        with pytest.raises(fsmod.Fenced, match="below the account's 7"):
            store.switch_head("a", 3, head(4), fence=3)  # a lease acquired since: refused
        assert store.read_head("a", for_switch=True) == head(3, writer="other")
        store.switch_head("a", 3, head(4), fence=7)
        assert other.read_head("a") == head(4)
        # a state change at the same generation (a removal) is seen, though the generation is not
        assert store.read_head("a", for_switch=True) == head(4)
        removed = dataclasses.replace(head(4), state="removed")
        other.switch_head("a", 4, removed, fence=7)
        with pytest.raises(HeadConflict, match="generation 4, removed"):
            store.switch_head("a", 4, head(5), fence=7)
        assert other.read_head("a") == removed
        # any other read leaves the switch to read the document itself
        assert store.read_head("a", for_switch=True) == removed
        assert store.read_head("a") == removed
        before = reads()
        store.switch_head("a", 4, head(5), fence=7)  # the store's own rule is the generation
        assert reads() == before + 1
    finally:
        other.client.close()  # type: ignore[no-untyped-call]


def test_pieces_ride_with_their_manifest_and_wait_for_the_next_one_if_it_collides(
    firestore_emulator: Emulator, store: FirestoreStore
) -> None:
    other = FirestoreStore(firestore_emulator.project)
    try:
        assert other.create_manifest("a", 5, b"crashed writer's")
        store.write_piece("a", "1" * 64, b"piece")
        writes = store.counters["writes"]
        assert store.create_manifest("a", 5, b"mine") is False
        assert store.counters["writes"] == writes  # the batch failed whole: no piece written
        assert other.missing_pieces("a", ["1" * 64]) == {"1" * 64}
        assert store.create_manifest("a", 6, b"mine") is True  # one batch: piece and manifest
        assert store.counters["writes"] == writes + 2
        assert other.missing_pieces("a", ["1" * 64]) == set()
        assert other.read_piece("a", "1" * 64) == b"piece"
        assert other.read_manifest("a", 6) == b"mine"
    finally:
        other.client.close()  # type: ignore[no-untyped-call]


def test_describe_names_project_database_and_emulator(
    store: FirestoreStore, firestore_emulator: Emulator
) -> None:
    assert store.describe() == (
        f"firestore project {firestore_emulator.project} database (default) "
        f"(emulator {firestore_emulator.address})"
    )


def test_open_store_builds_the_configured_store(
    firestore_emulator: Emulator, tmp_path: Path
) -> None:
    path = tmp_path / "w.yaml"
    path.write_text(
        "backup:\n  target: firestore\n"
        f"firestore:\n  project: {firestore_emulator.project}\n  collection_prefix: t_\n"
    )
    store = open_store(load_config(path))
    assert isinstance(store, FirestoreStore)
    assert "collection prefix 't_'" in store.describe()
    store.switch_head("a", None, head(1))
    assert store.list_accounts() == ["a"]
    assert [c.id for c in store.client.collections()] == ["t_wa_sessions"]


def test_missing_or_unusable_credentials_are_configuration_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("FIRESTORE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))  # no gcloud login
    monkeypatch.setenv("GCE_METADATA_HOST", "127.0.0.1:9")  # no metadata server
    monkeypatch.setenv("GCE_METADATA_IP", "127.0.0.1:9")
    path = tmp_path / "w.yaml"
    path.write_text("backup:\n  target: firestore\nfirestore:\n  project: my-project\n")
    with pytest.raises(ConfigError, match="no Google credentials for Firestore project my-project"):
        open_store(load_config(path, environ={}))
    key = tmp_path / "sa.json"
    key.write_text('{"type": "service_account"}')
    key.chmod(0o600)
    path.write_text(path.read_text() + f"  credentials_file: {key}\n")
    with pytest.raises(ConfigError, match=r"w.yaml:5: firestore.credentials_file: .* no usable"):
        open_store(load_config(path, environ={}))

    # a well-formed key builds the store (nothing is sent before the first call)
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    sa = {
        "type": "service_account",
        "project_id": "my-project",
        "private_key_id": "0" * 40,
        "private_key": pem,
        "client_email": "wadaemon@my-project.iam.gserviceaccount.com",
        "client_id": "1",
        "token_uri": "https://oauth2.googleapis.com/token",
    }
    key.write_text(json.dumps(sa))
    store = open_store(load_config(path, environ={}))
    assert isinstance(store, FirestoreStore)
    assert store.describe() == "firestore project my-project database (default)"


def test_head_writes_are_paced_to_one_per_second(store: FirestoreStore) -> None:
    started = time.monotonic()
    store.switch_head("a", None, head(1))
    store.switch_head("a", 1, head(2))
    store.switch_head("a", 2, head(3))
    assert time.monotonic() - started >= 1.9
    started = time.monotonic()
    store.switch_head("b", None, head(1))  # another account has its own second
    assert time.monotonic() - started < 0.9


# --- whole sessions through the replica, the backup engine and restore -----------------------

MARKER = "phone-number-15551234567-marker"


def all_documents(store: FirestoreStore) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every document in the emulator (also under parents that only hold subcollections)."""

    def walk(collection: Any) -> Iterator[tuple[str, dict[str, Any]]]:
        for ref in collection.list_documents():
            snap = ref.get()
            if snap.exists:
                yield ref.path, snap.to_dict() or {}
            for sub in ref.collections():
                yield from walk(sub)

    for collection in store.client.collections():
        yield from walk(collection)


def values_of(data: Any) -> Iterator[bytes]:
    if isinstance(data, dict):
        for key, value in data.items():
            yield str(key).encode()
            yield from values_of(value)
    elif isinstance(data, (list, tuple)):
        for value in data:
            yield from values_of(value)
    elif isinstance(data, bytes):
        yield data
    else:
        yield str(data).encode()


def test_session_over_1_mib_round_trips_and_no_plaintext_reaches_firestore(
    store: FirestoreStore, keyring: Keyring, tmp_path: Path
) -> None:
    s = make_setup(tmp_path, store, keyring)
    db = s.session("alice") / "session.db"
    make_db(db, rows=3500, row_bytes=300)
    run_sql(db, f"INSERT INTO t (v) VALUES ('{MARKER}')")
    (db.parent / "creds.json").write_text(f'{{"me": "{MARKER}"}}')
    result = s.engine.backup("alice")
    assert result.status == "created" and result.commit is not None
    assert result.commit.size > 1024 * 1024

    dest = tmp_path / "restored"
    outcome = s.restorer().restore_to("alice", dest)
    assert outcome.status == "restored" and outcome.generation == 1
    assert table_digest(dest / "session.db") == table_digest(db)
    assert (dest / "creds.json").read_text() == (db.parent / "creds.json").read_text()

    documents = list(all_documents(store))
    assert len(documents) > 5
    for path, data in documents:
        for value in values_of(data):
            assert b"SQLite format 3" not in value, path
            assert MARKER.encode() not in value, path


def count_calls(store: FirestoreStore, monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Wrap the store's writing methods: calls per method and the bytes handed to them."""
    calls: Counter[str] = Counter()
    for name in (
        "write_piece",
        "create_manifest",
        "switch_head",
        "delete_piece",
        "delete_manifest",
    ):
        method = getattr(store, name)

        def wrapped(*args: Any, _name: str = name, _method: Any = method) -> Any:
            calls[_name] += 1
            calls[f"{_name}_bytes"] += sum(len(a) for a in args if isinstance(a, bytes))
            return _method(*args)

        monkeypatch.setattr(store, name, wrapped)
    return calls


def test_20_mb_session_round_trips_and_a_one_row_change_costs_a_handful_of_writes(
    store: FirestoreStore, keyring: Keyring, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = make_setup(tmp_path, store, keyring)
    db = s.session("alice") / "session.db"
    make_db(db, rows=50_000, row_bytes=400)  # ~21 MB
    first = s.engine.backup("alice")
    assert first.commit is not None and first.commit.size > 20_000_000
    full_writes = store.counters["writes"]

    calls = count_calls(store, monkeypatch)
    before = Counter(store.counters)
    run_sql(db, "UPDATE t SET v = x'00' WHERE id = 4242")
    second = s.engine.backup("alice")
    assert second.status == "created" and second.commit is not None
    assert second.commit.generation == 2
    document_writes = store.counters["writes"] - before["writes"]
    uploaded = store.counters["bytes_written"] - before["bytes_written"]
    print(
        f"\nfirst backup: {first.commit.pieces} pieces, {full_writes} document writes; "
        f"one-row change: {dict(calls)}, {document_writes} document writes, {uploaded} bytes, "
        f"{store.counters['reads'] - before['reads']} reads, "
        f"{store.counters['deletes'] - before['deletes']} deletes"
    )
    assert calls["create_manifest"] == 1 and calls["switch_head"] == 1
    # the head, read once (the switch uses that read), and one lookup of the changed pieces
    # (this database is not in WAL mode: it is read whole, and the store is asked about the
    # pieces the head does not hold)
    assert store.counters["reads"] - before["reads"] == 2
    assert calls["write_piece"] <= 3
    assert document_writes == calls["write_piece"] + 2 <= 5  # pieces, manifest, head
    assert uploaded < 600_000
    assert calls["write_piece_bytes"] + calls["create_manifest_bytes"] == uploaded

    # generation 2 shares all but one or two pieces with generation 1
    outcome = s.restorer().restore_to("alice", tmp_path / "restored")
    assert outcome.status == "restored" and outcome.generation == 2
    assert table_digest(tmp_path / "restored" / "session.db") == table_digest(db)


# --- manifests larger than one document ---------------------------------------------------------


def parts_of(store: FirestoreStore, account: str, generation: int) -> list[str]:
    ref = store._generation(account, generation).collection("parts")
    return sorted(r.id for r in ref.list_documents())


def many_files(session: Path, count: int, tag: str) -> None:
    session.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (session / f"pre-key-{i}.json").write_text(f'{{"key": "{tag}-{i}"}}')


def test_oversized_manifest_is_split_and_round_trips(
    store: FirestoreStore, keyring: Keyring, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fsmod, "MANIFEST_PART_BYTES", 1000)
    s = make_setup(tmp_path, store, keyring)
    many_files(s.session("bob"), 60, "one")
    make_db(s.session("bob") / "session.db", rows=200)
    assert s.engine.backup("bob").status == "created"
    blob = store.read_manifest("bob", 1)
    parts = parts_of(store, "bob", 1)
    assert len(blob) > 3000 and len(parts) == (len(blob) - 1) // 1000  # the first is in the main
    outcome = s.restorer().restore_to("bob", tmp_path / "restored")
    assert outcome.status == "restored"
    assert (tmp_path / "restored" / "pre-key-59.json").read_text() == '{"key": "one-59"}'


def test_partly_written_manifest_is_invisible_and_its_parts_are_collected(
    store: FirestoreStore, keyring: Keyring, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fsmod, "MANIFEST_PART_BYTES", 1000)
    store.write_interval = 0.05
    s = make_setup(tmp_path, store, keyring, keep=1)
    many_files(s.session("bob"), 40, "one")
    assert s.engine.backup("bob").status == "created"

    # the writer dies after the extra parts of generation 2 and before its main document
    # (created in a batch with the pieces)
    real_create = WriteBatch.create

    def die(batch: Any, ref: Any, *args: Any, **kwargs: Any) -> Any:
        if "/generations/" in ref.path:
            raise OSError("killed before the main manifest document")
        return real_create(batch, ref, *args, **kwargs)

    monkeypatch.setattr(WriteBatch, "create", die)
    many_files(s.session("bob"), 40, "two")
    with pytest.raises(OSError, match="killed"):
        s.engine.backup("bob")
    monkeypatch.setattr(WriteBatch, "create", real_create)
    stale = parts_of(store, "bob", 2)
    assert stale  # the parts are there ...
    assert store.list_generations("bob") == [1]  # ... but no generation 2
    with pytest.raises(NotFound):
        store.read_manifest("bob", 2)
    current = store.read_head("bob")
    assert current is not None and current.generation == 1
    assert s.restorer().restore_to("bob", tmp_path / "r1").generation == 1

    # the next commit takes number 2 again with a new upload; dropping it later removes all
    assert s.engine.backup("bob").commit is not None
    assert store.list_generations("bob") == [2]
    assert set(stale) < set(parts_of(store, "bob", 2))
    assert s.restorer().restore_to("bob", tmp_path / "r2").generation == 2
    many_files(s.session("bob"), 40, "three")
    assert s.engine.backup("bob").status == "created"
    assert store.list_generations("bob") == [3]
    assert parts_of(store, "bob", 2) == [] and parts_of(store, "bob", 1) == []


def test_two_writers_creating_one_split_manifest_never_mix_parts(
    firestore_emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fsmod, "MANIFEST_PART_BYTES", 1000)
    stores = [FirestoreStore(firestore_emulator.project) for _ in range(2)]
    blobs = [bytes([i + 1]) * 7_500 for i in range(2)]
    results: list[bool] = [False, False]
    barrier = threading.Barrier(2)

    def create(i: int) -> None:
        barrier.wait()
        results[i] = stores[i].create_manifest("c", 7, blobs[i])

    threads = [threading.Thread(target=create, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False, True]
    winner = results.index(True)
    assert stores[1 - winner].read_manifest("c", 7) == blobs[winner]
    assert len(parts_of(stores[0], "c", 7)) == 7  # the loser removed its own parts


# --- two writers on one account ------------------------------------------------------------------


class ReplicaWithoutCollection(Replica):
    """A replica that never collects garbage.

    Two instances are not yet excluded from each other's commits (leases come later): one
    instance's collection may delete the manifest or the pieces another is still committing. The
    race below is about the head's compare-and-swap, so its writers do not collect.
    """

    def _collect_after_commit(
        self, account: str, fell_off: tuple[int, ...], switched: Head
    ) -> GcResult:
        return GcResult(skipped="collection disabled in this test")


def test_two_writers_racing_on_one_account_never_lose_or_rewind_a_generation(
    firestore_emulator: Emulator, keyring: Keyring, tmp_path: Path
) -> None:
    rounds = 6
    stores = [FirestoreStore(firestore_emulator.project) for _ in range(3)]
    setups = []
    for i in range(2):
        layout = SessionsLayout(tmp_path / f"writer{i}")
        layout.prepare()
        replica = ReplicaWithoutCollection(stores[i], keyring, keep_generations=100)
        setups.append(Setup(tmp_path, layout, replica, BackupEngine(layout, replica)))
        make_db(layout.account_dir("race") / "session.db", rows=30)
    committed: dict[int, str] = {}  # generation -> the content it holds
    conflicts: list[str] = []
    errors: list[BaseException] = []
    observed: list[int] = []
    barrier = threading.Barrier(2)
    done = threading.Event()
    for racer in stores[:2]:
        # both switches of a round start together, so both read the head before either writes
        switch = racer.switch_head

        def switch_together(*args: Any, _switch: Any = switch) -> None:
            barrier.wait(timeout=60)
            _switch(*args)

        racer.switch_head = switch_together  # type: ignore[method-assign]

    def write(i: int) -> None:
        state = setups[i].layout.account_dir("race") / "state.json"
        try:
            for r in range(rounds):
                content = f'{{"writer": {i}, "round": {r}}}'
                state.write_text(content)
                barrier.wait(timeout=60)
                # both hosts hold a session that descends from the head (as if both had restored
                # it): neither is refused as a conflict, so the compare-and-swap decides
                head = stores[i].read_head("race")
                if head is not None:
                    lineage = setups[i].layout.lineage
                    lineage.record("race", head.generation, lineage.read("race").inode)
                try:
                    result = setups[i].engine.backup("race")
                except HeadConflict as exc:
                    conflicts.append(str(exc))
                    continue
                assert result.status == "created" and result.commit is not None
                assert result.commit.generation not in committed
                committed[result.commit.generation] = content
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    def watch() -> None:
        while not done.is_set():
            current = stores[2].read_head("race")
            if current is not None:
                observed.append(current.generation)
            time.sleep(0.02)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(2)]
    watcher = threading.Thread(target=watch)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    done.set()
    watcher.join()
    assert not errors, errors
    print(f"\n{len(committed)} commits, {len(conflicts)} conflicts, {len(observed)} observations")

    assert conflicts and all("expected" in c for c in conflicts)  # the losers were told
    assert observed == sorted(observed)  # the head only moved forward
    final = stores[2].read_head("race")
    assert final is not None
    # every commit that succeeded is in the head's history, newest first: none was lost. (A
    # commit that finds no head keeps the complete generations the store already lists, rather
    # than trust a missing head: in the first round, that can be the loser's manifest.)
    assert [g for g in final.history if g in committed] == sorted(committed, reverse=True)
    assert all(g < min(committed) for g in final.history if g not in committed)
    assert final.generation == max(committed)
    restorer = setups[0].restorer()
    for generation, content in committed.items():
        dest = tmp_path / f"restored-{generation}"
        assert restorer.restore_to("race", dest, generation).status == "restored"
        assert (dest / "state.json").read_text() == content


# --- retention ------------------------------------------------------------------------------------


def test_retention_keeps_the_newest_generations_and_collects_their_unreferenced_pieces(
    store: FirestoreStore, keyring: Keyring, tmp_path: Path
) -> None:
    store.write_interval = 0.05
    s = make_setup(tmp_path, store, keyring, keep=3)
    notes = s.session("carol") / "notes.txt"
    notes.parent.mkdir(parents=True)
    make_db(notes.parent / "session.db", rows=20)
    for i in range(6):
        notes.write_text(f"version {i}")
        result = s.engine.backup("carol")
        assert result.commit is not None and result.commit.generation == i + 1
    assert store.list_generations("carol") == [4, 5, 6]
    current = store.read_head("carol")
    assert current is not None and current.history == (6, 5, 4)
    referenced = {
        p for g in (4, 5, 6) for f in s.replica.load_manifest("carol", g).files for p in f.pieces
    }
    assert store.list_pieces("carol") == referenced
    assert s.restorer().restore_to("carol", tmp_path / "oldest", 4).status == "restored"
    assert (tmp_path / "oldest" / "notes.txt").read_text() == "version 3"


# --- account records ------------------------------------------------------------------------------


@pytest.fixture(params=["directory", "firestore"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> DirectoryStore | FirestoreStore:
    if request.param == "directory":
        (tmp_path / "backups").mkdir()
        return DirectoryStore(tmp_path / "backups")
    emulator = request.getfixturevalue("firestore_emulator")
    return FirestoreStore(emulator.project)


def test_account_records_merge_field_by_field(any_store: DirectoryStore | FirestoreStore) -> None:
    assert any_store.read_account("dana") is None
    any_store.record_account("dana", {"accountId": "dana", "status": "pairing", "lease": {"a": 1}})
    any_store.record_account("dana", {"status": "connected", "lease": {"b": 2}, "phone": "1555"})
    any_store.flush()
    expected = {"accountId": "dana", "status": "connected", "lease": {"b": 2}, "phone": "1555"}
    assert any_store.read_account("dana") == expected
    assert any_store.read_account("erik") is None


def test_account_records_are_written_at_most_once_a_second(store: FirestoreStore) -> None:
    raw = store._record("dana")
    store.record_account("dana", {"status": "connecting", "phone": "1555"})
    assert raw.get().to_dict() == {"status": "connecting", "phone": "1555"}
    started = time.monotonic()
    for i in range(20):
        store.record_account("dana", {"status": f"event {i}", "lastEventAt": i})
    assert time.monotonic() - started < 0.5  # coalesced, nobody waited
    assert raw.get().to_dict() == {"status": "connecting", "phone": "1555"}
    assert (store.read_account("dana") or {})["status"] == "event 19"  # pending ones included
    deadline = time.monotonic() + 10
    while (raw.get().to_dict() or {}).get("status") != "event 19":
        assert time.monotonic() < deadline, "the coalesced fields were never written"
        time.sleep(0.05)
    assert raw.get().to_dict() == {"status": "event 19", "lastEventAt": 19, "phone": "1555"}
    assert store.counters["writes"] == 2
    store.record_account("dana", {"lastMessageAt": "now"})
    store.flush()  # waits out the rest of the second, then writes
    assert (raw.get().to_dict() or {})["lastMessageAt"] == "now"
    assert store.counters["writes"] == 3


# --- Firestore down ----------------------------------------------------------------------------


def test_outage_gives_store_unavailable_in_seconds_and_commits_resume_after_it(
    store: FirestoreStore, firestore_emulator: Emulator, keyring: Keyring, tmp_path: Path
) -> None:
    s = make_setup(tmp_path, store, keyring)
    make_db(s.session("fred") / "session.db", rows=100)
    assert s.engine.backup("fred").status == "created"

    firestore_emulator.stop()
    run_sql(s.session("fred") / "session.db", "INSERT INTO t (v) VALUES (x'01')")
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as info:
        s.engine.backup("fred")
    failed_after = time.monotonic() - started
    message = str(info.value)
    assert "Firestore" in message and firestore_emulator.project in message
    assert f"is the emulator running at {firestore_emulator.address}" in message
    assert failed_after < 30

    firestore_emulator.start()  # an empty emulator: its data was in memory
    started = time.monotonic()
    attempts = 0
    while True:
        attempts += 1
        try:
            result = s.engine.backup("fred")
            break
        except StoreUnavailable:
            assert time.monotonic() - started < 60, "commits did not resume"
            time.sleep(0.5)
    print(
        f"\nStoreUnavailable after {failed_after:.1f} s; commits resumed "
        f"{time.monotonic() - started:.1f} s after the restart ({attempts} attempts)"
    )
    assert result.status == "created" and result.commit is not None
    assert s.restorer().restore_to("fred", tmp_path / "after").status == "restored"
