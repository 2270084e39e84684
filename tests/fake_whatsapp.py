"""A WhatsApp client for tests, behind the same boundary as the real NeonizeClient.

WhatsApp's servers cannot be reached from a test machine, so this client plays their part. The
daemon loads it with WADAEMON_WHATSAPP_CLIENT=fake_whatsapp:FakeClient; a test drives it through
files under $FAKE_WHATSAPP_DIR/<account>/:

    inbox/NNN-<Event>.pb   a serialized neonize event (neonize.proto.Neonize_pb2.<Event>) to
                           deliver; whatsmeow's side effects on the database are applied as the
                           real library would (PairStatus SUCCESS stores the device, LoggedOut
                           deletes it, Message changes session keys). The file is removed once
                           the event callback returned: the server's copy is acknowledged after
                           the daemon's handler, so a test can tell the daemon's own window
                           (handler to durable) from the library's (whatsmeow acknowledges
                           before the handler runs, which no test here can reproduce)
    send_script            outcomes of the next sends, one per line, consumed in order: ok,
                           transient, permanent, ambiguous (it reached WhatsApp but the
                           acknowledgement timed out), hang SECONDS (then ok); none left: ok
    sent.log               one JSON line per message that reached WhatsApp
    connect_error          if present, run() fails with its text (a refused connect)
    logout_on_connect      if present, the server answers a connect with LoggedOut (a real
                           logout, seen by a client that connects with a dead session)
    calls.log              what the daemon asked: connect, stop, stopped, logout, pair_phone N
    ../unreachable         if present, the servers cannot be reached at all (the probe says so)

It writes the real `session.db` (SQLite, the whatsmeow table names) as the client would.

With $FAKE_WHATSAPP_SERVER set (the socket of a fake_server.FakeServer), a paired client also
holds a connection to that server, as instance $FAKE_WHATSAPP_INSTANCE (default: the host name):
run() connects and says hello before it reports Connected (a client that is not paired yet does
so once the pairing succeeds), and fails with ConnectError if the server cannot be reached. A
message the server pushes has the side effects of an inbox Message and is delivered as one. When
the server says the stream was replaced, or closes the connection, the client reports
StreamReplaced and stays disconnected, without reconnecting, until stop(). stop() and a LoggedOut
leave the server (the server records the connection as "closed").

Run as a script (`python fake_whatsapp.py ACCOUNT DB`), it is one client outside any daemon
(another host's, in tests): it prints the name of each event it reports; SIGTERM stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any

from neonize.proto import Neonize_pb2 as pb

from wadaemon.errors import WadaemonError
from wadaemon.whatsapp.client import ConnectError, EventSink, SendFailed, Sent

FAKE_DIR_ENV = "FAKE_WHATSAPP_DIR"
SERVER_ENV = "FAKE_WHATSAPP_SERVER"
INSTANCE_ENV = "FAKE_WHATSAPP_INSTANCE"
SERVER_TIMEOUT_S = 10.0
LEAVE_TIMEOUT_S = 2.0
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
        self.server_path = os.environ.get(SERVER_ENV) or None
        self.instance = os.environ.get(INSTANCE_ENV) or socket.gethostname()
        self._link: asyncio.StreamWriter | None = None  # the live connection to the server
        self._listener: asyncio.Task[None] | None = None
        self._leaving = False

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

    # --- the fake server ($FAKE_WHATSAPP_SERVER) -----------------------------------------------

    async def _join_server(self) -> None:
        """Connect to the server and say hello; ConnectError if it cannot be done."""
        assert self.server_path is not None
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(self.server_path), SERVER_TIMEOUT_S
            )
        except (OSError, asyncio.TimeoutError) as exc:
            raise ConnectError(f"cannot reach the fake server: {exc!r}") from None
        try:
            hello = {"hello": {"account": self.account, "instance": self.instance}}
            writer.write(json.dumps(hello).encode() + b"\n")
            line = await asyncio.wait_for(reader.readline(), SERVER_TIMEOUT_S)
            if json.loads(line or b"null") != {"event": "connected"}:
                raise ValueError(f"answered {line!r}")
        except (OSError, ValueError, asyncio.TimeoutError) as exc:
            writer.close()
            raise ConnectError(f"the fake server refused the hello: {exc!r}") from None
        self._log(f"server connected as {self.instance}")
        self._link, self._leaving = writer, False
        self._listener = asyncio.create_task(self._listen(reader, writer))

    async def _listen(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                line = await reader.readline()
                message = json.loads(line) if line else None
            except (OSError, ValueError):
                message = None
            if not isinstance(message, dict) or message.get("event") == "replaced":
                break  # replaced, or the server closed the connection
            if message.get("event") == "message":
                event = complete(
                    pb.Message(
                        Info=pb.MessageInfo(
                            MessageSource=pb.MessageSource(
                                Chat=pb.JID(
                                    User=str(message.get("chat") or "someone"),
                                    Server="s.whatsapp.net",
                                )
                            )
                        )
                    )
                )
                self._log("event Message")
                self._apply(event)
                self.sink(event)
        writer.close()
        if self._leaving or self._link is not writer:
            return  # the client itself left
        # whatsmeow reports the replaced stream and does not reconnect
        self._link, self._connected = None, False
        self._log("event StreamReplaced")
        self.sink(complete(pb.StreamReplaced()))

    async def _leave_server(self) -> None:
        """Close the connection: EOF to the server, which closes its side (interval "closed")."""
        writer, self._link = self._link, None
        listener, self._listener = self._listener, None
        if writer is None:
            return
        self._leaving = True
        with contextlib.suppress(OSError, RuntimeError):
            writer.write_eof()
        if listener is not None:
            await asyncio.wait({listener}, timeout=LEAVE_TIMEOUT_S)
            listener.cancel()
        writer.close()
        self._log("server left")

    # --- WhatsAppClient ------------------------------------------------------------------------

    async def run(self) -> None:
        self._log("connect")
        error = self.dir / "connect_error"
        if error.exists():
            raise ConnectError(error.read_text().strip() or "refused")
        self._stop = asyncio.Event()
        paired = self._device() is not None
        if paired and self.server_path and not (self.dir / "logout_on_connect").exists():
            try:
                await self._join_server()
            except ConnectError:
                self._close_db()
                raise
        tasks = [asyncio.create_task(self._deliver())]
        self._qr_task = None
        if not paired:
            self._qr_task = asyncio.create_task(self._show_qr_codes())
            tasks.append(self._qr_task)
        else:
            tasks.append(asyncio.create_task(self._connect_soon()))
        try:
            await self._stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)  # no join left half done
            await self._leave_server()
            self._connected = False
            self._close_db()
            self._log("stopped")

    def _close_db(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    async def _connect_soon(self) -> None:
        await asyncio.sleep(0.1)
        if (self.dir / "logout_on_connect").exists():
            self._log("event LoggedOut")
            self.sink(
                complete(pb.LoggedOut(OnConnect=True, Reason=pb.ConnectFailureReason.LOGGED_OUT))
            )
            self._open().execute("DELETE FROM whatsmeow_device")
            return
        if self.server_path and self._link is None:
            return  # replaced before it got this far
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
                    await self._leave_server()  # the server ends a logged-out session
                    await asyncio.sleep(LOGOUT_EVENT_DELAY_S)
                self.sink(event)
                path.unlink()  # acknowledged
                if kind == "PairStatus" and event.Status == pb.PairStatus.SUCCESS:
                    if self.server_path is not None:
                        try:
                            await self._join_server()  # the new session connects
                        except ConnectError as exc:
                            self._log(f"server connect failed: {exc}")
                            continue
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

    def _next_outcome(self) -> str:
        script = self.dir / "send_script"
        try:
            lines = script.read_text().splitlines()
        except FileNotFoundError:
            return "ok"
        if not lines:
            return "ok"
        tmp = script.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in lines[1:]))
        tmp.rename(script)
        return lines[0].strip()

    async def download(self, message: Any) -> bytes:
        """The media's bytes: its caption (or file name) repeated to its stated size."""
        for field in ("imageMessage", "videoMessage", "audioMessage", "documentMessage"):
            if message.HasField(field):
                media = getattr(message, field)
                seed = (getattr(media, "caption", "") or "media").encode() or b"media"
                return (seed * (media.fileLength // len(seed) + 1))[: media.fileLength]
        raise WadaemonError("no media in this message")

    async def send_text(self, to: str, text: str, reply_to: str = "") -> Sent:
        if not self._connected:
            raise SendFailed("websocket not connected", "transient")
        if "@" not in to and not to.isdigit():
            raise SendFailed(f"invalid phone number {to!r}", "permanent")
        if to.startswith("000"):
            raise SendFailed(f"{to} is not on WhatsApp", "permanent")
        outcome = self._next_outcome()
        if outcome.startswith("hang"):
            await asyncio.sleep(float(outcome.split()[1]))
            outcome = "ok"
        if outcome == "transient":
            raise SendFailed("server returned error 500", "transient")
        if outcome == "permanent":
            raise SendFailed("server returned error 479", "permanent")
        chat = to if "@" in to else f"{to}@s.whatsapp.net"
        sent = Sent(f"3EB0{os.urandom(8).hex().upper()}", time.time(), chat)
        with open(self.dir / "sent.log", "a") as fh:
            fh.write(
                json.dumps(
                    {
                        "to": chat,
                        "text": text,
                        "reply_to": reply_to,
                        "id": sent.id,
                        "at": time.time(),
                    }
                )
            )
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        if outcome == "ambiguous":
            raise SendFailed("context deadline exceeded", "ambiguous")
        return sent


def sent_messages(fake_dir: Path, account: str) -> list[dict[str, Any]]:
    path = fake_dir / account / "sent.log"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv: list[str]) -> int:
    """One client outside any daemon: `fake_whatsapp.py ACCOUNT DB`; prints each event's name."""
    import signal

    account, db = argv

    async def run() -> None:
        loop = asyncio.get_running_loop()
        client = FakeClient(account, Path(db), lambda e: print(type(e).__name__, flush=True))
        loop.add_signal_handler(signal.SIGTERM, lambda: loop.create_task(client.stop()))
        await client.run()

    try:
        asyncio.run(run())
    except ConnectError as exc:
        print(f"ConnectError {exc}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
