"""Several daemon instances sharing one Firestore emulator, as separate hosts would.

Each instance has its own sessions directory, socket and instance id; all use one key and one
fake WhatsApp server (fake_server.FakeServer), which records which instance is connected to
which account and replaces a client when another connects with the same session, as WhatsApp
does. Accounts are seeded as paired sessions committed to the store (generation 1), so the
instances find them in Firestore and restore them from there.
"""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import DaemonProcess, wait_until
from fake_server import FakeServer
from fake_whatsapp import FAKE_DIR_ENV
from firestore_emulator import Emulator

from wadaemon.backup import BackupEngine
from wadaemon.keyring import load_keyring, write_new_key
from wadaemon.layout import SessionsLayout
from wadaemon.replica import Replica
from wadaemon.socket_client import request as ask
from wadaemon.store.base import Head
from wadaemon.store.firestore import FirestoreStore

TESTS = Path(__file__).parent
TTL = 6.0
RENEW = 2.0


def paired_session(path: Path, account: str) -> None:
    """A session database as the fake client leaves it once paired."""
    path.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path / "session.db")
    db.executescript(
        "PRAGMA journal_mode=WAL;"
        "CREATE TABLE IF NOT EXISTS whatsmeow_device (jid TEXT PRIMARY KEY, push_name TEXT, "
        "noise_key BLOB);"
        "CREATE TABLE IF NOT EXISTS whatsmeow_sessions (their_id TEXT PRIMARY KEY, "
        "session BLOB);"
    )
    db.execute(
        "INSERT OR REPLACE INTO whatsmeow_device VALUES (?, ?, ?)",
        (f"1555{abs(hash(account)) % 10**7:07d}:7@s.whatsapp.net", "Fake Phone", os.urandom(32)),
    )
    db.commit()
    db.close()


def session_rows(path: Path) -> set[str]:
    db = sqlite3.connect(f"file:{path / 'session.db'}?mode=ro", uri=True)
    try:
        return {r[0] for r in db.execute("SELECT their_id FROM whatsmeow_sessions")}
    finally:
        db.close()


class Fleet:
    def __init__(self, root: Path, emulator: Emulator, factory: type[DaemonProcess]) -> None:
        self.root = root
        self.emulator = emulator
        self.factory = factory
        self.key = root / "session.key"
        write_new_key(self.key)
        self.server = FakeServer(root / "whatsapp.sock").start()
        self.daemons: dict[str, DaemonProcess] = {}
        self.firestore_host = emulator.address  # a TcpProxy's address to cut the store
        self.store = FirestoreStore(emulator.project)

    def close(self) -> None:
        for daemon in self.daemons.values():
            if daemon.proc.poll() is None:
                daemon.kill()
        self.server.stop()
        self.store.client.close()  # type: ignore[no-untyped-call]

    # --- set-up ----------------------------------------------------------------------------------

    def seed(self, accounts: list[str]) -> None:
        """Paired sessions, each committed as generation 1 (as a host that drove them would)."""
        staging = self.root / "seed"
        layout = SessionsLayout(staging)
        layout.prepare()
        keyring = load_keyring(self.key, [], environ={})
        engine = BackupEngine(layout, Replica(self.store, keyring, keep_generations=5))
        for account in accounts:
            paired_session(layout.account_dir(account), account)
            assert engine.backup(account).generation == 1
        shutil.rmtree(staging)

    def config(self, name: str, restore_timeout: float = 60, **instance: object) -> Path:
        home = self.root / name
        (home / "fake").mkdir(parents=True, exist_ok=True)
        settings = {"id": name, **instance}
        path = home / "wadaemon.yaml"
        path.write_text(
            "\n".join(
                [
                    f"sessions_path: {home / 'sessions'}",
                    f"socket_path: {home / 'wadaemon.sock'}",
                    f"encryption: {{key_file: {self.key}}}",
                    "backup: {target: firestore, debounce_seconds: 0.2}",
                    f"firestore: {{project: {self.emulator.project}}}",
                    f"restore: {{timeout_seconds: {restore_timeout}}}",
                    "instance: {" + ", ".join(f"{k}: {v}" for k, v in settings.items()) + "}",
                    f"leases: {{ttl_seconds: {TTL}, renew_seconds: {RENEW}}}",
                    "whatsapp: {enabled: true, health_check_seconds: 0.5}",
                ]
            )
            + "\n"
        )
        return path

    def start(
        self,
        name: str,
        environ: dict[str, str] | None = None,
        restore_timeout: float = 60,
        **instance: object,
    ) -> DaemonProcess:
        config = self.config(name, restore_timeout, **instance)
        home = config.parent
        env = _Env(home, config)
        daemon = self.factory(
            env,  # type: ignore[arg-type]
            extra_env={
                "WADAEMON_WHATSAPP_CLIENT": "fake_whatsapp:FakeClient",
                FAKE_DIR_ENV: str(home / "fake"),
                "FAKE_WHATSAPP_SERVER": str(self.server.path),
                "FAKE_WHATSAPP_INSTANCE": name,
                "PYTHONPATH": str(TESTS),
                "FIRESTORE_EMULATOR_HOST": self.firestore_host,
                "GOOGLE_CLOUD_PROJECT": self.emulator.project,
                **(environ or {}),
            },
        )
        self.daemons[name] = daemon
        daemon.wait_for("ready:", timeout=90)
        return daemon

    # --- looking -------------------------------------------------------------------------------

    def socket(self, name: str) -> Path:
        return self.root / name / "wadaemon.sock"

    def accounts(self, name: str) -> dict[str, dict[str, Any]]:
        status, body = ask(self.socket(name), "GET", "/accounts", timeout=10)
        assert status == 200, body
        return {a["account"]: a for a in body["accounts"]}

    def driven(self, name: str) -> set[str]:
        return {a for a, info in self.accounts(name).items() if info["state"] != "passive"}

    def by_instance(self) -> dict[str, set[str]]:
        """Which instance the fake server sees connected for each account, grouped."""
        out: dict[str, set[str]] = {}
        for account, instance in self.server.live().items():
            out.setdefault(instance, set()).add(account)
        return out

    def wait_all_connected(self, accounts: list[str], timeout: float = 60.0) -> None:
        try:
            wait_until(lambda: set(self.server.live()) >= set(accounts), timeout, 0.2)
        except AssertionError:
            missing = sorted(set(accounts) - set(self.server.live()))
            raise AssertionError(
                f"not connected within {timeout} s: {missing}\n" + self.logs()
            ) from None

    def wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        try:
            wait_until(predicate, timeout, 0.05)
        except AssertionError:
            raise AssertionError(f"{what}: not within {timeout} s\n{self.logs()}") from None

    def wait_spread(self, accounts: list[str], counts: list[int], timeout: float = 90.0) -> None:
        """Until every account is connected, the instances drive `counts` of them (sorted),
        and that holds for two seconds (no hand-over in flight)."""

        def spread() -> list[int]:
            live = self.server.live()
            if not set(accounts) <= set(live):
                return []
            return sorted(len(v) for v in self.by_instance().values())

        def stable() -> bool:
            if spread() != counts:
                return False
            time.sleep(2.0)
            return spread() == counts

        self.wait(stable, timeout, f"spread {counts} (now {spread()})")

    def heads(self, accounts: list[str]) -> dict[str, Head]:
        heads = {}
        for account in accounts:
            head = self.store.read_head(account)
            assert head is not None
            heads[account] = head
        return heads

    def lease(self, account: str) -> dict[str, Any]:
        snap = self.store.client.collection("leases").document(account).get()
        return snap.to_dict() or {}

    def cli(self, name: str, *args: str) -> subprocess.CompletedProcess[str]:
        config = self.root / name / "wadaemon.yaml"
        return subprocess.run(
            [sys.executable, "-m", "wadaemon", *args, "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=120,
        )

    def kill(self, name: str, timeout: float = 10.0) -> None:
        """kill -9 the instance, then wait until the fake server has seen each of its
        connections end. The kernel closes them as the process dies, but the server's loop (a
        thread of this process) notices a moment later: on a busy machine, right after the
        kill, it may still list the dead instance's clients as live."""
        self.daemons[name].kill()
        self.server.wait_gone(name, timeout)

    def pid(self, name: str) -> int:
        return self.daemons[name].proc.pid

    def logs(self) -> str:
        return "\n".join(f"--- {n}\n{d.log()[-6000:]}" for n, d in self.daemons.items())

    def restored(self, name: str) -> dict[str, int]:
        """account -> generation restored by the instance (from its log)."""
        log = self.daemons[name].log()
        found = re.findall(r"restore: (\S+): restored \(generation (\d+)\)", log)
        return {a: int(g) for a, g in found}


class _Env:
    """The part of conftest.Env that DaemonProcess uses."""

    def __init__(self, root: Path, config: Path) -> None:
        self.root = root
        self.config = config


def settle(
    fleet: Fleet, accounts: list[str], timeout: float = 30.0, skip: frozenset[str] = frozenset()
) -> None:
    """Wait until no instance (but those in `skip`: paused) has a backup of the accounts
    running or waiting."""

    def quiet() -> bool:
        for name, daemon in fleet.daemons.items():
            if daemon.proc.poll() is not None or name in skip:
                continue
            for account, info in fleet.accounts(name).items():
                if account not in accounts:
                    continue
                if info["backup_running_seconds"] is not None:
                    return False
                if info["pending_since_seconds"] is not None:
                    return False
        return True

    wait_until(quiet, timeout, 0.2)
    time.sleep(0.5)
