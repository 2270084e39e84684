"""sd_notify(3): READY, STATUS, WATCHDOG, RELOADING and STOPPING for systemd.

Active only when $NOTIFY_SOCKET is set; otherwise every call does nothing.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping

from sdnotify import SystemdNotifier

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.enabled = bool(env.get("NOTIFY_SOCKET"))
        self._notifier = SystemdNotifier() if self.enabled else None
        self.watchdog_interval = _watchdog_interval(env)
        self._last_status = ""

    def _send(self, message: str) -> None:
        if self._notifier is not None:
            # systemd reads UTF-8; sdnotify encodes str as Latin-1 (and silently drops what
            # Latin-1 cannot encode), so hand it the UTF-8 bytes spelled as Latin-1.
            self._notifier.notify(message.encode("utf-8").decode("latin-1"))

    def ready(self, status: str | None = None) -> None:
        self._send("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def status(self, text: str) -> None:
        if text != self._last_status:
            self._last_status = text
            self._send(f"STATUS={text}")

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        self._send("STOPPING=1")


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Seconds between pings (half of WATCHDOG_USEC), or None when no watchdog is asked for."""
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None  # meant for another process
    try:
        value = int(usec)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not a number", usec)
        return None
    return value / 2 / 1_000_000 if value > 0 else None
