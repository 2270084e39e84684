"""A WhatsApp client for tests, behind the same boundary as the real NeonizeClient.

WhatsApp's servers cannot be reached from a test machine, so this client plays their part. The
daemon loads it with WADAEMON_WHATSAPP_CLIENT=fake_whatsapp:FakeClient; a test drives it through
files under $FAKE_WHATSAPP_DIR/<account>/:

    inbox/NNN-<Event>.pb   a serialized neonize event (neonize.proto.Neonize_pb2.<Event>) to
                           deliver; whatsmeow's side effects on the database are applied as the
                           real library would (PairStatus SUCCESS stores the device, LoggedOut
                           deletes it, Message changes session keys)
    connect_error          if present, run() fails with its text (a refused connect)
    logout_on_connect      if present, the server answers a connect with LoggedOut (a real
                           logout, seen by a client that connects with a dead session)
    calls.log              what the daemon asked: connect, stop, stopped, logout, pair_phone N
    ../unreachable         if present, the servers cannot be reached at all (the probe says so)

It writes the real `session.db` (SQLite, the whatsmeow table names) as the client would.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from neonize.proto import Neonize_pb2 as pb

from wadaemon.whatsapp.client import ConnectError, EventSink

FAKE_DIR_ENV = "FAKE_WHATSAPP_DIR"
POLL_S = 0.05
QR_EVERY_S = 1.0
LOGOUT_EVENT_DELAY_S = 1.0

_seq = itertools.count()


def complete(message: Any) -> Any:
    """Give every required field that is still unset its zero value, as the Go side always sends
    them (neonize's messages are proto2, with required fields)."""
    for field in message.DESCRIPTOR.fields:
        if not field.is_required:
            continue
        if field.message_type is not None:
            complete(getattr(message, field.name))
            getattr(message, field.name).SetInParent()
        elif not message.HasField(field.name):
            if field.enum_type is not None:
                value: Any = field.enum_type.values[0].number
            elif field.type == field.TYPE_STRING:
                value = ""
            elif field.type == field.TYPE_BYTES:
                value = b""
            elif field.type == field.TYPE_BOOL:
                value = False
            else:
                value = 0
            setattr(message, field.name, value)
    return message


def send_event(fake_dir: Path, account: str, event: Any) -> None:
    """Deliver a neonize event to the account's fake client (from the test process)."""
    complete(event)
    inbox = fake_dir / account / "inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    name = f"{time.monotonic_ns():020d}-{next(_seq):04d}-{type(event).__name__}"
    tmp = inbox / f".{name}.tmp"
    tmp.write_bytes(event.SerializeToString())
    tmp.rename(inbox / f"{name}.pb")


def calls(fake_dir: Path, account: str) -> list[str]:
    path = fake_dir / account / "calls.log"
    return path.read_text().splitlines() if path.exists() else []


def paired_event(phone: str) -> Any:
    return pb.PairStatus(
        ID=pb.JID(User=phone, Server="s.whatsapp.net", Device=7), Status=pb.PairStatus.SUCCESS
    )


class FakeClient:
    def __init__(self, account: str, db_path: Path, sink: EventSink) -> None:
        self.account = account
        self.db_path = db_path
        self.sink = sink
        self.dir = Path(os.environ[FAKE_DIR_ENV]) / account
        self.inbox = self.dir / "inbox"
        self.inbox.mkdir(parents=True, exist_ok=True)
        self._stop = asyncio.Event()
        self._connected = False
        self._db: sqlite3.Connection | None = None
        self._qr_task: asyncio.Task[None] | None = None

    def _log(self, what: str) -> None:
        with open(self.dir / "calls.log", "a") as fh:
            fh.write(what + "\n")

    # --- the database, as whatsmeow would write it --------------------------------------------

    def _open(self) -> sqlite3.Connection:
        if self._db is None:
            self._db = sqlite3.connect(self.db_path, timeout=10, isolation_level=None)
            self._db.executescript(
                "CREATE TABLE IF NOT EXISTS whatsmeow_device (jid TEXT PRIMARY KEY, "
                "push_name TEXT, noise_key BLOB);"
                "CREATE TABLE IF NOT EXISTS whatsmeow_sessions (their_id TEXT PRIMARY KEY, "
                "session BLOB);"
            )
        return self._db

    def _device(self) -> str | None:
        row = self._open().execute("SELECT jid FROM whatsmeow_device").fetchone()
        return str(row[0]) if row else None

    def _apply(self, event: Any) -> None:
        db = self._open()
        name = type(event).__name__
        if name == "PairStatus" and event.Status == pb.PairStatus.SUCCESS:
            jid = f"{event.ID.User}:{event.ID.Device}@{event.ID.Server}"
            db.execute(
                "INSERT OR REPLACE INTO whatsmeow_device VALUES (?, ?, ?)",
                (jid, "Fake Phone", os.urandom(32)),
            )
        elif name == "Message":
            chat = event.Info.MessageSource.Chat.User or "someone"
            db.execute(
                "INSERT OR REPLACE INTO whatsmeow_sessions VALUES (?, ?)", (chat, os.urandom(200))
            )

    # --- WhatsAppClient ------------------------------------------------------------------------

    async def run(self) -> None:
        self._log("connect")
        error = self.dir / "connect_error"
        if error.exists():
            raise ConnectError(error.read_text().strip() or "refused")
        self._stop = asyncio.Event()
        tasks = [asyncio.create_task(self._deliver())]
        self._qr_task = None
        if self._device() is None:
            self._qr_task = asyncio.create_task(self._show_qr_codes())
            tasks.append(self._qr_task)
        else:
            tasks.append(asyncio.create_task(self._connect_soon()))
        try:
            await self._stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            self._connected = False
            if self._db is not None:
                self._db.close()
                self._db = None
            self._log("stopped")

    async def _connect_soon(self) -> None:
        await asyncio.sleep(0.1)
        if (self.dir / "logout_on_connect").exists():
            self._log("event LoggedOut")
            self.sink(
                complete(pb.LoggedOut(OnConnect=True, Reason=pb.ConnectFailureReason.LOGGED_OUT))
            )
            self._open().execute("DELETE FROM whatsmeow_device")
            return
        self._connected = True
        self.sink(pb.Connected(status=True))

    async def _show_qr_codes(self) -> None:
        for n in itertools.count(1):
            self.sink(pb.QR(Codes=[f"2@fake-{self.account}-{n}"]))
            await asyncio.sleep(QR_EVERY_S)

    async def _deliver(self) -> None:
        while True:
            for path in sorted(self.inbox.glob("*.pb")):
                kind = path.stem.rsplit("-", 1)[1]
                event = getattr(pb, kind).FromString(path.read_bytes())
                path.unlink()
                self._log(f"event {kind}")
                self._apply(event)
                if kind == "PairStatus" and self._qr_task is not None:
                    self._qr_task.cancel()  # paired: whatsmeow closes the QR channel
                if kind == "LoggedOut":
                    # whatsmeow sends the event off to a goroutine and deletes the device from
                    # the store at once; through neonize's event channel and the Python callback
                    # the event reaches the daemon later, after the change on disk
                    self._connected = False
                    self._open().execute("DELETE FROM whatsmeow_device")
                    await asyncio.sleep(LOGOUT_EVENT_DELAY_S)
                self.sink(event)
                if kind == "PairStatus" and event.Status == pb.PairStatus.SUCCESS:
                    self.sink(pb.Connected(status=True))
                    self._connected = True
            await asyncio.sleep(POLL_S)

    @staticmethod
    async def reachable() -> str | None:
        flag = Path(os.environ[FAKE_DIR_ENV]) / "unreachable"
        return f"cannot reach the fake servers: {flag.read_text()}" if flag.exists() else None

    async def stop(self) -> None:
        self._log("stop")
        self._stop.set()

    async def pair_phone(self, phone: str) -> str:
        self._log(f"pair_phone {phone}")
        return "FAKE-C0DE"

    async def logout(self) -> None:
        self._log("logout")
        with contextlib.suppress(sqlite3.Error):
            self._open().execute("DELETE FROM whatsmeow_device")

    async def is_connected(self) -> bool:
        return self._connected
