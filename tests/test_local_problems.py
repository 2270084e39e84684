"""Problems on this machine or with the store are never mistaken for bad backups: a full disk or
a store that cannot be read never restores an older generation, and an unusable sessions
directory stops the daemon with exit status 78.

Real filesystems: a small tmpfs (full disk) and a read-only bind mount; these tests need root."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import DaemonProcess, Env, make_db, read_ids
from test_restore import newest_only_pieces, two_generations

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
