"""The leases this instance holds: their renewal, their bound, and their loss.

Renewal runs on its own, never behind a takeover: each held lease is renewed every
leases.renew_seconds, in its own task, so a renewal that hangs (the store is slow or down)
delays no other. The instance's own bound on a lease is the monotonic time it sent the last
successful renewal plus the TTL, less a margin: Firestore stamped the renewal after that moment,
so no other instance can see the lease expire before then. Past that bound:
- with no renewal in flight or failing, this process was paused or its loop stalled: the lease
  may be another's now, so it is lost here and the client stops at once, before anything else
  is sent;
- with its renewal unanswered or failing, the store is down or out of reach: the instance keeps
  driving. Nobody can take a lease over while Firestore is down for everyone, the others defer
  to the last holders for a while after an outage (StoreContact.grace), and if only this host
  was cut off, the instance that takes the account over connects, WhatsApp replaces this
  client's stream, and this one stops.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from wadaemon.errors import WadaemonError
from wadaemon.store.base import StoreUnavailable
from wadaemon.store.firestore import RECONNECT_MAX_S  # (imports the Google client library)
from wadaemon.store.firestore_leases import FirestoreLeases, Lease, LeaseLost

log = logging.getLogger("wadaemon.leases")

RETRY_FAILED_RENEWAL_S = 1.0
# after an outage, expired leases of other instances are left to their holders for 1.5 renewal
# periods plus the longest the holders' connections take to come back (store/firestore.py)
OUTAGE_GRACE_FACTOR = 1.5


class StoreContact:
    """Whether this instance reaches the store, and since when it does again."""

    def __init__(self, renew_every: float) -> None:
        self.grace = renew_every * OUTAGE_GRACE_FACTOR + RECONNECT_MAX_S
        self.down = False
        self._back_at: float | None = None  # monotonic

    def failed(self, exc: BaseException) -> None:
        if not self.down:
            log.warning("leases: the store cannot be reached: %s", exc)
        self.down = True

    def ok(self) -> None:
        if self.down:
            self._back_at = time.monotonic()
            log.info(
                "leases: the store answers again; expired leases of other instances are left "
                "to their holders for %.0f s",
                self.grace,
            )
        self.down = False

    def deferring(self, now: float) -> bool:
        """During an outage, and for `grace` after it: expired leases of others are left to
        their holders, who were probably cut off too."""
        return self.down or (self._back_at is not None and now - self._back_at < self.grace)


@dataclass
class Held:
    lease: Lease
    safe_until: float  # monotonic
    next_renew: float  # monotonic
    failing: bool = False  # the last renewal failed (store unreachable)
    unconfirmed_logged: bool = False


class HeldLeases:
    def __init__(
        self,
        leases: FirestoreLeases,
        ttl: float,
        renew_every: float,
        contact: StoreContact,
        lost: Callable[[str, str], None],
    ) -> None:
        self.leases = leases
        self.ttl = ttl
        self.renew_every = renew_every
        self.margin = min(ttl / 6, 5.0)
        self.contact = contact
        self._lost = lost  # (account, why): the daemon stops the client
        self.held: dict[str, Held] = {}
        self._renewing: set[str] = set()  # renewals sent and not answered yet
        self._tasks: set[asyncio.Task[None]] = set()

    def add(self, account: str, lease: Lease, sent: float) -> None:
        """A lease acquired (or renewed) by a call sent at the monotonic time `sent`."""
        self.held[account] = Held(lease, sent + self.ttl - self.margin, sent + self.renew_every)

    def fresh(self, account: str) -> bool:
        """Held and within its bound, or past it only while its renewal is out or failing (the
        store is slow or down): what _check_bounds does not take for a pause."""
        held = self.held.get(account)
        if held is None:
            return False
        past = time.monotonic() >= held.safe_until
        return not past or held.failing or account in self._renewing

    def token(self, account: str) -> int | None:
        held = self.held.get(account)
        return held.lease.token if held else None

    def saw(self, lease: Lease) -> bool:
        """A lease read from the store; True if it is one of ours (lost if it moved on)."""
        held = self.held.get(lease.account)
        if held is None:
            return False
        mine = held.lease
        if lease.token > mine.token or (lease.token == mine.token and lease.released):
            self.lose(lease.account, f"{lease.holder} holds it now (token {lease.token})")
            return False
        return True

    def lose(self, account: str, why: str) -> None:
        if self.held.pop(account, None) is None:
            return
        log.error(
            "%s: lease lost: %s; its client is stopped and nothing more of it is committed here",
            account,
            why,
        )
        self._lost(account, why)

    def tick(self, busy: set[str]) -> None:
        """Check the bounds (first: after a pause, clients stop before anything is sent), then
        send the renewals that are due."""
        self._check_bounds(busy)
        now = time.monotonic()
        for account, held in self.held.items():
            if now >= held.next_renew and account not in self._renewing:
                self._renewing.add(account)
                task = asyncio.create_task(self._renew(account), name=f"renew-{account}")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    def cancel(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    async def _renew(self, account: str) -> None:
        try:
            await self._renew_once(account)
        finally:
            self._renewing.discard(account)

    async def _renew_once(self, account: str) -> None:
        held = self.held.get(account)
        if held is None:
            return
        sent = time.monotonic()
        try:
            lease = await asyncio.to_thread(self.leases.renew, held.lease)
        except LeaseLost as exc:
            self.contact.ok()
            self.lose(account, str(exc))
            return
        except (WadaemonError, OSError) as exc:
            if isinstance(exc, (StoreUnavailable, OSError)):
                self.contact.failed(exc)
            held.failing = True
            held.next_renew = time.monotonic() + RETRY_FAILED_RENEWAL_S
            return
        self.contact.ok()
        if self.held.get(account) is not held:
            return  # lost or handed over meanwhile
        if held.unconfirmed_logged:
            log.info("%s: lease renewed after the outage; still driven here", account)
        self.add(account, lease, sent)
        renewed = self.held[account]
        if renewed.next_renew <= time.monotonic():
            # answered later than a renewal period (sent during an outage, answered after it):
            # the lease is ours, but this bound is near or past; renew again at once, and keep
            # driving while that renewal is out, rather than take the late answer for a pause
            renewed.failing = True
            renewed.next_renew = 0.0

    def _check_bounds(self, busy: set[str]) -> None:
        now = time.monotonic()
        for account, held in list(self.held.items()):
            if now < held.safe_until or account in busy:
                continue
            if held.failing or account in self._renewing:
                if not held.unconfirmed_logged:
                    held.unconfirmed_logged = True
                    log.warning(
                        "%s: its lease ran out while the store cannot be reached; this instance "
                        "keeps driving it (nobody can take a lease over while Firestore is down "
                        "for everyone, and this instance renews it first when it answers)",
                        account,
                    )
                continue
            self.lose(
                account,
                "its lease was not renewed in time (this process was paused or too slow) and "
                "may have been taken over",
            )
