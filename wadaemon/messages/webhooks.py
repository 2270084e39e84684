"""Webhooks: every event (a new message, a receipt, an outbox state change) POSTed to one URL.

Events wait in a SQLite queue until the receiver answers 2xx, across restarts and outages: at
least once (receivers deduplicate on X-Wadaemon-Event-Id). X-Wadaemon-Signature is `sha256=` +
hex HMAC-SHA256(secret, f"{timestamp}." + body), timestamp = X-Wadaemon-Timestamp (unix seconds),
so a receiver can also refuse old (replayed) requests: see verify_signature.

One request at a time, oldest event first, but order is best effort: a failed event waits out
its own backoff (full jitter from 1 s, doubling, capped at 300 s; or Retry-After on 429/503) while
later events are still tried, so one event the receiver refuses does not hold back the rest. All
but 2xx fail (4xx too; redirects are not followed); after max_attempts an event is dropped, logged
and counted. Failures in a row (receiver down) also pause the receiver: one request per backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import random
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from wadaemon import __version__
from wadaemon.config import WebhookConfig
from wadaemon.errors import ConfigError
from wadaemon.private_file import _systemd_credential

log = logging.getLogger("wadaemon")

QUEUE_FILE = "webhooks.sqlite"  # under messages.path
SECRET_KEY = "messages.webhook.secret_file"
NEW_SECRET = "`head -c 32 /dev/urandom | xxd -p -c 64 > FILE; chmod 600 FILE`"
_SCHEMA = """CREATE TABLE IF NOT EXISTS events (id TEXT PRIMARY KEY, body TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, next_at REAL NOT NULL, created_at REAL NOT NULL,
    last_error TEXT)"""


def event_body(event: dict[str, Any]) -> bytes:
    """The bytes POSTed (and signed) for an event: compact JSON, sorted keys, UTF-8."""
    return json.dumps(event, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode()


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """The X-Wadaemon-Signature header of a request."""
    return "sha256=" + hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def verify_signature(secret: bytes, timestamp: str, body: bytes, header: str) -> bool:
    """Whether `header` (X-Wadaemon-Signature) signs `body` sent at `timestamp`
    (X-Wadaemon-Timestamp). A receiver should also refuse a timestamp minutes from its clock."""
    expected = sign(secret, timestamp, body).encode()
    return hmac.compare_digest(expected, header.strip().encode("utf-8", "replace"))


@dataclass(frozen=True)
class Pending:
    id: str
    body: str  # the JSON POSTed, as event_body() made it
    attempts: int  # failed so far
    next_at: float  # unix time of the next attempt
    created_at: float
    last_error: str | None


def read_secret(config: WebhookConfig) -> bytes:
    """The webhook's signing key (the file's bytes, stripped); ConfigError if it cannot be used
    (check-config asks this too)."""
    path, key = config.secret_file, SECRET_KEY
    fix = f"create a key with {NEW_SECRET} (and give the receiver the same key)"
    try:
        if path is None:
            raise ConfigError(f"{key} is not set: {fix} and set {key} to FILE.")
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077 and not _systemd_credential(path):
            raise ConfigError(f"{key}: {path} has mode {mode:04o}: run `chmod 600 {path}`.")
        secret = path.read_bytes().strip()
    except FileNotFoundError:
        raise ConfigError(f"{key}: {path} not found; {fix}, or fix the path.") from None
    except OSError as exc:
        why = f"{exc.strerror}; make it a file the daemon's user owns and reads (mode 600)"
        raise ConfigError(f"{key}: cannot read {path}: {why}.") from None
    if not secret:
        raise ConfigError(f"{key}: {path} is empty; {fix}.")
    return secret


class WebhookQueue:
    """The events not delivered yet, in a SQLite file; one lock around the connection, so any
    thread may call it (its writes wait for fsync: call them from a worker thread)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))  # private from birth
        self.path = path
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._conn.executescript(
            "PRAGMA busy_timeout=10000; PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;" + _SCHEMA
        )

    def _sql(self, sql: str, *args: object) -> list[Any]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    def put(self, events: Iterable[dict[str, Any]], now: float | None = None) -> int:
        """Queue the events not queued yet (by id), in one transaction; how many were new."""
        now = time.time() if now is None else now
        rows = []
        for event in events:
            if not isinstance(event.get("id"), str) or not event["id"]:
                raise ValueError(f"a webhook event needs a non-empty string id: {event!r:.200}")
            rows.append((event["id"], event_body(event).decode("utf-8"), now, now))
        with self._lock, self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            sql = "INSERT OR IGNORE INTO events (id, body, next_at, created_at) VALUES (?,?,?,?)"
            return max(0, self._conn.executemany(sql, rows).rowcount)

    def due(self, now: float, limit: int = 100) -> list[Pending]:
        """Events due, oldest first (rowid: insertion order, as the file is never VACUUMed)."""
        sql = "SELECT id, body, attempts, next_at, created_at, last_error FROM events WHERE "
        rows = self._sql(sql + "next_at <= ? ORDER BY rowid LIMIT ?", now, limit)
        return [Pending(*row) for row in rows]

    def next_at(self) -> float | None:
        """When the earliest next attempt is due; None when the queue is empty."""
        value = self._sql("SELECT min(next_at) FROM events")[0][0]
        return None if value is None else float(value)

    def delivered(self, event_id: str) -> None:
        self.drop(event_id)

    def retry_later(self, event_id: str, next_at: float, attempts: int, error: str) -> None:
        sql = "UPDATE events SET next_at = ?, attempts = ?, last_error = ? WHERE id = ?"
        self._sql(sql, next_at, attempts, error, event_id)

    def drop(self, event_id: str) -> None:
        self._sql("DELETE FROM events WHERE id = ?", event_id)

    def backlog(self) -> int:
        return int(self._sql("SELECT count(*) FROM events")[0][0])

    def oldest_age(self, now: float) -> float | None:
        """Seconds since the oldest queued event was queued; None when the queue is empty."""
        oldest = self._sql("SELECT min(created_at) FROM events")[0][0]
        return None if oldest is None else max(0.0, now - float(oldest))

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class Webhooks:
    """Delivers the queued events to config.url (see the module's docstring)."""

    def __init__(
        self,
        config: WebhookConfig,
        queue: WebhookQueue,
        *,
        on_dropped: Callable[[str], None] | None = None,
        base_delay: float = 1.0,
        max_delay: float = 300.0,
        retry_after_cap: float = 300.0,
    ) -> None:
        self.config, self.queue, self.on_dropped = config, queue, on_dropped
        self.base_delay, self.max_delay, self.retry_after_cap = (
            base_delay,
            max_delay,
            retry_after_cap,
        )
        self.delivered = self.failed_attempts = self.dropped = 0  # counters, for metrics
        self._secret: bytes | None = None
        self._failing = False  # the last attempt failed (logged once, until one succeeds)
        self._streak = 0  # failures in a row, all events together
        self._paused_until = 0.0  # the receiver's own backoff (a failure streak, Retry-After)
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def load_secret(self) -> bytes:
        """The signing key (the file's bytes, stripped); ConfigError if it cannot be used."""
        self._secret = read_secret(self.config)
        return self._secret

    def enqueue(self, events: Iterable[dict[str, Any]]) -> int:
        """Queue events for delivery (a blocking SQLite write: call it from a worker thread);
        returns how many were new. Safe from any thread."""
        added = self.queue.put(events)
        loop = self._loop
        if added and loop is not None:
            with contextlib.suppress(RuntimeError):  # a closed loop: run() finds them later
                loop.call_soon_threadsafe(self._wake.set)
        return added

    def backlog(self) -> int:
        return self.queue.backlog()

    def oldest_age(self) -> float | None:
        return self.queue.oldest_age(time.time())

    def _backoff(self, failures: int) -> float:
        """Full jitter: uniform over [0, min(cap, base * 2^(failures-1))]."""
        return random.uniform(0, min(self.max_delay, self.base_delay * 2 ** min(failures - 1, 40)))

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver queued events until `stop` is set."""
        self._loop = asyncio.get_running_loop()
        secret = self._secret if self._secret else await asyncio.to_thread(self.load_secret)
        timeout = aiohttp.ClientTimeout(total=self.config.timeout_seconds)
        headers = {"User-Agent": f"wadaemon/{__version__}"}
        async with aiohttp.ClientSession(timeout=timeout, headers=headers) as session:
            while not stop.is_set():
                self._wake.clear()
                if self._paused_until <= time.time():
                    batch = await asyncio.to_thread(self.queue.due, time.time(), 100)
                    for item in batch:
                        if stop.is_set() or self._paused_until > time.time():
                            break
                        await self._attempt(session, secret, item)
                    if batch:
                        continue
                next_at = await asyncio.to_thread(self.queue.next_at)
                wait = None if next_at is None else max(next_at, self._paused_until) - time.time()
                await self._sleep(stop, wait)

    async def _sleep(self, stop: asyncio.Event, seconds: float | None) -> None:
        """Until `stop`, new events or `seconds` (None: no limit), whichever comes first."""
        waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._wake.wait())]
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def _attempt(self, session: aiohttp.ClientSession, secret: bytes, item: Pending) -> None:
        body = item.body.encode("utf-8")
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "X-Wadaemon-Event-Id": item.id,
            "X-Wadaemon-Timestamp": timestamp,
            "X-Wadaemon-Signature": sign(secret, timestamp, body),
        }
        error, retry_after = None, None
        try:
            async with session.post(
                self.config.url, data=body, headers=headers, allow_redirects=False
            ) as resp:
                if not 200 <= resp.status < 300:
                    error = f"HTTP {resp.status} {resp.reason or ''}".rstrip()
                    if resp.status in (429, 503):
                        with contextlib.suppress(ValueError):  # seconds; not an HTTP date
                            retry_after = max(0.0, float(resp.headers.get("Retry-After", "")))
        except (asyncio.TimeoutError, TimeoutError):
            error = f"no answer within {self.config.timeout_seconds:g} s"
        except (aiohttp.ClientError, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        if error is None:
            await asyncio.to_thread(self.queue.delivered, item.id)
            self.delivered += 1
            self._streak = 0
            if self._failing:
                self._failing = False
                log.info("webhook %s: deliveries work again", self.config.url)
        else:
            await self._failed(item, error, retry_after)

    async def _failed(self, item: Pending, error: str, retry_after: float | None) -> None:
        self.failed_attempts += 1
        self._streak += 1
        attempts = item.attempts + 1
        now = time.time()
        if not self._failing:
            self._failing = True
            log.warning("webhook %s: failing (%s); events kept, retried", self.config.url, error)
        if retry_after is not None:  # the receiver asked for a pause: all events wait
            retry_after = min(retry_after, self.retry_after_cap)
            self._paused_until = now + retry_after
        elif self._streak > 1:  # failures in a row: the receiver is down, not this event
            self._paused_until = now + self._backoff(self._streak - 1)
        if attempts >= max(1, self.config.max_attempts):
            await asyncio.to_thread(self.queue.drop, item.id)
            self.dropped += 1
            url, eid, n = self.config.url, item.id, attempts
            log.error("webhook %s: event %s dropped after %d attempts: %s", url, eid, n, error)
            if self.on_dropped is not None:
                try:
                    self.on_dropped(item.id)
                except Exception:
                    log.exception("webhook: the on_dropped callback failed")
            return
        delay = self._backoff(attempts) if retry_after is None else retry_after
        await asyncio.to_thread(self.queue.retry_later, item.id, now + delay, attempts, error)
