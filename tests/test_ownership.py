"""A restored session belongs to its writer as it did before; an account the daemon cannot read,
or one never backed up, is never shown as protected.

The daemon and the gateway run as different users here (setpriv), as they do in production: the
daemon as `wadaemon`, the gateway as its own user with a shared group.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import DaemonProcess, Env, wait_until

from wadaemon.keyring import write_new_key

DAEMON_UID = 4321  # the daemon's user
GATEWAY_UID = 4322  # the program that writes the sessions
SHARED_GID = 5000  # the group they share


def require_root() -> None:
    assert os.geteuid() == 0, "these tests run the daemon and a gateway as other users: run as root"


def _hidden_ancestor() -> tuple[Path, str] | None:
    """The first directory on the way to the interpreter that other users may not traverse
    (pyenv under /root, say), and the child of it that leads there."""
    target = Path(os.path.realpath(sys.executable))
    for parent in reversed(target.parents):
        if parent != Path("/") and not parent.stat().st_mode & stat.S_IXOTH:
            return parent, target.relative_to(parent).parts[0]
    return None


# In a private mount namespace, lay an empty traversable directory over the hidden one and bind
# the interpreter's subtree into it: the user can run this Python, nothing else there is shown.
REVEAL = """set -e
hidden=$1 child=$2; shift 2
orig=$(mktemp -d)
mount --bind "$hidden" "$orig"
mount -t tmpfs -o mode=0755 tmpfs "$hidden"
mkdir "$hidden/$child"
mount --bind "$orig/$child" "$hidden/$child"
exec "$@"
"""


def as_user(uid: int, groups: tuple[int, ...] = ()) -> list[str]:
    """A command prefix that runs as `uid` (primary group the same number)."""
    group_opt = f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups"
    setpriv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", group_opt, "--"]
    hidden = _hidden_ancestor()
    if hidden is None:
        return setpriv
    return [
        "unshare",
        "-m",
        "--",
        "sh",
        "-c",
        REVEAL,
        "reveal",
        str(hidden[0]),
        hidden[1],
        *setpriv,
    ]


@pytest.fixture
def shared_env() -> Iterator[Env]:
    """An installation that the daemon's user owns, in a directory every user may traverse."""
    require_root()
    root = Path(tempfile.mkdtemp(prefix="wadaemon-owners-"))
    root.chmod(0o755)
    e = Env(root, root / "sessions", root / "backups", root / "session.key", root / "wa.yaml")
    e.extra["socket"] = root / "run" / "wadaemon.sock"
    write_new_key(e.key)
    for d in (e.sessions, e.backups, root / "run"):
        d.mkdir(mode=0o770)
    e.write_config(interval_seconds=1)
    for path in (e.key, e.config, e.sessions, e.backups, root / "run"):
        os.chown(path, DAEMON_UID, SHARED_GID)
    try:
        yield e
    finally:
        shutil.rmtree(root, ignore_errors=True)


def cli_as(
    env: Env, uid: int, groups: tuple[int, ...], *args: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            *as_user(uid, groups),
            sys.executable,
            "-m",
            "wadaemon",
            *args,
            "--config",
            str(env.config),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def write_as_gateway(path: Path, text: str, mode: int = 0o660) -> None:
    path.write_text(text)
    os.chown(path, GATEWAY_UID, SHARED_GID)
    path.chmod(mode)


def make_dir_as_gateway(path: Path, mode: int) -> None:
    path.mkdir()
    os.chown(path, GATEWAY_UID, SHARED_GID)
    path.chmod(mode)


def test_owner_group_and_modes_round_trip_as_root(env: Env) -> None:
    require_root()
    acct = env.sessions / "alice"
    env.sessions.mkdir()
    make_dir_as_gateway(acct, 0o2750)
    make_dir_as_gateway(acct / "keys", 0o750)
    write_as_gateway(acct / "creds.json", '{"me": 1}', 0o640)
    write_as_gateway(acct / "keys" / "pre-key-1.json", '{"k": 1}', 0o600)
    want = {
        p.relative_to(acct): (p.stat().st_uid, p.stat().st_gid, stat.S_IMODE(p.stat().st_mode))
        for p in [acct, *acct.rglob("*")]
    }
    env.cli("backup", "alice", check=True)
    shutil.rmtree(acct)
    env.cli("restore", "alice", check=True)
    got = {
        p.relative_to(acct): (p.stat().st_uid, p.stat().st_gid, stat.S_IMODE(p.stat().st_mode))
        for p in [acct, *acct.rglob("*")]
    }
    assert got == want


def test_gateway_reads_its_session_restored_by_a_daemon_in_its_group(shared_env: Env) -> None:
    env = shared_env
    acct = env.sessions / "alice"
    make_dir_as_gateway(acct, 0o2770)
    write_as_gateway(acct / "creds.json", '{"me": "15551234567"}')
    daemon = (DAEMON_UID, (SHARED_GID,))
    proc = cli_as(env, *daemon, "backup", "alice")
    assert proc.returncode == 0, proc.stderr
    shutil.rmtree(acct)

    proc = cli_as(env, *daemon, "restore", "alice")
    assert proc.returncode == 0, proc.stderr
    # the daemon may not give files away, and says so; the shared group and the modes are kept
    assert f"uid {GATEWAY_UID}" in proc.stdout + proc.stderr
    st = (acct / "creds.json").stat()
    assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (SHARED_GID, 0o660)
    assert stat.S_IMODE(acct.stat().st_mode) == 0o2770 and acct.stat().st_gid == SHARED_GID

    gateway = as_user(GATEWAY_UID, (SHARED_GID,))
    read = subprocess.run([*gateway, "cat", str(acct / "creds.json")], capture_output=True)
    assert read.returncode == 0 and json.loads(read.stdout) == {"me": "15551234567"}
    write = subprocess.run([*gateway, "sh", "-c", f"echo '{{}}' > {acct}/pre-key-1.json"])
    assert write.returncode == 0


def health(env: Env) -> dict[str, object]:
    out = env.cli("status", "--json").stdout
    doc: dict[str, object] = json.loads(out)
    return doc


def test_unreadable_account_is_a_failing_check_then_recovers(shared_env: Env) -> None:
    env = shared_env
    acct = env.sessions / "alice"
    make_dir_as_gateway(acct, 0o700)  # the gateway's umask 077: the daemon cannot read it
    write_as_gateway(acct / "creds.json", '{"me": 1}', 0o600)
    bob = env.sessions / "bob"  # readable, but never whole: never backed up
    make_dir_as_gateway(bob, 0o770)
    write_as_gateway(bob / "creds.json", "")

    daemon = DaemonProcess(env, prefix=tuple(as_user(DAEMON_UID, (SHARED_GID,))))
    try:
        daemon.wait_for("ready")
        wait_until(lambda: health(env)["accounts"]["alice"]["state"] == "unreadable", 20)  # type: ignore[index]
        doc = health(env)
        check = doc["checks"]["accounts"]  # type: ignore[index]
        assert doc["status"] == "failing"
        assert check["status"] == "failing"
        assert str(acct) in check["detail"] and "chmod -R g+rX" in check["detail"]
        assert doc["accounts"]["bob"]["state"] == "unprotected"  # type: ignore[index]
        assert doc["accounts"]["alice"]["generation"] is None  # type: ignore[index]
        text = env.cli("status").stdout
        assert re.search(r"alice\s+unreadable", text) and re.search(r"bob\s+unprotected", text)
        assert not re.search(r"\bprotected\b", text)
        assert "skipped: local session is empty" not in daemon.log()

        acct.chmod(0o2770)  # the fix the message names
        (acct / "creds.json").chmod(0o660)
        wait_until(lambda: health(env)["accounts"]["alice"]["state"] == "protected", 30)  # type: ignore[index]
        assert health(env)["checks"]["accounts"]["status"] != "failing"  # type: ignore[index]
    finally:
        daemon.stop()
