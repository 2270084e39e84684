"""The two outbox backends against the same cases (SQLite, and Firestore in the real emulator),
then what only Firestore has: documents written by other programs, and its listener."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import wait_until
from firestore_emulator import Emulator

from wadaemon.messages.firestore_outbox import FirestoreOutbox
from wadaemon.messages.sqlite_outbox import SqliteOutbox
from wadaemon.messages.store import (
    InvalidEntry,
    OutboxConflict,
    OutboxEntry,
    OutboxStore,
    invalid_reason,
)
from wadaemon.store.firestore import FirestoreStore


@pytest.fixture(params=["sqlite", "firestore"])
def outbox(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OutboxStore]:
    if request.param == "sqlite":
        sqlite = SqliteOutbox(tmp_path / "outbox" / "outbox.db")
        yield sqlite
        sqlite.close()
        return
    emulator: Emulator = request.getfixturevalue("firestore_emulator")
    store = FirestoreStore(emulator.project, write_interval=0.05)
    firestore = FirestoreOutbox(store)
    yield firestore
    firestore.close()
    store.client.close()  # type: ignore[no-untyped-call]


@pytest.fixture
def firestore(firestore_emulator: Emulator) -> Iterator[FirestoreOutbox]:
    store = FirestoreStore(firestore_emulator.project, write_interval=0.05)
    outbox = FirestoreOutbox(store)
    yield outbox
    outbox.close()
    store.client.close()  # type: ignore[no-untyped-call]


def entry(key: str, account: str = "acct", text: str = "hello", **fields: object) -> OutboxEntry:
    return OutboxEntry(key=key, account=account, to="4915112345678", text=text, **fields)  # type: ignore[arg-type]


def test_adding_a_key_twice_keeps_the_first_entry(outbox: OutboxStore) -> None:
    first, created = outbox.add(entry("k1", text="first"))
    assert created and first.state == "queued" and first.created_at > 0
    again, created = outbox.add(entry("k1", text="second"))
    assert not created
    assert again == first and again.text == "first"
    assert outbox.get("k1") == first
    assert outbox.get("missing") is None
    with pytest.raises(InvalidEntry):
        outbox.add(entry("k2", account="Not An Account"))
    with pytest.raises(InvalidEntry):
        outbox.add(entry("k/3"))


def test_update_is_a_compare_and_swap_on_state_and_updated_at(outbox: OutboxStore) -> None:
    queued, _ = outbox.add(entry("k1"))
    claim = queued.moved(state="sending", process="p1", attempts=queued.attempts + 1)
    written = outbox.update(claim, "queued", queued.updated_at)
    assert written == claim and outbox.get("k1") == claim

    with pytest.raises(OutboxConflict, match=r"k1.*sending"):  # wrong state
        outbox.update(queued.moved(state="sending", process="p2"), "queued")
    with pytest.raises(OutboxConflict, match="k1"):  # right state, stale updated_at
        outbox.update(claim.moved(state="sent", wa_id="W1"), "sending", queued.updated_at)
    assert outbox.get("k1") == claim

    # the state alone (expected_updated_at None), then the version read
    retry = outbox.update(claim.moved(state="queued", next_at=time.time() + 5), "sending")
    sent = outbox.update(retry.moved(state="sent", wa_id="W1"), "queued", retry.updated_at)
    assert outbox.get("k1") == sent
    with pytest.raises(OutboxConflict, match="no such entry"):
        outbox.update(entry("nope").moved(state="sending"), "queued")


def test_two_senders_racing_for_one_entry_claim_it_once(outbox: OutboxStore) -> None:
    for round_ in range(20):
        read, _ = outbox.add(entry(f"race-{round_}"))
        start = threading.Barrier(2)
        won: list[str] = []
        lost: list[str] = []

        def claim(
            process: str,
            read: OutboxEntry,
            start: threading.Barrier,
            won: list[str],
            lost: list[str],
        ) -> None:
            moved = read.moved(state="sending", process=process, attempts=read.attempts + 1)
            start.wait()
            try:
                outbox.update(moved, "queued", read.updated_at)
                won.append(process)
            except OutboxConflict:
                lost.append(process)

        threads = [
            threading.Thread(target=claim, args=(f"p{n}", read, start, won, lost)) for n in range(2)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(won) == 1 and len(lost) == 1, (round_, won, lost)
        stored = outbox.get(f"race-{round_}")
        assert stored is not None and stored.process == won[0] and stored.attempts == 1


def test_pending_lists_queued_and_sending_entries_of_the_accounts_oldest_first(
    outbox: OutboxStore,
) -> None:
    now = time.time()
    outbox.add(entry("c", created_at=now - 10))
    outbox.add(entry("a", created_at=now - 30))
    outbox.add(entry("b", account="other", created_at=now - 20))
    outbox.add(entry("d", account="third", created_at=now - 40))
    done, _ = outbox.add(entry("e", created_at=now - 50))
    outbox.update(done.moved(state="failed", reason="no"), "queued")
    sending, _ = outbox.add(entry("f", created_at=now - 5))
    outbox.update(sending.moved(state="sending", process="p"), "queued")
    assert [e.key for e in outbox.pending({"acct"})] == ["a", "c", "f"]
    assert [e.key for e in outbox.pending({"acct", "other"})] == ["a", "b", "c", "f"]
    assert outbox.pending({"nobody"}) == []


# --- Firestore only: documents from other programs, the listener --------------------------------


class Seen:
    """What a watch() reported, by key."""

    def __init__(self) -> None:
        self.entries: dict[str, OutboxEntry] = {}
        self.lock = threading.Lock()

    def __call__(self, entry: OutboxEntry) -> None:
        with self.lock:
            self.entries[entry.key] = entry

    def has(self, key: str) -> bool:
        with self.lock:
            return key in self.entries


def foreign_write(outbox: FirestoreOutbox, key: str, fields: dict[str, object]) -> None:
    """Another program queues a message, with the plain Google client."""
    outbox.client.collection("outbox").document(key).set(fields)


def test_a_document_from_another_program_is_watched_and_pending(
    firestore: FirestoreOutbox,
) -> None:
    seen = Seen()
    stop = firestore.watch(seen)
    try:
        foreign_write(firestore, "ext-1", {"account": "acct", "to": "4915112345678", "text": "hi"})
        wait_until(lambda: seen.has("ext-1"), timeout=10)
        got = seen.entries["ext-1"]
        assert (got.state, got.attempts, got.reason, invalid_reason(got)) == ("queued", 0, "", "")
        assert got.created_at > 0 and got.updated_at > 0
        [pending] = firestore.pending({"acct"})
        assert pending == got
        # the sender claims and sends it: only its own fields change
        claim = firestore.update(pending.moved(state="sending"), "queued", pending.updated_at)
        firestore.update(claim.moved(state="sent", wa_id="W"), "sending", claim.updated_at)
        raw = firestore.client.collection("outbox").document("ext-1").get().to_dict() or {}
        assert raw["state"] == "sent" and raw["text"] == "hi" and "createdAt" not in raw
        assert firestore.pending({"acct"}) == []
    finally:
        stop()


def test_invalid_documents_from_another_program_are_reported_to_be_failed(
    firestore: FirestoreOutbox,
) -> None:
    seen = Seen()
    stop = firestore.watch(seen)
    try:
        foreign_write(firestore, "no-text", {"account": "acct", "to": "49151"})
        foreign_write(firestore, "bad-types", {"account": "acct", "to": ["x"], "text": 5})
        foreign_write(
            firestore, "bad-state", {"account": "acct", "to": "1", "text": "t", "state": 7}
        )
        foreign_write(firestore, "no-account", {"to": "49151", "text": "t"})
        foreign_write(firestore, "good", {"account": "acct", "to": 4915112345678, "text": "t"})
        keys = ["no-text", "bad-types", "bad-state", "no-account", "good"]
        wait_until(lambda: all(seen.has(k) for k in keys), timeout=10)
        pending = {e.key: e for e in firestore.pending({"acct"})}
        assert sorted(pending) == sorted(keys)
        assert pending["good"].to == "4915112345678" and invalid_reason(pending["good"]) == ""
        for key in keys[:-1]:
            reason = invalid_reason(pending[key])
            assert reason and pending[key].state == "queued", key
            # the sender marks it failed, with the reason
            failed = pending[key].moved(state="failed", reason=reason)
            firestore.update(failed, "queued", pending[key].updated_at)
        assert "`text` is empty" in invalid_reason(pending["no-text"])
        assert "`to` is a list" in invalid_reason(pending["bad-types"])
        assert "state 7" in invalid_reason(pending["bad-state"])
        assert [e.key for e in firestore.pending({"acct"})] == ["good"]
        raw = firestore.client.collection("outbox").document("no-text").get().to_dict() or {}
        assert raw["state"] == "failed" and "`text` is empty" in raw["reason"]
        assert raw["to"] == "49151" and "text" not in raw  # the other program's fields stay
        # the listener still works
        firestore.add(entry("after"))
        wait_until(lambda: seen.has("after"), timeout=10)
    finally:
        stop()


def test_the_listener_delivers_after_an_outage(
    firestore: FirestoreOutbox, firestore_emulator: Emulator
) -> None:
    seen = Seen()
    stop = firestore.watch(seen)
    try:
        firestore.add(entry("before"))
        wait_until(lambda: seen.has("before"), timeout=10)
        cpu = time.process_time()
        firestore_emulator.stop()
        time.sleep(5)  # the listener meets the outage, and keeps trying
        # the library reopens the stream without backoff unless throttled: ~40% of a CPU
        assert time.process_time() - cpu < 1.0
        firestore_emulator.start()  # empty: the emulator keeps no data
        foreign_write(firestore, "after", {"account": "acct", "to": "49151", "text": "t"})
        wait_until(lambda: seen.has("after"), timeout=30)
    finally:
        stop()


def test_a_listener_that_stopped_is_started_again(firestore: FirestoreOutbox) -> None:
    seen = Seen()
    stop = firestore.watch(seen)
    try:
        listener = stop.__self__  # type: ignore[attr-defined]
        listener._watch.close()  # as the library does on an error it does not recover from
        foreign_write(firestore, "later", {"account": "acct", "to": "49151", "text": "t"})
        wait_until(lambda: seen.has("later"), timeout=15)
        assert listener.restarts == 1
    finally:
        stop()
    stop()  # stopping twice is harmless
    foreign_write(firestore, "unseen", {"account": "acct", "to": "49151", "text": "t"})
    time.sleep(1)
    assert not seen.has("unseen")
