"""The fair-share rules: which free accounts an instance takes, which it gives up."""

from __future__ import annotations

from datetime import datetime, timezone

from wadaemon import lease_policy as policy
from wadaemon.store.firestore_leases import Lease

NOW = datetime(2026, 11, 28, tzinfo=timezone.utc)


def lease(account: str, holder: str = "other", **fields: object) -> Lease:
    base = Lease(account, holder, f"{holder}:1", 3, 30.0, NOW, NOW, NOW)
    return Lease(**{**base.__dict__, **fields})  # type: ignore[arg-type]


def accounts(cands: list[policy.Candidate]) -> list[str]:
    return [c.account for c in cands]


def test_the_share_is_the_accounts_over_the_live_instances_rounded_up_and_capped() -> None:
    assert policy.share(30, 3, 0) == 10
    assert policy.share(30, 4, 0) == 8
    assert policy.share(30, 4, 5) == 5
    assert policy.share(0, 2, 0) == 0
    assert policy.share(7, 0, 0) == 7  # no announcement seen yet: this instance alone


def test_held_unexpired_removed_and_reserved_leases_are_not_candidates() -> None:
    leases = {
        "held": (lease("held"), False),
        "removed": (lease("removed", released=True, removed=True), True),
        "for-c": (lease("for-c", released=True, hand_to="c", reason=policy.MOVED), False),
        "mine": (lease("mine", released=True, hand_to="me", reason=policy.MOVED), False),
        "expired": (lease("expired"), True),
        "stopping": (lease("stopping", released=True, reason=policy.STOPPING), False),
        "balance": (lease("balance", released=True, reason=policy.BALANCE), False),
    }
    known = [*leases, "never-leased", "already-mine"]
    got = policy.candidates("me", known, {"already-mine"}, leases, set(), in_grace=False)
    assert accounts(got)[0] == "mine"  # moved here on purpose: first
    assert set(accounts(got)) == {"mine", "expired", "stopping", "balance", "never-leased"}
    anyone = {c.account for c in got if c.anyone_with_room}
    # a leaving holder's and an expired lease go to anyone with room; a rebalanced one and a
    # never-leased account only to instances below their share
    assert anyone == {"mine", "expired", "stopping"}


def test_after_its_own_outage_an_instance_leaves_expired_leases_to_their_holders() -> None:
    leases = {
        "expired": (lease("expired"), True),
        "stopping": (lease("stopping", released=True, reason=policy.STOPPING), False),
    }
    got = policy.candidates("me", list(leases), set(), leases, set(), in_grace=True)
    assert accounts(got) == ["stopping"]


def test_an_account_free_for_long_goes_to_anyone_with_room() -> None:
    got = policy.candidates("me", ["orphan"], set(), {}, {"orphan"}, in_grace=False)
    assert [(c.account, c.anyone_with_room) for c in got] == [("orphan", True)]


def test_instances_prefer_different_accounts() -> None:
    free = [f"a{n}" for n in range(20)]
    first = accounts(policy.candidates("i1", free, set(), {}, set(), in_grace=False))[:5]
    second = accounts(policy.candidates("i2", free, set(), {}, set(), in_grace=False))[:5]
    assert first != second


def test_surplus_is_what_others_lack_and_nothing_when_nobody_lacks() -> None:
    held = [f"a{n}" for n in range(10)]
    # a fourth instance joined: share 8, it lacks 8, this one gives up its 2 extra
    assert len(policy.surplus("i1", held, {"i1": 10, "i2": 10, "i3": 10, "i4": 0}, 8)) == 2
    # others are at their share: nothing moves even though this one is above it
    assert policy.surplus("i1", held, {"i1": 10, "i2": 8, "i3": 8}, 8) == []
    # the accounts given up are the least preferred, the same each time
    one = policy.surplus("i1", held, {"i2": 0}, 8)
    assert one == policy.surplus("i1", list(reversed(held)), {"i2": 0}, 8)
