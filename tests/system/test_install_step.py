"""The package's install step with every Python it supports (3.10 to 3.13), outside a container.

postinst runs /usr/lib/wadaemon/install-venv with the system's python3. Here the package is
unpacked and that script runs with an interpreter of each version found on this machine (on
PATH as python3.X, or under ~/.pyenv/versions): the virtualenv is built from the carried wheels
alone, `wadaemon check-config` accepts the shipped configuration (its paths moved to a temporary
directory), every installed distribution's top-level modules import, importing neonize maps its
Go library from the virtualenv without any download, and the daemon runs with that
configuration until SIGTERM, backing up a session. A missing interpreter fails the test.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

PYTHONS = ("3.10", "3.11", "3.12", "3.13")
GO_LIBRARY = "neonize/neonize-linux-amd64.so"

# Run with the virtualenv's interpreter: import the top-most package or module of every file of
# every installed distribution (namespace packages such as google.* are walked into), then
# neonize as the daemon does, and say where its Go library is mapped from. neonize 0.5.2 needs
# the daemon's help on Python 3.10 (typing.Self), so that comes first, as in the daemon.
IMPORT_EVERYTHING = r"""
import importlib, importlib.metadata as md, sys
from wadaemon.whatsapp.neonize_client import neonize_on_python310
neonize_on_python310()
names = set()
for dist in md.distributions():
    for f in dist.files or ():
        parts = f.parts
        if parts[0].endswith((".dist-info", ".data")) or parts[0] in ("..", "bin", "__pycache__"):
            continue
        if len(parts) == 1:
            if f.suffix in (".py", ".so"):
                names.add(parts[0].split(".")[0])
            continue
        if parts[-1] != "__init__.py":
            continue
        # the top-most directory with an __init__.py on this path
        for depth in range(1, len(parts)):
            init = dist.locate_file("/".join(parts[:depth]) + "/__init__.py")
            if init.exists():
                names.add(".".join(parts[:depth]))
                break
for name in sorted(names):
    importlib.import_module(name)
import neonize.aioze.client, wadaemon.daemon
maps = [line.split()[-1] for line in open("/proc/self/maps") if "GO_LIBRARY" in line]
print(len(names), "modules imported;", sorted(set(maps)))
""".replace("GO_LIBRARY", GO_LIBRARY)


def interpreter(version: str) -> str:
    candidates = [shutil.which(f"python{version}") or ""]
    candidates += sorted(
        glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}.*/bin/python3"))
    )
    for candidate in filter(None, candidates):
        # the interpreter itself, not a wrapper script such as pyenv's shims
        probe = subprocess.run(
            [candidate, "-c", "import sys; print('%d.%d' % sys.version_info[:2], sys.executable)"],
            capture_output=True,
            text=True,
        )
        found = probe.stdout.split()
        if probe.returncode == 0 and found[:1] == [version]:
            return found[1]
    pytest.fail(f"no Python {version} on this machine (python{version} or ~/.pyenv)")


@pytest.fixture(scope="module")
def unpacked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    deb = Path(os.environ.get("WADAEMON_DEB", ""))
    if not deb.is_file():
        pytest.fail("$WADAEMON_DEB does not name the package (packaging/test-system sets it)")
    root = tmp_path_factory.mktemp("unpacked")
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    yield root


def clean_env() -> dict[str, str]:
    """No pip settings, no PYTHON* variables: as postinst runs under dpkg."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
    env["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin"
    return env


@pytest.mark.parametrize("version", PYTHONS)
def test_install_step(version: str, unpacked: Path, tmp_path: Path) -> None:
    python = interpreter(version)
    install_venv = str(unpacked / "usr/lib/wadaemon/install-venv")
    # a --venv that names something else is refused, not emptied
    elsewhere = tmp_path / "sessions"
    (elsewhere / "alice").mkdir(parents=True)
    refused = subprocess.run(
        [install_venv, "--python", python, "--venv", str(elsewhere)],
        capture_output=True,
        text=True,
        env=clean_env(),
    )
    assert refused.returncode == 1 and "is not a virtualenv" in refused.stderr, refused.stderr
    assert (elsewhere / "alice").is_dir()
    venv = tmp_path / "venv"
    built = subprocess.run(
        [str(unpacked / "usr/lib/wadaemon/install-venv"), "--python", python, "--venv", str(venv)],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=300,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    tag = "cp" + version.replace(".", "")
    assert f"({tag}) from" in built.stdout and "files match their wheels' RECORD" in built.stdout
    assert "is the wheel's" in built.stdout, built.stdout
    assert (venv / "bin/python").resolve() == Path(python).resolve()
    assert (venv / f"lib/python{version}/site-packages").is_dir()
    # what postinst asks later, when python3 changes: this virtualenv fits this interpreter
    check = [str(unpacked / "usr/lib/wadaemon/install-venv"), "--check", "--venv", str(venv)]
    assert subprocess.run([*check, "--python", python], env=clean_env()).returncode == 0
    other = interpreter("3.13" if version != "3.13" else "3.12")
    assert subprocess.run([*check, "--python", other], env=clean_env()).returncode == 1

    # the shipped configuration, its paths moved here
    text = (unpacked / "etc/wadaemon/wadaemon.yaml").read_text()
    for path in ("/var/lib/wadaemon", "/var/backups/wadaemon", "/run/wadaemon", "/etc/wadaemon"):
        (tmp_path / path.strip("/")).mkdir(parents=True, exist_ok=True)
        text = text.replace(path, str(tmp_path / path.strip("/")))
    config = tmp_path / "wadaemon.yaml"
    config.write_text(text)
    wadaemon = str(venv / "bin/wadaemon")
    key = tmp_path / "etc/wadaemon/session.key"
    subprocess.run([wadaemon, "keygen", str(key)], check=True, env=clean_env(), capture_output=True)
    checked = subprocess.run(
        [wadaemon, "check-config", "--config", str(config)],
        capture_output=True,
        text=True,
        env=clean_env(),
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr

    imported = subprocess.run(
        [str(venv / "bin/python"), "-c", IMPORT_EVERYTHING],
        capture_output=True,
        text=True,
        env=clean_env(),
        cwd=tmp_path,
        timeout=300,
    )
    assert imported.returncode == 0, imported.stderr[-3000:]
    assert f"['{venv}/lib/python{version}/site-packages/{GO_LIBRARY}']" in imported.stdout, (
        imported.stdout
    )
    assert "download" not in (imported.stdout + imported.stderr).lower()
    print(f"Python {version} ({python}): {imported.stdout.strip()}")

    # and the daemon runs on it: the shipped configuration (WhatsApp clients on, no account),
    # READY, its session backed up, SIGTERM, a clean stop
    session = tmp_path / "var/lib/wadaemon/sessions/alice"
    session.mkdir(parents=True)
    (session / "creds.json").write_text('{"me": "x"}')
    # a WAL database, held open as a client holds it: captured from its WAL, its image checked
    # in the worker (in memory, or through a temporary file on 3.10)
    db = sqlite3.connect(session / "session.db")
    db.execute("PRAGMA journal_mode=wal")
    db.execute("CREATE TABLE keys (id INTEGER PRIMARY KEY, k BLOB)")
    db.executemany("INSERT INTO keys (k) VALUES (?)", [(os.urandom(300),) for _ in range(200)])
    db.commit()
    log = tmp_path / "daemon.log"
    with log.open("wb") as out:
        daemon = subprocess.Popen(
            [wadaemon, "run", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**clean_env(), "SESSIONS_PATH": str(session.parent)},
        )
    try:
        deadline = time.monotonic() + 60
        while "backup: alice" not in log.read_text() and time.monotonic() < deadline:
            assert daemon.poll() is None, log.read_text()
            time.sleep(0.2)
        said = log.read_text()
        assert "ready: " in said and "whatsapp: supervising 1 accounts" in said, said
        assert "backup: alice: generation 1: 2 files" in said, said
    finally:
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(timeout=60)
        db.close()
    said = log.read_text()
    assert code == 0 and said.rstrip().endswith("stopped"), said[-3000:]
    assert "Traceback" not in said, said[-3000:]
