"""scripts/quickstart in a scratch copy of the repository, with a stand-in for setup.sh (no apt,
no virtualenv) and for the wadaemon command (it records how it was called)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    (tmp_path / "scripts").mkdir()
    shutil.copy2(REPO / "scripts" / "quickstart", tmp_path / "scripts" / "quickstart")
    (tmp_path / "scripts" / "setup.sh").write_text(
        "ensure_system_packages() { :; }\nensure_venv() { :; }\n"
    )
    fake = tmp_path / ".venv" / "bin" / "wadaemon"
    fake.parent.mkdir(parents=True)
    fake.write_text('#!/bin/sh\necho "$*" >> "$(dirname "$0")/calls"\n')
    fake.chmod(0o755)
    return tmp_path


def quickstart(clone: Path) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    proc = subprocess.run(
        ["bash", str(clone / "scripts" / "quickstart")], capture_output=True, text=True, timeout=60
    )
    calls = clone / ".venv" / "bin" / "calls"
    return proc, calls.read_text().splitlines() if calls.exists() else []


def test_no_new_key_over_backups_sealed_with_a_lost_one(clone: Path) -> None:
    head = clone / "local" / "backups" / "alice" / "HEAD.json"
    head.parent.mkdir(parents=True)
    head.write_text("{}")
    proc, calls = quickstart(clone)
    assert proc.returncode == 1
    assert "local/session.key is missing, but local/backups/ holds backups" in proc.stderr
    assert "Put local/session.key back from your copy" in proc.stderr
    assert "move local/backups away to start fresh" in proc.stderr
    assert calls == []  # neither keygen nor the daemon ran
    assert not (clone / "local" / "session.key").exists()


def test_a_fresh_start_writes_a_key_and_an_existing_key_is_kept(clone: Path) -> None:
    proc, calls = quickstart(clone)
    assert proc.returncode == 0, proc.stderr
    assert calls == ["keygen local/session.key", "run --config local/wadaemon.yaml"]
    assert (clone / "local" / "backups").is_dir()  # the daemon never creates it

    (clone / "local" / "session.key").write_text("the key\n")
    (clone / "local" / "backups" / "alice").mkdir(parents=True)
    (clone / "local" / "backups" / "alice" / "HEAD.json").write_text("{}")
    (clone / ".venv" / "bin" / "calls").unlink()
    proc, calls = quickstart(clone)
    assert proc.returncode == 0, proc.stderr
    assert calls == ["run --config local/wadaemon.yaml"]
