"""A lost key is never hidden: check-config and the daemon's `keys` check name the backups the
loaded keys cannot read, and a key file deleted or replaced under a running daemon."""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import DaemonProcess, Env, wait_until
from firestore_emulator import Emulator
from test_firestore_daemon import firestore_config

from wadaemon.config import load_config
from wadaemon.key_watch import key_file_problems, watched_key_files
from wadaemon.keyring import Key, Keyring, load_keyring, write_new_key
from wadaemon.lost_keys import sealed_heads, with_unknown_keys
from wadaemon.store import DirectoryStore

KEY_CHECK_WAIT_S = 25.0  # the key files are checked every 10 s


def sessions(env: Env, *accounts: str) -> None:
    for account in accounts:
        state = env.sessions / account / "creds.json"
        state.parent.mkdir(parents=True)
        state.write_text(json.dumps({"me": account}))


def replace_key(env: Env) -> tuple[Key, Path]:
    """The key file now holds a new key; the old one is kept aside but not configured (what
    happens when a key file is lost and `wadaemon keygen` or a reinstall makes a new one)."""
    old = load_keyring(env.key, [], environ={}).current
    aside = env.root / "old.key"
    env.key.rename(aside)
    write_new_key(env.key)
    return old, aside


def list_old_key(env: Env, old: Path) -> None:
    text = env.config.read_text().replace(
        f"  key_file: {env.key}\n", f"  key_file: {env.key}\n  old_key_files: [{old}]\n"
    )
    env.config.write_text(text)


def health(env: Env) -> tuple[int, dict[str, Any]]:
    proc = env.cli("status", "--json")
    return proc.returncode, json.loads(proc.stdout)


def keys_check(env: Env) -> dict[str, str]:
    check: dict[str, str] = health(env)[1]["checks"]["keys"]
    return check


# --- the shared question ------------------------------------------------------------------------


def test_heads_sealed_with_unknown_keys_count_logged_out_but_not_removed(
    env: Env, keyring: Keyring
) -> None:
    sessions(env, "alice", "bob", "carol")
    env.cli("backup", check=True)
    replica = env.replica()
    old = replica.keyring
    replica.set_head_state("bob", "logged_out")
    replica.set_head_state("carol", "removed")
    store = DirectoryStore(env.backups)
    heads = sealed_heads(store)
    assert [(h.account, h.state) for h in heads] == [("alice", "active"), ("bob", "logged_out")]
    assert with_unknown_keys(heads, old) == []
    lost = with_unknown_keys(heads, keyring)
    assert [(h.account, h.key_id) for h in lost] == [
        ("alice", old.current.key_id),
        ("bob", old.current.key_id),
    ]
    assert lost[1].describe() == "bob (generation 1, marked logged_out)"


# --- key files under a running daemon (what the `keys` check reads) ---------------------------


def test_key_file_problems_say_what_happened_and_the_fix(env: Env) -> None:
    env.rotate_key()
    old = env.root / "old.key"
    config = load_config(env.config, environ={})
    ring = load_keyring(env.key, [old], environ={})
    files = watched_key_files(config, ring)
    assert [(f.path, f.key_id) for f in files] == [
        (env.key, ring.current.key_id),
        (old, ring.old[0].key_id),
    ]
    assert key_file_problems(files) == {}

    old.chmod(0o644)
    problem = key_file_problems(files)[f"key file {old}"]
    assert problem.startswith(f"{env.config}:6: encryption.old_key_files: the key file {old} ")
    assert f"run `chmod 600 {old}`" in problem
    assert f"the daemon keeps using key {ring.old[0].key_id} from memory" in problem
    old.chmod(0o600)

    env.key.write_text("not a key\n")
    problem = key_file_problems(files)[f"key file {env.key}"]
    assert f"the key file {env.key} no longer holds a key" in problem
    assert "put the file back from your copy before the next restart" in problem
    assert list(key_file_problems(files)) == [f"key file {env.key}"]


def test_with_a_systemd_credential_the_key_file_is_watched_for_deletion(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = env.root / "credentials"
    creds.mkdir()
    shutil.copy(env.key, creds / "session-key")
    (creds / "session-key").chmod(0o400)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    config = load_config(env.config, environ={})
    ring = load_keyring(env.key, [])
    assert ring.current.source == str(creds / "session-key")
    files = watched_key_files(config, ring)
    assert [(f.path, f.setting, f.key_id) for f in files] == [
        (creds / "session-key", "systemd credential session-key", ring.current.key_id),
        (env.key, f"{env.config}:5: encryption.key_file", None),
    ]
    env.key.unlink()
    problem = key_file_problems(files)[f"key file {env.key}"]
    assert f"the key file {env.key} was deleted" in problem
    assert "LoadCredential=" in problem
    # a reload while it is gone keeps watching it; a key file that never existed is not watched
    assert watched_key_files(config, ring, [env.key])[1].path == env.key
    assert len(watched_key_files(config, ring)) == 1


# --- check-config -------------------------------------------------------------------------------


def test_check_config_names_every_backup_a_replaced_key_cannot_read(env: Env) -> None:
    sessions(env, "alice", "bob")
    env.cli("backup", check=True)
    ok = env.cli("check-config")
    assert ok.returncode == 0, ok.stderr
    assert "backups         2 accounts, every head readable with the loaded keys" in ok.stdout

    old, aside = replace_key(env)
    proc = env.cli("check-config")
    assert proc.returncode == 78, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2, proc.stderr
    for account, line in zip(("alice", "bob"), lines, strict=True):
        assert line.startswith(f"wadaemon check-config: {env.config}: encryption.old_key_files: ")
        assert f"the backup of {account} (generation 1) is sealed with key {old.key_id}" in line
        assert "which is not loaded" in line
        assert "add the key file that sealed it to encryption.old_key_files" in line
        assert "or put back the key file from your copy" in line
    assert proc.stdout == ""

    list_old_key(env, aside)
    fixed = env.cli("check-config")
    assert fixed.returncode == 0, fixed.stderr
    assert fixed.stderr == ""
    assert "2 accounts, every head readable with the loaded keys" in fixed.stdout


def test_check_config_warns_when_the_backups_cannot_be_reached(env: Env) -> None:
    env.backups.rmdir()
    env.backups.write_text("the backup volume is not mounted")
    proc = env.cli("check-config")
    assert proc.returncode == 0, proc.stderr
    warning = proc.stderr.strip()
    assert warning.startswith("wadaemon check-config: warning: the keys could not be checked")
    assert f"cannot list {env.backups}: Not a directory" in warning
    assert "backups         not checked: the store cannot be reached" in proc.stdout


@pytest.mark.slow
def test_check_config_finds_a_lost_key_in_firestore(env: Env, firestore_emulator: Emulator) -> None:
    firestore_config(env, firestore_emulator)
    sessions(env, "alice")
    env.cli("backup", check=True)
    assert "1 account, every head readable" in env.cli("check-config", check=True).stdout
    old, _ = replace_key(env)
    proc = env.cli("check-config")
    assert proc.returncode == 78, proc.stderr
    assert f"the backup of alice (generation 1) is sealed with key {old.key_id}" in proc.stderr


# --- the daemon's `keys` check --------------------------------------------------------------------


@pytest.mark.slow
def test_daemon_booted_with_a_key_that_cannot_read_the_backups_fails_keys(
    env: Env, daemon_factory: type[DaemonProcess]
) -> None:
    sessions(env, "alice", "bob")
    env.cli("backup", check=True)
    shutil.rmtree(env.sessions / "alice")  # alice needs a restore, bob is healthy
    old, aside = replace_key(env)

    daemon = daemon_factory()
    daemon.wait_for("ready")
    code, body = health(env)
    assert code == 1 and body["status"] == "failing"  # 503
    keys = body["checks"]["keys"]
    assert keys["status"] == "failing"
    assert f"alice (generation 1) with key {old.key_id}" in keys["detail"]
    assert f"bob (generation 1) with key {old.key_id}" in keys["detail"]
    assert "encryption.old_key_files" in keys["detail"]
    assert "put back the key file from your copy" in keys["detail"]
    assert body["accounts"]["alice"]["state"] == "restore_failed"
    log = daemon.log()
    assert log.count("ERROR   keys: ") == 1
    assert log.index("ERROR   keys: ") < log.index("ready")

    list_old_key(env, aside)  # the fix, then a reload
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: keys_check(env)["status"] == "ok")
    assert "all readable with the loaded keys" in keys_check(env)["detail"]
    assert "keys: backups found at boot: ok again" in daemon.log()
    assert daemon.stop() == 0


@pytest.mark.slow
def test_a_key_file_replaced_under_the_daemon_fails_keys_until_reloaded(
    env: Env, daemon_factory: type[DaemonProcess]
) -> None:
    sessions(env, "alice")
    daemon = daemon_factory()
    daemon.wait_for("ready")
    wait_until(lambda: env.head_generation("alice") == 1)
    loaded = load_keyring(env.key, [], environ={}).current
    assert keys_check(env)["status"] == "ok"

    env.rotate_key()  # a new key in the file, the old one listed: but no reload yet
    new = load_keyring(env.key, [], environ={}).current
    wait_until(lambda: keys_check(env)["status"] == "failing", timeout=KEY_CHECK_WAIT_S)
    detail = keys_check(env)["detail"]
    assert f"{env.key} now holds key {new.key_id}, not key {loaded.key_id}" in detail
    assert "put the file back from your copy before the next restart" in detail

    daemon.proc.send_signal(signal.SIGHUP)  # the reload makes the new key the expected one
    wait_until(lambda: keys_check(env)["status"] == "ok", timeout=5)
    assert "2 key files unchanged" in keys_check(env)["detail"]
    assert daemon.log().count("ERROR   keys: ") == 1
    assert f"keys: key file {env.key}: ok again" in daemon.log()
    assert daemon.stop() == 0


@pytest.mark.slow
def test_a_deleted_old_key_file_fails_keys(env: Env, daemon_factory: type[DaemonProcess]) -> None:
    sessions(env, "alice")
    env.cli("backup", check=True)
    env.rotate_key()
    old = env.root / "old.key"
    daemon = daemon_factory()
    daemon.wait_for("ready")
    assert keys_check(env)["status"] == "ok"
    old.unlink()
    started = time.monotonic()
    wait_until(lambda: keys_check(env)["status"] == "failing", timeout=KEY_CHECK_WAIT_S)
    assert time.monotonic() - started < 12
    detail = keys_check(env)["detail"]
    assert f"encryption.old_key_files: key file {old} not found" in detail
    assert "the daemon keeps using key" in detail
    assert daemon.stop() == 0
