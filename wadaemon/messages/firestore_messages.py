"""The Firestore message store, in the project (and collection prefix) of the backup store.

{prefix}threads/{account}:{chat}              account, chat, name, lastMessageAt, lastMessageId,
                                              messages (count), unread, lastSeq (the thread's
                                              arrival counter), pending (see below)
{prefix}threads/{threadId}/messages/{sender}:{id}
                                              the Message in camelCase (account, chat, sender,
                                              id, timestamp, kind, fromMe, text, pushName,
                                              chatName, quotedId, target, targetSender, media,
                                              source), status, reactions (sender -> emoji),
                                              reactionsAt (sender -> timestamp of that sender's
                                              newest reaction), editedText, editedAt (null:
                                              never edited), revoked, seq, and prefix (the
                                              collection prefix, for the collection-group query)

Times (timestamp, lastMessageAt, reactionsAt, editedAt) are float seconds since the epoch, as
WhatsApp gives them: they round-trip exactly and order as numbers.

Receipts, reactions, edits and revokes for a message not stored yet are kept in the thread
document's `pending` map (message document id -> the merged state, plus `at`), at most
PENDING_MAX per thread (the oldest are dropped), and applied when the message arrives. The
state rules are those of the embedded store (sqlite_messages.py).

One write() reads every document it needs with get_all (the threads, the messages, their
targets), computes the new state in memory (firestore_docs.py), then commits batched writes of
at most BATCH_WRITES documents. A thread's message documents and its thread document go in the
same batch; only a thread with more changed documents than a batch holds is split, its thread
document last. A message document counts as stored only once its thread document counts it
(seq <= lastSeq): a batch written in part is written again whole by the caller, and what the
first attempt left behind is overwritten, never counted twice. Only the instance driving an
account writes its threads, one call at a time; should two write at once all the same (an
instance flushing an old journal after another took the account over), each thread document is
written on the condition that it is unchanged since it was read (or created only if absent), so
the loser's batch fails whole (StoreError) and the caller writes its changes again: no count is
lost, no arrival number given twice.

So that the round trips of one write() overlap, its get_all chunks are read, and its batches
committed, COMMITTERS at a time (the client is thread-safe). Batches of whole threads are
independent: they are packed to about a COMMITTERS-th of the write each and committed
together; the batches of a split thread are committed one after the other, its thread document
in the last, so the rule above holds. write() returns (or raises) only once every call it
started has ended: nothing of a failed attempt lands after the caller writes the batch again.

Indexes needed in production (the emulator needs none): messages of one chat order by
(timestamp, seq): a composite index on the `messages` collection, timestamp ASC, seq ASC; all
chats of an account use a collection-group query: a composite index with collection-group
scope on `messages`: account ASC, prefix ASC, timestamp ASC, seq ASC.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, TypeVar

from google.cloud.firestore_v1.base_query import FieldFilter
from google.cloud.firestore_v1.collection import CollectionReference
from google.cloud.firestore_v1.document import DocumentReference
from google.cloud.firestore_v1.query import Query

from wadaemon.messages.firestore_docs import MsgKey, Run, stored_message
from wadaemon.messages.model import (
    ME,
    Change,
    Message,
    Receipt,
    StoredMessage,
    Thread,
    message_id,
    thread_id,
)
from wadaemon.messages.sqlite_messages import new_thread, target_key
from wadaemon.messages.store import WriteResult
from wadaemon.store.firestore import CALL_TIMEOUT, GET_ALL_REFS, RETRY, FirestoreStore

THREADS = "threads"
MESSAGES = "messages"
BATCH_WRITES = 500
COMMITTERS = 4  # calls (get_all chunks, batch commits) of one write() in flight at once
MIN_BATCH = 50  # writes per batch below which a batch is not split further to spread the load

Writes = list[tuple[DocumentReference, dict[str, Any]]]
T = TypeVar("T")


class FirestoreMessages:
    # changes per write() the Inbox gives: a write costs one get_all and a few commits, whatever
    # its size (2000 over 50 chats measured 1.1-1.4 times the rate of 500: docs/performance.md)
    write_batch = 2000

    def __init__(self, store: FirestoreStore) -> None:
        self.store = store
        self.client = store.client
        self._pool: ThreadPoolExecutor | None = None

    def describe(self) -> str:
        return f"messages in {self.store.describe()}"

    def close(self) -> None:
        """The client belongs to the backup store, which closes it."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _each(self, call: Callable[[T], None], items: Sequence[T]) -> None:
        """call(item) for each item, COMMITTERS at a time; returns once every call has ended
        (raising the first exception, after the others ended too)."""
        if len(items) <= 1:
            for item in items:
                call(item)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(COMMITTERS, thread_name_prefix="messages-firestore")
        futures = [self._pool.submit(call, item) for item in items]
        wait(futures)
        for future in futures:
            future.result()

    def _threads(self) -> CollectionReference:
        return self.client.collection(self.store.prefix + THREADS)

    def _thread_ref(self, tid: str) -> DocumentReference:
        return self._threads().document(tid)

    def _message_ref(self, key: MsgKey) -> DocumentReference:
        messages: CollectionReference = self._thread_ref(key[0]).collection(MESSAGES)
        return messages.document(key[1])

    # --- writing ------------------------------------------------------------------------------

    def write(self, changes: Sequence[Change]) -> WriteResult:
        if not changes:
            return WriteResult(0, 0, 0)
        tids: dict[str, tuple[str, str]] = {}
        wanted: set[MsgKey] = set()
        for change in changes:
            tid = thread_id(change.account, change.chat)
            tids[tid] = (change.account, change.chat)
            if isinstance(change, Message):
                wanted.add((tid, change.doc_id))
                target = target_key(change)
                if target is not None:
                    wanted.add((tid, message_id(target[2], target[3])))
            elif isinstance(change, Receipt):
                wanted.update((tid, message_id(ME, wa_id)) for wa_id in change.ids)
        threads, msgs, read_at = self._load(tids, wanted)
        run = Run(threads, msgs, self.store.prefix)
        new: list[Change] = []  # what changed something, for the readers
        for change in changes:
            before = run.stored + run.updates
            run.apply(change)
            if run.stored + run.updates > before:
                new.append(change)
        self._commit(run, read_at)
        return WriteResult(run.stored, run.duplicates, run.updates, tuple(new))

    def _load(
        self, tids: dict[str, tuple[str, str]], wanted: set[MsgKey]
    ) -> tuple[
        dict[str, dict[str, Any] | None], dict[MsgKey, dict[str, Any] | None], dict[str, Any]
    ]:
        """(threads, messages, update time of each thread document read, by path)."""
        refs = {self._thread_ref(t).path: t for t in tids}
        read_at: dict[str, Any] = {}
        msg_paths = {self._message_ref(k).path: k for k in sorted(wanted)}
        docs: dict[str, dict[str, Any]] = {}
        all_refs = [self._thread_ref(t) for t in tids]
        all_refs += [self._message_ref(k) for k in msg_paths.values()]
        what = f"reading {len(tids)} threads and {len(wanted)} messages"
        chunks = [all_refs[at : at + GET_ALL_REFS] for at in range(0, len(all_refs), GET_ALL_REFS)]
        # the calls are made here, in order; their answers are read in the pool
        answers = [self.client.get_all(c, retry=RETRY, timeout=CALL_TIMEOUT) for c in chunks]

        def read(answer: tuple[list[DocumentReference], Iterable[Any]]) -> None:
            with self.store._call(what):
                for snap in answer[1]:
                    if snap.exists:
                        docs[snap.reference.path] = snap.to_dict() or {}
                        if snap.reference.path in refs:
                            read_at[snap.reference.path] = snap.update_time
            self.store._count(reads=len(answer[0]))

        self._each(read, list(zip(chunks, answers, strict=True)))
        threads: dict[str, dict[str, Any] | None] = {t: docs.get(p) for p, t in refs.items()}
        msgs: dict[MsgKey, dict[str, Any] | None] = {}
        for path, key in msg_paths.items():
            doc, thread = docs.get(path), threads[key[0]]
            # a document its thread does not count yet was left by a write that failed midway
            seq = int(doc.get("seq", 0)) if doc is not None else None
            counted = seq is not None and thread is not None and seq <= thread.get("lastSeq", 0)
            msgs[key] = doc if counted else None
        for tid, (account, chat) in tids.items():
            thread = threads[tid]
            if thread is None:
                threads[tid] = {"account": account, "chat": chat, **new_thread(), "pending": {}}
            else:
                thread.setdefault("pending", {})
        return threads, msgs, read_at

    def _commit(self, run: Run, read_at: dict[str, Any]) -> None:
        groups: dict[str, Writes] = {}
        for key in run.dirty_msgs:
            groups.setdefault(key[0], []).append((self._message_ref(key), run.msgs[key] or {}))
        for tid in run.dirty_threads:  # the thread document last
            groups.setdefault(tid, []).append((self._thread_ref(tid), run.threads[tid] or {}))
        total = sum(map(len, groups.values()))
        size = min(BATCH_WRITES, max(MIN_BATCH, -(-total // COMMITTERS)))
        chains: list[list[Writes]] = []  # each: batches committed one after the other
        packed: list[Writes] = [[]]  # batches of whole threads, independent of each other
        for writes in groups.values():
            if len(writes) > BATCH_WRITES:  # split, in order: the thread document last
                chains.append(
                    [writes[at : at + BATCH_WRITES] for at in range(0, len(writes), BATCH_WRITES)]
                )
                continue
            if packed[-1] and len(packed[-1]) + len(writes) > size:
                packed.append([])
            packed[-1].extend(writes)
        chains += [[writes] for writes in packed if writes]
        threads = {self._thread_ref(tid).path for tid in run.dirty_threads}
        self._each(lambda chain: self._commit_chain(chain, threads, read_at), chains)

    def _commit_chain(
        self, chain: list[Writes], threads: set[str], read_at: dict[str, Any]
    ) -> None:
        """Batches one after the other (encoded here, while other batches are in flight); a
        thread document only if it is as it was read (see the module's docstring)."""
        for writes in chain:
            batch = self.client.batch()
            for ref, data in writes:
                if ref.path not in threads:
                    batch.set(ref, data)
                elif ref.path in read_at:
                    unchanged = self.client.write_option(last_update_time=read_at[ref.path])
                    batch.update(ref, data, option=unchanged)
                else:
                    batch.create(ref, data)
            with self.store._call(f"writing {len(writes)} message and thread documents"):
                batch.commit(retry=RETRY, timeout=CALL_TIMEOUT)
            self.store._count(writes=len(writes))

    # --- reading ------------------------------------------------------------------------------

    def messages(
        self, account: str, chat: str | None = None, since: float = 0.0, limit: int = 100
    ) -> list[StoredMessage]:
        if chat is not None:
            tid = thread_id(account, chat)
            with self.store._call(f"{account}: reading thread {chat}"):
                snap = self._thread_ref(tid).get(retry=RETRY, timeout=CALL_TIMEOUT)
            self.store._count(reads=1)
            if not snap.exists:
                return []
            last_seq = {tid: int((snap.to_dict() or {}).get("lastSeq", 0))}
            query: Query = self._thread_ref(tid).collection(MESSAGES)
        else:
            last_seq = {t.id: t.last_seq for t in self._thread_docs(account)}
            query = self.client.collection_group(MESSAGES)
            query = query.where(filter=FieldFilter("account", "==", account))
            query = query.where(filter=FieldFilter("prefix", "==", self.store.prefix))
        query = query.where(filter=FieldFilter("timestamp", ">=", float(since)))
        query = query.order_by("timestamp").order_by("seq")
        out: list[StoredMessage] = []
        after = None
        while len(out) < limit:
            size = limit - len(out)
            page = query.limit(size)
            if after is not None:
                page = page.start_after(after)
            with self.store._call(f"{account}: reading messages"):
                snaps = list(page.stream(retry=RETRY, timeout=CALL_TIMEOUT))
            self.store._count(reads=max(1, len(snaps)))
            for snap in snaps:
                doc = snap.to_dict() or {}
                parent = snap.reference.parent.parent
                tid = parent.id if parent is not None else ""
                if doc.get("seq", 0) <= last_seq.get(tid, 0):  # counted by its thread
                    out.append(stored_message(doc))
            if len(snaps) < size:
                break
            after = snaps[-1]
        return out

    def _thread_docs(self, account: str) -> list[_ThreadDoc]:
        query = self._threads().where(filter=FieldFilter("account", "==", account))
        with self.store._call(f"{account}: listing the threads"):
            snaps = list(query.stream(retry=RETRY, timeout=CALL_TIMEOUT))
        self.store._count(reads=max(1, len(snaps)))
        return [_ThreadDoc(s.id, s.to_dict() or {}) for s in snaps]

    def threads(self, account: str) -> list[Thread]:
        found = [
            Thread(
                account=account,
                chat=t.doc.get("chat", ""),
                name=t.doc.get("name", ""),
                last_message_at=float(t.doc.get("lastMessageAt", 0.0)),
                last_message_id=t.doc.get("lastMessageId", ""),
                messages=int(t.doc.get("messages", 0)),
                unread=int(t.doc.get("unread", 0)),
            )
            for t in self._thread_docs(account)
            if t.doc.get("messages", 0) > 0  # not one that holds only pending receipts
        ]
        return sorted(found, key=lambda t: (-t.last_message_at, t.chat))


class _ThreadDoc:
    def __init__(self, tid: str, doc: dict[str, Any]) -> None:
        self.id = tid
        self.doc = doc
        self.last_seq = int(doc.get("lastSeq", 0))
