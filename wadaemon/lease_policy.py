"""Which accounts an instance takes and which it gives up: the fair share, as pure functions.

- The share: the accounts divided by the live instances, rounded up (capped by
  instance.max_accounts). An instance takes free accounts until it holds its share.
- A lease released because its holder stops (or moved without a destination) is taken by any
  instance with room: its holder is leaving. One released to rebalance is taken only by an
  instance below its share; one moved to an instance, only by that one until it expires.
- A lease that expired (its holder died or stalled) is taken by any instance with room, except
  for a while after this instance's own store outage: its holder was probably cut off too, and
  renews it first. Rebalancing evens out what the survivors took.
- An account free for longer than a TTL (nobody below its share wanted it) is taken by any
  instance with room, so that max_accounts caps never leave an account undriven.
- Rebalancing: an instance holding more than its share while another live instance holds
  less gives up the difference (at most what the others lack), its least preferred accounts
  first. Accounts that stay are not touched.
Preferences are rendezvous hashes of (instance, account): the same on every run and every
host, and different from instance to instance, so instances racing for free accounts mostly
reach for different ones.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from wadaemon.store.firestore_leases import Lease

# why a lease was released (its `reason` field)
STOPPING = "stopping"  # its holder stops: anyone with room takes it
MOVED = "moved"  # `accounts move` (to one instance if hand_to is set)
BALANCE = "balance"  # the holder had more than its share: only an instance below its share
NOT_DRIVABLE = "not-drivable"  # it could not be restored or started there


def preference(account: str, instance: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{instance}\0{account}".encode()).digest()[:8], "big")


def share(accounts: int, instances: int, max_accounts: int) -> int:
    fair = math.ceil(accounts / max(1, instances)) if accounts else 0
    return min(fair, max_accounts) if max_accounts else fair


@dataclass(frozen=True)
class Candidate:
    account: str
    anyone_with_room: bool  # taken even at or above the share (see the module's rules)
    order: int  # lower first


def candidates(
    instance: str,
    known: Collection[str],
    held: Collection[str],
    leases: Mapping[str, tuple[Lease, bool]],
    free_long: Collection[str],
    *,
    in_grace: bool,
) -> list[Candidate]:
    """The accounts this instance may try to acquire now, best first. `leases`: account ->
    (its lease as last seen, whether it has expired by now); `free_long`: accounts free for
    longer than a TTL."""
    out = []
    for account in known:
        if account in held:
            continue
        seen = leases.get(account)
        anyone = account in free_long
        order = 2
        if seen is not None:
            lease, expired = seen
            if lease.removed:
                continue
            if lease.released:
                if lease.hand_to and lease.hand_to != instance and not expired:
                    continue  # reserved for the instance it was moved to
                if lease.hand_to == instance:
                    anyone, order = True, 0
                elif lease.reason in (STOPPING, MOVED, NOT_DRIVABLE) or expired:
                    anyone, order = True, 1
            elif not expired:
                continue
            elif in_grace:
                continue  # its holder was cut off too: it renews first
            else:
                anyone, order = True, 1  # its holder died or stalled: drive it at once
        out.append(Candidate(account, anyone, order))
    out.sort(key=lambda c: (c.order, preference(c.account, instance)))
    return out


def surplus(
    instance: str, held: Collection[str], others: Mapping[str, int], fair: int
) -> list[str]:
    """The accounts to give up so that instances below their share get theirs: at most what
    the others lack, least preferred first."""
    over = len(held) - fair
    lacking = sum(max(0, fair - n) for i, n in others.items() if i != instance)
    count = min(over, lacking)
    if count <= 0:
        return []
    return sorted(held, key=lambda a: preference(a, instance), reverse=True)[:count]
