"""The account supervisor, end to end: the real daemon, a real session.db, real backups.

WhatsApp's servers cannot be reached from here, so the client is the fake in fake_whatsapp.py,
loaded through the same boundary as neonize and fed real neonize event objects (protobuf).
Everything else is real: the daemon process, its socket, the `wadaemon` command, the snapshot
worker, the directory store, restores.
"""

from __future__ import annotations

import re
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import DaemonProcess, Env, wait_until
from fake_whatsapp import FAKE_DIR_ENV, calls, paired_event, send_event
from firestore_emulator import Emulator
from neonize.proto import Neonize_pb2 as pb

from wadaemon.restore import Restorer
from wadaemon.socket_client import request
from wadaemon.store import DirectoryStore
from wadaemon.store.firestore import FirestoreStore

TESTS = Path(__file__).parent


class WhatsAppEnv:
    def __init__(self, env: Env, daemon_factory: type[DaemonProcess]) -> None:
        self.env = env
        self.fake = env.root / "fake"
        self.fake.mkdir()
        self._factory = daemon_factory
        self.daemon: DaemonProcess | None = None
        self.pair_stderr = ""  # what the last `pair` printed on stderr
        self.configure()

    def configure(self, **whatsapp: object) -> None:
        settings: dict[str, object] = {"health_check_seconds": 0.5, **whatsapp}
        self.env.write_config(whatsapp=settings)

    def start(self) -> DaemonProcess:
        self.daemon = self._factory(
            self.env,
            {
                "WADAEMON_WHATSAPP_CLIENT": "fake_whatsapp:FakeClient",
                FAKE_DIR_ENV: str(self.fake),
                "PYTHONPATH": str(TESTS),
            },
        )
        self.daemon.wait_for("ready:")
        return self.daemon

    def accounts(self) -> dict[str, Any]:
        status, body = request(self.env.socket, "GET", "/accounts")
        assert status == 200, body
        return {a["account"]: a for a in body["accounts"]}

    def client_state(self, account: str) -> str | None:
        info = self.accounts().get(account)
        return info["whatsapp"]["state"] if info and info["whatsapp"] else None

    def wait_state(self, account: str, state: str, timeout: float = 20.0) -> None:
        try:
            wait_until(lambda: self.client_state(account) == state, timeout=timeout)
        except AssertionError:
            assert self.daemon is not None
            raise AssertionError(
                f"{account} never became {state} (is {self.client_state(account)}):\n"
                + self.daemon.log()
            ) from None

    def cli(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "wadaemon", *args, "--config", str(self.env.config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def send(self, account: str, event: Any) -> None:
        send_event(self.fake, account, event)

    def pair(self, account: str, phone: str = "15551234567") -> str:
        """`wadaemon accounts add` until the QR shows, then the phone scans it."""
        proc = self.cli("accounts", "add", account)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "Scan with WhatsApp" in line, line + proc.communicate(timeout=30)[1]
        self.send(account, paired_event(phone))
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        self.pair_stderr = err
        self.wait_state(account, "connected")
        return line + out

    def settled(self, account: str) -> None:
        """Wait until no backup of the account runs or waits."""

        def quiet() -> bool:
            a = self.accounts()[account]
            return a["backup_running_seconds"] is None and a["pending_since_seconds"] is None

        for _ in range(2):
            wait_until(quiet)
            time.sleep(0.5)

    def store(self) -> DirectoryStore:
        return DirectoryStore(self.env.backups)

    def session_db(self, account: str) -> Path:
        return self.env.sessions / account / "session.db"


@pytest.fixture
def wa(env: Env, daemon_factory: type[DaemonProcess]) -> WhatsAppEnv:
    return WhatsAppEnv(env, daemon_factory)


def devices(db: Path) -> list[str]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return [r[0] for r in conn.execute("SELECT jid FROM whatsmeow_device")]
    finally:
        conn.close()


def restored_devices(env: Env, account: str, tmp: Path, generation: int | None = None) -> list[str]:
    dest = tmp / f"restored-{account}-{time.monotonic_ns()}"
    Restorer(env.layout(), env.replica()).restore_to(account, dest, generation)
    return devices(dest / "session.db")


def test_pairing_by_qr_code_is_backed_up_at_once(wa: WhatsAppEnv, tmp_path: Path) -> None:
    wa.start()
    started = time.monotonic()
    out = wa.pair("acc1")
    # the QR code itself is drawn in the terminal (segno's half blocks)
    assert "▀" in out or "█" in out
    assert re.search(r"acc1: paired with \+15551234567; backed up as generation \d+", out), out
    # while it waits, the command says for what, once per phase, on stderr
    assert wa.pair_stderr.splitlines() == [
        "acc1: waiting for the daemon to start the client…",
        "acc1: waiting for the first QR code from WhatsApp…",
        "acc1: waiting for the phone to scan the code…",
        "acc1: linked; waiting for the pairing to be backed up…",
    ], wa.pair_stderr
    head = wa.store().read_head("acc1")
    assert head is not None and head.state == "active"
    # the generation made at pairing holds the paired device, before any debounce
    assert time.monotonic() - started < 15
    assert restored_devices(wa.env, "acc1", tmp_path, head.history[-1]) == [
        "15551234567:7@s.whatsapp.net"
    ]
    # WAL mode was switched on before the client first opened the database
    conn = sqlite3.connect(f"file:{wa.session_db('acc1')}?mode=ro", uri=True)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    info = wa.accounts()["acc1"]
    assert info["whatsapp"]["phone"] == "15551234567"
    # the account record (accounts/{id} in Firestore) follows, coalesced to one write a second
    wait_until(lambda: (wa.store().read_account("acc1") or {}).get("status") == "connected")
    record = wa.store().read_account("acc1")
    assert record is not None and record["phone"] == "15551234567"
    assert record["lastEventAt"] and record["lastConnectedAt"]


def test_pairing_by_phone_code(wa: WhatsAppEnv) -> None:
    wa.start()
    proc = wa.cli("accounts", "add", "acc2", "--phone", "+1 555 123-4567")
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert "Pairing code for +15551234567: FAKE-C0DE" in line, line
    assert "pair_phone 15551234567" in calls(wa.fake, "acc2")
    wa.send("acc2", paired_event("15551234567"))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "paired with +15551234567" in out
    assert err.splitlines() == [
        "acc2: waiting for the daemon to start the client…",
        "acc2: waiting for the pairing code from WhatsApp…",
        "acc2: waiting for the code to be entered on the phone…",
        "acc2: linked; waiting for the pairing to be backed up…",
    ], err


def test_bad_phone_number_and_sidecar_mode_are_refused_clearly(wa: WhatsAppEnv) -> None:
    wa.start()
    proc = wa.cli("accounts", "add", "acc3", "--phone", "call me")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert "is not a phone number" in err and "country code" in err
    assert wa.daemon is not None
    wa.daemon.stop()
    wa.env.write_config()  # sidecar mode
    wa.start()
    proc = wa.cli("accounts", "add", "acc3")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1 and "sidecar mode" in err


def test_pairing_times_out_and_the_account_needs_a_qr(wa: WhatsAppEnv) -> None:
    wa.configure(pairing_timeout_seconds=2)
    wa.start()
    proc = wa.cli("accounts", "add", "acc4")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "within 2 s" in err and "run the command again" in err
    wa.wait_state("acc4", "needs_qr")
    assert calls(wa.fake, "acc4")[-1] == "stopped"
    # a session that never paired holds nothing worth a backup
    time.sleep(3)
    assert wa.store().read_head("acc4") is None
    assert wa.daemon is not None
    refused = wa.daemon.log().count("session.db holds no paired device")
    assert refused >= 1
    # and refusing it does not start an endless series of snapshots (their reads touch the
    # -wal and -shm files, which the watcher reports)
    time.sleep(3)
    assert wa.daemon.log().count("session.db holds no paired device") == refused


def test_logged_out_quarantines_marks_the_head_and_deletes_nothing(
    wa: WhatsAppEnv, tmp_path: Path
) -> None:
    # no debounce: the library deletes the device the moment it reports the logout, and that
    # state must still never become a backup
    wa.env.write_config(
        whatsapp={"retry_after_logout": "false", "health_check_seconds": 0.5}, debounce_seconds=0
    )
    wa.start()
    wa.pair("acc1")
    wa.settled("acc1")
    before = wa.store().read_head("acc1")
    assert before is not None
    generations = wa.store().list_generations("acc1")
    wa.send("acc1", pb.LoggedOut(OnConnect=False, Reason=pb.ConnectFailureReason.LOGGED_OUT))
    wa.wait_state("acc1", "needs_qr")
    # the local session is set aside, not deleted
    assert not (wa.env.sessions / "acc1").exists()
    quarantined = list((wa.env.sessions / ".quarantine").glob("acc1.*.logged-out"))
    assert len(quarantined) == 1 and (quarantined[0] / "session.db").is_file()
    # the head says logged_out and keeps every generation; no backup of the dead session
    head = wa.store().read_head("acc1")
    assert head is not None and head.state == "logged_out"
    assert head.generation == before.generation and head.history == before.history
    assert wa.store().list_generations("acc1") == generations
    assert restored_devices(wa.env, "acc1", tmp_path) == ["15551234567:7@s.whatsapp.net"]
    # a restart does not bring the dead session back
    assert wa.daemon is not None
    assert wa.daemon.stop() == 0
    wa.start()
    wa.wait_state("acc1", "needs_qr")
    assert not (wa.env.sessions / "acc1").exists()
    # pairing again starts a new history
    wa.pair("acc1", phone="15550000000")
    wait_until(lambda: (wa.store().read_head("acc1") or before).state == "active")
    head = wa.store().read_head("acc1")
    assert head is not None and head.history == (head.generation,)


def test_a_spurious_logout_is_recovered_from_the_last_backup(wa: WhatsAppEnv) -> None:
    wa.start()
    wa.pair("acc1")
    wait_until(lambda: wa.store().read_head("acc1") is not None)
    wa.send("acc1", pb.LoggedOut(OnConnect=True, Reason=pb.ConnectFailureReason.UNKNOWN_LOGOUT))
    assert wa.daemon is not None
    wa.daemon.wait_for("the logout was spurious")
    wa.wait_state("acc1", "connected")
    assert devices(wa.session_db("acc1")) == ["15551234567:7@s.whatsapp.net"]
    head = wa.store().read_head("acc1")
    assert head is not None and head.state == "active"
    assert len(list((wa.env.sessions / ".quarantine").glob("acc1.*"))) == 1


def test_a_logout_the_retry_confirms_ends_in_needs_qr(wa: WhatsAppEnv, tmp_path: Path) -> None:
    wa.start()
    wa.pair("acc1")
    wa.settled("acc1")
    generations = wa.store().list_generations("acc1")
    (wa.fake / "acc1" / "logout_on_connect").touch()  # the server insists
    wa.send("acc1", pb.LoggedOut(OnConnect=False, Reason=pb.ConnectFailureReason.LOGGED_OUT))
    assert wa.daemon is not None
    wa.daemon.wait_for("trying the last good backup once")
    wait_until(lambda: (wa.store().read_head("acc1") or None) is not None)
    wa.wait_state("acc1", "needs_qr")
    head = wa.store().read_head("acc1")
    assert head is not None and head.state == "logged_out"
    assert wa.store().list_generations("acc1") == generations
    # the session without its device never became a backup
    assert restored_devices(wa.env, "acc1", tmp_path) == ["15551234567:7@s.whatsapp.net"]
    # one connect for the retry, and no more
    assert calls(wa.fake, "acc1").count("connect") == 2
    assert len(list((wa.env.sessions / ".quarantine").glob("acc1.*.logged-out*"))) == 2


def test_stream_replaced_stops_without_a_reconnect_loop(wa: WhatsAppEnv) -> None:
    wa.start()
    wa.pair("acc1")
    wa.send("acc1", pb.StreamReplaced())
    wa.wait_state("acc1", "replaced")
    wait_until(lambda: calls(wa.fake, "acc1")[-1] == "stopped")
    connects = calls(wa.fake, "acc1").count("connect")
    time.sleep(3)
    assert calls(wa.fake, "acc1").count("connect") == connects
    assert wa.client_state("acc1") == "replaced"
    assert (wa.env.sessions / "acc1" / "session.db").is_file()  # nothing deleted


def test_temporary_ban_waits_until_it_expires(wa: WhatsAppEnv) -> None:
    wa.start()
    wa.pair("acc1")
    connects = calls(wa.fake, "acc1").count("connect")
    wa.send("acc1", pb.TemporaryBan(Code=pb.TemporaryBan.SEND_TO_TOO_MANY_PEOPLE, Expire=3))
    wa.wait_state("acc1", "temp_banned")
    banned_at = time.monotonic()
    wait_until(lambda: calls(wa.fake, "acc1").count("connect") > connects, timeout=20)
    assert time.monotonic() - banned_at >= 2.0
    wa.wait_state("acc1", "connected")


def test_a_vanished_session_is_restored_before_reconnecting(wa: WhatsAppEnv) -> None:
    wa.start()
    wa.pair("acc1")
    wait_until(lambda: wa.store().read_head("acc1") is not None)
    connects = calls(wa.fake, "acc1").count("connect")
    shutil.rmtree(wa.env.sessions / "acc1")
    wait_until(lambda: calls(wa.fake, "acc1").count("connect") > connects, timeout=30)
    log = calls(wa.fake, "acc1")
    assert log.index("stop", len(log) - 4) < len(log) - 1  # stopped before the new connect
    # the client reconnected with the restored session: no QR, the same device
    wa.wait_state("acc1", "connected")
    assert devices(wa.session_db("acc1")) == ["15551234567:7@s.whatsapp.net"]
    assert wa.daemon is not None
    assert "acc1: restored" in wa.daemon.log()


def test_a_refused_connect_is_retried_with_growing_backoff(wa: WhatsAppEnv) -> None:
    wa.start()
    wa.pair("acc1")
    assert wa.daemon is not None
    assert wa.daemon.stop() == 0
    (wa.fake / "acc1" / "connect_error").write_text("websocket: bad handshake")
    wa.start()
    pattern = re.compile(r"acc1: .*; retrying in (\d+) s")
    wait_until(lambda: len(pattern.findall(wa.daemon.log())) >= 3, timeout=40)
    delays = [int(d) for d in pattern.findall(wa.daemon.log())]
    assert delays[2] > delays[0], delays
    assert wa.daemon.log().count("connect failed: websocket: bad handshake") >= 3
    info = wa.accounts()["acc1"]["whatsapp"]
    assert info["state"] == "offline" and info["connect_failures"] >= 3
    status, health = request(wa.env.socket, "GET", "/health")
    assert status == 200 and health["checks"]["whatsapp"]["status"] == "degraded"
    # while the servers cannot be reached at all, the client is not even asked to connect
    (wa.fake / "unreachable").write_text("no route")
    wait_until(lambda: "cannot reach the fake servers: no route" in wa.daemon.log(), timeout=60)
    connects = calls(wa.fake, "acc1").count("connect")
    time.sleep(3)
    assert calls(wa.fake, "acc1").count("connect") == connects
    (wa.fake / "unreachable").unlink()
    (wa.fake / "acc1" / "connect_error").unlink()
    wa.wait_state("acc1", "connected", timeout=60)


def test_accounts_list_and_remove(wa: WhatsAppEnv) -> None:
    wa.start()
    wa.pair("acc1")
    wa.pair("acc2", phone="15557654321")
    proc = wa.cli("accounts", "list")
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert re.search(r"acc1\s+connected\s+\+15551234567\s+\d+s ago\s+Connected", out), out
    assert re.search(r"acc2\s+connected\s+\+15557654321", out), out
    # without a terminal and without --yes, nothing is removed
    proc = wa.cli("accounts", "remove", "acc1")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1 and "--yes" in err
    assert (wa.env.sessions / "acc1").exists()
    proc = wa.cli("accounts", "remove", "acc1", "--yes")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "logged out on WhatsApp's servers" in out
    assert "logout" in calls(wa.fake, "acc1")
    assert not (wa.env.sessions / "acc1").exists()
    head = wa.store().read_head("acc1")
    assert head is not None and head.state == "removed"
    assert wa.store().list_generations("acc1") == []
    assert wa.store().list_pieces("acc1") == set()
    assert "acc1" not in wa.accounts() and "acc2" in wa.accounts()
    time.sleep(1.5)  # records are coalesced for a second: nothing older may land after this one
    record = wa.store().read_account("acc1")
    assert record is not None and record["status"] == "removed"
    # a restart does not bring it back either
    assert wa.daemon is not None
    assert wa.daemon.stop() == 0
    wa.start()
    assert "acc1" not in wa.accounts()
    assert not (wa.env.sessions / "acc1").exists()


def test_sigterm_stops_the_clients_then_backs_up_their_last_changes(
    wa: WhatsAppEnv, tmp_path: Path
) -> None:
    wa.env.write_config(whatsapp={"health_check_seconds": 0.5}, debounce_seconds=30)
    wa.start()
    wa.pair("acc1")
    before = wa.store().read_head("acc1")
    message = pb.Message(
        Info=pb.MessageInfo(
            MessageSource=pb.MessageSource(Chat=pb.JID(User="15550001111", Server="s.whatsapp.net"))
        )
    )
    wa.send("acc1", message)
    wait_until(lambda: "event Message" in calls(wa.fake, "acc1"))
    assert wa.daemon is not None
    started = time.monotonic()
    assert wa.daemon.stop() == 0
    assert time.monotonic() - started < 10
    log = calls(wa.fake, "acc1")
    assert log[-2:] == ["stop", "stopped"]
    head = wa.store().read_head("acc1")
    assert head is not None and before is not None and head.generation > before.generation
    dest = tmp_path / "final"
    Restorer(wa.env.layout(), wa.env.replica()).restore_to("acc1", dest)
    conn = sqlite3.connect(dest / "session.db")
    assert conn.execute("SELECT their_id FROM whatsmeow_sessions").fetchall() == [("15550001111",)]
    conn.close()


def test_a_redeploy_reconnects_every_account_without_a_qr_code(wa: WhatsAppEnv) -> None:
    wa.start()
    wa.pair("acc1")
    wa.pair("acc2", phone="15557654321")
    assert wa.daemon is not None
    assert wa.daemon.stop() == 0
    shutil.rmtree(wa.env.sessions)  # the disk is lost
    connects = {a: calls(wa.fake, a).count("connect") for a in ("acc1", "acc2")}
    wa.start()
    for account in ("acc1", "acc2"):
        wa.wait_state(account, "connected")
        assert calls(wa.fake, account).count("connect") == connects[account] + 1
    assert devices(wa.session_db("acc2")) == ["15557654321:7@s.whatsapp.net"]
    assert "needs qr" not in wa.daemon.log()
    # the restore happened before the clients started
    log = wa.daemon.log()
    assert log.index("acc1: restored") < log.index("whatsapp: supervising")


@pytest.mark.slow
def test_firestore_gets_the_status_changes_and_the_logout_mark(
    wa: WhatsAppEnv, firestore_emulator: Emulator
) -> None:
    env = wa.env
    env.config.write_text(
        "\n".join(
            [
                f"sessions_path: {env.sessions}",
                f"socket_path: {env.socket}",
                f"encryption: {{key_file: {env.key}}}",
                "backup: {target: firestore, debounce_seconds: 0.2}",
                f"firestore: {{project: {firestore_emulator.project}}}",
                "whatsapp: {enabled: true, retry_after_logout: false, health_check_seconds: 1}",
            ]
        )
        + "\n"
    )
    store = FirestoreStore(firestore_emulator.project)
    wa.start()
    wa.pair("acc1")
    wait_until(lambda: (store.read_account("acc1") or {}).get("status") == "connected")
    record = store.read_account("acc1")
    assert record is not None
    assert record["phone"] == "15551234567" and record["lastConnectedAt"] and record["host"]
    wa.send("acc1", pb.LoggedOut(OnConnect=False, Reason=pb.ConnectFailureReason.LOGGED_OUT))
    wa.wait_state("acc1", "needs_qr")
    wait_until(lambda: (store.read_account("acc1") or {}).get("status") == "needs_qr")
    head = store.read_head("acc1")
    assert head is not None and head.state == "logged_out"
    assert store.list_generations("acc1")  # kept


def test_disconnects_are_tracked_and_an_outdated_client_is_retried(wa: WhatsAppEnv) -> None:
    wa.start()
    wa.pair("acc1")
    wa.send("acc1", pb.Disconnected(status=True))
    wa.wait_state("acc1", "disconnected")
    wa.send("acc1", pb.Connected(status=True))  # the library reconnected by itself
    wa.wait_state("acc1", "connected")
    wa.send("acc1", pb.KeepAliveTimeout(ErrorCount=3, LastSuccess=0))
    wa.wait_state("acc1", "disconnected")
    assert "keep-alive timeout (3 errors)" in wa.accounts()["acc1"]["whatsapp"]["detail"]
    wa.send("acc1", pb.KeepAliveRestored())
    wa.wait_state("acc1", "connected")
    connects = calls(wa.fake, "acc1").count("connect")
    wa.send("acc1", pb.ClientOutdated())
    # stopped, then connected again after a backoff (the library would not reconnect)
    wait_until(lambda: calls(wa.fake, "acc1").count("connect") > connects, timeout=20)
    wa.wait_state("acc1", "connected")
    assert wa.daemon is not None
    assert "client version is outdated" in wa.daemon.log()
