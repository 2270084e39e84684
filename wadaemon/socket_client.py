"""A small HTTP client for the daemon's UNIX socket (http.client from the standard library)."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from wadaemon.errors import WadaemonError

EXIT_NOT_RUNNING = 3  # as LSB `status` uses for "program is not running"


class NotRunning(WadaemonError):
    exit_code = EXIT_NOT_RUNNING


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(str(self._path))
        self.sock = sock


def _connect_error(path: Path, exc: OSError, hint: str) -> WadaemonError:
    if isinstance(exc, (FileNotFoundError, ConnectionRefusedError)):
        message = f"the daemon is not running (nothing listens on {path})"
        return NotRunning(f"{message}; {hint}" if hint else message)
    if isinstance(exc, PermissionError):
        return WadaemonError(
            f"{path}: permission denied; run as root or as a member of the daemon's group"
        )
    return WadaemonError(f"{path}: no valid answer from the daemon: {exc}")


def stream(
    path: Path,
    method: str,
    url: str,
    timeout: float,
    hint: str = "",
    accepted: Callable[[], object] | None = None,
) -> Iterator[dict[str, Any]]:
    """JSON lines from a streaming endpoint, as they come. An error answer raises WadaemonError
    with the daemon's message; `hint` (how to start the daemon) follows "not running".
    `accepted` is called once the daemon has answered 200, before the first line."""
    conn = _UnixConnection(path, timeout)
    try:
        try:
            conn.request(method, url)
            response = conn.getresponse()
        except OSError as exc:
            raise _connect_error(path, exc, hint) from None
        if response.status != 200:
            body = response.read().decode("utf-8", "replace")
            try:
                message = json.loads(body).get("error", body)
            except ValueError:
                message = body
            raise WadaemonError(str(message).strip())
        if accepted is not None:
            accepted()
        while True:
            try:
                line = response.readline()
            except (OSError, http.client.HTTPException) as exc:
                raise WadaemonError(f"{path}: the daemon stopped answering: {exc}") from None
            if not line:
                return
            if line.strip():
                yield json.loads(line)
    finally:
        conn.close()


def request(
    path: Path,
    method: str,
    url: str,
    timeout: float = 30.0,
    hint: str = "",
    body: Any = None,
) -> tuple[int, Any]:
    """(HTTP status, decoded JSON or text) from the daemon; NotRunning if nobody answers, with
    `hint` (how to start the daemon: the command knows, from its configuration). `body`, if
    given, is sent as JSON."""
    conn = _UnixConnection(path, timeout)
    try:
        if body is None:
            conn.request(method, url)
        else:
            data = json.dumps(body).encode()
            conn.request(method, url, data, {"Content-Type": "application/json"})
        response = conn.getresponse()
        body = response.read().decode("utf-8", "replace")
    except (FileNotFoundError, ConnectionRefusedError, PermissionError) as exc:
        raise _connect_error(path, exc, hint) from None
    except (OSError, http.client.HTTPException) as exc:
        raise WadaemonError(f"{path}: no valid answer from the daemon: {exc}") from None
    finally:
        conn.close()
    if response.getheader("Content-Type", "").startswith("application/json"):
        return response.status, json.loads(body)
    return response.status, body
