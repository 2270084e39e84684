"""Restore: fallback to older generations, refusal of bad data, and never losing a local session."""

from __future__ import annotations

import argparse
import hashlib
import shutil
import tempfile
from pathlib import Path

import pytest
from conftest import Env, make_db, read_ids, run_sql

from wadaemon.errors import DecryptError
from wadaemon.keyring import write_new_key
from wadaemon.layout import SessionsLayout
from wadaemon.lineage import ADOPTED
from wadaemon.restore import Restorer

GEN_DIR = "generations"


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def two_generations(env: Env, account: str = "alice") -> Path:
    """Generation 1 with rows 1..20, generation 2 with rows 1..21."""
    db = env.sessions / account / "session.db"
    make_db(db, rows=20)
    env.cli("backup", account, check=True)
    run_sql(db, "INSERT INTO t (v) VALUES (x'01')")
    env.cli("backup", account, check=True)
    assert env.head_generation(account) == 2
    return db


def manifest_path(env: Env, account: str, generation: int) -> Path:
    return env.backups / account / GEN_DIR / f"{generation:012d}.bin"


def newest_only_pieces(env: Env, account: str) -> set[Path]:
    """Piece files that generation 2 references and generation 1 does not."""
    replica = env.replica()
    old = {p for f in replica.load_manifest(account, 1).files for p in f.pieces}
    new = {p for f in replica.load_manifest(account, 2).files for p in f.pieces}
    return {env.backups / account / "pieces" / p[:2] / p for p in new - old}


def test_missing_session_is_restored_from_newest(env: Env) -> None:
    db = two_generations(env)
    shutil.rmtree(db.parent)
    proc = env.cli("restore", "alice")
    assert proc.returncode == 0, proc.stderr
    assert "restored (generation 2)" in proc.stdout
    assert read_ids(db) == list(range(1, 22))


def test_truncated_newest_manifest_falls_back_and_says_so(env: Env) -> None:
    db = two_generations(env)
    m = manifest_path(env, "alice", 2)
    m.write_bytes(m.read_bytes()[:40])
    shutil.rmtree(db.parent)
    proc = env.cli("restore", "alice")
    assert proc.returncode == 0, proc.stderr
    assert "restored (generation 1)" in proc.stdout
    assert "generation 2" in proc.stderr and "fell back" in proc.stderr
    assert read_ids(db) == list(range(1, 21))


def test_corrupt_piece_of_newest_falls_back(env: Env) -> None:
    db = two_generations(env)
    pieces = newest_only_pieces(env, "alice")
    assert pieces
    for piece in pieces:
        data = bytearray(piece.read_bytes())
        data[len(data) // 2] ^= 0xFF
        piece.write_bytes(bytes(data))
    shutil.rmtree(db.parent)
    proc = env.cli("restore", "alice")
    assert proc.returncode == 0, proc.stderr
    assert "restored (generation 1)" in proc.stdout
    assert "authentication failed" in proc.stderr
    assert read_ids(db) == list(range(1, 21))
    # the drill reports the broken head generation and fails
    verify = env.cli("verify", "alice")
    assert verify.returncode == 1
    assert "generation 2: FAILED" in verify.stderr


def test_verify_passes_on_good_backups_and_touches_nothing(env: Env) -> None:
    db = two_generations(env)
    before = tree_digest(env.sessions)
    proc = env.cli("verify", "--all-generations")
    assert proc.returncode == 0, proc.stderr
    assert "alice: generation 2 (head): ok" in proc.stdout
    assert "alice: generation 1: ok" in proc.stdout
    assert tree_digest(env.sessions) == before
    assert db.exists()


def test_wrong_key_is_a_clear_error_and_local_is_untouched(env: Env) -> None:
    db = two_generations(env)
    env.key.rename(env.root / "original.key")
    write_new_key(env.key)
    before = tree_digest(db.parent)
    proc = env.cli("restore", "alice", "--force")
    assert proc.returncode == 1
    assert "not in the keyring" in proc.stderr
    assert "old_key_files" in proc.stderr
    assert tree_digest(db.parent) == before
    quarantine = env.sessions / ".quarantine"
    assert not quarantine.exists() or not any(quarantine.iterdir())
    verify = env.cli("verify")
    assert verify.returncode == 1 and "not in the keyring" in verify.stderr


def test_old_key_in_keyring_restores_after_rotation(env: Env) -> None:
    db = two_generations(env)
    env.rotate_key()
    shutil.rmtree(db.parent)
    proc = env.cli("restore", "alice")
    assert proc.returncode == 0, proc.stderr
    assert read_ids(db) == list(range(1, 22))
    # the next backup is sealed with the new key: a new generation, then nothing more
    backup = env.cli("backup", "alice", check=True)
    assert "generation 3" in backup.stdout
    new_key_id = env.replica().keyring.current.key_id
    assert env.replica().generations("alice")[0].key_id == new_key_id


def test_tampered_ciphertext_in_every_generation_fails_cleanly(env: Env) -> None:
    db = two_generations(env)
    for g in (1, 2):
        m = manifest_path(env, "alice", g)
        data = bytearray(m.read_bytes())
        data[-5] ^= 0x01
        m.write_bytes(bytes(data))
    shutil.rmtree(db.parent)
    proc = env.cli("restore", "alice")
    assert proc.returncode == 1
    assert "no generation could be restored" in proc.stderr
    assert "authentication failed" in proc.stderr
    assert not db.parent.exists()  # nothing half-restored was put in place
    assert not list((env.sessions / ".tmp").iterdir())


def test_blob_moved_to_another_account_is_refused(env: Env) -> None:
    two_generations(env, "alice")
    make_db(env.sessions / "bob" / "session.db", rows=5)
    env.cli("backup", "bob", check=True)
    bob_db = env.sessions / "bob" / "session.db"
    before = tree_digest(bob_db.parent)
    # an attacker with access to the store swaps bob's manifest for alice's
    shutil.copy(manifest_path(env, "alice", 1), manifest_path(env, "bob", 1))
    proc = env.cli("restore", "bob", "--force")
    assert proc.returncode == 1
    assert "belongs to another account" in proc.stderr
    assert tree_digest(bob_db.parent) == before
    # and alice's pieces copied into bob's store do not decrypt as bob's
    alice = env.replica().load_manifest("alice", 1)
    bob_pieces = env.backups / "bob" / "pieces"
    piece = alice.files[0].pieces[0]
    (bob_pieces / piece[:2]).mkdir(exist_ok=True)
    shutil.copy(
        env.backups / "alice" / "pieces" / piece[:2] / piece, bob_pieces / piece[:2] / piece
    )

    with pytest.raises(DecryptError):
        env.replica().read_piece("bob", piece)


def test_healthy_local_session_is_never_overwritten(env: Env) -> None:
    db = two_generations(env)
    run_sql(db, "INSERT INTO t (v) VALUES (x'02')")  # local is newer than any backup
    before = tree_digest(db.parent)
    proc = env.cli("restore", "alice")
    assert proc.returncode == 1
    assert "healthy" in proc.stderr and "--force" in proc.stderr
    assert tree_digest(db.parent) == before


def test_forced_restore_moves_the_current_session_to_quarantine(env: Env) -> None:
    db = two_generations(env)
    run_sql(db, "INSERT INTO t (v) VALUES (x'02')")
    proc = env.cli("restore", "alice", "--force", "--generation", "1")
    assert proc.returncode == 0, proc.stderr
    assert read_ids(db) == list(range(1, 21))
    (kept,) = (env.sessions / ".quarantine").iterdir()
    assert read_ids(kept / "session.db") == list(range(1, 23))


def test_corrupt_local_session_is_quarantined_then_restored(env: Env) -> None:
    db = two_generations(env)
    for suffix in ("-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    data = bytearray(db.read_bytes())
    data[4096 : 4096 + 2000] = b"\xab" * 2000  # smash a b-tree page
    db.write_bytes(bytes(data))
    proc = env.cli("restore", "alice")
    assert proc.returncode == 0, proc.stderr
    assert "local was corrupt" in proc.stdout
    assert read_ids(db) == list(range(1, 22))
    (kept,) = (env.sessions / ".quarantine").iterdir()
    assert ".corrupt" in kept.name
    assert (kept / "session.db").read_bytes() == bytes(data)


def test_restore_to_another_directory(env: Env) -> None:
    db = two_generations(env)
    dest = env.root / "drill" / "alice"
    proc = env.cli("restore", "alice", "--to", str(dest), "--generation", "1")
    assert proc.returncode == 0, proc.stderr
    assert read_ids(dest / "session.db") == list(range(1, 21))
    assert read_ids(db) == list(range(1, 22))
    again = env.cli("restore", "alice", "--to", str(dest))
    assert again.returncode == 1 and "not an empty directory" in again.stderr


def test_generations_lists_head_first(env: Env) -> None:
    two_generations(env)
    proc = env.cli("generations", "alice", check=True)
    lines = proc.stdout.splitlines()
    assert "head generation 2" in lines[0]
    assert lines[2].split()[0] == "2*"
    assert lines[3].split()[0] == "1"
    unknown = env.cli("generations", "nobody")
    assert unknown.returncode == 1 and "no backups" in unknown.stderr
    bad = env.cli("generations", "../etc")
    assert bad.returncode == 1 and "not a valid account id" in bad.stderr


def test_root_running_the_cli_becomes_the_owner_of_the_data(env: Env) -> None:
    """An admin runs `wadaemon backup` as root while the daemon runs as an unprivileged user:
    what root's command creates must stay usable by the daemon. (The package's container test
    runs the real commands; here a forked child checks the switch itself.)"""
    import os

    from wadaemon.cli.common import become_data_owner, load
    from wadaemon.fsutil import atomic_write

    if os.geteuid() != 0:
        pytest.fail("this test needs root: it checks what commands run by root leave behind")
    owner = 65534
    public = Path(tempfile.mkdtemp(prefix="wadaemon-test-", dir="/tmp"))  # nobody can enter it
    public.chmod(0o755)
    env.sessions = public / "sessions"
    env.write_config()
    env.sessions.mkdir()
    os.chown(env.sessions, owner, owner)
    config = load(argparse.Namespace(config=str(env.config)))
    pid = os.fork()
    if pid == 0:  # the child: switch, then create a file as a command would
        code = 1
        try:
            become_data_owner(config)
            atomic_write(env.sessions / "made-by-cli", b"x")
            code = 0 if (os.geteuid(), os.getegid(), os.getgroups()) == (owner, owner, []) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert (env.sessions / "made-by-cli").stat().st_uid == owner
    shutil.rmtree(public)


def takeover_setup(env: Env, tmp: Path) -> tuple[Path, Path]:
    """Host A backed up generations 1 and 2 of alice; host B has its own copy of generation 1.
    Returns (A's database, B's sessions directory)."""
    db = env.sessions / "alice" / "session.db"
    make_db(db, rows=20)
    env.cli("backup", "alice", check=True)
    other = tmp / "b-sessions"
    shutil.copytree(env.sessions, other, ignore=shutil.ignore_patterns(".lock", ".tmp"))
    run_sql(db, "INSERT INTO t (v) VALUES (x'01')")
    env.cli("backup", "alice", check=True)
    assert env.head_generation("alice") == 2
    return db, other


def b_restorer(env: Env, other: Path) -> tuple[Restorer, SessionsLayout]:
    layout = SessionsLayout(other)
    layout.prepare()
    return Restorer(layout, env.replica()), layout


def test_a_takeover_restores_the_head_over_a_copy_that_changed_after_an_older_generation(
    env: Env, tmp_path: Path
) -> None:
    # B drove alice once, from generation 1, and changed it without backing that up; A has
    # driven it since: B takes it over again
    _, other = takeover_setup(env, tmp_path)
    restorer, layout = b_restorer(env, other)
    layout.lineage.record("alice", 1, (other / "alice").stat().st_ino)
    run_sql(other / "alice" / "session.db", "INSERT INTO t (v) VALUES (x'0b')")
    # a single host calls it a conflict and touches nothing...
    assert restorer.restore_account("alice").status == "conflict"
    # ...taking the lease over, the head is the truth: the stale copy goes to quarantine
    outcome = restorer.restore_account("alice", takeover=True)
    assert outcome.status == "restored" and outcome.generation == 2
    assert read_ids(other / "alice" / "session.db") == list(range(1, 22))
    (kept,) = (other / ".quarantine").iterdir()
    assert "stale" in kept.name and read_ids(kept / "session.db") == list(range(1, 22))


def test_a_takeover_trusts_no_adopted_copy_but_keeps_one_that_descends_from_the_head(
    env: Env, tmp_path: Path
) -> None:
    _, other = takeover_setup(env, tmp_path)
    restorer, layout = b_restorer(env, other)
    layout.lineage.record("alice", ADOPTED, (other / "alice").stat().st_ino)
    outcome = restorer.restore_account("alice", takeover=True)
    assert outcome.status == "restored" and outcome.generation == 2  # adopted proves nothing
    # now B's copy descends from generation 2 and changes on top of it: kept as it is
    run_sql(other / "alice" / "session.db", "INSERT INTO t (v) VALUES (x'0c')")
    outcome = restorer.restore_account("alice", takeover=True)
    assert outcome.status == "kept"
    assert read_ids(other / "alice" / "session.db") == list(range(1, 23))
