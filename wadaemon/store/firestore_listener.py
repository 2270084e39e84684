"""A Firestore listener that holds up through outages: the lease watch and the outbox use it.

The library's listener has two flaws this class makes up for:
- it reopens its stream at once after every recoverable error, without backoff: with Firestore
  unreachable that loop burned about 40% of a CPU (8 s of CPU in a 20 s outage of the
  emulator). Its stream object can throttle reopening (api_core's own option, which Firestore's
  Watch does not set): at most REOPENS_PER_WINDOW per REOPEN_WINDOW_S;
- on an error it does not count as transient it stops for good, silently: a supervising thread
  checks every CHECK_S and starts a new listener (which delivers every document again, as a
  first snapshot does).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from google.api_core import bidi

log = logging.getLogger(__name__)

CHECK_S = 2.0  # seconds between two checks that the listener still runs
REOPENS_PER_WINDOW, REOPEN_WINDOW_S = 3, 5.0

OnSnapshot = Callable[[Any, Any, Any], None]  # (documents, changes, read time)


class SupervisedListener:
    def __init__(
        self,
        query: Callable[[], Any],
        on_snapshot: OnSnapshot,
        what: str,
        *,
        name: str,
        on_stop: Callable[[SupervisedListener], None] | None = None,
    ) -> None:
        """`query()` gives what to listen to (a collection or a query), again at each restart;
        `what` names it in the log."""
        self._query = query
        self._on_snapshot = on_snapshot
        self.what = what
        self._on_stop = on_stop
        self.restarts = 0
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._watch: Any = None
        self._thread = threading.Thread(target=self._supervise, name=name, daemon=True)

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    def start(self) -> None:
        self._listen()
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        with self._lock:
            watch, self._watch = self._watch, None
        if watch is not None:
            watch.unsubscribe()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(CHECK_S + 5)
        if self._on_stop is not None:
            self._on_stop(self)

    def _listen(self) -> None:
        with self._lock:
            if self._stopped.is_set():
                return
            self._watch = self._query().on_snapshot(self._on_snapshot)
            throttle_reopening(self._watch)

    def _supervise(self) -> None:
        while not self._stopped.wait(CHECK_S):
            with self._lock:
                watch = self._watch
            if watch is None or watch.is_active:
                continue
            self.restarts += 1
            log.warning(
                "the listener on %s stopped; starting a new one (restart %d)",
                self.what,
                self.restarts,
            )
            try:
                watch.unsubscribe()
            except Exception as exc:  # already closed with an error: it says so again
                log.debug("closing the stopped listener: %r", exc)
            try:
                self._listen()
            except Exception:
                log.exception("starting a listener on %s", self.what)


def throttle_reopening(watch: Any) -> None:
    """At most REOPENS_PER_WINDOW reopenings of the listener's stream per window."""
    rpc = getattr(watch, "_rpc", None)
    if rpc is not None and getattr(rpc, "_reopen_throttle", "absent") is None:
        rpc._reopen_throttle = bidi._Throttle(  # type: ignore[no-untyped-call]
            access_limit=REOPENS_PER_WINDOW, time_window=timedelta(seconds=REOPEN_WINDOW_S)
        )
