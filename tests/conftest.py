"""Shared fixtures: a real configuration, key and directories; the CLI and daemon as processes."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from wadaemon.keyring import Key, Keyring, write_new_key
from wadaemon.layout import SessionsLayout
from wadaemon.replica import Replica
from wadaemon.store import DirectoryStore

WRITER = Path(__file__).with_name("writer.py")

pytest_plugins = ["firestore_emulator"]


@pytest.fixture
def keyring() -> Keyring:
    return Keyring(Key.from_bytes(os.urandom(32), "test key"))


def make_db(path: Path, rows: int = 100, row_bytes: int = 300, wal: bool = True) -> None:
    """A session-like SQLite database written by another process (as the client would)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    script = (
        "import sqlite3, os, sys\n"
        "c = sqlite3.connect(sys.argv[1])\n"
        f"c.execute('PRAGMA journal_mode={'wal' if wal else 'delete'}')\n"
        "c.execute('CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, v BLOB)')\n"
        f"c.executemany('INSERT INTO t (v) VALUES (?)', "
        f"[(os.urandom({row_bytes}),) for _ in range({rows})])\n"
        "c.commit(); c.close()\n"
    )
    subprocess.run([sys.executable, "-c", script, str(path)], check=True)


def run_sql(path: Path, sql: str) -> None:
    """Change a database from another process."""
    script = "import sqlite3, sys\nc = sqlite3.connect(sys.argv[1])\nc.execute(sys.argv[2])\n"
    script += "c.commit(); c.close()\n"
    subprocess.run([sys.executable, "-c", script, str(path), sql], check=True)


def read_ids(path: Path) -> list[int]:
    """Row ids of a database that is not live (a restored copy)."""
    conn = sqlite3.connect(f"file:{path}?immutable=1", uri=True)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return [r[0] for r in conn.execute("SELECT id FROM t ORDER BY id")]
    finally:
        conn.close()


def committed_ids(db: Path) -> list[int]:
    """The rows of a database no process writes any more (its WAL is read too)."""
    conn = sqlite3.connect(db)
    try:
        return [r[0] for r in conn.execute("SELECT id FROM t ORDER BY id")]
    finally:
        conn.close()


@dataclass
class Env:
    """A complete local installation in a temporary directory."""

    root: Path
    sessions: Path
    backups: Path
    key: Path
    config: Path
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def socket(self) -> Path:
        return Path(str(self.extra.get("socket", self.root / "wadaemon.sock")))

    def write_config(
        self,
        log_level: str = "info",
        restore_timeout: float = 60,
        whatsapp: dict[str, object] | None = None,
        messages: dict[str, object] | None = None,
        **backup: object,
    ) -> None:
        """Sidecar mode unless `whatsapp` (the whatsapp section's settings) is given."""
        settings: dict[str, object] = {"debounce_seconds": 0.2, **backup}
        wa = {"enabled": "true", **whatsapp} if whatsapp is not None else {"enabled": "false"}
        lines = [
            f"log_level: {log_level}",
            f"sessions_path: {self.sessions}",
            f"socket_path: {self.socket}",
            "encryption:",
            f"  key_file: {self.key}",
            "backup:",
            "  target: directory",
            f"  directory: {self.backups}",
            *(f"  {k}: {v}" for k, v in settings.items()),
            "restore:",
            f"  timeout_seconds: {restore_timeout}",
            "whatsapp:",
            *(f"  {k}: {v}" for k, v in wa.items()),
        ]
        if messages:
            lines.append("messages:")
            for k, v in messages.items():
                if isinstance(v, dict):
                    lines.append(f"  {k}:")
                    lines.extend(f"    {k2}: {v2}" for k2, v2 in v.items())
                else:
                    lines.append(f"  {k}: {v}")
        self.config.write_text("\n".join(lines) + "\n")

    def cli(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "wadaemon", *args, "--config", str(self.config)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"wadaemon {args} failed ({proc.returncode}): {proc.stderr}")
        return proc

    def rotate_key(self) -> None:
        """A new current key; the old one stays in the keyring for decryption only."""
        old = self.root / "old.key"
        self.key.rename(old)
        write_new_key(self.key)
        text = self.config.read_text().replace(
            f"  key_file: {self.key}\n", f"  key_file: {self.key}\n  old_key_files: [{old}]\n"
        )
        self.config.write_text(text)

    def replica(self, keyring: Keyring | None = None) -> Replica:
        from wadaemon.keyring import load_keyring

        ring = keyring or load_keyring(self.key, [], environ={})
        return Replica(DirectoryStore(self.backups), ring, keep_generations=5)

    def layout(self) -> SessionsLayout:
        return SessionsLayout(self.sessions)

    def head_generation(self, account: str) -> int | None:
        head = DirectoryStore(self.backups).read_head(account)
        return head.generation if head else None


@pytest.fixture
def env(tmp_path: Path) -> Env:
    e = Env(
        root=tmp_path,
        sessions=tmp_path / "sessions",
        backups=tmp_path / "backups",
        key=tmp_path / "session.key",
        config=tmp_path / "wadaemon.yaml",
    )
    write_new_key(e.key)
    e.backups.mkdir()  # as the package does: the store never creates its root
    e.write_config()
    return e


class DaemonProcess:
    def __init__(
        self, env: Env, extra_env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()
    ) -> None:
        """`wadaemon run` as a process; `prefix` runs it under another command (unshare)."""
        self.env = env
        self.log_path = env.root / f"daemon-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115
        environ = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET",)}
        environ.update(extra_env or {})
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "wadaemon", "run", "--config", str(env.config)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=environ,
        )

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_for(self, text: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited ({self.proc.returncode}):\n{self.log()}")
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not logged within {timeout} s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        finally:
            self._log.close()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self._log.close()


@pytest.fixture
def daemon_factory(env: Env) -> Iterator[type[DaemonProcess]]:
    started: list[DaemonProcess] = []

    class Factory(DaemonProcess):
        def __init__(
            self,
            e: Env = env,
            extra_env: dict[str, str] | None = None,
            prefix: tuple[str, ...] = (),
        ) -> None:
            super().__init__(e, extra_env, prefix)
            started.append(self)

    yield Factory
    for d in started:
        if d.proc.poll() is None:
            d.kill()


def wait_until(predicate: object, timeout: float = 20.0, interval: float = 0.05) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


@pytest.fixture
def fleet(
    tmp_path: Path, daemon_factory: type[DaemonProcess], request: pytest.FixtureRequest
) -> Iterator[Any]:
    """Daemons sharing one Firestore emulator, each with its own sessions directory (fleet.py)."""
    from fleet import Fleet

    emulator = request.getfixturevalue("firestore_emulator")
    (tmp_path / "fleet").mkdir()
    f = Fleet(tmp_path / "fleet", emulator, daemon_factory)
    try:
        yield f
    finally:
        f.close()
