"""A backup only moves forward: an old disk put back, a second host with an older copy, or a
session made while the store was down never rolls the head back or deletes a newer generation.

Each test drives the daemon and the CLI as processes, as a user would, against the directory
store and (where the store must be unreachable) the Firestore emulator.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from conftest import DaemonProcess, Env, wait_until
from firestore_emulator import Emulator
from tcp_proxy import TcpProxy
from test_firestore_daemon import firestore_config, head_generation

from wadaemon.backup import BackupEngine
from wadaemon.keyring import Keyring, load_keyring
from wadaemon.layout import SessionsLayout
from wadaemon.replica import Conflict, Replica
from wadaemon.store import DirectoryStore
from wadaemon.store.firestore import FirestoreStore

pytestmark = pytest.mark.slow


def creds(env: Env, account: str = "alice") -> Path:
    return env.sessions / account / "creds.json"


def write(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"me": "15551234567", "v": value}))


def backed_up_value(env: Env, generation: int, account: str = "alice") -> int:
    dest = env.root / f"gen-{account}-{generation}-{os.urandom(3).hex()}"
    env.cli("restore", account, "--generation", str(generation), "--to", str(dest), check=True)
    value: int = json.loads((dest / "creds.json").read_text())["v"]
    return value


def generations(env: Env, account: str = "alice") -> list[int]:
    out = env.cli("generations", account, "--json", check=True).stdout
    return sorted(g["generation"] for g in json.loads(out)["generations"])


def health(env: Env) -> dict[str, object]:
    doc: dict[str, object] = json.loads(env.cli("status", "--json").stdout)
    return doc


def account_state(env: Env, account: str = "alice") -> str:
    return str(health(env)["accounts"][account]["state"])  # type: ignore[index]


class Target:
    """The backup target a test runs against: the directory store or the Firestore emulator."""

    def __init__(self, emulator: Emulator | None) -> None:
        self.emulator = emulator

    def configure(self, env: Env, **backup: object) -> None:
        if self.emulator is None:
            env.write_config(**backup)
        else:
            firestore_config(env, self.emulator, **backup)

    def head(self, env: Env, account: str = "alice") -> int | None:
        if self.emulator is None:
            return env.head_generation(account)
        return head_generation(self.emulator, account) or None


@pytest.fixture(params=["directory", "firestore"])
def target(request: pytest.FixtureRequest) -> Target:
    if request.param == "directory":
        return Target(None)
    return Target(request.getfixturevalue("firestore_emulator"))


def run_to_generation(
    env: Env, daemon: DaemonProcess, first: int, last: int, target: Target | None = None
) -> None:
    """Change the session and wait for each change's generation."""
    head = target.head if target is not None else Target(None).head
    for v in range(first, last + 1):
        write(creds(env), v)
        wait_until(lambda v=v: head(env) == v, 20)  # type: ignore[misc]


@pytest.fixture
def old_disk(env: Env, daemon_factory: type[DaemonProcess], target: Target) -> Path:
    """A sessions directory as it was at generation 2 (inodes and lineage as they were, like a
    VM image or a re-attached volume), set aside while the account goes on to generation 5."""
    target.configure(env, keep_generations=10)
    daemon = daemon_factory()
    daemon.wait_for("ready")
    run_to_generation(env, daemon, 1, 2, target)
    assert daemon.stop() == 0
    image = env.root / "sessions.image"
    os.rename(env.sessions, image)  # the disk image, untouched from here on
    shutil.copytree(image, env.sessions, symlinks=True)  # the disk that goes on
    daemon = daemon_factory()
    daemon.wait_for("ready")
    run_to_generation(env, daemon, 3, 5, target)
    assert daemon.stop() == 0
    return image


def put_back(env: Env, image: Path) -> None:
    os.rename(env.sessions, env.root / "sessions.newer")
    os.rename(image, env.sessions)


def test_an_old_disk_put_back_gets_the_newer_backup(
    env: Env, daemon_factory: type[DaemonProcess], old_disk: Path, target: Target
) -> None:
    put_back(env, old_disk)
    daemon = daemon_factory()
    daemon.wait_for("ready")
    assert "restore: alice: restored (generation 5)" in daemon.log()
    assert json.loads(creds(env).read_text())["v"] == 5
    quarantined = list((env.sessions / ".quarantine").glob("alice.*.behind"))
    assert len(quarantined) == 1  # the old copy is set aside, never deleted
    write(creds(env), 6)
    wait_until(lambda: target.head(env) == 6, 20)
    assert daemon.stop() == 0
    assert generations(env) == [1, 2, 3, 4, 5, 6]


def test_an_old_disk_with_its_own_changes_is_a_conflict(
    env: Env, daemon_factory: type[DaemonProcess], old_disk: Path, target: Target
) -> None:
    write(old_disk / "alice" / "creds.json", 99)  # changed on the old disk, never backed up
    put_back(env, old_disk)
    daemon = daemon_factory()
    daemon.wait_for("ready")
    assert "restore: alice: conflict" in daemon.log()
    doc = health(env)
    assert doc["status"] == "failing"
    assert "accounts resolve alice" in doc["checks"]["accounts"]["detail"]  # type: ignore[index]
    write(creds(env), 100)  # the gateway keeps writing: still nothing is committed over the head
    (env.sessions / "alice" / "pre-key-1.json").write_text("{}")
    time.sleep(2.0)  # a few debounce windows: backups are attempted, none is committed
    assert target.head(env) == 5
    assert generations(env) == [1, 2, 3, 4, 5]
    assert account_state(env) == "conflict"

    proc = env.cli("accounts", "resolve", "alice", "--keep-local")
    assert proc.returncode == 0, proc.stderr
    assert "backed up as generation 6" in proc.stdout
    assert backed_up_value(env, 6) == 100 and backed_up_value(env, 5) == 5
    assert account_state(env) == "protected"
    assert daemon.stop() == 0


def test_resolve_keep_backup_restores_the_head(
    env: Env, daemon_factory: type[DaemonProcess], old_disk: Path, target: Target
) -> None:
    write(old_disk / "alice" / "creds.json", 99)
    put_back(env, old_disk)
    daemon = daemon_factory()
    daemon.wait_for("ready")
    assert account_state(env) == "conflict"
    assert env.cli("accounts", "resolve", "alice", "--keep-backup").returncode == 0
    assert json.loads(creds(env).read_text())["v"] == 5
    kept = list((env.sessions / ".quarantine").glob("alice.*"))
    assert len(kept) == 1 and json.loads((kept[0] / "creds.json").read_text())["v"] == 99
    wait_until(lambda: account_state(env) == "protected", 10)
    write(creds(env), 6)
    wait_until(lambda: target.head(env) == 6, 20)
    proc = env.cli("accounts", "resolve", "alice", "--keep-backup")
    assert proc.returncode == 1 and "not in conflict" in proc.stderr
    assert daemon.stop() == 0


def test_a_second_host_with_an_older_copy_never_rolls_the_head_back(
    env: Env, daemon_factory: type[DaemonProcess], target: Target
) -> None:
    target.configure(env, keep_generations=3)
    first = daemon_factory()
    first.wait_for("ready")
    write(creds(env), 1)
    wait_until(lambda: target.head(env) == 1, 20)
    other = Env(
        env.root / "b", env.root / "b" / "sessions", env.backups, env.key, env.root / "b.yaml"
    )
    other.extra["socket"] = env.root / "b.sock"
    other.root.mkdir()
    shutil.copytree(env.sessions / "alice", other.sessions / "alice")  # a copy of generation 1
    target.configure(other, keep_generations=3)
    run_to_generation(env, first, 2, 6, target)  # the first host goes on; 1-3 fall out

    second = daemon_factory(other)
    second.wait_for("ready")
    assert "restore: alice: conflict" in second.log()
    assert account_state(other) == "conflict"
    write(other.sessions / "alice" / "creds.json", 1000)
    run_to_generation(env, first, 7, 7, target)  # the first host is unaffected
    assert target.head(env) == 7
    assert all(backed_up_value(env, g) == g for g in generations(env))
    assert first.stop() == 0 and second.stop() == 0


def test_a_session_made_while_the_store_was_down_never_replaces_the_backup(
    env: Env, daemon_factory: type[DaemonProcess], firestore_emulator: Emulator
) -> None:
    proxy = TcpProxy(("127.0.0.1", int(firestore_emulator.address.rsplit(":", 1)[1])))
    via_proxy = {"FIRESTORE_EMULATOR_HOST": proxy.address}
    firestore_config(env, firestore_emulator, keep_generations=2)
    env.config.write_text(
        env.config.read_text().replace("timeout_seconds: 60", "timeout_seconds: 5")
    )
    write(creds(env), 1)
    daemon = daemon_factory(env, via_proxy)
    daemon.wait_for("ready", timeout=60)
    wait_until(lambda: head_generation(firestore_emulator, "alice") == 1, 30)
    write(creds(env), 2)
    wait_until(lambda: head_generation(firestore_emulator, "alice") == 2, 30)
    write(env.sessions / "bob" / "creds.json", 7)
    wait_until(lambda: head_generation(firestore_emulator, "bob") == 1, 30)
    assert daemon.stop() == 0

    proxy.cut()
    shutil.rmtree(env.sessions)  # the disk is lost while the store is down
    daemon = daemon_factory(env, via_proxy)
    daemon.wait_for("ready", timeout=90)  # after restore.timeout_seconds
    write(creds(env), 500)  # the gateway starts with a fresh session meanwhile
    time.sleep(3)
    proxy.restore()
    wait_until(lambda: (env.sessions / "bob" / "creds.json").exists(), 120)  # no restart
    assert json.loads((env.sessions / "bob" / "creds.json").read_text())["v"] == 7
    wait_until(lambda: account_state(env) == "conflict", 60)
    assert head_generation(firestore_emulator, "alice") == 2
    store = FirestoreStore(firestore_emulator.project)
    replica = Replica(store, load_keyring(env.key, [], environ={}), 2)
    assert [i.generation for i in replica.generations("alice")] == [2, 1]
    assert json.loads(creds(env).read_text())["v"] == 500  # the fresh session is left alone too
    assert daemon.stop() == 0


def test_retention_keeps_the_head_line_in_the_directory_store(env: Env) -> None:
    """The store side of the rule: a commit whose parent is not the head is refused before
    anything is written, so retention never runs for it."""
    write(creds(env), 1)
    env.cli("backup", "alice", check=True)
    write(creds(env), 2)
    env.cli("backup", "alice", check=True)
    before = sorted(p.name for p in (env.backups / "alice").rglob("*") if p.is_file())
    lineage = env.sessions / ".lineage" / "alice.json"
    record = json.loads(lineage.read_text())
    # as if this copy were older: it descends from generation 1, no commit of it pending
    lineage.write_text(json.dumps({"generation": 1, "inode": record["inode"]}))
    write(creds(env), 3)
    proc = env.cli("backup", "alice")
    assert proc.returncode == 1 and "does not descend from the backup head" in proc.stderr
    after = sorted(p.name for p in (env.backups / "alice").rglob("*") if p.is_file())
    assert after == before
    assert DirectoryStore(env.backups).read_head("alice").generation == 2  # type: ignore[union-attr]


def test_a_stop_between_the_head_switch_and_the_lineage_record_is_no_conflict(
    tmp_path: Path, keyring: Keyring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon killed right after its commit switched the head, before it wrote down that
    its session descends from the new generation: its next backup is still a fast forward."""
    layout = SessionsLayout(tmp_path / "sessions")
    layout.prepare()
    (tmp_path / "backups").mkdir()

    def engine() -> BackupEngine:  # a fresh process: nothing remembered in memory
        return BackupEngine(layout, Replica(DirectoryStore(tmp_path / "backups"), keyring, 5))

    session = layout.account_dir("alice") / "creds.json"
    write(session, 1)
    assert engine().backup("alice").generation == 1
    write(session, 2)

    def killed(*args: object) -> None:
        raise OSError("killed")

    monkeypatch.setattr(layout.lineage, "record", killed)
    with pytest.raises(OSError, match="killed"):
        engine().backup("alice")
    monkeypatch.undo()
    assert DirectoryStore(tmp_path / "backups").read_head("alice").generation == 2  # type: ignore[union-attr]
    write(session, 3)  # the gateway went on writing
    assert engine().backup("alice").generation == 3


def test_a_commit_writes_the_lineage_once_and_it_holds_after_another_writer_moves_on(
    tmp_path: Path, keyring: Keyring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The record written before the switch stands for the commit once it landed: no second
    write after it; and once another writer's generation follows it, this unchanged copy is
    known as behind (an old copy put back), not as a session of unknown descent."""
    layout = SessionsLayout(tmp_path / "sessions")
    layout.prepare()
    (tmp_path / "backups").mkdir()
    replica = Replica(DirectoryStore(tmp_path / "backups"), keyring, 5)
    engine = BackupEngine(layout, replica)
    session = layout.account_dir("alice") / "creds.json"
    write(session, 1)
    assert engine.backup("alice").generation == 1
    writes: list[object] = []
    real = layout.lineage._write
    monkeypatch.setattr(layout.lineage, "_write", lambda *a: (writes.append(a), real(*a)))
    for value in (2, 3):
        write(session, value)
        assert engine.backup("alice").status == "created"
    assert len(writes) == 2  # one per commit
    descent = layout.lineage.read("alice")
    assert descent.pending is not None and descent.pending[0] == 3 and descent.generation == 2
    # another host commits generation 4 over it; this copy has not changed since 3
    other = tmp_path / "other"
    shutil.copytree(layout.account_dir("alice"), other / "alice")
    write(other / "alice" / "creds.json", 4)
    other_layout = SessionsLayout(other)
    other_layout.prepare()
    other_layout.lineage.record("alice", 3, (other / "alice").stat().st_ino)
    assert BackupEngine(other_layout, replica).backup("alice").generation == 4
    with pytest.raises(Conflict, match="it is generation 3 unchanged, older than the backup"):
        BackupEngine(layout, replica).backup("alice")
