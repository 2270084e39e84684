"""The holder's own bound on its leases (wadaemon/held_leases.py), on a controlled clock: a
renewal answered late is not taken for a pause, a stalled loop is."""

from __future__ import annotations

import asyncio
import functools
import threading
import types
from collections.abc import Callable, Coroutine
from datetime import datetime, timezone
from typing import Any

import pytest

from wadaemon import held_leases
from wadaemon.held_leases import HeldLeases, StoreContact
from wadaemon.store.base import StoreUnavailable
from wadaemon.store.firestore_leases import Lease

TTL = 6.0
RENEW = 2.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class SlowLeases:
    """renew() blocks until the test lets it answer (or fail)."""

    def __init__(self) -> None:
        self.sent = threading.Event()
        self.answer = threading.Event()
        self.fail = False
        self.calls = 0

    def renew(self, lease: Lease) -> Lease:
        self.calls += 1
        self.sent.set()
        self.answer.wait(10)
        self.sent.clear()
        self.answer.clear()
        if self.fail:
            raise StoreUnavailable("the store is down")
        return lease


def lease(account: str = "acct") -> Lease:
    t = datetime(2026, 1, 1, tzinfo=timezone.utc)
    return Lease(account, "i1", "p", 3, TTL, t, t, t)


def synchronously(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    # only held_leases sees this clock: the event loop keeps the real one
    monkeypatch.setattr(held_leases, "time", types.SimpleNamespace(monotonic=c))
    return c


async def settle() -> None:
    for _ in range(50):
        await asyncio.sleep(0.01)


async def answer(leases: SlowLeases) -> None:
    leases.answer.set()
    await settle()


def holding(leases: SlowLeases) -> tuple[HeldLeases, list[tuple[str, str]]]:
    lost: list[tuple[str, str]] = []
    held = HeldLeases(leases, TTL, RENEW, StoreContact(RENEW), lambda a, why: lost.append((a, why)))  # type: ignore[arg-type]
    return held, lost


@synchronously
async def test_a_renewal_answered_just_before_the_bound_is_renewed_again_not_lost(
    clock: Clock,
) -> None:
    leases = SlowLeases()
    held, lost = holding(leases)
    held.add("acct", lease(), clock.now)
    clock.now += RENEW
    held.tick(set())  # renewal sent at 1002
    await asyncio.to_thread(leases.sent.wait, 5)
    clock.now += 4.9  # answered 4.9 s later: its bound (1002 + 6 - 1 = 1007) is 0.1 s away
    await answer(leases)
    assert "acct" in held.held and not lost
    clock.now += 1.0  # past the bound before the next renewal answers
    held.tick(set())
    assert not lost, "a late answer must not be taken for a pause"
    assert await asyncio.to_thread(leases.sent.wait, 5), "the next renewal goes out at once"
    assert leases.calls == 2
    await answer(leases)
    assert held.held["acct"].safe_until == clock.now + TTL - held.margin
    held.cancel()


@synchronously
async def test_a_stalled_loop_past_the_bound_loses_the_lease(clock: Clock) -> None:
    leases = SlowLeases()
    held, lost = holding(leases)
    held.add("acct", lease(), clock.now)
    clock.now += TTL  # nothing ran for a whole TTL: a pause
    held.tick(set())
    assert [a for a, _ in lost] == ["acct"]
    assert "paused" in lost[0][1]
    assert leases.calls == 0, "no renewal is sent for a lost lease"


@synchronously
async def test_a_lease_whose_renewals_fail_is_kept_past_its_bound_until_the_store_answers(
    clock: Clock,
) -> None:
    leases = SlowLeases()
    held, lost = holding(leases)
    held.add("acct", lease(), clock.now)
    leases.fail = True
    clock.now += RENEW
    held.tick(set())
    await asyncio.to_thread(leases.sent.wait, 5)
    await answer(leases)  # failed: the store is down
    assert held.contact.down
    clock.now += TTL
    held.tick(set())
    assert not lost
    leases.fail = False
    await answer(leases)
    assert not held.contact.down and "acct" in held.held and not lost
    held.cancel()


@synchronously
async def test_a_lease_past_its_bound_is_not_fresh_unless_its_renewal_is_out(clock: Clock) -> None:
    """What gates a client's start and a commit: a lease nobody renewed for a TTL may be
    another instance's by now (acquiring many leases at boot once took longer than the TTL)."""
    leases = SlowLeases()
    held, _ = holding(leases)
    held.add("acct", lease(), clock.now)
    assert held.fresh("acct") and not held.fresh("other")
    clock.now += TTL
    assert not held.fresh("acct")
    held.tick(set())  # the pause is noticed: lost
    assert "acct" not in held.held
    held.add("acct", lease(), clock.now)
    clock.now += RENEW
    held.tick(set())  # a renewal goes out and hangs
    await asyncio.to_thread(leases.sent.wait, 5)
    clock.now += TTL
    assert held.fresh("acct"), "kept while its renewal is out (the store is slow or down)"
    await answer(leases)
    held.cancel()
