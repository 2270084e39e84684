"""Long-lived snapshot worker processes, fed requests over a pipe.

The rule stands: the daemon process never opens a live session database; the worker does, in a
child process (sqlite_worker.py). Starting a fresh interpreter for each backup cost about 40 ms
of CPU (interpreter start and imports), more than the copy itself: so a few workers are started
once and reused, one request at a time each. A worker that dies, answers garbage or outlasts its
timeout is killed and replaced by a new one on the next request; the request fails with
SnapshotError, as a failed one-shot worker did.

The protocol (one request at a time): the daemon writes one JSON line
{"command": ..., "args": [...], "options": {...}}; the worker answers one JSON line, followed by
the raw bytes of each entry of its "payloads" list ({"path": ..., "size": n}), in that order.
Payloads carry database copies made in memory, so no throwaway copy is written to disk.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
import threading
import time
import zlib
from typing import Any

from wadaemon.errors import SnapshotError, UnreadableSession

# workers: a delta capture takes a millisecond or two of a worker, and each idle worker holds
# about 16 MiB; backups waiting for one wait in their thread
SLOTS = 2
HEADER_MAX = 64 * 2**20  # a JSON answer larger than this is garbage


class _Worker:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "wadaemon.sqlite_worker", "serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,  # a crash's traceback goes where the daemon's own errors go
            close_fds=True,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin = self.proc.stdin
        self.fd = self.proc.stdout.fileno()
        self.buffer = bytearray()

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.kill()
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            self.proc.wait(5)
        for pipe in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                if pipe is not None:
                    pipe.close()

    def _fill(self, deadline: float, what: str) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        ready, _, _ = select.select([self.fd], [], [], remaining)
        if not ready:
            raise TimeoutError
        chunk = os.read(self.fd, 1 << 20)
        if not chunk:
            code = self.proc.poll()
            status = f"exit status {code}" if code is not None else "closed its output"
            raise EOFError(f"the snapshot worker ended ({status}) while sending {what}")
        self.buffer += chunk

    def _line(self, deadline: float) -> bytes:
        while True:
            end = self.buffer.find(b"\n")
            if end >= 0:
                line = bytes(self.buffer[:end])
                del self.buffer[: end + 1]
                return line
            if len(self.buffer) > HEADER_MAX:
                raise ValueError("the snapshot worker's answer has no end")
            self._fill(deadline, "its answer")

    def _exactly(self, n: int, deadline: float) -> bytes:
        while len(self.buffer) < n:
            self._fill(deadline, "a copy")
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data

    def request(
        self, command: str, args: list[str], options: dict[str, Any], timeout: float
    ) -> tuple[dict[str, Any], dict[str, bytes]]:
        deadline = time.monotonic() + timeout
        line = json.dumps({"command": command, "args": args, "options": options}) + "\n"
        self.stdin.write(line.encode())
        self.stdin.flush()
        out: dict[str, Any] = json.loads(self._line(deadline))
        payloads: dict[str, bytes] = {}
        for item in out.pop("payloads", ()):
            payloads[str(item["path"])] = self._exactly(int(item["size"]), deadline)
        return out, payloads


class WorkerPool:
    """Up to SLOTS workers, each serving one request at a time, started when first needed.
    Requests with the same key go to the same worker (it remembers each database's WAL
    position: wal_capture.py)."""

    def __init__(self) -> None:
        self._slots: list[_Slot] = [_Slot() for _ in range(SLOTS)]
        self._pid = os.getpid()

    def _slot(self, key: str) -> _Slot:
        if self._pid != os.getpid():  # a forked child must not share its parent's pipes
            self._slots, self._pid = [_Slot() for _ in range(SLOTS)], os.getpid()
        return self._slots[zlib.crc32(key.encode()) % SLOTS]

    def call(
        self,
        command: str,
        *args: str,
        options: dict[str, Any] | None = None,
        timeout: float,
        key: str | None = None,
    ) -> tuple[dict[str, Any], dict[str, bytes]]:
        """One request (with `key`: to that key's worker); its answer and payloads. Raises
        SnapshotError (UnreadableSession when the daemon's user may not read a file)."""
        # by default the path the request is about: a few accounts start only a few workers
        slot = self._slot(key if key is not None else (args[0] if args else command))
        with slot.lock:
            if slot.worker is None or slot.worker.proc.poll() is not None:
                if slot.worker is not None:
                    slot.worker.kill()
                slot.worker = _Worker()
            worker = slot.worker
            try:
                out, payloads = worker.request(command, list(args), options or {}, timeout)
            except TimeoutError:
                worker.kill()
                slot.worker = None
                raise SnapshotError(
                    f"the snapshot worker took longer than {timeout:.0f} s"
                ) from None
            except (OSError, EOFError, ValueError) as exc:  # ValueError: JSONDecodeError too
                worker.kill()
                slot.worker = None
                raise SnapshotError(f"the snapshot worker failed: {exc}") from None
            except BaseException:
                worker.kill()
                slot.worker = None
                raise
        if out.get("unreadable"):
            raise UnreadableSession(str(out["error"]))
        if "error" in out:
            raise SnapshotError(str(out["error"]))
        return out, payloads


class _Slot:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.worker: _Worker | None = None


POOL = WorkerPool()
