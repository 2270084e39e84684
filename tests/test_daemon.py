"""The daemon as a process: live writers, kill -9, lost disks, bursts, and shutdown."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import WRITER, DaemonProcess, Env, committed_ids, make_db, read_ids, wait_until

from wadaemon.layout import SessionsLayout
from wadaemon.restore import Restorer

pytestmark = pytest.mark.slow


def start_writer(db: Path, rate: float, journal: str = "wal") -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, str(WRITER), str(db), "--rate", str(rate), "--journal", journal]
    )


def check_every_generation(env: Env, account: str) -> list[int]:
    """Restore every kept generation; each must hold rows 1..n. Returns the n of each."""
    replica = env.replica()
    head = replica.store.read_head(account)
    assert head is not None
    (env.root / "drill").mkdir(exist_ok=True)
    restorer = Restorer(SessionsLayout(env.root / "drill"), replica)
    counts: list[int] = []
    for g in sorted(head.history):
        dest = env.root / "drill" / f"{account}-{g}"
        restorer.build(account, g, dest)
        ids = read_ids(dest / "session.db")
        assert ids == list(range(1, len(ids) + 1)), f"generation {g} is not a prefix"
        counts.append(len(ids))
        shutil.rmtree(dest)
    assert counts == sorted(counts), f"generations went backwards: {counts}"
    return counts


@pytest.mark.parametrize("journal", ["wal", "delete"])
def test_live_writer_every_generation_restores_to_a_prefix(
    env: Env, daemon_factory: type[DaemonProcess], journal: str
) -> None:
    env.write_config(debounce_seconds=0.1, keep_generations=100)
    db = env.sessions / "alice" / "session.db"
    make_db(db, rows=3000, wal=journal == "wal")
    writer = start_writer(db, rate=200, journal=journal)
    daemon = daemon_factory()
    try:
        daemon.wait_for("ready")
        wait_until(lambda: (env.head_generation("alice") or 0) >= 8, timeout=60)
    finally:
        writer.terminate()
        writer.wait()
    assert daemon.stop() == 0
    assert "backup failed" not in daemon.log()
    counts = check_every_generation(env, "alice")
    assert len(counts) >= 8
    assert counts[0] >= 3000
    # the final backup at shutdown holds everything the writer committed
    assert counts[-1] == len(committed_ids(db))


def test_kill_9_at_random_moments_leaves_a_restorable_head(
    env: Env, daemon_factory: type[DaemonProcess]
) -> None:
    env.write_config(debounce_seconds=0.05, keep_generations=50)
    db = env.sessions / "alice" / "session.db"
    make_db(db, rows=15_000, row_bytes=400)  # ~6 MB: each backup takes a while
    writer = start_writer(db, rate=300)
    rng = random.Random(20261121)
    heads: list[int] = []
    try:
        for _ in range(8):
            daemon = daemon_factory()
            daemon.wait_for("ready")
            time.sleep(rng.uniform(0.2, 2.0))
            daemon.kill()
            heads.append(env.head_generation("alice") or 0)
    finally:
        writer.terminate()
        writer.wait()
    assert heads == sorted(heads) and heads[-1] >= 4, heads
    check_every_generation(env, "alice")
    verify = env.cli("verify", "--all-generations")
    assert verify.returncode == 0, verify.stderr
    # a normal start afterwards cleans up and carries on
    daemon = daemon_factory()
    daemon.wait_for("ready")
    assert daemon.stop() == 0
    assert not list((env.sessions / ".tmp").iterdir())


def manifest_files(env: Env, account: str) -> dict[str, str]:
    out = env.cli("generations", account, "--json", check=True).stdout
    gens = json.loads(out)["generations"]
    return {f["path"]: f["sha256"] for f in gens[0]["files"]}


def tree(root: Path) -> dict[str, str]:
    """Every file's SHA-256; a database's rows instead (its header may differ in copies)."""
    out = {}
    for p in root.rglob("*"):
        if p.is_file() and p.name.endswith(".db"):
            with sqlite3.connect(f"file:{p}?mode=ro", uri=True) as conn:
                dump = "\n".join(conn.iterdump())
            out[str(p.relative_to(root))] = hashlib.sha256(dump.encode()).hexdigest()
        elif p.is_file() and not p.name.endswith(("-wal", "-shm")):
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def test_lost_sessions_directory_comes_back_before_ready(
    env: Env, daemon_factory: type[DaemonProcess]
) -> None:
    make_db(env.sessions / "alice" / "session.db", rows=500, wal=False)
    make_db(env.sessions / "bob" / "session.db", rows=50, wal=False)
    baileys = env.sessions / "carol"
    (baileys / "keys").mkdir(parents=True)
    (baileys / "creds.json").write_text(json.dumps({"me": {"id": "15551234567:1@s.whatsapp.net"}}))
    for i in range(40):
        (baileys / "keys" / f"pre-key-{i}.json").write_text(json.dumps({"i": i}))
    daemon = daemon_factory()
    daemon.wait_for("ready")
    wait_until(lambda: all(env.head_generation(a) for a in ("alice", "bob", "carol")))
    assert daemon.stop() == 0
    expected = {a: tree(env.sessions / a) for a in ("alice", "bob", "carol")}
    for account in ("alice", "bob", "carol"):  # and what the generation says it holds
        assert set(manifest_files(env, account)) == set(expected[account])

    shutil.rmtree(env.sessions)
    daemon = daemon_factory()
    daemon.wait_for("ready")
    log = daemon.log()
    for account in ("alice", "bob", "carol"):
        line = f"restore: {account}: restored (generation 1)"
        assert line in log
        assert log.index(line) < log.index("ready")
        assert tree(env.sessions / account) == expected[account]
    assert daemon.stop() == 0
    # restoring is not a change: no new generation was made
    assert all(env.head_generation(a) == 1 for a in ("alice", "bob", "carol"))


def test_burst_of_changes_becomes_a_handful_of_generations(
    env: Env, daemon_factory: type[DaemonProcess]
) -> None:
    env.write_config(debounce_seconds=0.5, keep_generations=100)
    state = env.sessions / "dave" / "creds.json"
    state.parent.mkdir(parents=True)
    state.write_text("{}")
    daemon = daemon_factory()
    daemon.wait_for("ready")
    wait_until(lambda: env.head_generation("dave") == 1)
    for i in range(1000):
        state.write_text(json.dumps({"n": i}))
    wait_until(lambda: (env.head_generation("dave") or 0) >= 2)
    time.sleep(2.0)
    assert daemon.stop() == 0
    generation = env.head_generation("dave") or 0
    assert 2 <= generation <= 5, generation
    dest = env.root / "out"
    env.cli("restore", "dave", "--to", str(dest), check=True)
    assert json.loads((dest / "creds.json").read_text()) == {"n": 999}


def test_sigterm_backs_up_pending_changes_before_exit(
    env: Env, daemon_factory: type[DaemonProcess]
) -> None:
    env.write_config(debounce_seconds=60)
    state = env.sessions / "erin" / "creds.json"
    state.parent.mkdir(parents=True)
    state.write_text('{"v": 1}')
    daemon = daemon_factory()
    daemon.wait_for("ready")
    time.sleep(0.5)
    state.write_text('{"v": 3}')
    time.sleep(0.5)  # seen by the watcher, far inside the 60 s debounce
    assert env.head_generation("erin") is None
    state.write_text('{"v": 2}')  # and a change the very moment before the signal
    assert daemon.stop() == 0
    assert env.head_generation("erin") == 1
    dest = env.root / "out"
    env.cli("restore", "erin", "--to", str(dest), check=True)
    assert json.loads((dest / "creds.json").read_text()) == {"v": 2}
    assert "stopped" in daemon.log()


def test_new_account_is_backed_up_within_seconds(
    env: Env, daemon_factory: type[DaemonProcess]
) -> None:
    env.write_config(debounce_seconds=0.2)
    daemon = daemon_factory()
    daemon.wait_for("ready")
    make_db(env.sessions / "frank" / "session.db", rows=10)
    started = time.monotonic()
    wait_until(lambda: env.head_generation("frank") == 1, timeout=10)
    assert time.monotonic() - started < 10
    (env.sessions / "not an account").mkdir()
    (env.sessions / "not an account" / "x").write_text("ignored")
    time.sleep(1)
    assert daemon.stop() == 0
    assert not (env.backups / "not an account").exists()


def test_second_daemon_on_the_same_sessions_is_refused(
    env: Env, daemon_factory: type[DaemonProcess]
) -> None:
    first = daemon_factory()
    first.wait_for("ready")
    second = daemon_factory()
    assert second.proc.wait(30) == 1
    assert "in use by another wadaemon" in second.log()
    assert f"pid {first.proc.pid}" in second.log()
    assert first.proc.poll() is None
    assert first.stop() == 0


def test_an_idle_session_is_not_backed_up_over_and_over(
    env: Env, daemon_factory: type[DaemonProcess]
) -> None:
    """The snapshot's own open of a database touches its -wal/-shm files; that must not look
    like a change that starts the next backup, forever."""
    env.write_config(log_level="debug", debounce_seconds=0.2)
    make_db(env.sessions / "alice" / "session.db", rows=2000, wal=True)
    daemon = daemon_factory()
    daemon.wait_for("ready")
    wait_until(lambda: env.head_generation("alice") == 1)
    time.sleep(4)  # past the window in which a fresh fingerprint is not trusted
    before = daemon.log().count("backup: alice")
    time.sleep(3)
    assert daemon.log().count("backup: alice") == before
    assert daemon.stop() == 0


def test_store_outage_at_boot_and_recovery(env: Env, daemon_factory: type[DaemonProcess]) -> None:
    """The store is down at start: local sessions go ahead, READY does not wait past the restore
    timeout, the outage is visible; when the store is back, everything catches up."""
    env.write_config(restore_timeout=3)
    make_db(env.sessions / "alice" / "session.db", rows=50)
    env.cli("backup", "alice", check=True)
    shutil.rmtree(env.sessions / "alice")  # alice needs a restore
    bob = env.sessions / "bob" / "creds.json"  # bob is healthy and never backed up
    bob.parent.mkdir(parents=True)
    bob.write_text('{"bob": 1}')
    real = env.root / "backups.real"
    env.backups.rename(real)
    env.backups.write_text("the backup volume is not mounted")  # every store call fails

    daemon = daemon_factory()
    started = time.monotonic()
    daemon.wait_for("ready", timeout=30)
    assert time.monotonic() - started < 15
    assert "cannot list the backed-up accounts" in daemon.log()
    status = json.loads(env.cli("status", "--json").stdout)
    assert status["status"] == "degraded"
    assert status["checks"]["store"]["status"] == "degraded"
    wait_until(lambda: "bob: backup failed" in daemon.log(), timeout=20)
    assert bob.read_text() == '{"bob": 1}'  # the local session is untouched and keeps working
    assert not (env.sessions / "alice").exists()

    env.backups.unlink()
    real.rename(env.backups)
    wait_until(lambda: (env.sessions / "alice" / "session.db").exists(), timeout=60)
    wait_until(lambda: env.head_generation("bob") == 1, timeout=60)
    wait_until(lambda: json.loads(env.cli("status", "--json").stdout)["status"] == "ok", 30)
    assert "reachable again" in daemon.log()
    assert read_ids(env.sessions / "alice" / "session.db") == list(range(1, 51))
    assert daemon.stop() == 0


def test_sigterm_during_a_long_restore_phase_stops_promptly(
    env: Env, daemon_factory: type[DaemonProcess]
) -> None:
    env.write_config(restore_timeout=300)
    env.backups.rmdir()
    env.backups.write_text("not mounted")
    daemon = daemon_factory()
    daemon.wait_for("cannot list the backed-up accounts")
    started = time.monotonic()
    assert daemon.stop(timeout=30) == 0
    assert time.monotonic() - started < 10
    assert "ready:" not in daemon.log()


def test_account_record_follows_backups_and_restores(
    env: Env, daemon_factory: type[DaemonProcess]
) -> None:
    from wadaemon.store import DirectoryStore

    state = env.sessions / "gina" / "creds.json"
    state.parent.mkdir(parents=True)
    state.write_text("{}")
    daemon = daemon_factory()
    daemon.wait_for("ready")
    wait_until(lambda: env.head_generation("gina") == 1)
    wait_until(lambda: DirectoryStore(env.backups).read_account("gina") is not None)
    record = DirectoryStore(env.backups).read_account("gina")
    assert record is not None
    assert record["accountId"] == "gina" and record["generation"] == 1
    assert record["status"] == "protected" and record["lastBackupAt"]
    assert daemon.stop() == 0

    shutil.rmtree(state.parent)
    daemon = daemon_factory()
    daemon.wait_for("ready")
    store = DirectoryStore(env.backups)
    wait_until(lambda: bool((store.read_account("gina") or {}).get("lastRestoreAt")))
    assert (store.read_account("gina") or {})["generation"] == 1
    assert daemon.stop() == 0


def test_final_backup_covers_changes_the_watcher_missed(
    env: Env, daemon_factory: type[DaemonProcess]
) -> None:
    state = env.sessions / "ivan" / "creds.json"
    state.parent.mkdir(parents=True)
    state.write_text('{"v": 1}')
    daemon = daemon_factory(env, {"WADAEMON_FAULTS": "1"})
    daemon.wait_for("ready")
    wait_until(lambda: env.head_generation("ivan") == 1)
    time.sleep(2.5)  # the fingerprint of generation 1 is trusted from now on
    subprocess.run(
        [
            "curl",
            "-sf",
            "-X",
            "POST",
            "--unix-socket",
            str(env.socket),
            "http://localhost/debug/hang/watcher?seconds=600",
        ],
        check=True,
        capture_output=True,
    )
    time.sleep(0.5)
    state.write_text('{"v": 22}')  # the watcher is not watching: nobody reports this change
    time.sleep(0.5)
    assert daemon.stop() == 0
    assert env.head_generation("ivan") == 2
    dest = env.root / "out"
    env.cli("restore", "ivan", "--to", str(dest), check=True)
    assert json.loads((dest / "creds.json").read_text()) == {"v": 22}
