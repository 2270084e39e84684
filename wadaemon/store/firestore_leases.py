"""Account leases in Firestore: which instance drives which account, with fencing tokens.

leases/{account}       holder (instance id), process (that daemon's run), token, ttl,
                       renewedAt and acquiredAt (server time), released, handTo
instances/{instance}   a live instance: process, host, sessions, seenAt (server time), ttl, held
wa_sessions/{account}  its `fence` field: the highest token ever issued for the account

Every operation is one read (or none) and one conditional write: an update-time precondition,
Firestore's compare-and-swap, which fails if anyone wrote the document since it was read.
Nothing is held open between two calls, so a paused or dead holder blocks nobody for longer
than its lease's TTL. Acquiring writes the lease and the fence in one atomic batch, both
conditional; the fence sits in the head's own document, where nothing deletes it (removing an
account leaves a tombstone head), so a token never goes back even if the lease document is
deleted, and the head switch checks it in the same compare-and-swap (store/firestore.py).

Expiry is decided on Firestore's clock only: a lease expires when the read time of a snapshot
(the server's time) is past renewedAt + ttl, both written and read by the server. No host's
clock takes part; the holder keeps its own bound with the monotonic clock (lease_holder.py).
The library's transactions are not used: they take no per-call timeout, and with Firestore down
they retry for about a minute.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from google.api_core import exceptions as gexc
from google.cloud.firestore_v1 import SERVER_TIMESTAMP
from google.cloud.firestore_v1.document import DocumentReference

from wadaemon.layout import is_account_id
from wadaemon.store.base import StoreError
from wadaemon.store.firestore import CALL_TIMEOUT, RETRY, SESSIONS, FirestoreStore
from wadaemon.store.firestore_listener import SupervisedListener

log = logging.getLogger(__name__)

LEASES = "leases"
INSTANCES = "instances"


class LeaseHeld(StoreError):
    """Another instance holds the lease (not expired, not released)."""

    def __init__(self, lease: Lease) -> None:
        super().__init__(f"{lease.account}: held by {lease.holder} (token {lease.token})")
        self.lease = lease


class LeaseContended(StoreError):
    """Someone wrote the lease while this instance tried to acquire it: read it again."""


class LeaseLost(StoreError):
    """The lease is no longer this process's: another instance acquired it, or it was
    released or deleted."""

    def __init__(self, account: str, now: Lease | None) -> None:
        who = f"{now.holder} holds it with token {now.token}" if now and not now.free else "free"
        super().__init__(f"{account}: the lease was lost ({who})")
        self.current = now


@dataclass(frozen=True)
class Lease:
    account: str
    holder: str
    process: str
    token: int
    ttl: float
    renewed_at: datetime  # server time
    read_at: datetime  # server time of the snapshot (or of our own write)
    update_time: datetime  # the document's, for the next compare-and-swap
    released: bool = False
    hand_to: str = ""  # released for this instance (wadaemon accounts move --to)
    removed: bool = False  # the account was removed: nobody drives it (until paired again)
    reason: str = ""  # why it was released (lease_policy: stopping, moved, balance...)

    @property
    def expires_at(self) -> datetime:
        return self.renewed_at + timedelta(seconds=self.ttl)

    @property
    def expired(self) -> bool:
        """Past its TTL on Firestore's clock, as of the read."""
        return self.read_at >= self.expires_at

    @property
    def free(self) -> bool:
        """May be acquired by anyone (a lease handed to one instance is free only for it, until
        it expires; a removed account's by nobody)."""
        if self.removed:
            return False
        return self.expired or (self.released and not self.hand_to)

    def remaining(self) -> float:
        """Seconds of Firestore's time left at the read (negative: expired since)."""
        return (self.expires_at - self.read_at).total_seconds()

    def free_for(self, instance: str) -> bool:
        return self.free or (self.released and not self.removed and self.hand_to == instance)

    def as_dict(self) -> dict[str, Any]:
        return {
            "holder": self.holder,
            "token": self.token,
            "expiresAt": self.expires_at.isoformat(),
            "released": self.released,
            **({"handTo": self.hand_to} if self.hand_to else {}),
        }


@dataclass(frozen=True)
class Instance:
    id: str
    process: str
    host: str
    sessions: str
    held: int
    seen_at: datetime
    ttl: float
    read_at: datetime

    @property
    def live(self) -> bool:
        return self.read_at < self.seen_at + timedelta(seconds=self.ttl)


def _lease_of(snap: Any) -> Lease | None:
    raw = snap.to_dict() if snap.exists else None
    if not raw or snap.update_time is None or snap.read_time is None:
        return None
    try:
        return Lease(
            account=snap.id,
            holder=str(raw["holder"]),
            process=str(raw.get("process", "")),
            token=int(raw["token"]),
            ttl=float(raw["ttl"]),
            renewed_at=raw["renewedAt"],
            read_at=snap.read_time,
            update_time=snap.update_time,
            released=bool(raw.get("released", False)),
            hand_to=str(raw.get("handTo") or ""),
            removed=bool(raw.get("removed", False)),
            reason=str(raw.get("reason") or ""),
        )
    except (KeyError, TypeError, ValueError) as exc:
        log.warning("lease of %s is malformed (%r); taken as expired", snap.id, exc)
        return None


class FirestoreLeases:
    """The leases of one instance (`instance`, in this daemon run `process`)."""

    def __init__(self, store: FirestoreStore, instance: str, process: str, ttl: float) -> None:
        self.store = store
        self.client = store.client
        self.instance = instance
        self.process = process
        self.ttl = ttl
        self._watch: Any = None

    def _lease_ref(self, account: str) -> DocumentReference:
        return self.client.collection(self.store.prefix + LEASES).document(account)

    def _head_ref(self, account: str) -> DocumentReference:
        return self.client.collection(self.store.prefix + SESSIONS).document(account)

    def _instance_ref(self, instance: str) -> DocumentReference:
        return self.client.collection(self.store.prefix + INSTANCES).document(instance)

    # --- reading ------------------------------------------------------------------------------

    def read(self, account: str) -> Lease | None:
        with self.store._call(f"{account}: reading the lease"):
            snap = self._lease_ref(account).get(retry=RETRY, timeout=CALL_TIMEOUT)
        self.store._count(reads=1)
        return _lease_of(snap)

    def all(self) -> dict[str, Lease]:
        """Every account's lease (accounts without one are not listed)."""
        col = self.client.collection(self.store.prefix + LEASES)
        with self.store._call("listing the leases"):
            snaps = list(col.stream(retry=RETRY, timeout=CALL_TIMEOUT))
        self.store._count(reads=max(1, len(snaps)))
        leases = (_lease_of(s) for s in snaps if is_account_id(s.id))
        return {lease.account: lease for lease in leases if lease is not None}

    def watch(self, changed: Callable[[list[Lease]], None]) -> None:
        """Call `changed` (from the library's thread) with the leases that changed, first with
        all of them (and again with all of them after a listener was restarted); the library
        reconnects by itself after an outage, at a bounded rate (SupervisedListener)."""

        def on_snapshot(snaps: Any, changes: Any, read_time: Any) -> None:
            leases = []
            for change in changes:
                doc = change.document
                if is_account_id(doc.id):
                    lease = _lease_of(doc)
                    if lease is not None:
                        # a listener's snapshot carries the read time of the whole answer
                        leases.append(_with_read_time(lease, read_time))
            self.store._count(reads=len(changes))  # a listener is billed one read per change
            if leases:
                changed(leases)

        col = self.client.collection(self.store.prefix + LEASES)
        self._watch = SupervisedListener(
            lambda: col, on_snapshot, f"the leases in {self.store.describe()}", name="leases"
        )
        self._watch.start()

    def stop_watching(self) -> None:
        if self._watch is not None:
            self._watch.stop()
            self._watch = None

    # --- acquiring, renewing, releasing -------------------------------------------------------

    def acquire(self, account: str, *, restarted: bool = False, revive: bool = False) -> Lease:
        """Take the account's lease with a new token: if it is free, free for this instance,
        or (`restarted`: this instance's previous run, which the sessions directory's lock
        proves dead) held by this instance id; `revive`: also a removed account's (paired
        again). Raises LeaseHeld or LeaseContended."""
        lease_ref, head_ref = self._lease_ref(account), self._head_ref(account)
        with self.store._call(f"{account}: acquiring the lease"):
            snaps = {
                s.reference.path: s
                for s in self.client.get_all(
                    [lease_ref, head_ref], field_paths=None, retry=RETRY, timeout=CALL_TIMEOUT
                )
            }
            self.store._count(reads=2)
            lease_snap, head_snap = snaps[lease_ref.path], snaps[head_ref.path]
            lease = _lease_of(lease_snap)
            if lease is not None and revive and lease.removed:
                lease = dataclasses.replace(lease, removed=False, released=True, hand_to="")
            if (
                lease is not None
                and not lease.free_for(self.instance)
                and not (restarted and lease.holder == self.instance)
                and lease.process != self.process
            ):
                raise LeaseHeld(lease)
            head = head_snap.to_dict() if head_snap.exists else None
            fence = int((head or {}).get("fence") or 0)
            token = max(lease.token if lease else 0, fence) + 1
            batch = self.client.batch()
            fields = {
                "holder": self.instance,
                "process": self.process,
                "token": token,
                "ttl": self.ttl,
                "renewedAt": SERVER_TIMESTAMP,
                "acquiredAt": SERVER_TIMESTAMP,
                "released": False,
                "handTo": None,
                "removed": False,
                "reason": None,
            }
            if lease_snap.exists:
                when = self.client.write_option(last_update_time=lease_snap.update_time)
                batch.update(lease_ref, fields, option=when)
            else:
                batch.create(lease_ref, fields)
            if head_snap.exists:
                when = self.client.write_option(last_update_time=head_snap.update_time)
                batch.update(head_ref, {"fence": token}, option=when)
            else:
                batch.create(head_ref, {"fence": token})
            try:
                results = batch.commit(retry=RETRY, timeout=CALL_TIMEOUT)
            except (gexc.FailedPrecondition, gexc.AlreadyExists, gexc.NotFound) as exc:
                raise LeaseContended(f"{account}: the lease moved meanwhile ({exc})") from None
            self.store._count(writes=2)
        at = results[0].update_time
        return Lease(account, self.instance, self.process, token, self.ttl, at, at, at)

    def renew(self, lease: Lease) -> Lease:
        """Extend this process's lease (one conditional write); LeaseLost if it is not ours."""
        ref = self._lease_ref(lease.account)
        for _ in range(3):
            when = self.client.write_option(last_update_time=lease.update_time)
            with self.store._call(f"{lease.account}: renewing the lease"):
                try:
                    result = ref.update(
                        {"renewedAt": SERVER_TIMESTAMP},
                        option=when,
                        retry=RETRY,
                        timeout=CALL_TIMEOUT,
                    )
                except (gexc.FailedPrecondition, gexc.NotFound):
                    result = None
            if result is not None:
                self.store._count(writes=1)
                at = result.update_time
                return Lease(
                    lease.account, lease.holder, lease.process, lease.token, lease.ttl, at, at, at
                )
            now = self.read(lease.account)  # written by someone else since our last write
            if now is None or not self._same(now, lease) or now.released:
                raise LeaseLost(lease.account, now)
            lease = now  # touched, still ours (an operator's edit): renew on top of it
        raise LeaseLost(lease.account, lease)

    def release(self, lease: Lease, *, reason: str, hand_to: str = "") -> bool:
        """Give the lease up now (keeping its token), saying why; `hand_to`: only that instance
        may take it before it would have expired. False if it was no longer ours."""
        ref = self._lease_ref(lease.account)
        fields = {
            "released": True,
            "releasedAt": SERVER_TIMESTAMP,
            "handTo": hand_to or None,
            "reason": reason,
        }
        for _ in range(3):
            when = self.client.write_option(last_update_time=lease.update_time)
            with self.store._call(f"{lease.account}: releasing the lease"):
                try:
                    ref.update(fields, option=when, retry=RETRY, timeout=CALL_TIMEOUT)
                except (gexc.FailedPrecondition, gexc.NotFound):
                    pass
                else:
                    self.store._count(writes=1)
                    return True
            now = self.read(lease.account)
            if now is None or not self._same(now, lease) or now.released:
                return False
            lease = now
        return False

    def retire(self, account: str) -> None:
        """The account was removed: its lease stays, released and marked removed, so that no
        instance takes it over from a stale local copy (pairing it again revives it)."""
        fields = {"released": True, "removed": True, "releasedAt": SERVER_TIMESTAMP}
        with self.store._call(f"{account}: retiring the lease"):
            self._lease_ref(account).set(fields, merge=True, retry=RETRY, timeout=CALL_TIMEOUT)
        self.store._count(writes=1)

    def _same(self, a: Lease, b: Lease) -> bool:
        return (a.holder, a.process, a.token) == (b.holder, b.process, b.token)

    # --- instances ----------------------------------------------------------------------------

    def announce(self, host: str, sessions: str, held: int) -> None:
        """Say that this instance is alive (for the others' fair share)."""
        fields = {
            "process": self.process,
            "host": host,
            "sessions": sessions,
            "held": held,
            "seenAt": SERVER_TIMESTAMP,
            "ttl": self.ttl,
        }
        with self.store._call("announcing this instance"):
            self._instance_ref(self.instance).set(fields, retry=RETRY, timeout=CALL_TIMEOUT)
        self.store._count(writes=1)

    def instances(self) -> dict[str, Instance]:
        """Every announced instance, live or not."""
        col = self.client.collection(self.store.prefix + INSTANCES)
        with self.store._call("listing the instances"):
            snaps = list(col.stream(retry=RETRY, timeout=CALL_TIMEOUT))
        self.store._count(reads=max(1, len(snaps)))
        found = {}
        for snap in snaps:
            raw = snap.to_dict() or {}
            try:
                found[snap.id] = Instance(
                    snap.id,
                    str(raw["process"]),
                    str(raw.get("host", "")),
                    str(raw.get("sessions", "")),
                    int(raw.get("held", 0)),
                    raw["seenAt"],
                    float(raw["ttl"]),
                    snap.read_time,
                )
            except (KeyError, TypeError, ValueError):
                continue
        return found

    def check_unique(self, host: str, sessions: str) -> None:
        """Refuse to run as an instance id that another live instance uses (on another host, or
        over another sessions directory): it would take this one's leases for its own."""
        other = self.instances().get(self.instance)
        if other is not None and other.live and (other.host, other.sessions) != (host, sessions):
            raise StoreError(
                f"instance id {self.instance!r} is in use by a live instance on host "
                f"{other.host} (sessions {other.sessions}); this one drives nothing until that "
                "one stops: give every instance its own instance.id in the configuration"
            )

    def leave(self) -> None:
        """This instance stops: the others' fair share no longer counts it."""
        ref = self._instance_ref(self.instance)
        with self.store._call("removing this instance's announcement"):
            snap = ref.get(retry=RETRY, timeout=CALL_TIMEOUT)
            if snap.exists and (snap.to_dict() or {}).get("process") == self.process:
                when = self.client.write_option(last_update_time=snap.update_time)
                with contextlib.suppress(gexc.FailedPrecondition):
                    ref.delete(option=when, retry=RETRY, timeout=CALL_TIMEOUT)
        self.store._count(reads=1, deletes=1)


def _with_read_time(lease: Lease, read_time: Any) -> Lease:
    if not isinstance(read_time, datetime):
        return lease
    return dataclasses.replace(lease, read_at=read_time)
