"""Measure the message path: throughput, latency, the outbox, memory.

    .venv/bin/python bench/messages_bench.py            # the full run (a few minutes)
    .venv/bin/python bench/messages_bench.py --quick    # fewer messages, shorter rates
    .venv/bin/python bench/messages_bench.py --only firestore-write   # one part

Everything goes through the daemon's own classes: Journal.put (one event, one append), the Inbox
flusher (up to its batch size per store.write), the embedded store (SqliteMessages) and the
Firestore one (FirestoreMessages) against the real Firestore emulator started here (Java and the
emulator jar, as the tests need them). 50 chats of one account, text messages. Prints plain
tables; asserts nothing about time. See docs/performance.md, "Messages".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import queue
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from wadaemon.config import MessagesConfig  # noqa: E402
from wadaemon.messages import inbox as inbox_module  # noqa: E402
from wadaemon.messages.inbox import Inbox  # noqa: E402
from wadaemon.messages.journal import Journal  # noqa: E402
from wadaemon.messages.model import Change, Message, StoredMessage, Thread  # noqa: E402
from wadaemon.messages.outbox import Outbox  # noqa: E402
from wadaemon.messages.sqlite_messages import SqliteMessages  # noqa: E402
from wadaemon.messages.sqlite_outbox import SqliteOutbox  # noqa: E402
from wadaemon.messages.store import MessageStore, OutboxEntry, OutboxStore, WriteResult  # noqa: E402
from wadaemon.whatsapp.client import Sent  # noqa: E402

ACCOUNT = "acct"
CHATS = 50
MiB = 2**20


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def pct(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def ms(values: Sequence[float]) -> str:
    return f"{pct(values, 50) * 1000:8.1f} {pct(values, 99) * 1000:8.1f}"


def messages(n: int, start: int = 0, seed: int = 1) -> list[Message]:
    rng = random.Random(seed)
    chats = [f"1555{c:04d}@s.whatsapp.net" for c in range(CHATS)]
    out = []
    for i in range(start, start + n):
        chat = chats[i % CHATS]
        text = "lorem ipsum " * rng.randrange(1, 12)
        out.append(Message(ACCOUNT, chat, chat, f"3EB0{i:016X}", 1.7e9 + i, "text", text=text))
    return out


class Timed:
    """A message store that notes when each write returned, per message id."""

    def __init__(self, store: MessageStore) -> None:
        self.store = store
        self.write_batch = int(getattr(store, "write_batch", inbox_module.BATCH))
        self.done: dict[str, float] = {}
        self.writes: list[tuple[int, float]] = []  # (changes, seconds)

    def describe(self) -> str:
        return self.store.describe()

    def write(self, changes: Sequence[Change]) -> WriteResult:
        t0 = time.monotonic()
        result = self.store.write(changes)
        now = time.monotonic()
        self.writes.append((len(changes), now - t0))
        for c in changes:
            if isinstance(c, Message):
                self.done[c.id] = now
        return result

    def messages(
        self, account: str, chat: str | None = None, since: float = 0.0, limit: int = 100
    ) -> list[StoredMessage]:
        return self.store.messages(account, chat, since, limit)

    def threads(self, account: str) -> list[Thread]:
        return self.store.threads(account)

    def close(self) -> None:
        self.store.close()


class DelayProxy:
    """A TCP proxy in front of the emulator that delays each direction by rtt/2: a network
    between the daemon and Firestore (the emulator on the same machine answers in microseconds).
    """

    def __init__(self, target: tuple[str, int], rtt: float) -> None:
        self.target, self.delay = target, rtt / 2
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            conn, _ = self.listener.accept()
            upstream = socket.create_connection(self.target)
            for src, dst in ((conn, upstream), (upstream, conn)):
                for sock in (src, dst):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                q: queue.SimpleQueue[tuple[float, bytes]] = queue.SimpleQueue()
                threading.Thread(target=self._read, args=(src, q), daemon=True).start()
                threading.Thread(target=self._send, args=(dst, q), daemon=True).start()

    def _read(self, src: socket.socket, q: queue.SimpleQueue[tuple[float, bytes]]) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(1 << 16):
                q.put((time.monotonic() + self.delay, data))
        q.put((0.0, b""))

    @staticmethod
    def _send(dst: socket.socket, q: queue.SimpleQueue[tuple[float, bytes]]) -> None:
        with contextlib.suppress(OSError):
            while True:
                at, data = q.get()
                if not data:
                    break
                time.sleep(max(0.0, at - time.monotonic()))
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


# --- the stores ---------------------------------------------------------------------------------


class Stores:
    """Opens a fresh store of either kind (the emulator is started on first use)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.emulator: Any = None
        self.runs = 0

    def _emulator(self) -> Any:
        if self.emulator is None:
            from firestore_emulator import Emulator, find_emulator, free_port

            java, jar = find_emulator()
            self.emulator = Emulator(jar, java, free_port(), self.root / "emulator.log")
            self.emulator.start()
            os.environ["FIRESTORE_EMULATOR_HOST"] = self.emulator.address
            os.environ["GOOGLE_CLOUD_PROJECT"] = self.emulator.project
            self._warm_up()
        return self.emulator

    def _warm_up(self) -> None:
        """A fresh emulator (a JVM) spends its first seconds compiling: about twice the CPU per
        message of a warm one. Warm it with 8,000 messages, as a long-running one would be."""
        from wadaemon.messages.firestore_messages import FirestoreMessages
        from wadaemon.store.firestore import FirestoreStore

        backing = FirestoreStore(self.emulator.project)
        store = FirestoreMessages(backing)
        for start in range(0, 8000, 1000):
            store.write(messages(1000, start=10**9 + start))
        store.close()
        backing.client.close()  # type: ignore[no-untyped-call]

    def open(self, kind: str, rtt: float = 0.0) -> tuple[MessageStore, Path, Callable[[], None]]:
        """(the store, a directory for its journal, close); Firestore behind a proxy that adds
        `rtt` seconds to each round trip, if given."""
        self.runs += 1
        where = self.root / f"run{self.runs}"
        where.mkdir()
        if kind == "sqlite":
            s = SqliteMessages(where / "messages.db")
            return s, where, s.close
        from wadaemon.messages.firestore_messages import FirestoreMessages
        from wadaemon.store.firestore import FirestoreStore

        emulator = self._emulator()
        emulator.wipe()
        if rtt:
            proxy = DelayProxy((emulator.host, emulator.port), rtt)
            os.environ["FIRESTORE_EMULATOR_HOST"] = proxy.address
        try:
            backing = FirestoreStore(emulator.project)
        finally:
            os.environ["FIRESTORE_EMULATOR_HOST"] = emulator.address
        return FirestoreMessages(backing), where, backing.client.close

    def outbox(self, kind: str) -> tuple[OutboxStore, Callable[[], None]]:
        self.runs += 1
        where = self.root / f"run{self.runs}"
        where.mkdir()
        if kind == "sqlite":
            o = SqliteOutbox(where / "outbox.db")
            return o, o.close
        from wadaemon.messages.firestore_outbox import FirestoreOutbox
        from wadaemon.store.firestore import FirestoreStore

        emulator = self._emulator()
        emulator.wipe()
        backing = FirestoreStore(emulator.project)
        fo = FirestoreOutbox(backing)

        def close() -> None:
            fo.close()
            backing.client.close()  # type: ignore[no-untyped-call]

        return fo, close

    def close(self) -> None:
        if self.emulator is not None:
            self.emulator.stop()


# --- 1. throughput ------------------------------------------------------------------------------


async def _through_inbox(store: Timed, where: Path, batch: list[Message]) -> tuple[float, float]:
    """All of `batch` offered as fast as the loop takes them, one event each: (seconds until
    the last put returned, seconds until the last was stored)."""
    journal = Journal(where / "journal")
    inbox = Inbox(journal, store, max_bytes=1 << 40)
    runner = asyncio.create_task(inbox.run())
    t0 = time.monotonic()
    for i, m in enumerate(batch):
        inbox.add([m])
        if i % 50 == 49:
            await asyncio.sleep(0)  # let the loop run the flusher's steps, as events would
    put_s = time.monotonic() - t0
    last = batch[-1].id
    while last not in store.done or journal.depth():
        await asyncio.sleep(0.005)
    stored_s = max(store.done.values()) - t0
    await inbox.drain(5)
    runner.cancel()
    journal.close()
    return put_s, stored_s


def throughput(stores: Stores, kind: str, n: int) -> None:
    store, where, close = stores.open(kind)
    timed = Timed(store)
    try:
        put_s, stored_s = asyncio.run(_through_inbox(timed, where, messages(n)))
    finally:
        close()
    sizes = [c for c, _ in timed.writes]
    write_s = sum(s for _, s in timed.writes)
    print(
        f"  {kind:<9} {n:>7} {n / put_s:>10.0f} {n / stored_s:>10.0f} {stored_s:>7.1f}"
        f" {len(sizes):>7} {statistics.mean(sizes):>7.0f} {sum(sizes) / write_s:>10.0f}"
    )


def direct_writes(stores: Stores, kind: str, n: int, size: int, rtt: float = 0.0) -> None:
    """store.write alone, batches of `size`, no journal: the store's own rate."""
    store, _, close = stores.open(kind, rtt)
    batch = messages(n)
    try:
        t0 = time.monotonic()
        for start in range(0, n, size):
            store.write(batch[start : start + size])
        took = time.monotonic() - t0
    finally:
        close()
    print(
        f"  {kind:<9} {rtt * 1000:>4.0f} {n:>7} {size:>7} {n / took:>10.0f}"
        f" {took / (n / size) * 1000:>9.0f}"
    )


# --- 2. latency at a steady rate ----------------------------------------------------------------


async def _steady(store: Timed, where: Path, rate: float, seconds: float) -> dict[str, Any]:
    journal = Journal(where / "journal")
    inbox = Inbox(journal, store, max_bytes=1 << 40)
    runner = asyncio.create_task(inbox.run())
    batch = messages(int(rate * seconds), seed=2)
    offered: dict[str, float] = {}
    durable: list[float] = []
    late = 0.0
    t0 = time.monotonic()
    for i, m in enumerate(batch):
        due = t0 + i / rate
        wait = due - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        else:
            late = max(late, -wait)
        # the event happens at `due`: a loop that is late delays its put, and that counts
        offered[m.id] = due
        inbox.add([m])
        durable.append(time.monotonic() - due)
    while batch[-1].id not in store.done:
        await asyncio.sleep(0.005)
    await inbox.drain(5)
    runner.cancel()
    journal.close()
    stored = [store.done[k] - t for k, t in offered.items()]
    return {"durable": durable, "stored": stored, "late": late}


def latency(stores: Stores, kind: str, rate: float, seconds: float) -> None:
    store, where, close = stores.open(kind)
    timed = Timed(store)
    try:
        r = asyncio.run(_steady(timed, where, rate, seconds))
    finally:
        close()
    sizes = [c for c, _ in timed.writes]
    print(
        f"  {kind:<9} {rate:>6.0f} {len(r['durable']):>6} {ms(r['durable'])}  {ms(r['stored'])}"
        f" {max(r['stored']) * 1000:8.0f} {statistics.mean(sizes):>7.0f}"
    )


# --- 3. the outbox ------------------------------------------------------------------------------


class FakeHost:
    def __init__(self) -> None:
        self.sent_at: dict[str, float] = {}

    def driven_accounts(self) -> set[str]:
        return {ACCOUNT}

    def send_ready(self, account: str) -> str | None:
        return None

    async def send_text(self, account: str, to: str, text: str, reply_to: str) -> Sent:
        self.sent_at[text] = time.monotonic()
        return Sent(f"3EB0{len(self.sent_at):016X}", time.time(), to + "@s.whatsapp.net")

    def sent(self, entry: OutboxEntry, sent: Sent) -> None:
        pass

    def outbox_changed(self, entry: OutboxEntry) -> None:
        pass


async def _outbox(store: OutboxStore, n: int, rate: float) -> tuple[list[float], list[float]]:
    host = FakeHost()
    config = MessagesConfig(send_gap_seconds=0.0, per_recipient_per_hour=10**9)
    outbox = Outbox(store, config, "bench", host)
    runner = asyncio.create_task(outbox.run())
    await asyncio.sleep(0.5)  # its first listing
    submitted: dict[str, float] = {}
    submit_s: list[float] = []
    t0 = time.monotonic()
    for i in range(n):
        due = t0 + i / rate
        if due > time.monotonic():
            await asyncio.sleep(due - time.monotonic())
        text = f"hello {i}"
        submitted[text] = time.monotonic()
        entry = OutboxEntry(f"k{i}", ACCOUNT, f"1555{i % CHATS:04d}", text, source="api")
        await outbox.submit(entry)
        submit_s.append(time.monotonic() - submitted[text])
    deadline = time.monotonic() + 60
    while len(host.sent_at) < n and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    await outbox.stop(5)
    runner.cancel()
    return submit_s, [host.sent_at[t] - s for t, s in submitted.items() if t in host.sent_at]


def outbox_latency(stores: Stores, kind: str, n: int, rate: float) -> None:
    store, close = stores.outbox(kind)
    try:
        submit_s, to_send = asyncio.run(_outbox(store, n, rate))
    finally:
        close()
    print(f"  {kind:<9} {rate:>6.0f} {len(to_send):>5}/{n:<5} {ms(submit_s)}  {ms(to_send)}")


# --- 4. memory ----------------------------------------------------------------------------------


def memory_child(n: int, where: Path) -> None:
    """In a fresh process: RSS before, after writing n messages (batches of 500, as the
    Inbox does), after reading a page of 100 of one chat and of the whole account."""
    before = rss_mib()
    store = SqliteMessages(where / "messages.db")
    opened = rss_mib()
    for start in range(0, n, inbox_module.BATCH):
        store.write(messages(min(inbox_module.BATCH, n - start), start=start))
    written = rss_mib()
    size = sum(p.stat().st_size for p in where.iterdir() if p.name.startswith("messages.db"))
    store.close()
    store = SqliteMessages(where / "messages.db")  # as after a restart: nothing cached
    reopened = rss_mib()
    t0 = time.monotonic()
    page = store.messages(ACCOUNT, "15550007@s.whatsapp.net", since=1.7e9 + n / 2, limit=100)
    chat_ms = (time.monotonic() - t0) * 1000
    chat_rss = rss_mib()
    t0 = time.monotonic()
    page2 = store.messages(ACCOUNT, since=1.7e9 + n / 2, limit=100)
    all_ms = (time.monotonic() - t0) * 1000
    assert len(page) == len(page2) == 100
    print(f"  process start (interpreter + wadaemon imports)   {before:8.1f} MiB")
    print(f"  store opened                                     {opened:8.1f} MiB")
    print(f"  after writing {n} messages                   {written:8.1f} MiB")
    print(f"  SQLite files (db + wal)                          {size / MiB:8.1f} MiB")
    print(f"  store reopened                                   {reopened:8.1f} MiB")
    print(f"  after a page of 100 of one chat ({chat_ms:4.1f} ms)        {chat_rss:8.1f} MiB")
    print(f"  after a page of 100 of the account ({all_ms:4.1f} ms)     {rss_mib():8.1f} MiB")


# --- main ---------------------------------------------------------------------------------------

PARTS = ("throughput", "firestore-write", "latency", "outbox", "memory")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer messages, shorter runs")
    ap.add_argument("--only", choices=PARTS, action="append", help="run only these parts")
    ap.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args.dir)
        return 0
    parts = args.only or PARTS
    quick = args.quick
    n_sqlite, n_fs = (5_000, 3_000) if quick else (20_000, 10_000)
    seconds = 3.0 if quick else 10.0
    print(f"{os.cpu_count()} CPUs; {CHATS} chats, one account; Inbox batch {inbox_module.BATCH}")
    with contextlib.suppress(ImportError, AttributeError):
        from wadaemon.messages import firestore_messages as fm

        batch, calls = fm.FirestoreMessages.write_batch, fm.COMMITTERS
        print(f"Firestore: Inbox batch {batch}, {calls} calls at once")
    with tempfile.TemporaryDirectory(prefix="messages-bench-") as tmp:
        stores = Stores(Path(tmp))
        try:
            if "throughput" in parts:
                print("\n1. throughput: one event per Journal.put, Inbox flusher, store")
                print(
                    f"  {'store':<9} {'msgs':>7} {'put/s':>10} {'stored/s':>10} {'secs':>7}"
                    f" {'writes':>7} {'batch':>7} {'write/s':>10}"
                )
                throughput(stores, "sqlite", n_sqlite)
                throughput(stores, "firestore", n_fs)
            if "firestore-write" in parts:
                print("\n1b. store.write alone (no journal), batches of a given size")
                print(
                    f"  {'store':<9} {'rtt':>4} {'msgs':>7} {'batch':>7} {'msgs/s':>10}"
                    f" {'ms/write':>9}"
                )
                direct_writes(stores, "sqlite", n_sqlite, 500)
                for rtt in (0.0, 0.02):
                    for size in (500, 2000):
                        direct_writes(stores, "firestore", n_fs, size, rtt)
            if "latency" in parts:
                print(f"\n2. latency at a steady offered rate, {seconds:g} s each (ms)")
                print(
                    f"  {'store':<9} {'rate/s':>6} {'msgs':>6} {'durable p50':>8} {'p99':>8}"
                    f"  {'stored p50':>8} {'p99':>8} {'max':>8} {'batch':>7}"
                )
                for kind in ("sqlite", "firestore"):
                    for rate in (200.0, 1000.0):
                        latency(stores, kind, rate, seconds)
            if "outbox" in parts:
                n = 100 if quick else 300
                print("\n3. outbox: submit() to send_text (send_gap_seconds 0), ms")
                print(
                    f"  {'store':<9} {'rate/s':>6} {'sent':>11} {'submit p50':>8} {'p99':>8}"
                    f"  {'to send p50':>8} {'p99':>8}"
                )
                for kind in ("sqlite", "firestore"):
                    for rate in (10.0, 50.0):
                        outbox_latency(stores, kind, n, rate)
            if "memory" in parts:
                n = 20_000 if quick else 100_000
                print(f"\n4. memory: the embedded store with {n} messages (a fresh process)")
                where = Path(tmp) / "memory"
                where.mkdir()
                subprocess.run(
                    [sys.executable, __file__, "--memory-child", str(n), "--dir", str(where)],
                    check=True,
                )
        finally:
            stores.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
