"""When to back up each account: debounce, coalescing, retries, and the final flush.

A change opens a window of `debounce` seconds; every change made in it goes into one backup that
starts when the window closes. So no change waits longer than `debounce` for its backup to
start, a burst becomes one generation per window, and an account written continuously is backed
up once per window (a quiet-period timer restarted by every change would keep postponing it).
Changes that arrive while a backup runs cause exactly one more backup. A failed backup is
retried with exponential backoff and jitter; only the newest state matters, so retries never
queue up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

RETRY_FIRST_S = 2.0
RETRY_MAX_S = 300.0


@dataclass
class _Account:
    dirty: bool = False
    first_change: float | None = None
    running: bool = False
    failures: int = 0
    retry_now: bool = False
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class BackupScheduler:
    def __init__(self, run_backup: Callable[[str], Awaitable[bool]], debounce: float) -> None:
        self._run_backup = run_backup
        self.debounce = debounce
        self._accounts: dict[str, _Account] = {}
        self._flushing = False

    def touch(self, account: str) -> None:
        """Something in the account's directory changed."""
        if self._flushing:
            return
        st = self._accounts.setdefault(account, _Account())
        now = time.monotonic()
        if st.first_change is None:
            st.first_change = now
        st.dirty = True
        if st.task is None or st.task.done():
            st.task = asyncio.create_task(self._worker(account, st), name=f"backup-{account}")
        else:
            st.wake.set()

    def failures(self, account: str) -> int:
        st = self._accounts.get(account)
        return st.failures if st else 0

    async def _sleep_unless_woken(self, st: _Account, seconds: float) -> None:
        st.wake.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(st.wake.wait(), max(0.0, seconds))

    async def _worker(self, account: str, st: _Account) -> None:
        while st.dirty:
            while not self._flushing:
                assert st.first_change is not None
                deadline = st.first_change + self.debounce
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                await self._sleep_unless_woken(st, remaining)
            st.dirty = False
            st.first_change = None
            st.running = True
            try:
                ok = await self._run_backup(account)
            finally:
                st.running = False
            if ok:
                st.failures = 0
                continue
            st.failures += 1
            if self._flushing:
                return  # shutting down: one attempt only
            delay = min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** (st.failures - 1))
            delay *= random.uniform(0.5, 1.0)
            log.info(
                "%s: retrying the backup in %.0f s (attempt %d)", account, delay, st.failures + 1
            )
            if not st.dirty:
                st.dirty = True
                st.first_change = time.monotonic()
            await self._sleep_retry(st, delay)

    async def _sleep_retry(self, st: _Account, seconds: float) -> None:
        end = time.monotonic() + seconds
        st.retry_now = False
        while not self._flushing and not st.retry_now and time.monotonic() < end:
            await self._sleep_unless_woken(st, end - time.monotonic())
        st.first_change = time.monotonic() - self.debounce

    def retry_now(self) -> None:
        """End every retry wait at once (the store that failed answers again)."""
        for st in self._accounts.values():
            if st.failures:
                st.retry_now = True
                st.wake.set()

    async def flush(self) -> None:
        """Back up every changed account now (no debounce), once, and wait for all backups."""
        self._flushing = True
        for st in self._accounts.values():
            st.wake.set()
        tasks = [st.task for st in self._accounts.values() if st.task and not st.task.done()]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
