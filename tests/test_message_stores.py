"""The two message stores (embedded SQLite, Firestore in its emulator) against the same tests:
idempotent writes, per-thread order and counters, receipts, reactions, edits and revokes that
arrive before or after their message, the queries; then what is Firestore's own: the collection
prefix, a write that failed midway, an outage."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from firestore_emulator import Emulator

from wadaemon.messages.firestore_messages import FirestoreMessages
from wadaemon.messages.model import (
    ME,
    Change,
    ChatRead,
    Message,
    Receipt,
    StoredMessage,
    Thread,
    thread_id,
)
from wadaemon.messages.sqlite_messages import SqliteMessages
from wadaemon.messages.store import MessageStore, WriteResult
from wadaemon.store import StoreError, StoreUnavailable
from wadaemon.store.firestore import FirestoreStore

ACCOUNT = "acct"
ALICE = "15550001@s.whatsapp.net"
BOB = "15550002@s.whatsapp.net"
GROUP = "120363000000000001@g.us"


@pytest.fixture(params=["sqlite", "firestore"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MessageStore]:
    if request.param == "sqlite":
        s = SqliteMessages(tmp_path / "messages" / "messages.db")
        yield s
        s.close()
        return
    emulator: Emulator = request.getfixturevalue("firestore_emulator")
    backing = FirestoreStore(emulator.project, write_interval=0.05)
    yield FirestoreMessages(backing)
    backing.client.close()  # type: ignore[no-untyped-call]


@pytest.fixture
def firestore(firestore_emulator: Emulator) -> Iterator[FirestoreStore]:
    backing = FirestoreStore(firestore_emulator.project, write_interval=0.05)
    yield backing
    backing.client.close()  # type: ignore[no-untyped-call]


def msg(
    wa_id: str, ts: float, chat: str = ALICE, sender: str | None = None, **kw: object
) -> Message:
    sender = sender if sender is not None else (ME if kw.get("from_me") else chat)
    return Message(ACCOUNT, chat, sender, wa_id, ts, str(kw.pop("kind", "text")), **kw)  # type: ignore[arg-type]


def mine(wa_id: str, ts: float, chat: str = ALICE, **kw: object) -> Message:
    return msg(wa_id, ts, chat, ME, from_me=True, status="sent", **kw)


def action(
    kind: str, wa_id: str, ts: float, target: Message, sender: str, text: str = ""
) -> Message:
    return msg(
        wa_id,
        ts,
        target.chat,
        sender,
        kind=kind,
        text=text,
        target=target.id,
        target_sender=target.sender,
        from_me=sender == ME,
    )


def one(store: MessageStore, m: Message) -> StoredMessage:
    found = [s for s in store.messages(ACCOUNT, m.chat, limit=1000) if s.message.key == m.key]
    assert len(found) == 1, f"{m.key}: {len(found)} stored"
    return found[0]


def thread(store: MessageStore, chat: str = ALICE) -> Thread:
    (found,) = [t for t in store.threads(ACCOUNT) if t.chat == chat]
    return found


# --- many messages, redelivered ---------------------------------------------------------------


def test_ten_thousand_messages_with_redeliveries_are_stored_once_in_order(
    store: MessageStore,
) -> None:
    rng = random.Random(7)
    chats = [f"1555{n:04d}@s.whatsapp.net" for n in range(49)] + [GROUP]
    originals: list[Message] = []
    for n in range(10_000):
        chat = chats[n % len(chats)]
        from_me = rng.random() < 0.2
        sender = ME if from_me else (chat if chat != GROUP else f"1666{n % 7}@s.whatsapp.net")
        originals.append(
            Message(
                ACCOUNT,
                chat,
                sender,
                f"3EB0{n:012X}",
                1_700_000_000 + rng.randrange(0, 100_000) + rng.random(),
                "text",
                from_me=from_me,
                text=f"message {n}",
                source="history" if rng.random() < 0.1 else "live",
            )
        )
    rng.shuffle(originals)  # arrival order is not timestamp order
    batches: list[list[Message]] = []
    sent = 0
    while sent < len(originals):
        size = rng.randrange(100, 501)
        fresh = originals[sent : sent + int(size * 0.8)]
        sent += len(fresh)
        seen = originals[:sent]  # redeliveries: of this batch and of earlier ones
        batch = fresh + [rng.choice(seen) for _ in range(size - len(fresh))]
        rng.shuffle(batch)
        batches.append(batch)
    batches.insert(len(batches) // 2, batches[len(batches) // 2 - 1])  # a whole batch again

    first_seen: dict[tuple[str, str, str, str], int] = {}
    for batch in batches:
        for m in batch:
            first_seen.setdefault(m.key, len(first_seen))
    arrival = sorted(originals, key=lambda m: first_seen[m.key])

    started = time.monotonic()
    total = WriteResult(0, 0, 0)
    for batch in batches:
        r = store.write(batch)
        total = WriteResult(total.stored + r.stored, total.duplicates + r.duplicates, 0)
    elapsed = time.monotonic() - started
    written = sum(map(len, batches))
    print(
        f"\n{store.describe()}: {written} messages in {len(batches)} batches, "
        f"{elapsed:.1f} s, {written / elapsed:.0f} messages/s"
    )
    assert total.stored == 10_000 and total.duplicates == written - 10_000

    expected_unread: dict[str, int] = {}
    for m in arrival:
        if m.source == "history":
            continue
        expected_unread[m.chat] = 0 if m.from_me else expected_unread.get(m.chat, 0) + 1
    threads = {t.chat: t for t in store.threads(ACCOUNT)}
    assert set(threads) == set(chats)
    stamps = [t.last_message_at for t in store.threads(ACCOUNT)]
    assert stamps == sorted(stamps, reverse=True)
    for chat in chats:
        stored = store.messages(ACCOUNT, chat, limit=1000)
        mine_ = [m for m in arrival if m.chat == chat]
        assert len(stored) == len(mine_) == 200
        assert [s.seq for s in sorted(stored, key=lambda s: s.seq)] == list(range(1, 201))
        by_seq = [s.message.key for s in sorted(stored, key=lambda s: s.seq)]
        assert by_seq == [m.key for m in mine_]  # seq is the order of first arrival
        assert [s.message for s in stored] == sorted(mine_, key=lambda m: m.timestamp)
        order = [(s.message.timestamp, s.seq) for s in stored]
        assert order == sorted(order)
        newest = max(mine_, key=lambda m: m.timestamp)
        t = threads[chat]
        assert t.messages == 200 and t.unread == expected_unread.get(chat, 0)
        assert t.last_message_at == newest.timestamp and t.last_message_id == newest.id

    again = store.write(batches[0])
    assert again == WriteResult(0, len(batches[0]), 0)


# --- receipts -----------------------------------------------------------------------------------


def test_receipts_before_and_after_their_message_and_status_only_moves_up(
    store: MessageStore,
) -> None:
    m1, m2, m3 = mine("M1", 10), mine("M2", 20), mine("M3", 30)
    assert store.write([m1]).stored == 1
    assert one(store, m1).status == "sent"
    assert store.write([Receipt(ACCOUNT, ALICE, ("M1",), "delivered", 11)]).updates == 1
    assert one(store, m1).status == "delivered"
    assert store.write([Receipt(ACCOUNT, ALICE, ("M1",), "sent", 12)]).updates == 0
    assert store.write([Receipt(ACCOUNT, ALICE, ("M1",), "read", 13)]).updates == 1
    assert store.write([Receipt(ACCOUNT, ALICE, ("M1",), "delivered", 14)]).updates == 0
    assert one(store, m1).status == "read"

    # before the message: in an earlier batch, and earlier in the same batch
    early = Receipt(ACCOUNT, ALICE, ("M2", "M3"), "read", 31)
    assert store.write([early]) == WriteResult(0, 0, 0)
    assert store.threads(ACCOUNT)[0].messages == 1  # a pending receipt makes no thread
    assert store.write([Receipt(ACCOUNT, ALICE, ("M2",), "delivered", 32)]).updates == 0
    r = store.write([Receipt(ACCOUNT, ALICE, ("M3",), "played", 33), m2, m3])
    assert r.stored == 2 and r.updates == 2
    assert one(store, m2).status == "read" and one(store, m3).status == "played"
    assert store.write([Receipt(ACCOUNT, ALICE, ("M2", "M3"), "delivered", 34)]).updates == 0
    assert store.write([m2, m3]) == WriteResult(0, 2, 0)
    assert one(store, m2).status == "read" and one(store, m3).status == "played"

    # a receipt names our messages only: a message of the contact with that id is untouched
    theirs = msg("M4", 40)
    store.write([theirs, Receipt(ACCOUNT, ALICE, ("M4",), "read", 41)])
    assert one(store, theirs).status == ""
    assert one(store, m1).to_json()["status"] == "read"


# --- reactions, edits, revokes ------------------------------------------------------------------


def test_reactions_edits_and_revokes_after_the_target_are_applied_once(
    store: MessageStore,
) -> None:
    target = msg("T1", 100, text="hello")
    store.write([target, mine("M1", 101)])
    before = thread(store)
    thumbs = action("reaction", "R1", 110, target, ME, "👍")
    heart = action("reaction", "R2", 111, target, BOB, "❤️")
    r = store.write([thumbs, heart])
    assert r == WriteResult(2, 0, 2)
    assert one(store, target).reactions == {ME: "👍", BOB: "❤️"}
    assert store.write([thumbs, heart]) == WriteResult(0, 2, 0)  # the same reactions again
    assert one(store, target).reactions == {ME: "👍", BOB: "❤️"}

    store.write([action("reaction", "R3", 120, target, BOB, "")])  # bob removes his
    assert one(store, target).reactions == {ME: "👍"}
    store.write([action("reaction", "R0", 105, target, BOB, "😮")])  # older: late, ignored
    assert one(store, target).reactions == {ME: "👍"}
    store.write([action("reaction", "R4", 121, target, ME, "😂")])  # replaces mine
    assert one(store, target).reactions == {ME: "😂"}

    store.write([action("edit", "E1", 130, target, ALICE, "hello, edited")])
    store.write([action("edit", "E0", 125, target, ALICE, "older edit")])
    assert one(store, target).edited_text == "hello, edited"
    assert store.write([action("revoke", "V1", 140, target, ALICE)]).updates == 1
    assert store.write([action("revoke", "V2", 141, target, ALICE)]).updates == 0
    final = one(store, target)
    assert final.revoked and final.edited_text == "hello, edited" and final.message == target

    after = thread(store)  # reactions, edits, revokes: stored, not unread, not newer activity
    assert after.messages == before.messages + 9
    assert after.unread == before.unread == 0
    assert (after.last_message_at, after.last_message_id) == (101, "M1")
    reaction = one(store, heart)
    assert reaction.message.kind == "reaction" and reaction.message.text == "❤️"


def test_reactions_edits_and_revokes_before_the_target_wait_for_it(store: MessageStore) -> None:
    late = mine("L1", 200, text="sent from the phone")
    later = msg("L2", 201, text="hi")
    actions: list[Change] = [
        action("reaction", "R1", 210, late, ALICE, "👍"),
        action("reaction", "R2", 211, late, BOB, "🎉"),
        action("reaction", "R3", 212, late, BOB, ""),
        action("edit", "E1", 213, late, ME, "sent, edited"),
        action("revoke", "V1", 214, later, ALICE),
    ]
    r = store.write(actions)
    assert r == WriteResult(5, 0, 0)
    assert store.write([late]) == WriteResult(1, 0, 1)  # everything pending, applied at once
    stored = one(store, late)
    assert stored.reactions == {ALICE: "👍"} and stored.edited_text == "sent, edited"
    assert not stored.revoked and stored.status == "sent"
    # in the same batch: the reaction before its target
    early = msg("L3", 202)
    store.write([action("reaction", "R4", 220, early, ME, "👀"), early, later])
    assert one(store, early).reactions == {ME: "👀"} and one(store, later).revoked
    store.write(actions)  # redelivered: nothing moves
    assert one(store, late).reactions == {ALICE: "👍"}
    assert thread(store).messages == 9 and thread(store).unread == 2


# --- unread -------------------------------------------------------------------------------------


def test_from_me_and_chat_read_reset_unread_and_history_does_not_count(
    store: MessageStore,
) -> None:
    store.write([msg("A1", 1), msg("A2", 2), msg("A3", 3)])
    assert thread(store).unread == 3
    store.write([msg("H1", 0.5, source="history"), mine("H2", 0.6, source="history")])
    assert thread(store).unread == 3 and thread(store).messages == 5
    assert (thread(store).last_message_at, thread(store).last_message_id) == (3, "A3")
    store.write([mine("M1", 4)])
    assert thread(store).unread == 0
    store.write([msg("A4", 5), msg("A5", 6), msg("A1", 1)])
    assert thread(store).unread == 2
    assert store.write([ChatRead(ACCOUNT, ALICE, 7)]).updates == 1
    assert thread(store).unread == 0
    assert store.write([ChatRead(ACCOUNT, ALICE, 8)]).updates == 0
    assert store.write([ChatRead(ACCOUNT, BOB, 8)]) == WriteResult(0, 0, 0)
    assert [t.chat for t in store.threads(ACCOUNT)] == [ALICE]
    # the group's subject names its thread; a contact's push name names a one-to-one chat once
    store.write([msg("G1", 9, GROUP, ALICE, push_name="Alice", chat_name="Friends")])
    store.write([msg("B1", 10, BOB, push_name="Bob"), msg("B2", 11, BOB, push_name="Robert")])
    assert thread(store, GROUP).name == "Friends" and thread(store, BOB).name == "Bob"
    assert thread(store).name == ""
    assert [t.chat for t in store.threads(ACCOUNT)] == [BOB, GROUP, ALICE]


# --- queries ------------------------------------------------------------------------------------


def test_messages_by_chat_since_and_limit(store: MessageStore) -> None:
    store.write([msg(f"A{n}", 100 + n) for n in range(10)])
    store.write([msg(f"B{n}", 100.5 + n, BOB) for n in range(10)])
    store.write([msg("A-same", 105), msg("A-late", 50)])  # the same second, and a late one
    alice = store.messages(ACCOUNT, ALICE, limit=100)
    assert [s.message.id for s in alice][:7] == ["A-late", "A0", "A1", "A2", "A3", "A4", "A5"]
    assert [s.message.id for s in alice][7] == "A-same"  # after A5: same timestamp, later seq
    assert [s.message.id for s in store.messages(ACCOUNT, ALICE, since=108)] == ["A8", "A9"]
    assert [s.message.id for s in store.messages(ACCOUNT, ALICE, since=101, limit=2)] == [
        "A1",
        "A2",
    ]
    both = store.messages(ACCOUNT, since=103, limit=5)
    assert [s.message.id for s in both] == ["A3", "B3", "A4", "B4", "A5"]
    assert len(store.messages(ACCOUNT, limit=1000)) == 22
    assert store.messages(ACCOUNT, "nobody@s.whatsapp.net") == []
    assert store.messages("other", ALICE) == []
    assert store.messages(ACCOUNT, since=1000) == []


def test_the_sqlite_store_makes_its_directory_private(tmp_path: Path) -> None:
    s = SqliteMessages(tmp_path / "a" / "b" / "messages.db")
    s.write([msg("X1", 1)])
    s.close()
    assert (tmp_path / "a" / "b").stat().st_mode & 0o777 == 0o700
    again = SqliteMessages(tmp_path / "a" / "b" / "messages.db")
    assert [m.message.id for m in again.messages(ACCOUNT)] == ["X1"]
    assert again.describe() == f"embedded message store {tmp_path / 'a' / 'b' / 'messages.db'}"
    again.close()


# --- Firestore ----------------------------------------------------------------------------------


def test_firestore_honours_the_collection_prefix(firestore_emulator: Emulator) -> None:
    a = FirestoreStore(firestore_emulator.project, collection_prefix="a_", write_interval=0.05)
    b = FirestoreStore(firestore_emulator.project, collection_prefix="b_", write_interval=0.05)
    try:
        FirestoreMessages(a).write([msg("P1", 1), mine("P2", 2, chat=BOB)])
        FirestoreMessages(b).write([msg("Q1", 3)])
        tid = thread_id(ACCOUNT, ALICE)
        doc = a.client.collection("a_threads").document(tid).get()
        assert doc.exists and (doc.to_dict() or {})["messages"] == 1
        stored = doc.reference.collection("messages").document(f"{ALICE}:P1").get()
        assert (stored.to_dict() or {})["fromMe"] is False
        assert list(a.client.collection("threads").stream()) == []
        assert [m.message.id for m in FirestoreMessages(a).messages(ACCOUNT)] == ["P1", "P2"]
        assert [m.message.id for m in FirestoreMessages(b).messages(ACCOUNT)] == ["Q1"]
        assert [t.chat for t in FirestoreMessages(b).threads(ACCOUNT)] == [ALICE]
        assert a.counters["writes"] == 4 and a.counters["reads"] > 0
    finally:
        a.client.close()  # type: ignore[no-untyped-call]
        b.client.close()  # type: ignore[no-untyped-call]


def test_firestore_batches_a_large_thread_and_ignores_what_a_failed_write_left(
    firestore: FirestoreStore,
) -> None:
    store = FirestoreMessages(firestore)
    calls: list[str] = []
    get_all, batch = firestore.client.get_all, firestore.client.batch

    def spy_get_all(refs: list[object], **kw: object) -> object:
        calls.append(f"get_all {len(refs)}")
        return get_all(refs, **kw)  # type: ignore[arg-type]

    def spy_batch() -> object:
        calls.append("batch")
        return batch()

    many = [msg(f"N{n:04d}", n) for n in range(1200)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(firestore.client, "get_all", spy_get_all)
        patch.setattr(firestore.client, "batch", spy_batch)
        r = store.write(many[:600])
    assert calls == ["get_all 300", "get_all 300", "get_all 1", "batch", "batch"]
    assert r.stored == 600 and firestore.counters["writes"] == 601
    assert firestore.counters["reads"] == 601  # one read per document: the thread and the messages
    # a write that stored message documents, then failed before their thread document
    ref = firestore.client.collection("threads").document(thread_id(ACCOUNT, ALICE))
    for m, seq in ((many[600], 601), (many[601], 602)):
        doc = {"account": ACCOUNT, "chat": ALICE, "sender": ALICE, "id": m.id, "kind": "text"}
        doc.update(timestamp=m.timestamp, seq=seq, prefix="")
        ref.collection("messages").document(m.doc_id).set(doc)
    assert len(store.messages(ACCOUNT, ALICE, since=599)) == 1  # not counted by the thread
    r = store.write(many[600:])  # the caller writes the whole batch again
    assert r == WriteResult(600, 0, 0)
    assert thread(store).messages == 1200 and thread(store).unread == 1200
    stored = store.messages(ACCOUNT, limit=2000)
    assert [s.seq for s in stored] == list(range(1, 1201))


def test_firestore_down_gives_store_unavailable_and_the_same_batch_writes_after(
    firestore: FirestoreStore, firestore_emulator: Emulator
) -> None:
    store = FirestoreMessages(firestore)
    store.write([msg("D0", 1)])
    batch: list[Change] = [msg("D1", 2), Receipt(ACCOUNT, ALICE, ("D2",), "read", 3), mine("D2", 3)]
    firestore_emulator.stop()
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as info:
        store.write(batch)
    failed_after = time.monotonic() - started
    assert f"is the emulator running at {firestore_emulator.address}" in str(info.value)
    assert failed_after < 30
    firestore_emulator.start()  # empty again: its data was in memory
    started = time.monotonic()
    while True:
        try:
            r = store.write(batch)
            break
        except StoreUnavailable:
            assert time.monotonic() - started < 60, "writes did not resume"
            time.sleep(0.5)
    print(f"\nStoreUnavailable after {failed_after:.1f} s; writes resumed after the restart")
    assert r == WriteResult(2, 0, 1)
    assert store.write(batch) == WriteResult(0, 2, 0)
    assert one(store, mine("D2", 3)).status == "read"
    assert thread(store).messages == 2 and thread(store).unread == 0


def test_a_write_names_the_changes_that_changed_something(store: MessageStore) -> None:
    """What the readers (event stream, webhooks) get: new messages and receipts that moved a
    status, not redeliveries."""
    m1, m2 = msg("N1", 10), mine("N2", 11)
    seen = Receipt(ACCOUNT, ALICE, ("N2",), "read", 12)
    assert store.write([m1, m2, m1, seen]).new == (m1, m2, seen)
    assert store.write([m1, m2, seen]).new == ()


def test_two_writers_of_one_firestore_thread_lose_no_count(firestore: FirestoreStore) -> None:
    """Two writers at once (an instance flushing an old journal while another drives the
    account): the loser of each race writes again, and the thread counts every message once."""
    stores = [FirestoreMessages(firestore), FirestoreMessages(firestore)]
    conflicts = []

    def writer(n: int) -> None:
        store = stores[n]
        for b in range(15):
            batch = [msg(f"W{n}-{b}-{i}", 1000 + b) for i in range(4)]
            while True:
                try:
                    store.write(batch)
                    break
                except StoreError:  # the thread changed since it was read: write it again
                    conflicts.append(n)

    threads = [threading.Thread(target=writer, args=(n,)) for n in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    stored = stores[0].messages(ACCOUNT, ALICE, limit=1000)
    assert len(stored) == 120
    assert sorted(s.seq for s in stored) == list(range(1, 121))
    assert thread(stores[0]).messages == 120 and thread(stores[0]).unread == 120
    print(f"{len(conflicts)} conflicting writes retried")
