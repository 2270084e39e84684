"""The real WhatsApp client: neonize's asyncio client (whatsmeow inside), one per account.

Facts this module relies on (measured, see the neonize notes in the repository history):
- `import neonize` calls logging.basicConfig(INFO) and Go logs everything unless the logger
  `neonize.utils.log` has a level when connect() runs: `load_neonize()` sets the level first and
  removes the handler neonize adds, so Go's lines reach the daemon's log through the loggers
  `whatsmeow.Client` and `Whatsmeow.Database`.
- Events are dispatched with run_coroutine_threadsafe onto one global loop, captured by the first
  connect(); this module points it at the running loop explicitly.
- Each connect() opens a database handle that is never closed (one descriptor each): retries must
  be few, which the account runner ensures.
- One NewAClient object per account for the life of the daemon: its finalizer stops the Go client
  by uuid, so a discarded second object would stop the live one.
- neonize 0.5.2 says it needs Python 3.10, but four of its modules import `typing.Self`, which
  Python has since 3.11: on 3.10 (Ubuntu 22.04) `import neonize` fails. `neonize_on_python310()`
  lends `typing` the identical `typing_extensions.Self` first (it is only used in annotations).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
import typing
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from wadaemon.errors import WadaemonError
from wadaemon.whatsapp.client import ConnectError, EventSink, SendFailed, Sent, classify_send_error

log = logging.getLogger(__name__)

GO_LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
STOP_TIMEOUT_S = 10.0

# neonize event classes the supervisor reacts to (names in neonize.proto.Neonize_pb2)
EVENT_NAMES = (
    "PairStatus",
    "Connected",
    "KeepAliveTimeout",
    "KeepAliveRestored",
    "LoggedOut",
    "StreamReplaced",
    "TemporaryBan",
    "ConnectFailure",
    "ClientOutdated",
    "StreamError",
    "Disconnected",
    "Message",
    "Receipt",
    "HistorySync",
)


def neonize_on_python310() -> None:
    """Make `from typing import Self` (in neonize's modules) work on Python 3.10."""
    if sys.version_info < (3, 11) and not hasattr(typing, "Self"):
        import typing_extensions

        typing.Self = typing_extensions.Self  # type: ignore[attr-defined]


def load_neonize(go_log_level: str) -> Any:
    """Import neonize with the daemon's logging kept intact; returns the aioze client module."""
    neonize_on_python310()
    go_logger = logging.getLogger("neonize.utils.log")
    go_logger.setLevel(GO_LOG_LEVELS.get(go_log_level, logging.ERROR))
    # "ffmpeg not found: media operations will fail": the daemon handles no media
    logging.getLogger("neonize.utils.ffmpeg").setLevel(logging.ERROR)
    root = logging.getLogger()
    before = list(root.handlers)
    import neonize.aioze.client as aioze

    for handler in list(root.handlers):
        if handler not in before:
            root.removeHandler(handler)  # basicConfig's, when the root had none yet
    if root.level == logging.INFO and not before:
        root.setLevel(logging.WARNING)
    return aioze


# The Go library keeps its clients in plain maps that Neonize() and Stop() write and every other
# call reads, from whichever thread calls; a write concurrent with any access is a fatal Go error
# that kills the process. Starts and stops take this lock alone (a client's start holds it until
# the Go side has registered the client, or gave up); other calls share it, so that a send
# waiting up to 75 s for the server's acknowledgement holds up no other account's send.


class _SharedLock:
    def __init__(self) -> None:
        self._readers = 0
        self._cond = asyncio.Condition()
        self._writer = False

    @contextlib.asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._writer)
            self._readers += 1
        try:
            yield
        finally:
            async with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextlib.asynccontextmanager
    async def alone(self) -> AsyncIterator[None]:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._writer and self._readers == 0)
            self._writer = True
        try:
            yield
        finally:
            async with self._cond:
                self._writer = False
                self._cond.notify_all()


_GO_LOCK = _SharedLock()
START_WAIT_S = 60.0  # a dial that hangs ends with the Go side's own timeout well before


class NeonizeClient:
    """WhatsAppClient over neonize's NewAClient; the database is `<account>/session.db`."""

    def __init__(self, account: str, db_path: Path, sink: EventSink) -> None:
        import neonize.aioze.client as aioze
        from neonize.aioze import events as ev_module
        from neonize.proto import Neonize_pb2

        self.account = account
        self._sink = sink
        self._events_module = ev_module
        self._client = aioze.NewAClient(str(db_path), uuid=account)
        # NewAClient stops the Go client by uuid when it is garbage-collected, from whichever
        # thread collects it and without this module's lock; this class stops it itself
        self._client._stop_finalizer.detach()
        self._task: asyncio.Task[Any] | None = None
        self._stopping = False
        self._qr_seen = False
        for name in EVENT_NAMES:
            self._client.event(getattr(Neonize_pb2, name))(self._forward)
        self._client.event.qr(self._qr)
        self._qr_type = Neonize_pb2.QR

    async def _forward(self, _client: Any, event: Any) -> None:
        self._sink(event)

    async def _qr(self, _client: Any, data: bytes) -> None:
        self._qr_seen = True
        code = data.decode() if isinstance(data, bytes) else str(data)
        self._sink(self._qr_type(Codes=[code]))

    @property
    def _running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def run(self) -> None:
        from neonize.exc import NeonizeError

        self._stopping = False
        self._qr_seen = False
        async with _GO_LOCK.alone():
            # events are dispatched onto this module-global loop, which the first connect() in
            # a process captures; point it at the running loop
            self._events_module.event_global_loop = asyncio.get_running_loop()
            self._client.me = None
            task: asyncio.Task[Any] = await self._client.connect()
            self._task = task
            deadline = time.monotonic() + START_WAIT_S
            while not (task.done() or self._client.me is not None or self._qr_seen):
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
        try:
            await task
        except NeonizeError as exc:
            if self._stopping:
                return
            raise ConnectError(str(exc) or type(exc).__name__) from None

    async def stop(self) -> None:
        self._stopping = True
        task = self._task
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while task is not None and not task.done() and time.monotonic() < deadline:
            async with _GO_LOCK.alone():
                await self._client.stop()
            # a Stop() that ran before the Go side registered the client is lost: repeat it
            await asyncio.wait({task}, timeout=1.0)
        if task is not None and not task.done():
            log.warning(
                "%s: the WhatsApp client did not stop within %.0f s", self.account, STOP_TIMEOUT_S
            )

    # The Go functions below dereference the client registered under this uuid without a
    # check: called while no connect() runs, they would crash the whole process.

    def _require_running(self, what: str) -> None:
        if not self._running:
            raise ConnectError(f"{self.account}: cannot {what}: the client is not running")

    async def pair_phone(self, phone: str) -> str:
        self._require_running("request a pairing code")
        async with _GO_LOCK.shared():
            code: str = await self._client.PairPhone(phone, show_push_notification=True)
        return code

    async def logout(self) -> None:
        self._require_running("log out")
        async with _GO_LOCK.alone():
            await self._client.logout()

    async def send_text(self, to: str, text: str, reply_to: str = "") -> Sent:
        from neonize.exc import IsOnWhatsAppError, SendMessageError
        from neonize.proto.waE2E.WAWebProtobufsE2E_pb2 import (
            ContextInfo,
            ExtendedTextMessage,
        )
        from neonize.proto.waE2E.WAWebProtobufsE2E_pb2 import Message as E2EMessage
        from neonize.utils.jid import build_jid

        if not self._running:
            raise SendFailed("the WhatsApp client is not running", "transient")
        try:
            if "@" in to:
                user, _, server = to.partition("@")
                target = build_jid(user, server)
            else:
                async with _GO_LOCK.shared():
                    answers = await self._client.is_on_whatsapp(to)
                if not answers or not answers[0].IsIn:
                    raise SendFailed(f"{to} is not on WhatsApp", "permanent")
                target = answers[0].JID
            chat = f"{target.User}@{target.Server}"
            context = ContextInfo(stanzaID=reply_to, participant=chat) if reply_to else None
            message = E2EMessage(
                extendedTextMessage=ExtendedTextMessage(text=text, contextInfo=context)
            )
            async with _GO_LOCK.shared():
                response = await self._client.send_message(target, message)
        except (SendMessageError, IsOnWhatsAppError) as exc:
            raise classify_send_error(str(exc)) from None
        return Sent(response.ID, float(response.Timestamp), chat)

    async def download(self, message: Any) -> bytes:
        from neonize.exc import DownloadError

        self._require_running("download media")
        try:
            async with _GO_LOCK.shared():
                data = await self._client.download_any(message)
        except DownloadError as exc:
            raise WadaemonError(f"{self.account}: cannot download the media: {exc}") from None
        return bytes(data or b"")

    async def is_connected(self) -> bool:
        if not self._running:
            return False
        async with _GO_LOCK.shared():
            return bool(await self._client.is_connected)
