"""Which accounts this instance drives, when several instances share one Firestore project.

An instance drives an account (runs its client, backs it up) only while it holds the account's
lease (store/firestore_leases.py); the others stay passive. This module keeps the leases; which
free accounts to take and which to give up is lease_policy.py's.

- The held leases are renewed on their own schedule (held_leases.py), never behind a takeover;
  a lease this process may have lost stops its client at once.
- Leases are watched with a listener (and listed in full now and then, in case it missed
  something); a free lease is acquired, then the account is taken over in the background
  (restore, then client), several at a time.
- Handing over (SIGTERM, `accounts move`, rebalancing): the client stops, the last changes are
  committed while the lease is still held, then the lease is released with its reason.
- Fencing: every head switch carries the held token (Replica.fence); a refused switch
  (Fenced) loses the lease here too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Protocol

from wadaemon import lease_policy as policy
from wadaemon.config import Config
from wadaemon.errors import WadaemonError
from wadaemon.held_leases import HeldLeases, StoreContact
from wadaemon.store.firestore_leases import FirestoreLeases, Lease, LeaseContended, LeaseHeld

log = logging.getLogger("wadaemon.leases")

TICK_S = 0.25
LIST_EVERY_FACTOR = 6  # x renew_seconds: a full listing, in case the listener missed something
DECLINE_FAILED_S = 300.0  # an account that could not be driven here is left to others this long
TAKEOVERS_AT_ONCE = 8


class OwnershipHost(Protocol):
    """What the lease keeper asks of the daemon (driven_accounts.DrivenAccounts)."""

    def known_accounts(self) -> set[str]: ...

    async def take_over(self, account: str) -> bool:
        """Restore the newest generation where needed; False if the account cannot be driven
        here."""
        ...

    def drive(self, account: str) -> None:
        """Taken over: start the client, back up what needs it."""
        ...

    async def let_go(self, account: str, *, final_backup: bool) -> None:
        """Stop the client; with final_backup, commit the last changes (still held)."""
        ...

    def lost(self, account: str, why: str) -> None:
        """No longer held: stop the client now, commit nothing more."""
        ...

    async def restart(self, account: str) -> bool:
        """Start the client again if it stopped because its stream was replaced."""
        ...


def process_name(instance: str) -> str:
    """This daemon run, as a lease's `process`: another run of the same instance differs."""
    return f"{instance}:{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"


class LeaseOwnership:
    def __init__(
        self,
        leases: FirestoreLeases,
        config: Config,
        host: OwnershipHost,
        count: Callable[[str], None] = lambda event: None,
    ) -> None:
        self.leases = leases
        self.config = config
        self.host = host
        self.count = count  # takeover | lost | handover (the metric wadaemon_lease_events)
        self.instance = leases.instance
        self.ttl = config.leases.ttl_seconds
        self.renew_every = config.leases.renew_seconds
        self.contact = StoreContact(self.renew_every)
        self.holding = HeldLeases(leases, self.ttl, self.renew_every, self.contact, self._lost)
        self.held = self.holding.held  # account -> Held: what this instance drives
        self.seen: dict[str, tuple[Lease, float]] = {}  # others' leases, monotonic expiry
        self.busy: set[str] = set()  # being taken over or handed over
        self.live: dict[str, int] = {self.instance: 0}  # live instances -> accounts they hold
        self.backed_up: set[str] = set()  # accounts with an active head in the store
        # acquired from another instance (or from nobody): restored as a takeover, where the
        # head wins over a local copy that does not descend from it
        self.taken_over: set[str] = set()
        self._free_since: dict[str, float] = {}
        self._decline_until: dict[str, float] = {}
        self._changes: asyncio.Queue[list[Lease]] = asyncio.Queue()
        self._takeovers = asyncio.Semaphore(TAKEOVERS_AT_ONCE)
        self._tasks: set[asyncio.Task[None]] = set()
        self.arriving: set[str] = set()  # acquired, not restored yet
        self._stopping = False
        self._renewing: asyncio.Task[None] | None = None
        self._replaced_once: set[str] = set()  # replaced while held: started once more

    # --- what the daemon asks ------------------------------------------------------------------

    def drives(self, account: str) -> bool:
        """Held, taken over (restored), and within this instance's bound on the lease (or its
        renewal is out): nothing is backed up before the restore, and no client starts on a
        lease that may be another's by now."""
        return account in self.held and account not in self.arriving and self.holding.fresh(account)

    def token(self, account: str) -> int | None:
        return self.holding.token(account)

    def holder(self, account: str) -> str:
        if account in self.held:
            return self.instance
        seen = self.seen.get(account)
        if seen is None or seen[0].free or time.monotonic() >= seen[1]:
            return ""
        return seen[0].holder

    def known(self) -> set[str]:
        """Every account of the fleet (but those removed)."""
        accounts = self.host.known_accounts() | self.backed_up | set(self.seen) | set(self.held)
        return accounts - self.removed()

    def removed(self) -> set[str]:
        return {a for a, (lease, _) in self.seen.items() if lease.removed and a not in self.held}

    def share(self) -> int:
        max_accounts = self.config.instance.max_accounts
        return policy.share(len(self.known()), len(self.live), max_accounts)

    def room(self) -> bool:
        cap = self.config.instance.max_accounts
        return not cap or len(self.held) < cap

    # --- start and the loops ------------------------------------------------------------------

    async def start(self) -> None:
        """At boot: announce this instance; take back this instance's own leases (its previous
        run is dead: this run holds the sessions directory's lock), then free accounts up to the
        share; the restore phase restores them. Raises StoreError if the store cannot be
        reached."""
        await self._check_unique()
        # Renewals (and the announcements with them) only once the id is this instance's own:
        # a twin that announced itself while refused would overwrite the live instance's
        # announcement, then find its own there, pass the check and take that one's leases.
        if self._renewing is None:
            self._renewing = asyncio.create_task(self._renewals(), name="lease-renewals")
        await self._announce()
        await self._refresh()
        self.backed_up = set(await asyncio.to_thread(self.leases.store.active_accounts))
        previous = [a for a, (lease, _) in self.seen.items() if lease.holder == self.instance]
        for account in sorted(previous):
            await self._acquire(account, restarted=True, boot=True)
        await self._acquire_free(boot=True)
        loop = asyncio.get_running_loop()

        def changed(leases: list[Lease]) -> None:
            loop.call_soon_threadsafe(self._changes.put_nowait, leases)

        try:
            self.leases.watch(changed)
        except (WadaemonError, OSError) as exc:
            log.warning("leases: cannot listen for lease changes (%s); listing them instead", exc)

    async def _check_unique(self) -> None:
        here = (socket.gethostname(), str(self.config.sessions_path))
        await asyncio.to_thread(self.leases.check_unique, *here)

    async def run(self, stop: asyncio.Event) -> None:
        await self._acquisitions(stop)

    async def _renewals(self) -> None:
        """From the first acquisition on (acquiring many leases at boot can take longer than
        their TTL) until stop()."""
        next_announce = time.monotonic() + self.renew_every
        announcing: asyncio.Task[None] | None = None
        while not self._stopping:
            await asyncio.sleep(TICK_S)
            self.holding.tick(self.busy)
            now = time.monotonic()
            if now >= next_announce and (announcing is None or announcing.done()):
                next_announce = now + self.renew_every
                announcing = asyncio.create_task(self._announce_quietly())

    async def _announce_quietly(self) -> None:
        with contextlib.suppress(WadaemonError, OSError):
            await self._announce()

    async def _acquisitions(self, stop: asyncio.Event) -> None:
        next_list = time.monotonic() + self.renew_every * LIST_EVERY_FACTOR
        next_balance = time.monotonic() + self.renew_every
        while not stop.is_set() and not self._stopping:
            with contextlib.suppress(asyncio.TimeoutError):
                for lease in await asyncio.wait_for(self._changes.get(), TICK_S):
                    self._saw(lease)
            now = time.monotonic()
            try:
                if now >= next_list:
                    next_list = now + self.renew_every * LIST_EVERY_FACTOR
                    await self._refresh()
                await self._acquire_free()
                if now >= next_balance:  # who is live (a newcomer), then the shares
                    next_balance = now + self.renew_every
                    await self._count_instances()
                    await self._balance()
            except (WadaemonError, OSError) as exc:
                self.contact.failed(exc)

    async def _announce(self) -> None:
        host, sessions = socket.gethostname(), str(self.config.sessions_path)
        await asyncio.to_thread(self.leases.announce, host, sessions, len(self.held))

    async def _refresh(self) -> None:
        """List every lease and the live instances."""
        leases = await asyncio.to_thread(self.leases.all)
        self.contact.ok()
        for lease in leases.values():
            self._saw(lease)
        for account in [a for a in self.seen if a not in leases]:
            del self.seen[account]
        await self._count_instances()

    async def _count_instances(self) -> None:
        """The live instances (one small document each) and what each holds."""
        instances = await asyncio.to_thread(self.leases.instances)
        self.contact.ok()
        self.live = {i: x.held for i, x in instances.items() if x.live}
        self.live[self.instance] = len(self.held)

    def _saw(self, lease: Lease) -> None:
        if not self.holding.saw(lease):
            self.seen[lease.account] = (lease, time.monotonic() + lease.remaining())

    async def check(self, account: str) -> None:
        """Another client replaced this one's stream: if another instance holds the lease now,
        this one lost it (passive); if this one still does, a client outside the leases uses
        the session: the account stays stopped (`replaced`), its lease kept so that no other
        instance fights that client too."""
        if account not in self.held:
            return
        try:
            lease = await asyncio.to_thread(self.leases.read, account)
        except (WadaemonError, OSError) as exc:
            log.warning("%s: cannot read its lease after the stream was replaced: %s", account, exc)
            return
        if lease is not None:
            self._saw(lease)
        if account not in self.held:
            return
        token = self.holding.token(account) or 0
        if account in self._replaced_once:
            log.error(
                "%s: this instance holds its lease (token %d), yet another client took the "
                "session again: a client outside the leases uses it; the account stays stopped "
                "here",
                account,
                token,
            )
            return
        self._replaced_once.add(account)
        wait = self.ttl + self.holding.margin
        log.error(
            "%s: this instance holds its lease (token %d), yet another client took the session: "
            "a client outside the leases, or an instance whose lease ran out (paused or cut off: "
            "it stops its client within a TTL); this client starts once more in %.0f s",
            account,
            token,
            wait,
        )
        task = asyncio.create_task(self._restart_later(account, wait), name=f"again-{account}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _restart_later(self, account: str, wait: float) -> None:
        await asyncio.sleep(wait)
        held = account in self.held and self.holding.fresh(account) and not self._stopping
        if held and await self.host.restart(account):
            log.warning("%s: its client starts again after being replaced", account)

    def fenced(self, account: str, why: str) -> None:
        """The store refused a head switch under this instance's token."""
        self.holding.lose(account, why)

    def _lost(self, account: str, why: str) -> None:
        self.count("lost")
        self.host.lost(account, why)

    # --- acquiring -------------------------------------------------------------------------------

    async def _acquire_free(self, *, boot: bool = False) -> None:
        if self._stopping:
            return
        now = time.monotonic()
        leases = {a: (lease, now >= expiry) for a, (lease, expiry) in self.seen.items()}
        known = {a for a in self.known() if a not in self.busy and not self._declined(a, now)}
        for account in known:
            lease = leases.get(account)
            if lease is None or lease[0].released or lease[1]:
                self._free_since.setdefault(account, now)
            else:
                self._free_since.pop(account, None)
        # free for long: a TTL for one that was never leased or expired, a renewal period for
        # one released (nobody below its share took it, so anyone with room does)
        free_long = {
            a
            for a, t in self._free_since.items()
            if now - t >= (self.renew_every if a in leases and leases[a][0].released else self.ttl)
        }
        in_grace = self.contact.deferring(now)
        fair = self.share()
        cap = self.config.instance.max_accounts
        room = (cap - len(self.held)) if cap else len(known)
        below = max(0, fair - len(self.held))  # what this instance lacks of its share
        picked: list[str] = []
        for candidate in policy.candidates(
            self.instance, known, self.held, leases, free_long, in_grace=in_grace
        ):
            if len(picked) >= room:
                break
            if candidate.anyone_with_room or len(picked) < below:
                picked.append(candidate.account)
        if picked and not self._stopping:  # at once: the store settles races per account
            await asyncio.gather(*(self._acquire(a, boot=boot) for a in picked))

    def _declined(self, account: str, now: float) -> bool:
        until = self._decline_until.get(account)
        if until is not None and now >= until:
            del self._decline_until[account]
            return False
        return until is not None

    async def _acquire(self, account: str, *, restarted: bool = False, boot: bool = False) -> None:
        sent = time.monotonic()
        try:
            lease = await asyncio.to_thread(self.leases.acquire, account, restarted=restarted)
        except LeaseHeld as exc:
            self._saw(exc.lease)
            return
        except LeaseContended:
            return
        self.contact.ok()
        self._free_since.pop(account, None)
        self.seen.pop(account, None)
        self.holding.add(account, lease, sent)
        self._replaced_once.discard(account)  # one more start per holding, if replaced
        if not restarted:
            self.taken_over.add(account)
        log.info(
            "%s: lease acquired by %s (token %d)%s",
            account,
            self.instance,
            lease.token,
            "" if boot else "; taking the account over",
        )
        if not boot:
            self.busy.add(account)
            self.arriving.add(account)
            task = asyncio.create_task(self._take_over(account), name=f"take-over-{account}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _take_over(self, account: str) -> None:
        try:
            async with self._takeovers:
                ok = account in self.held and await self.host.take_over(account)
            self.arriving.discard(account)
            if ok and account in self.held:
                self.count("takeover")
                self.host.drive(account)
            elif account in self.held:
                self.busy.discard(account)
                await self.hand_over(
                    account, why="it cannot be driven here", reason=policy.NOT_DRIVABLE
                )
                self._decline_until[account] = time.monotonic() + DECLINE_FAILED_S
        finally:
            self.arriving.discard(account)
            self.busy.discard(account)

    async def claim(self, account: str) -> None:
        """Take an account's lease for a new pairing on this instance, beyond the share."""
        if account in self.held:
            return
        sent = time.monotonic()
        try:
            lease = await asyncio.to_thread(self.leases.acquire, account, revive=True)
        except LeaseContended as exc:
            raise WadaemonError(f"{account}: {exc}; try again") from None
        except LeaseHeld as exc:
            raise WadaemonError(
                f"{account} is driven by instance {exc.lease.holder}: pair it there, or move it "
                f"here first with `wadaemon accounts move {account} --to {self.instance}` on "
                f"{exc.lease.holder}"
            ) from None
        self.holding.add(account, lease, sent)
        log.info(
            "%s: lease acquired by %s (token %d) to pair it", account, self.instance, lease.token
        )

    # --- handing over ----------------------------------------------------------------------------

    async def hand_over(self, account: str, *, why: str, reason: str, hand_to: str = "") -> None:
        """Stop the client, commit the last changes, then release the lease."""
        if account not in self.held or account in self.busy:
            return
        self.busy.add(account)
        try:
            await self.host.let_go(account, final_backup=True)
            held = self.held.pop(account, None)
            if held is None:
                return  # lost meanwhile
            try:
                await asyncio.to_thread(
                    self.leases.release, held.lease, reason=reason, hand_to=hand_to
                )
            except (WadaemonError, OSError) as exc:
                log.warning("%s: cannot release the lease (%s); it expires by itself", account, exc)
                return
            self.count("handover")
            to = f" for {hand_to}" if hand_to else ""
            log.info("%s: lease released%s (%s)", account, to, why)
        finally:
            self.busy.discard(account)

    async def move(self, account: str, to: str = "") -> dict[str, object]:
        if account not in self.held:
            holder = self.holder(account) or "nobody"
            raise WadaemonError(
                f"{account} is not driven by this instance ({self.instance}) but by {holder}: "
                "run the command there"
            )
        if to == self.instance:
            raise WadaemonError(f"{account} is already driven by {to}")
        if to and to not in self.live:
            live = ", ".join(sorted(self.live))
            raise WadaemonError(f"instance {to!r} is not live (live instances: {live})")
        await self.hand_over(account, why="moved on request", reason=policy.MOVED, hand_to=to)
        self._decline_until[account] = time.monotonic() + 2 * self.ttl  # not taken back at once
        return {"account": account, "released": True, "to": to or None, "from": self.instance}

    async def _balance(self) -> None:
        """Give up what this instance holds beyond its share while others hold less."""
        movable = [a for a in self.held if a not in self.busy]
        fair = self.share()
        for account in policy.surplus(self.instance, movable, self.live, fair):
            why = f"this instance holds more than its share of {fair}"
            await self.hand_over(account, why=why, reason=policy.BALANCE)
            self._decline_until[account] = time.monotonic() + 2 * self.ttl

    async def retire(self, account: str) -> None:
        """The account was removed: nobody takes it over from a stale local copy."""
        self.held.pop(account, None)
        await asyncio.to_thread(self.leases.retire, account)

    async def stop(self) -> None:
        """SIGTERM: leave the fleet, then hand every held account over (client stopped, last
        backup, lease released for anyone with room)."""
        self._stopping = True
        self.leases.stop_watching()
        if self._renewing is not None:
            self._renewing.cancel()
        self.holding.cancel()
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(WadaemonError, OSError):
            await asyncio.to_thread(self.leases.leave)
        accounts = sorted(self.held)
        if accounts:
            log.info("leases: handing %d accounts over", len(accounts))
        self.busy.clear()
        results = await asyncio.gather(
            *(
                self.hand_over(a, why="this instance stops", reason=policy.STOPPING)
                for a in accounts
            ),
            return_exceptions=True,
        )
        for account, result in zip(accounts, results, strict=True):
            if isinstance(result, BaseException):  # one account's failure stops no other's
                log.error(
                    "%s: handing it over failed: %r; its lease expires by itself",
                    account,
                    result,
                    exc_info=result,
                )
