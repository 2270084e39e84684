"""The README's quick start, as a user pastes it: the block runs against a clone's `local/`.

The configuration is the one `scripts/quickstart` writes and the commands are the README's own
lines, read from the files, so that the documentation cannot drift from what works.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import DaemonProcess, Env

from wadaemon.keyring import write_new_key

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent


def readme() -> str:
    return (REPO / "README.md").read_text()


def try_it_block() -> str:
    """The bash block after "Try it from another terminal", whole."""
    match = re.search(r"Try it from another terminal.*?```bash\n(.*?)```", readme(), re.S)
    assert match, "README.md has no quick-start try-it block"
    return match.group(1)


def quickstart_config() -> str:
    match = re.search(
        r"<<'YAML'\n(.*?\n)YAML\n", (REPO / "scripts" / "quickstart").read_text(), re.S
    )
    assert match, "scripts/quickstart writes no configuration"
    return match.group(1)


@pytest.fixture
def clone(tmp_path: Path) -> Env:
    """A clone after `./scripts/quickstart` set it up: `.venv/bin/wadaemon` and `local/`."""
    root = tmp_path / "clone"
    local = root / "local"
    local.mkdir(parents=True)
    venv_bin = root / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    installed = Path(sys.executable).with_name("wadaemon")
    if installed.exists():
        (venv_bin / "wadaemon").symlink_to(installed)
    else:
        script = f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m wadaemon "$@"\n'
        (venv_bin / "wadaemon").write_text(script)
        (venv_bin / "wadaemon").chmod(0o755)
    write_new_key(local / "session.key")
    (local / "backups").mkdir()  # as scripts/quickstart does: the daemon never creates it
    (local / "wadaemon.yaml").write_text(quickstart_config())
    return Env(
        root=local,
        sessions=local / "sessions",
        backups=local / "backups",
        key=local / "session.key",
        config=local / "wadaemon.yaml",
    )


def paste(clone: Env, commands: str) -> subprocess.CompletedProcess[str]:
    """Run lines as a shell in the clone runs what is pasted into it (no `set -e`)."""
    return subprocess.run(
        ["bash", "-c", commands],
        cwd=clone.root.parent,
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k != "WADAEMON_CONFIG"},
    )


def test_the_try_it_block_pasted_whole_backs_up_before_it_deletes(
    clone: Env, daemon_factory: type[DaemonProcess]
) -> None:
    block = try_it_block()
    assert "--wait" in block and "&& rm -rf local/sessions/alice" in block
    daemon = daemon_factory(clone)
    daemon.wait_for("ready")

    started = time.monotonic()
    pasted = paste(clone, block)
    assert pasted.returncode == 0, pasted.stderr
    assert pasted.stderr == ""
    assert "alice: state active, head generation 1" in pasted.stdout
    assert time.monotonic() - started < 10  # the 1 s debounce, then one small backup
    assert not (clone.sessions / "alice").exists()  # deleted, but only once backed up
    assert clone.head_generation("alice") == 1

    # "Then stop the daemon in its terminal (Ctrl-C) and start it again": what it logs
    said = re.search(r"logs `(restore: [^`]+)` before `ready`", readme())
    assert said, "the README no longer says what the restart logs"
    assert daemon.stop(signal.SIGINT) == 0
    again = daemon_factory(clone)
    again.wait_for("ready")
    log = again.log()
    assert said.group(1) in log and log.index(said.group(1)) < log.index("ready")
    assert (clone.sessions / "alice" / "creds.json").read_text() == '{"me": "demo"}\n'
    assert again.stop(signal.SIGINT) == 0


def test_generations_wait_times_out_saying_what_to_check(
    clone: Env, daemon_factory: type[DaemonProcess]
) -> None:
    daemon = daemon_factory(clone)
    daemon.wait_for("ready")
    started = time.monotonic()
    waited = paste(
        clone, ".venv/bin/wadaemon generations bob --wait 1 --config local/wadaemon.yaml"
    )
    assert 1.0 <= time.monotonic() - started < 10
    assert waited.returncode == 1 and waited.stdout == ""
    err = waited.stderr
    assert "bob: no backup appeared within 1 s" in err, err
    assert "`.venv/bin/wadaemon status --config local/wadaemon.yaml`" in err, err
    assert "start it with `.venv/bin/wadaemon run --config local/wadaemon.yaml`" in err, err
    assert "systemctl" not in err and "journalctl" not in err
    assert len(err.strip().splitlines()) == 1

    # an account that has a backup answers at once, the same as without --wait
    (clone.sessions / "carol").mkdir(parents=True)
    (clone.sessions / "carol" / "creds.json").write_text("{}")
    shown = paste(
        clone, ".venv/bin/wadaemon generations carol --wait 10 --config local/wadaemon.yaml"
    )
    assert shown.returncode == 0, shown.stderr
    plain = paste(clone, ".venv/bin/wadaemon generations carol --config local/wadaemon.yaml")
    assert plain.stdout == shown.stdout
    assert daemon.stop() == 0

    bad = paste(
        clone, ".venv/bin/wadaemon generations carol --wait -1 --config local/wadaemon.yaml"
    )
    assert bad.returncode == 1 and "cannot be negative" in bad.stderr
