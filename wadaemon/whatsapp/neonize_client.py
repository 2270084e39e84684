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
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from wadaemon.whatsapp.client import ConnectError, EventSink

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
)


def load_neonize(go_log_level: str) -> Any:
    """Import neonize with the daemon's logging kept intact; returns the aioze client module."""
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
# call reads, from whichever thread calls; concurrent access is a fatal Go error that kills the
# process. All calls into it go through this lock, and a client's start holds it until the Go
# side has registered the client (its first callback) or gave up.
_GO_LOCK = asyncio.Lock()
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
        async with _GO_LOCK:
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
            async with _GO_LOCK:
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
        async with _GO_LOCK:
            code: str = await self._client.PairPhone(phone, show_push_notification=True)
        return code

    async def logout(self) -> None:
        self._require_running("log out")
        async with _GO_LOCK:
            await self._client.logout()

    async def is_connected(self) -> bool:
        if not self._running:
            return False
        async with _GO_LOCK:
            return bool(await self._client.is_connected)
