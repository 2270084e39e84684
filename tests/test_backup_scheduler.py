"""Debounce, coalescing, retries and the final flush of the backup scheduler."""

from __future__ import annotations

import asyncio

import pytest

from wadaemon import backup_scheduler
from wadaemon.backup_scheduler import BackupScheduler


class Recorder:
    def __init__(self, duration: float = 0.0, fail_times: int = 0) -> None:
        self.calls: list[str] = []
        self.running = 0
        self.max_running = 0
        self.duration = duration
        self.fail_times = fail_times
        self.elapsed = 0.0

    async def __call__(self, account: str) -> bool:
        self.calls.append(account)
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        await asyncio.sleep(self.duration)
        self.running -= 1
        if self.fail_times:
            self.fail_times -= 1
            return False
        return True


def test_burst_is_one_backup() -> None:
    async def scenario() -> Recorder:
        rec = Recorder()
        sched = BackupScheduler(rec, debounce=0.5)
        for _ in range(50):
            sched.touch("a")
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.8)
        return rec

    assert asyncio.run(scenario()).calls == ["a"]


def test_continuous_changes_are_still_backed_up() -> None:
    async def scenario() -> Recorder:
        rec = Recorder()
        sched = BackupScheduler(rec, debounce=0.1)
        started = asyncio.get_running_loop().time()
        for _ in range(100):  # 1 s of changes every 10 ms: never quiet for 0.1 s
            sched.touch("a")
            await asyncio.sleep(0.01)
        rec.elapsed = asyncio.get_running_loop().time() - started
        return rec

    rec = asyncio.run(scenario())
    # one backup per window: no change waits more than the debounce for its backup to start
    assert len(rec.calls) >= rec.elapsed / 0.1 * 0.6, (len(rec.calls), rec.elapsed)


def test_changes_during_a_backup_cause_exactly_one_more() -> None:
    async def scenario() -> Recorder:
        rec = Recorder(duration=0.3)
        sched = BackupScheduler(rec, debounce=0.01)
        sched.touch("a")
        await asyncio.sleep(0.1)  # the backup is running now
        for _ in range(20):
            sched.touch("a")
            await asyncio.sleep(0.005)
        await asyncio.sleep(1.0)
        return rec

    rec = asyncio.run(scenario())
    assert rec.calls == ["a", "a"]
    assert rec.max_running == 1  # never two backups of one account at once


def test_accounts_are_independent() -> None:
    async def scenario() -> Recorder:
        rec = Recorder(duration=0.1)
        sched = BackupScheduler(rec, debounce=0.01)
        sched.touch("a")
        sched.touch("b")
        await asyncio.sleep(0.3)
        return rec

    rec = asyncio.run(scenario())
    assert sorted(rec.calls) == ["a", "b"]
    assert rec.max_running == 2


def test_failure_is_retried_with_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backup_scheduler, "RETRY_FIRST_S", 0.05)

    async def scenario() -> tuple[Recorder, int]:
        rec = Recorder(fail_times=2)
        sched = BackupScheduler(rec, debounce=0.01)
        sched.touch("a")
        await asyncio.sleep(1.0)
        return rec, sched.failures("a")

    rec, failures = asyncio.run(scenario())
    assert rec.calls == ["a", "a", "a"]
    assert failures == 0


def test_flush_backs_up_pending_changes_at_once() -> None:
    async def scenario() -> tuple[Recorder, float]:
        rec = Recorder()
        sched = BackupScheduler(rec, debounce=60.0)
        sched.touch("a")
        sched.touch("b")
        loop = asyncio.get_running_loop()
        started = loop.time()
        await sched.flush()
        sched.touch("c")  # ignored after shutdown began
        await asyncio.sleep(0.05)
        return rec, loop.time() - started

    rec, elapsed = asyncio.run(scenario())
    assert sorted(rec.calls) == ["a", "b"]
    assert elapsed < 5


def test_flush_does_not_retry_forever() -> None:
    async def scenario() -> Recorder:
        rec = Recorder(fail_times=100)
        sched = BackupScheduler(rec, debounce=60.0)
        sched.touch("a")
        await asyncio.wait_for(sched.flush(), 5)
        return rec

    assert asyncio.run(scenario()).calls == ["a"]
