"""Health, metrics and control over HTTP/1.1 on a UNIX socket (aiohttp).

    GET  /health                   anyone who can open the socket (mode 0660)
    GET  /metrics                  anyone who can open the socket
    GET  /accounts                 root, the daemon's user, members of the daemon's group
    POST /accounts/{id}/backup     same
    POST /accounts/{id}/verify     same
    POST /accounts/{id}/pair       same; ?phone=NUMBER for a pairing code instead of QR codes.
                                   Streams JSON lines: {"event": "connecting"} when the client
                                   starts, {"event": "qr", "code": ...} as codes rotate,
                                   {"event": "code", ...}, {"event": "linked", "phone": ...}
                                   when the phone accepted (the backup runs), then "paired" or
                                   "failed".
    DELETE /accounts/{id}          same; logs out, deletes the backups and the local session
    messages, the outbox, the event stream: see message_routes
The socket file is created under a temporary name, given mode 0660, then renamed into place, so
it is never reachable with looser permissions. A stale socket left by a crash is replaced; a live
one (another daemon) is not.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

from wadaemon.errors import WadaemonError
from wadaemon.layout import InvalidAccountId, validate_account_id
from wadaemon.whatsapp.pairing import Pairing

if TYPE_CHECKING:
    from wadaemon.messaging import Messaging

log = logging.getLogger(__name__)

SOCKET_MODE = 0o660
MAX_HEADER_BYTES = 8190
KEEPALIVE_S = 5.0


class ControlApi(Protocol):
    def health(self) -> tuple[int, dict[str, Any]]: ...

    def metrics_text(self) -> bytes: ...

    def accounts(self) -> list[dict[str, Any]]: ...

    async def backup_now(self, account: str) -> dict[str, Any]: ...

    async def verify(self, account: str) -> dict[str, Any]: ...

    async def inject_fault(self, part: str, seconds: float) -> dict[str, Any]: ...

    async def pair(self, account: str, phone: str | None) -> Pairing: ...

    async def remove(self, account: str) -> dict[str, Any]: ...

    async def resolve(self, account: str, keep: str) -> dict[str, Any]: ...

    async def move(self, account: str, to: str) -> dict[str, Any]: ...

    @property
    def messaging(self) -> Messaging | None: ...


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _BadRequestsAtDebug(logging.Filter):
    """aiohttp logs a malformed request as an ERROR with a traceback; a client that sends
    garbage must not be able to fill the journal, so such lines become one DEBUG line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        reason = record.exc_info[1] if record.exc_info else None
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        record.msg, record.args = "control socket: bad request: %s", (reason,)
        record.exc_info = record.exc_text = None
        return log.isEnabledFor(logging.DEBUG)


_http_log = logging.getLogger("wadaemon.http")
_http_log.addFilter(_BadRequestsAtDebug())


SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux 4.13+; Python lacks the name


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int
    groups: frozenset[int]


def peer_of(request: web.Request) -> Peer | None:
    """Who is at the other end of the socket, as the kernel says (SO_PEERCRED and
    SO_PEERGROUPS; /proc/PID/status only where the kernel lacks the latter)."""
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is None:
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    groups = {gid}
    try:
        # 1024 bytes (256 groups) is the most Python's getsockopt accepts; more: /proc
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 1024)
        groups.update(struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4]))
    except OSError:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("Groups:"):
                    groups.update(int(g) for g in line.split()[1:])
    return Peer(pid, uid, gid, frozenset(groups))


def is_privileged(peer: Peer | None) -> bool:
    """Root, the daemon's own user, or a member of the daemon's group."""
    if peer is None:
        return False
    return peer.uid in (0, os.getuid()) or os.getgid() in peer.groups


def _phone(raw: str) -> str:
    """A phone number as WhatsApp's pairing wants it: digits only, with the country code."""
    digits = "".join(c for c in raw if c not in " +-().")
    if not digits.isdigit() or not 7 <= len(digits) <= 15:
        raise ApiError(
            400,
            f"{raw!r} is not a phone number: give the number with its country code, digits "
            "only, e.g. 15551234567",
        )
    return digits


def _number(raw: str, name: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ApiError(400, f"{name} must be a number, not {raw!r}") from None
    if value < 0 or value != value:
        raise ApiError(400, f"{name} must be zero or more")
    return value


def _json(status: int, body: Any) -> web.Response:
    return web.Response(
        status=status, text=json.dumps(body, indent=2) + "\n", content_type="application/json"
    )


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ControlServer:
    def __init__(self, path: Path, api: ControlApi, *, faults: bool = False) -> None:
        self.path = path
        self.api = api
        self.faults = faults
        self._runner: web.AppRunner | None = None
        self._inode: int | None = None

    def _app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors])
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/accounts", self._privileged(self._accounts))
        app.router.add_post("/accounts/{account}/backup", self._privileged(self._backup))
        app.router.add_post("/accounts/{account}/verify", self._privileged(self._verify))
        app.router.add_post("/accounts/{account}/pair", self._privileged(self._pair))
        app.router.add_delete("/accounts/{account}", self._privileged(self._remove))
        app.router.add_post("/accounts/{account}/resolve", self._privileged(self._resolve))
        app.router.add_post("/accounts/{account}/move", self._privileged(self._move))
        from wadaemon.message_routes import MessageRoutes

        MessageRoutes(self.api, self._account).add_to(app.router, self._privileged)
        if self.faults:
            app.router.add_post("/debug/hang/{part}", self._privileged(self._hang))
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as exc:
            return _json(exc.status, {"error": str(exc)})
        except web.HTTPException as exc:
            if exc.status >= 400:
                return _json(exc.status, {"error": exc.reason})
            raise

    def _privileged(self, handler: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            peer = peer_of(request)
            if not is_privileged(peer):
                uid = peer.uid if peer else "unknown"
                log.warning(
                    "control socket: denied %s %s to uid %s", request.method, request.path, uid
                )
                raise ApiError(
                    403,
                    "permission denied: control needs root or membership of the daemon's group "
                    "(add the user to it, e.g. `adduser USER wadaemon`)",
                )
            return await handler(request)

        return guarded

    async def _health(self, request: web.Request) -> web.Response:
        status, body = self.api.health()
        return _json(status, body)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.api.metrics_text(),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )

    async def _accounts(self, request: web.Request) -> web.Response:
        return _json(200, {"accounts": self.api.accounts()})

    @staticmethod
    def _account(request: web.Request) -> str:
        try:
            return validate_account_id(request.match_info["account"])
        except InvalidAccountId as exc:
            raise ApiError(400, str(exc)) from None

    async def _backup(self, request: web.Request) -> web.Response:
        account = self._account(request)
        try:
            return _json(200, await self.api.backup_now(account))
        except WadaemonError as exc:
            raise ApiError(409, str(exc)) from None

    async def _verify(self, request: web.Request) -> web.Response:
        account = self._account(request)
        result = await self.api.verify(account)
        return _json(200 if result.get("ok") else 500, result)

    async def _pair(self, request: web.Request) -> web.StreamResponse:
        account = self._account(request)
        phone = None
        if "phone" in request.query:
            phone = _phone(request.query["phone"])
        try:
            pairing = await self.api.pair(account, phone)
        except WadaemonError as exc:
            raise ApiError(409, str(exc)) from None
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        try:
            async for update in pairing.updates():
                await response.write(json.dumps(update).encode() + b"\n")
            await response.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            pairing.cancel()
            raise
        return response

    async def _remove(self, request: web.Request) -> web.Response:
        account = self._account(request)
        try:
            return _json(200, await self.api.remove(account))
        except WadaemonError as exc:
            raise ApiError(409, str(exc)) from None

    async def _resolve(self, request: web.Request) -> web.Response:
        account = self._account(request)
        keep = request.query.get("keep", "")
        if keep not in ("backup", "local"):
            raise ApiError(400, "say which side to keep: ?keep=backup or ?keep=local")
        try:
            return _json(200, await self.api.resolve(account, keep))
        except WadaemonError as exc:
            raise ApiError(409, str(exc)) from None

    async def _move(self, request: web.Request) -> web.Response:
        account = self._account(request)
        to = request.query.get("to", "")
        try:
            return _json(200, await self.api.move(account, to))
        except WadaemonError as exc:
            raise ApiError(409, str(exc)) from None

    async def _hang(self, request: web.Request) -> web.Response:
        try:
            seconds = float(request.query.get("seconds", "3600"))
        except ValueError:
            raise ApiError(400, "seconds must be a number") from None
        return _json(200, await self.api.inject_fault(request.match_info["part"], seconds))

    # --- socket lifecycle ------------------------------------------------------------------

    def _bind(self) -> socket.socket:
        path = self.path
        try:
            path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        except OSError as exc:
            raise WadaemonError(
                f"{path.parent}: cannot create the socket directory: {exc.strerror}"
            ) from None
        if path.exists() or path.is_symlink():
            if not path.is_socket():
                raise WadaemonError(
                    f"{path} exists and is not a socket; remove it or set another socket_path"
                )
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(path))
            except OSError as exc:
                if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                    raise WadaemonError(
                        f"{path}: cannot check the existing socket: {exc}"
                    ) from None
                log.info("replacing the stale socket %s", path)
            else:
                raise WadaemonError(
                    f"{path} is in use by another running daemon; stop it or set another "
                    "socket_path"
                )
            finally:
                probe.close()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(tmp))
            os.chmod(tmp, SOCKET_MODE)
            os.rename(tmp, path)
            sock.listen(128)
        except OSError as exc:
            sock.close()
            tmp.unlink(missing_ok=True)
            raise WadaemonError(f"{path}: cannot listen on the socket: {exc.strerror}") from None
        sock.setblocking(False)
        self._inode = path.stat().st_ino
        return sock

    async def start(self) -> None:
        sock = self._bind()
        runner = web.AppRunner(
            self._app(),
            handle_signals=False,
            access_log=None,
            logger=_http_log,
            keepalive_timeout=KEEPALIVE_S,
            max_line_size=MAX_HEADER_BYTES,
            max_field_size=MAX_HEADER_BYTES,
        )
        await runner.setup()
        await web.SockSite(runner, sock).start()
        self._runner = runner
        log.info("control socket listening on %s", self.path)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        with contextlib.suppress(OSError):
            if self.path.stat().st_ino == self._inode:
                self.path.unlink()
