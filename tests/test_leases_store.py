"""Account leases in the real Firestore emulator: tokens, expiry on Firestore's clock, fencing
in the head's compare-and-swap, release and hand-over, the listener, instance announcements."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import pytest
from conftest import make_db, run_sql
from firestore_emulator import Emulator

from wadaemon.backup import BackupEngine
from wadaemon.keyring import Key, Keyring
from wadaemon.layout import SessionsLayout
from wadaemon.replica import Replica
from wadaemon.store import Fenced
from wadaemon.store.firestore import FirestoreStore
from wadaemon.store.firestore_leases import (
    FirestoreLeases,
    Lease,
    LeaseContended,
    LeaseHeld,
    LeaseLost,
)

TTL = 2.0


@pytest.fixture
def store(firestore_emulator: Emulator) -> Iterator[FirestoreStore]:
    s = FirestoreStore(firestore_emulator.project, write_interval=0.05)
    yield s
    s.client.close()  # type: ignore[no-untyped-call]


def leases(store: FirestoreStore, instance: str, ttl: float = TTL) -> FirestoreLeases:
    return FirestoreLeases(store, instance, f"{instance}:{os.urandom(4).hex()}", ttl)


def test_a_lease_is_taken_once_renewed_and_its_token_grows_on_every_acquisition(
    store: FirestoreStore,
) -> None:
    a, b = leases(store, "a"), leases(store, "b")
    first = a.acquire("acct")
    assert first.token == 1 and first.holder == "a"
    with pytest.raises(LeaseHeld) as held:
        b.acquire("acct")
    assert held.value.lease.holder == "a" and not held.value.lease.expired
    renewed = a.renew(first)
    assert renewed.token == 1 and renewed.renewed_at > first.renewed_at
    assert a.release(renewed, reason="stopping")
    second = b.acquire("acct")  # released: free at once, without waiting for the TTL
    assert second.token == 2 and second.holder == "b"
    with pytest.raises(LeaseLost):
        a.renew(renewed)  # a's old lease is gone for good
    assert store.client.collection("wa_sessions").document("acct").get().get("fence") == 2


def test_expiry_is_decided_on_firestores_clock(store: FirestoreStore) -> None:
    a, b = leases(store, "a"), leases(store, "b")
    lease = a.acquire("acct")
    seen = b.read("acct")
    assert seen is not None and not seen.expired and 0 < seen.remaining() <= TTL
    time.sleep(TTL + 0.3)  # a does not renew: paused, or dead
    seen = b.read("acct")
    assert seen is not None and seen.expired and seen.remaining() < 0
    taken = b.acquire("acct")
    assert taken.token == lease.token + 1
    with pytest.raises(LeaseLost) as lost:
        a.renew(lease)
    assert lost.value.current is not None and lost.value.current.holder == "b"


def test_two_instances_racing_for_a_free_lease_get_one_holder(store: FirestoreStore) -> None:
    racers = [leases(store, f"i{n}") for n in range(4)]
    won: list[Lease] = []
    lost: list[Exception] = []
    barrier = threading.Barrier(len(racers))

    def race(r: FirestoreLeases) -> None:
        barrier.wait()
        try:
            won.append(r.acquire("acct"))
        except (LeaseHeld, LeaseContended) as exc:
            lost.append(exc)

    threads = [threading.Thread(target=race, args=(r,)) for r in racers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(lost) == 3
    stored = racers[0].read("acct")
    assert stored is not None and stored.holder == won[0].holder and stored.token == 1


def test_the_token_never_goes_back_when_the_lease_document_is_deleted(
    store: FirestoreStore,
) -> None:
    a, b = leases(store, "a"), leases(store, "b")
    for _ in range(3):
        a.release(a.acquire("acct"), reason="stopping")
    store.client.collection("leases").document("acct").delete()
    assert b.acquire("acct").token == 4  # from the fence kept in wa_sessions/acct


def test_a_lease_handed_to_one_instance_is_free_only_for_it(store: FirestoreStore) -> None:
    a, b, c = leases(store, "a"), leases(store, "b"), leases(store, "c")
    lease = a.acquire("acct")
    assert a.release(lease, reason="moved", hand_to="c")
    with pytest.raises(LeaseHeld):
        b.acquire("acct")
    assert c.acquire("acct").holder == "c"


def test_a_restarted_instance_takes_its_own_lease_back_at_once(store: FirestoreStore) -> None:
    before = leases(store, "a")
    old = before.acquire("acct")  # then the process dies (kill -9): the lease stays
    after = leases(store, "a")  # the same instance, a new run
    with pytest.raises(LeaseHeld):
        after.acquire("acct")
    taken = after.acquire("acct", restarted=True)
    assert taken.token == old.token + 1
    with pytest.raises(LeaseLost):
        before.renew(old)


def test_a_head_switch_under_an_older_token_is_refused(
    store: FirestoreStore, tmp_path: os.PathLike[str]
) -> None:
    keyring = Keyring(Key.from_bytes(os.urandom(32), "test key"))
    layout = SessionsLayout(tmp_path / "sessions")  # type: ignore[operator]
    layout.prepare()
    replica = Replica(store, keyring, keep_generations=5)
    engine = BackupEngine(layout, replica)
    db = layout.account_dir("acct") / "session.db"
    make_db(db, rows=10)
    a, b = leases(store, "a"), leases(store, "b")
    held = {"acct": a.acquire("acct").token}
    replica.fence = held.get
    first = engine.backup("acct")
    assert first.generation == 1
    # b takes the account over (a was paused past its TTL): the fence rises to 2
    time.sleep(TTL + 0.3)
    b.acquire("acct")
    run_sql(db, "INSERT INTO t (v) VALUES (x'00')")
    with pytest.raises(Fenced):
        engine.backup("acct")  # a still believes it holds token 1
    head = replica.read_head("acct")
    assert head is not None and head.generation == 1  # nothing committed under the old token
    replica.fence = lambda account: None  # no lease at all: refused as well
    with pytest.raises(Fenced):
        engine.backup("acct")


def test_the_listener_sees_acquisitions_and_releases(store: FirestoreStore) -> None:
    a, b = leases(store, "a"), leases(store, "b")
    seen: list[Lease] = []
    got = threading.Event()

    def changed(changes: list[Lease]) -> None:
        seen.extend(changes)
        if any(x.released for x in changes):
            got.set()

    b.watch(changed)
    try:
        a.release(a.acquire("acct"), reason="stopping")
        assert got.wait(10)
    finally:
        b.stop_watching()
    assert any(x.holder == "a" and x.released for x in seen)


def test_instances_announce_themselves_and_expire(store: FirestoreStore) -> None:
    a, b = leases(store, "a"), leases(store, "b")
    a.announce("host-a", "/s", held=3)
    b.announce("host-b", "/s", held=0)
    found = a.instances()
    assert {i for i, x in found.items() if x.live} == {"a", "b"}
    assert found["a"].held == 3
    b.leave()
    assert set(a.instances()) == {"a"}
    time.sleep(TTL + 0.3)
    assert not a.instances()["a"].live
