"""Hostile files in an account directory: only regular files are opened, never through a symlink
and never blocking. A FIFO hangs nothing; a file or directory swapped for a symlink to a secret
outside the directory while backups run never brings the secret into a backup."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import DaemonProcess, Env, make_db, wait_until

from wadaemon.backup import BackupEngine
from wadaemon.errors import WadaemonError
from wadaemon.keyring import load_keyring
from wadaemon.replica import Replica
from wadaemon.restore import Restorer
from wadaemon.store import DirectoryStore

SECRET = b"TOP-SECRET-not-in-any-session"


def head_paths(env: Env, account: str) -> set[str]:
    replica = env.replica()
    head = replica.store.read_head(account)
    assert head is not None
    return {f.path for f in replica.load_manifest(account, head.generation).files}


@pytest.mark.slow
def test_fifos_hang_nothing_and_are_reported_once_per_change(
    env: Env, daemon_factory: type[DaemonProcess]
) -> None:
    acct = env.sessions / "alice"
    acct.mkdir(parents=True)
    make_db(acct / "session.db", rows=10)
    (acct / "creds.json").write_text('{"v": 1}')
    os.mkfifo(acct / "pipe")
    os.mkfifo(acct / "keys.json")  # a FIFO with a JSON name: opening it to read would block

    daemon = daemon_factory()
    started = time.monotonic()
    daemon.wait_for("ready", timeout=30)  # the boot check of the local session did not hang
    assert time.monotonic() - started < 20
    wait_until(lambda: env.head_generation("alice") == 1, timeout=30)
    assert head_paths(env, "alice") == {"session.db", "creds.json"}
    for v in (2, 3):
        (acct / "creds.json").write_text(json.dumps({"v": v}))
        wait_until(lambda v=v: f"backup: alice: generation {v}" in daemon.log(), timeout=30)
    skipped = (
        "alice: not regular files, never opened nor backed up: keys.json (a FIFO), pipe (a FIFO)"
    )
    assert daemon.log().count(skipped) == 1  # once, not once per backup

    (acct / "pipe").unlink()
    (acct / "creds.json").write_text('{"v": 4}')
    wait_until(lambda: env.head_generation("alice") == 4, timeout=30)
    # the head is switched before the daemon logs the backup: wait for its lines
    wait_until(lambda: "backup: alice: generation 4" in daemon.log(), timeout=10)
    assert daemon.log().count("never opened nor backed up: keys.json (a FIFO)\n") == 1
    (acct / "keys.json").unlink()
    (acct / "creds.json").write_text('{"v": 5}')
    wait_until(lambda: "backup: alice: generation 5" in daemon.log(), timeout=30)
    assert daemon.log().count("alice: no entry is skipped any more") == 1

    started = time.monotonic()
    assert daemon.stop(timeout=30) == 0
    assert time.monotonic() - started < 10
    assert "backup failed" not in daemon.log()


def test_a_fifo_where_sqlite_looks_for_its_journal_blocks_nothing(env: Env) -> None:
    """SQLite opens a database's -journal by name to look for a hot journal: a FIFO there
    would block it for ever. The database is neither read nor checked, and the log says why."""
    acct = env.sessions / "alice"
    make_db(acct / "session.db", rows=10, wal=False)
    os.mkfifo(acct / "session.db-journal")
    started = time.monotonic()
    backup = cli(env, "backup", "alice")
    assert backup.returncode == 1
    assert (
        "alice: FAILED: session.db-journal: a FIFO, not a regular file: SQLite would open it "
        "with session.db, so session.db is not read until it is removed"
    ) in backup.stderr
    restore = cli(env, "restore", "alice")  # checks the local session first: left as it is
    assert restore.returncode == 1
    assert "alice: unchecked: could not check it: session.db-journal: a FIFO" in restore.stderr
    assert time.monotonic() - started < 30


def cli(env: Env, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wadaemon", *args, "--config", str(env.config)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def secret_db(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
    conn.execute("INSERT INTO t (v) VALUES (?)", (SECRET,))
    conn.commit()
    conn.close()


class Swapper(threading.Thread):
    """Swaps, over and over, each name for a symlink to a secret outside the account directory
    and back. A swapped-back file is the same inode as before (renamed back in), so a check
    that compares what it sees before and after the copy is not enough."""

    def __init__(self, acct: Path, stash: Path, secrets: Path) -> None:
        super().__init__(daemon=True)
        self.acct, self.stash, self.secrets = acct, stash, secrets
        self.stop = threading.Event()
        self.swaps = 0

    def swap_file(self, name: str, target: Path) -> None:
        link = self.stash / f"{name}.link"
        link.unlink(missing_ok=True)
        link.symlink_to(target)
        os.link(self.acct / name, self.stash / name)  # a second name for the real file
        os.replace(link, self.acct / name)  # now a symlink to the secret
        time.sleep(0.002)
        os.replace(self.stash / name, self.acct / name)  # the real file again, same inode

    def swap_dir(self, name: str, target: Path) -> None:
        link = self.stash / f"{name}.link"
        link.unlink(missing_ok=True)
        link.symlink_to(target, target_is_directory=True)
        os.rename(self.acct / name, self.stash / name)
        os.replace(link, self.acct / name)
        time.sleep(0.002)
        (self.acct / name).unlink()
        os.rename(self.stash / name, self.acct / name)

    def run(self) -> None:
        while not self.stop.is_set():
            self.swap_file("session.db", self.secrets / "secret.db")
            self.swap_file("creds.json", self.secrets / "secret.json")
            self.swap_dir("keys", self.secrets / "keys")
            self.swaps += 1
            time.sleep(0.002)


def test_symlinks_swapped_in_during_backups_never_bring_a_secret_in(env: Env) -> None:
    secrets = env.root / "secrets"
    (secrets / "keys").mkdir(parents=True)
    secret_db(secrets / "secret.db")
    (secrets / "secret.json").write_text(json.dumps({"secret": SECRET.decode()}))
    (secrets / "keys" / "pre-key-1.json").write_text(json.dumps({"secret": SECRET.decode()}))
    acct = env.sessions / "alice"
    make_db(acct / "session.db", rows=50, wal=False)
    (acct / "creds.json").write_text('{"me": "alice"}')
    (acct / "keys").mkdir()
    (acct / "keys" / "pre-key-1.json").write_text('{"i": 1}')
    stash = env.root / "stash"
    stash.mkdir()

    layout = env.layout()
    layout.prepare()
    keyring = load_keyring(env.key, [], environ={})
    replica = Replica(DirectoryStore(env.backups), keyring, keep_generations=10_000)
    engine = BackupEngine(layout, replica)
    assert engine.backup("alice").status == "created"  # generation 1, before any swap

    swapper = Swapper(acct, stash, secrets)
    swapper.start()
    done = failed = 0
    errors: set[str] = set()
    deadline = time.monotonic() + 6
    try:
        while time.monotonic() < deadline:
            try:
                engine.backup("alice", force=True)
                done += 1
            except WadaemonError as exc:
                failed += 1
                errors.add(str(exc).split(":")[0])
    finally:
        swapper.stop.set()
        swapper.join()
    assert swapper.swaps > 100, swapper.swaps
    assert done >= 5, (done, failed, errors)

    head = replica.store.read_head("alice")
    assert head is not None
    restorer = Restorer(layout, replica)
    out = env.root / "restored"
    for g in head.history:
        dest = out / str(g)
        restorer.restore_to("alice", dest, g)
        for path in dest.rglob("*"):
            if path.is_file():
                assert SECRET not in path.read_bytes(), f"generation {g}: {path}"
    assert (secrets / "secret.db").exists()  # nothing was done to the secrets either
    shutil.rmtree(out)


def test_an_account_directory_that_is_a_symlink_is_not_backed_up(env: Env) -> None:
    secrets = env.root / "secrets"
    secrets.mkdir()
    (secrets / "creds.json").write_text(json.dumps({"secret": SECRET.decode()}))
    env.sessions.mkdir()
    (env.sessions / "mallory").symlink_to(secrets, target_is_directory=True)
    proc = env.cli("backup", "mallory")
    assert proc.returncode == 1
    assert "is a symbolic link, not a directory; never backed up" in proc.stdout
    assert env.head_generation("mallory") is None
