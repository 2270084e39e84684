"""The head is authenticated: a head rewritten in the store (directory or Firestore) is used for
nothing: no restore picks a generation from it, no backup switches it, no collection deletes
after it. Heads of earlier versions (no MAC) are accepted once and replaced by authenticated ones.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import DaemonProcess, Env, make_db, run_sql, wait_until
from firestore_emulator import Emulator
from test_firestore_daemon import firestore_config

from wadaemon.backup import BackupEngine
from wadaemon.errors import WadaemonError
from wadaemon.keyring import Key, Keyring
from wadaemon.layout import SessionsLayout
from wadaemon.replica import Replica
from wadaemon.restore import Restorer, drill
from wadaemon.store import DirectoryStore, Store
from wadaemon.store.firestore import FirestoreStore

ALTERED = "the backup head of alice does not authenticate"


def raw_head(store: Store, account: str) -> dict[str, Any]:
    if isinstance(store, DirectoryStore):
        raw: dict[str, Any] = json.loads((store.root / account / "HEAD.json").read_text())
        return raw
    assert isinstance(store, FirestoreStore)
    return store._session(account).get().to_dict() or {}


def edit_head(store: Store, account: str, **fields: Any) -> None:
    """What someone with write access to the store does: rewrite fields of the head in place."""
    if isinstance(store, DirectoryStore):
        path = store.root / account / "HEAD.json"
        raw = json.loads(path.read_text())
        raw.update(fields)
        path.write_text(json.dumps(raw))
        return
    assert isinstance(store, FirestoreStore)
    store._session(account).update(fields)


def strip_mac(store: Store, account: str) -> None:
    """The head as an earlier version wrote it: no MAC."""
    if isinstance(store, DirectoryStore):
        path = store.root / account / "HEAD.json"
        raw = json.loads(path.read_text())
        raw.pop("mac", None)
        path.write_text(json.dumps(raw))
        return
    assert isinstance(store, FirestoreStore)
    from google.cloud.firestore_v1 import DELETE_FIELD

    store._session(account).update({"mac": DELETE_FIELD})


def contents(store: Store, account: str) -> tuple[list[int], set[str]]:
    return store.list_generations(account), store.list_pieces(account)


class Setup:
    def __init__(self, root: Path, store: Store, keyring: Keyring, keep: int) -> None:
        self.layout = SessionsLayout(root / "sessions")
        self.layout.prepare()
        self.store = store
        self.keyring = keyring
        self.keep = keep
        self.replica = Replica(store, keyring, keep)
        self.engine = BackupEngine(self.layout, self.replica)

    def fresh(self) -> tuple[Replica, BackupEngine, Restorer]:
        """A new process's replica, engine and restorer on the same store."""
        replica = Replica(self.store, self.keyring, self.keep)
        return replica, BackupEngine(self.layout, replica), Restorer(self.layout, replica)

    def versions(self, account: str, count: int) -> Path:
        notes = self.layout.account_dir(account) / "notes.txt"
        notes.parent.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            notes.write_text(f"version {i + 1}\n" * (i + 1) * 1000)
            result = self.engine.backup(account)
            assert result.status == "created", result
        return notes


def test_a_rewound_head_restores_nothing_and_lets_nothing_be_deleted(
    any_store: Store, keyring: Keyring, tmp_path: Path
) -> None:
    s = Setup(tmp_path, any_store, keyring, keep=3)
    notes = s.versions("alice", 4)
    head = any_store.read_head("alice")
    assert head is not None and head.history == (4, 3, 2)
    before = contents(any_store, "alice")
    assert before[0] == [2, 3, 4]

    # rewound to generation 3, with a history that a head of generation 3 would have had
    edit_head(any_store, "alice", generation=3, history=[3, 2])
    replica, engine, restorer = s.fresh()

    result = drill(replica, "alice")
    assert not result.ok
    assert ALTERED in result.error and "nothing is restored or deleted" in result.error

    shutil.rmtree(notes.parent)
    outcome = restorer.restore_account("alice")
    assert outcome.status == "failed" and ALTERED in outcome.detail
    assert not notes.parent.exists()  # nothing was restored from the rewound head
    with pytest.raises(WadaemonError, match=ALTERED):
        restorer.restore_to("alice", tmp_path / "elsewhere")
    assert not (tmp_path / "elsewhere").exists()

    # the next backup refuses to switch the head, so retention deletes nothing after it
    notes.parent.mkdir()
    notes.write_text("version 5\n")
    with pytest.raises(WadaemonError, match=ALTERED):
        engine.backup("alice")
    replica.collect_garbage("alice")  # nor does a full collection
    assert contents(any_store, "alice") == before
    assert raw_head(any_store, "alice")["generation"] == 3  # left as it is, for inspection
    assert replica.head_problems["alice"].startswith(ALTERED)


def test_the_head_mac_covers_every_field_and_the_account(tmp_path: Path) -> None:
    old, new = (Key.from_bytes(os.urandom(32), f"key {i}") for i in range(2))
    (tmp_path / "backups").mkdir()
    store = DirectoryStore(tmp_path / "backups")
    s = Setup(tmp_path, store, Keyring(old), keep=5)
    s.versions("alice", 2)
    s.keyring = Keyring(new, [old])  # the head names the old key, which is still loaded
    good = (store.root / "alice" / "HEAD.json").read_text()
    assert s.fresh()[0].read_head("alice") is not None
    changes: dict[str, Any] = {
        "generation": 1,
        "history": [2],
        "digest": "0" * 64,
        "key_id": new.key_id,
        "state": "logged_out",
        "updated_at": "2020-01-01T00:00:00.000Z",
        "writer": "elsewhere:1",
    }
    for field, value in changes.items():
        edit_head(store, "alice", **{field: value})
        with pytest.raises(WadaemonError, match=ALTERED):
            s.fresh()[0].read_head("alice")
        (store.root / "alice" / "HEAD.json").write_text(good)
    # a head copied to another account does not authenticate there
    (store.root / "bob").mkdir()
    (store.root / "bob" / "HEAD.json").write_text(good)
    with pytest.raises(WadaemonError, match="the backup head of bob does not authenticate"):
        s.fresh()[0].read_head("bob")


def test_state_changes_and_removal_write_authenticated_heads(
    any_store: Store, keyring: Keyring, tmp_path: Path
) -> None:
    s = Setup(tmp_path, any_store, keyring, keep=5)
    s.versions("alice", 2)
    s.replica.set_head_state("alice", "logged_out")
    assert raw_head(any_store, "alice")["mac"]
    head = s.fresh()[0].read_head("alice")
    assert head is not None and head.state == "logged_out" and head.history == (2, 1)
    edit_head(any_store, "alice", state="active")  # undoing the logout in the store
    with pytest.raises(WadaemonError, match=ALTERED):
        s.fresh()[0].read_head("alice")
    with pytest.raises(WadaemonError, match=ALTERED):
        s.fresh()[0].set_head_state("alice", "active")

    s.fresh()[0].remove_account("alice")  # removal deletes everything, even then
    tomb = s.fresh()[0].read_head("alice")
    assert tomb is not None and tomb.state == "removed" and raw_head(any_store, "alice")["mac"]
    assert contents(any_store, "alice") == ([], set())


def test_heads_of_earlier_versions_are_accepted_and_the_next_backup_authenticates_them(
    any_store: Store, keyring: Keyring, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    s = Setup(tmp_path, any_store, keyring, keep=5)
    notes = s.versions("alice", 3)
    strip_mac(any_store, "alice")
    assert "mac" not in raw_head(any_store, "alice")
    replica, engine, restorer = s.fresh()
    assert drill(replica, "alice").ok
    assert restorer.restore_to("alice", tmp_path / "copy").generation == 3
    assert "alice: the backup head (generation 3) is not authenticated yet" in caplog.text
    assert caplog.text.count("is not authenticated yet") == 1  # once per account

    # nothing changed, yet the next backup writes an authenticated head (a new generation,
    # whose history is what the store holds: nothing is deleted on the old head's word)
    result = engine.backup("alice", force=True)
    assert result.status == "created" and result.generation == 4
    assert raw_head(any_store, "alice")["mac"]
    head = s.fresh()[0].read_head("alice")
    assert head is not None and head.history == (4, 3, 2, 1)
    assert any_store.list_generations("alice") == [1, 2, 3, 4]
    assert (tmp_path / "copy" / "notes.txt").read_text() == notes.read_text()

    # once this process has seen an authenticated head, one without a MAC is refused
    strip_mac(any_store, "alice")
    with pytest.raises(WadaemonError, match="its MAC was removed"):
        replica.read_head("alice")


def test_rotation_lost_keys_and_a_deleted_head(tmp_path: Path) -> None:
    k1, k2, k3 = (Key.from_bytes(os.urandom(32), f"key {i}") for i in range(3))
    (tmp_path / "backups").mkdir()
    store = DirectoryStore(tmp_path / "backups")
    s = Setup(tmp_path, store, Keyring(k1), keep=3)
    s.versions("alice", 2)

    # rotation: the old key, still loaded, authenticates the old head; the new head is the
    # new key's
    s.keyring = Keyring(k2, [k1])
    replica, engine, _ = s.fresh()
    assert replica.read_head("alice") is not None
    assert engine.backup("alice", force=True).generation == 3
    assert Replica(store, Keyring(k2), 3).read_head("alice") is not None

    # a lost key: the head cannot be authenticated, so nothing is restored from it...
    s.keyring = Keyring(k3)
    replica, engine, restorer = s.fresh()
    with pytest.raises(WadaemonError, match=f"names key {k2.key_id}, which is not in the keyring"):
        replica.read_head("alice")
    assert "encryption.old_key_files" in drill(replica, "alice").error
    with pytest.raises(WadaemonError, match="which is not in the keyring"):
        restorer.restore_to("alice", tmp_path / "elsewhere")
    # ...but the local session is still backed up with the key at hand, deleting nothing
    assert engine.backup("alice", force=True).generation == 4
    assert store.list_generations("alice") == [1, 2, 3, 4]
    head = replica.read_head("alice")
    assert head is not None and head.history == (4, 3, 2)

    # a deleted head: the next backup writes a new one over what the store holds
    (store.root / "alice" / "HEAD.json").unlink()
    assert engine.backup("alice", force=True).generation == 5
    head = replica.read_head("alice")
    assert head is not None and head.history == (5, 4, 3)
    assert store.list_generations("alice") == [1, 2, 3, 4, 5]


# --- the command line and the daemon ------------------------------------------------------------


def two_generations(env: Env) -> Path:
    db = env.sessions / "alice" / "session.db"
    make_db(db, rows=20)
    env.cli("backup", "alice", check=True)
    run_sql(db, "INSERT INTO t (v) VALUES (x'01')")
    env.cli("backup", "alice", check=True)
    assert env.head_generation("alice") == 2
    return db


def store_files(env: Env) -> list[str]:
    root = env.backups / "alice"
    return sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "HEAD" not in p.name
    )


def test_cli_restore_verify_generations_and_backup_refuse_a_rewound_head(env: Env) -> None:
    db = two_generations(env)
    before = store_files(env)
    edit_head(DirectoryStore(env.backups), "alice", generation=1, history=[1])

    verify = env.cli("verify", "alice")
    assert verify.returncode == 1
    assert ALTERED in verify.stderr and "wadaemon verify alice" in verify.stderr
    assert "FAILED" in verify.stderr
    generations = env.cli("generations", "alice")
    assert generations.returncode == 1 and ALTERED in generations.stderr

    shutil.rmtree(db.parent)
    restore = env.cli("restore", "alice")
    assert restore.returncode == 1 and ALTERED in restore.stderr
    assert not db.parent.exists()

    make_db(db, rows=30)
    backup = env.cli("backup", "alice")
    assert backup.returncode == 1 and ALTERED in backup.stderr
    assert store_files(env) == before
    assert env.head_generation("alice") == 1


def test_cli_accepts_a_head_without_mac_once_and_the_next_backup_authenticates_it(
    env: Env,
) -> None:
    db = two_generations(env)
    strip_mac(DirectoryStore(env.backups), "alice")
    shutil.rmtree(db.parent)
    restore = env.cli("restore", "alice")
    assert restore.returncode == 0, restore.stderr
    assert "restored (generation 2)" in restore.stdout
    assert "is not authenticated yet" in restore.stderr
    backup = env.cli("backup", "alice", check=True)
    assert "generation 3" in backup.stdout
    assert json.loads((env.backups / "alice" / "HEAD.json").read_text())["mac"]
    verify = env.cli("verify", "--all-generations", check=True)
    assert "is not authenticated yet" not in verify.stderr
    assert all(f"generation {g}" in verify.stdout for g in (1, 2, 3))


def health(env: Env) -> tuple[int, dict[str, Any]]:
    proc = env.cli("status", "--json")
    return proc.returncode, json.loads(proc.stdout)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["directory", "firestore"])
def test_running_daemon_fails_health_on_a_rewound_head_and_deletes_nothing(
    env: Env, daemon_factory: type[DaemonProcess], request: pytest.FixtureRequest, target: str
) -> None:
    store: Store
    if target == "firestore":
        emulator: Emulator = request.getfixturevalue("firestore_emulator")
        firestore_config(env, emulator, keep_generations=2)
        store = FirestoreStore(emulator.project)
    else:
        env.write_config(keep_generations=2)
        store = DirectoryStore(env.backups)
    notes = env.sessions / "alice" / "notes.txt"
    notes.parent.mkdir(parents=True)
    notes.write_text("one")
    daemon = daemon_factory()
    daemon.wait_for("ready")

    def generation() -> int:
        head = store.read_head("alice")
        return head.generation if head else 0

    wait_until(lambda: generation() == 1, timeout=30)
    for i in range(2, 4):
        notes.write_text("x" * i)
        wait_until(lambda i=i: generation() == i, timeout=30)  # type: ignore[misc]
    # retention drops generation 1 just after the head moved to 3
    wait_until(lambda: contents(store, "alice")[0] == [2, 3], timeout=30)
    before = contents(store, "alice")
    edit_head(store, "alice", generation=2, history=[2])

    notes.write_text("four")  # the backup of this change refuses to switch the rewound head
    wait_until(lambda: ALTERED in daemon.log(), timeout=30)
    code, body = health(env)
    assert code == 1 and body["status"] == "failing"  # HTTP 503
    heads = body["checks"]["heads"]
    assert heads["status"] == "failing" and ALTERED in heads["detail"]
    assert body["accounts"]["alice"]["consecutive_failures"] >= 1
    assert contents(store, "alice") == before
    assert generation() == 2

    # the documented fix when no copy of the head exists: delete it; the next backup writes a
    # new authenticated head over the generations the store holds
    if isinstance(store, DirectoryStore):
        (env.backups / "alice" / "HEAD.json").unlink()
    else:
        assert isinstance(store, FirestoreStore)
        store._session("alice").delete()
    notes.write_text("five")
    wait_until(lambda: health(env)[1]["checks"]["heads"]["status"] == "ok", timeout=60)
    head = store.read_head("alice")
    assert head is not None and head.generation == 4 and head.history == (4, 3)
    assert daemon.stop() == 0
    assert notes.read_text() == "five"
