"""Problems on this machine or an absent store are never mistaken for bad backups: a full disk
never restores an older generation, an unusable sessions directory stops the daemon with exit
status 78, and a backup directory that is not there is an outage, not an empty store.

Real filesystems: a small tmpfs (full disk) and a read-only bind mount; these tests need root."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import DaemonProcess, Env, make_db, read_ids, wait_until
from test_restore import newest_only_pieces, two_generations

from wadaemon.store import DirectoryStore, StoreUnavailable

pytestmark = pytest.mark.slow

ROWS_NEWEST = 20 + 10_000


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("this test needs root: it mounts small and read-only filesystems")


@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted on `path` for the duration."""
    require_root()
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size},mode=0700"
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=False)


def resize(path: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


def small_then_large(env: Env) -> Path:
    """Generation 1: 20 rows (16 KiB); generation 2: 10 000 more rows of random bytes (4.5 MB,
    more than a 2 MiB filesystem holds). Then the sessions directory is lost."""
    db = env.sessions / "alice" / "session.db"
    make_db(db, rows=20)
    env.cli("backup", "alice", check=True)
    make_db(db, rows=10_000, row_bytes=400)
    env.cli("backup", "alice", check=True)
    assert env.head_generation("alice") == 2
    shutil.rmtree(env.sessions)
    return db


def wadaemon(env: Env, *args: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wadaemon", *args, "--config", str(env.config)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **extra_env},
    )


# --- A: a full disk is not a bad generation ------------------------------------------------


def test_daemon_on_a_full_disk_restores_nothing_older_then_the_newest(
    env: Env, daemon_factory: type[DaemonProcess]
) -> None:
    db = small_then_large(env)
    with tmpfs(env.sessions, "2m"):
        daemon = daemon_factory()
        daemon.wait_for("ready")
        daemon.wait_for("alice: retrying the restore")
        log = daemon.log()
        assert f"no space left on device under {env.sessions / '.tmp'}: free space" in log
        assert "restored (generation 1)" not in log
        assert "generation 2 cannot be restored" not in log  # the backup is not blamed
        assert not db.parent.exists()
        assert not list((env.sessions / ".tmp").iterdir())  # the partial copy is gone
        status = json.loads(env.cli("status", "--json").stdout)
        assert status["accounts"]["alice"]["state"] == "restore_failed"
        assert "no space left on device" in status["accounts"]["alice"]["last_restore"]

        resize(env.sessions, "64m")  # space is freed: the retry restores the newest
        daemon.wait_for("restore: alice: restored (generation 2)", timeout=60)
        assert read_ids(db) == list(range(1, ROWS_NEWEST + 1))
        assert daemon.stop() == 0
    assert env.head_generation("alice") == 2  # and no older generation became the head


def test_cli_restore_on_a_full_disk_says_so_and_takes_nothing_older(env: Env) -> None:
    db = small_then_large(env)
    with tmpfs(env.sessions, "2m"):
        proc = env.cli("restore", "alice")
        assert proc.returncode == 1, proc.stdout
        assert f"no space left on device under {env.sessions / '.tmp'}: free space" in proc.stderr
        assert "generation 1" not in proc.stdout + proc.stderr
        assert "fell back" not in proc.stderr
        assert not db.parent.exists()
        assert not list((env.sessions / ".tmp").iterdir())

        dest = env.sessions / ".drill" / "alice"
        to = env.cli("restore", "alice", "--to", str(dest))
        assert to.returncode == 1
        assert f"no space left on device under {dest.parent}" in to.stderr
        assert not dest.exists() and not list(dest.parent.iterdir())

        resize(env.sessions, "64m")
        again = env.cli("restore", "alice")
        assert again.returncode == 0, again.stderr
        assert "alice: restored (generation 2)" in again.stdout
        assert read_ids(db) == list(range(1, ROWS_NEWEST + 1))


def test_verify_on_a_full_disk_blames_the_disk_not_the_backup(env: Env) -> None:
    small_then_large(env)
    scratch = env.root / "scratch"
    with tmpfs(scratch, "2m"):
        proc = wadaemon(env, "verify", "--all-generations", TMPDIR=str(scratch))
    assert proc.returncode == 1
    assert (
        "alice: generation 2: NOT VERIFIED (a problem on this machine, not in the backup): "
        "no space left on device under " in proc.stderr
    )
    assert "FAILED" not in proc.stderr
    assert "alice: generation 1: ok" in proc.stdout


def test_a_store_that_cannot_be_read_never_restores_an_older_generation(env: Env) -> None:
    db = two_generations(env)
    piece = sorted(newest_only_pieces(env, "alice"))[0]
    blob = piece.read_bytes()
    piece.unlink()
    piece.mkdir()  # reading it fails (EISDIR): the store fails, it does not say "missing"
    shutil.rmtree(db.parent)
    proc = env.cli("restore", "alice")
    assert proc.returncode == 1
    assert "alice: failed: the store cannot be read: cannot read" in proc.stderr
    assert "fell back" not in proc.stderr
    assert not db.parent.exists()
    verify = env.cli("verify", "alice")
    assert verify.returncode == 1
    assert "generation 2 (head)" not in verify.stdout
    assert "alice: generation 2: NOT VERIFIED (the store cannot be read)" in verify.stderr

    piece.rmdir()
    piece.write_bytes(blob)
    again = env.cli("restore", "alice")
    assert again.returncode == 0, again.stderr
    assert "restored (generation 2)" in again.stdout


def test_a_missing_piece_is_still_a_bad_generation(env: Env) -> None:
    """The other side of the line: data gone from the store makes the older generation the
    one restored, and says so."""
    db = two_generations(env)
    for piece in newest_only_pieces(env, "alice"):
        piece.unlink()
    shutil.rmtree(db.parent)
    proc = env.cli("restore", "alice")
    assert proc.returncode == 0, proc.stderr
    assert "restored (generation 1)" in proc.stdout
    assert "is missing from" in proc.stderr and "fell back" in proc.stderr


# --- C1: a sessions directory the daemon cannot use -----------------------------------------


def run_daemon_to_exit(env: Env) -> subprocess.CompletedProcess[str]:
    proc = wadaemon(env, "run")
    assert "Traceback" not in proc.stderr + proc.stdout
    return proc


def test_run_on_a_read_only_sessions_directory_exits_78_with_one_message(env: Env) -> None:
    require_root()
    env.sessions.mkdir()
    subprocess.run(["mount", "--bind", str(env.sessions), str(env.sessions)], check=True)
    try:
        subprocess.run(
            ["mount", "-o", "remount,ro,bind", str(env.sessions)], check=True, capture_output=True
        )
        proc = run_daemon_to_exit(env)
    finally:
        subprocess.run(["umount", str(env.sessions)], check=False)
    assert proc.returncode == 78, proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if "CRITICAL" in x]
    assert line.endswith(
        f"cannot continue: cannot use the sessions directory: {env.sessions} is on a read-only "
        "file system; the daemon writes there (its lock, restores, .tmp/): mount it read-write, "
        "or point sessions_path ($SESSIONS_PATH) at a writable directory"
    )


def test_run_with_a_file_in_place_of_the_sessions_directory_exits_78(env: Env) -> None:
    env.sessions.write_text("not a directory")
    proc = run_daemon_to_exit(env)
    assert proc.returncode == 78, proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if "CRITICAL" in x]
    assert line.endswith(
        f"cannot continue: cannot use the sessions directory: {env.sessions} is not a "
        "directory; move what is there away, or point sessions_path ($SESSIONS_PATH) at a "
        "directory"
    )
    assert env.sessions.read_text() == "not a directory"


# --- C2: a backup directory that is not there is an outage ----------------------------------

ABSENT = "the backup directory {} does not exist; is the backup disk mounted?"


def test_an_absent_backup_directory_is_never_an_empty_store(env: Env) -> None:
    store = DirectoryStore(env.root / "not-mounted")
    calls = {
        "list_accounts": store.list_accounts,
        "read_head": lambda: store.read_head("alice"),
        "read_manifest": lambda: store.read_manifest("alice", 1),
        "read_piece": lambda: store.read_piece("alice", "ab" * 32),
        "missing_pieces": lambda: store.missing_pieces("alice", {"ab" * 32}),
        "write_piece": lambda: store.write_piece("alice", "ab" * 32, b"x"),
        "create_manifest": lambda: store.create_manifest("alice", 1, b"x"),
        "list_generations": lambda: store.list_generations("alice"),
        "list_pieces": lambda: store.list_pieces("alice"),
        "read_account": lambda: store.read_account("alice"),
        "record_account": lambda: store.record_account("alice", {"status": "x"}),
    }
    for name, call in calls.items():
        with pytest.raises(StoreUnavailable, match="is the backup disk mounted") as caught:
            call()
        assert ABSENT.format(env.root / "not-mounted") in str(caught.value), name
    assert not (env.root / "not-mounted").exists()

    # a backup from the command line creates nothing either
    creds = env.sessions / "alice" / "creds.json"
    creds.parent.mkdir(parents=True)
    creds.write_text("{}")
    env.backups.rmdir()
    proc = env.cli("backup", "alice")
    assert proc.returncode == 1
    assert ABSENT.format(env.backups) in proc.stderr
    assert not env.backups.exists()


def test_backup_directory_absent_at_boot_then_mounted_restores_without_restart(
    env: Env, daemon_factory: type[DaemonProcess]
) -> None:
    env.write_config(restore_timeout=3)
    creds = env.sessions / "alice" / "creds.json"
    creds.parent.mkdir(parents=True)
    creds.write_text('{"me": "alice"}')
    env.cli("backup", "alice", check=True)
    shutil.rmtree(creds.parent)  # the session is lost...
    unmounted = env.root / "backups.elsewhere"
    env.backups.rename(unmounted)  # ...and the backup disk is not mounted

    daemon = daemon_factory()
    started = time.monotonic()
    daemon.wait_for("ready", timeout=30)
    assert time.monotonic() - started < 15  # restore.timeout_seconds, not forever
    assert ABSENT.format(env.backups) in daemon.log()
    status = json.loads(env.cli("status", "--json").stdout)
    assert status["status"] == "degraded"
    assert status["checks"]["store"]["status"] == "degraded"
    assert ABSENT.format(env.backups) in status["checks"]["store"]["detail"]
    assert not creds.parent.exists()
    assert not env.backups.exists()  # nothing made an empty store in its place

    unmounted.rename(env.backups)  # the disk is mounted
    wait_until(lambda: creds.exists(), timeout=60)
    daemon.wait_for("restore: alice: restored (generation 1)")
    assert json.loads(creds.read_text()) == {"me": "alice"}
    wait_until(lambda: json.loads(env.cli("status", "--json").stdout)["status"] == "ok", 30)
    assert daemon.stop() == 0
    assert env.head_generation("alice") == 1
