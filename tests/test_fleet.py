"""Several instances share the accounts of one Firestore project through leases.

Three (or four) daemons run against one real Firestore emulator, each with its own sessions
directory as separate hosts would have, with the fake WhatsApp client behind the real client
boundary and a fake server that records which instance is connected to which account: two
clients of one account at once (a replacement) fails a test unless the test provokes it.
Leases here are short (TTL 6 s, renewed every 2 s) to keep the tests quick.
"""

from __future__ import annotations

import glob
import os
import re
import signal
import sqlite3
import threading
import time

import pytest
import wa_events as ev
from conftest import wait_until
from fake_whatsapp import send_event
from firestore_emulator import Emulator
from fleet import TTL, Fleet, session_rows, settle
from tcp_proxy import TcpProxy
from test_fake_server import RawClient

from wadaemon.socket_client import request as ask

pytestmark = pytest.mark.slow

ACCOUNTS = [f"acct{n:02d}" for n in range(30)]
CHAT = "4915112345678@s.whatsapp.net"
FAKETIME = next(
    iter(glob.glob("/usr/lib/*/faketime/libfaketime.so.1")), "/usr/lib/faketime/libfaketime.so.1"
)


def start_three(fleet: Fleet, accounts: list[str] = ACCOUNTS) -> None:
    fleet.seed(accounts)
    for name in ("i1", "i2", "i3"):
        fleet.start(name)
    per = len(accounts) // 3
    fleet.wait_spread(accounts, [per, per, per])
    assert not fleet.server.overlaps(), fleet.logs()


def message_all(fleet: Fleet, accounts: list[str], skip: frozenset[str] = frozenset()) -> None:
    """One incoming message per account (a session change), then wait until each is committed
    (its head moved on) and no backup runs or waits."""
    before = {a: h.generation for a, h in fleet.heads(accounts).items()}
    for account in accounts:
        assert fleet.server.send_message(account, chat=f"chat-{time.monotonic_ns()}")

    def committed() -> bool:
        return all(h.generation > before[a] for a, h in fleet.heads(accounts).items())

    fleet.wait(committed, 60, "the messages backed up")
    settle(fleet, accounts, skip=skip)


def test_kill_9_of_one_instance_its_accounts_are_driven_elsewhere_from_the_newest_generation(
    fleet: Fleet,
) -> None:
    start_three(fleet)
    message_all(fleet, ACCOUNTS)
    victims = fleet.by_instance()["i2"]
    assert victims
    heads = fleet.heads(sorted(victims))
    rows = {a: session_rows(fleet.root / "i2" / "sessions" / a) for a in victims}
    killed = time.monotonic()
    fleet.kill("i2")  # (and the fake server saw its connections end)
    fleet.wait_all_connected(ACCOUNTS, TTL + 30)
    took = time.monotonic() - killed
    live = fleet.server.live()
    assert all(live[a] in ("i1", "i3") for a in victims), {a: live[a] for a in victims}
    assert not fleet.server.overlaps(), fleet.logs()
    restored = {**fleet.restored("i1"), **fleet.restored("i3")}
    for account in victims:
        assert restored[account] == heads[account].generation, account
        holder = live[account]
        assert session_rows(fleet.root / holder / "sessions" / account) == rows[account]
    print(f"kill -9: {len(victims)} accounts driven elsewhere after {took:.1f} s")


def test_a_paused_holder_never_commits_after_another_took_over_and_stops_its_clients(
    fleet: Fleet,
) -> None:
    start_three(fleet)
    frozen = sorted(fleet.by_instance()["i1"])
    old_tokens = {a: fleet.lease(a)["token"] for a in frozen}
    pid = fleet.pid("i1")
    os.kill(pid, signal.SIGSTOP)
    try:
        paused = time.monotonic()
        # a change the paused instance will try to back up when it runs again
        for account in frozen:
            db = sqlite3.connect(fleet.root / "i1" / "sessions" / account / "session.db")
            db.execute("INSERT OR REPLACE INTO whatsmeow_sessions VALUES ('late', x'00')")
            db.commit()
            db.close()
        fleet.wait(
            lambda: all(fleet.server.connected(a) in ("i2", "i3") for a in frozen),
            TTL + 40,
            "taken over from the paused instance",
        )
        taken_at = time.monotonic() - paused
        # whoever took many of them hands its surplus over to the other (i1 no longer counts):
        # messages go to clients that stay where they are
        fleet.wait_spread(ACCOUNTS, [15, 15])
        message_all(fleet, frozen, skip=frozenset({"i1"}))
    finally:
        resumed = time.monotonic()
        os.kill(pid, signal.SIGCONT)
    seen: list[tuple[str, int, int | None, str]] = []  # every head polled meanwhile
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            for account, head in fleet.heads(frozen).items():
                seen.append((account, head.generation, head.token, head.writer))
            time.sleep(0.05)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        for account in frozen:
            fleet.daemons["i1"].wait_for(f"{account}: lease lost", timeout=30)
        time.sleep(2 * TTL)  # what the old holder does once it runs again
    finally:
        done.set()
        poller.join()
    log = fleet.daemons["i1"].log()
    for account in frozen:
        # never a head written by the old holder under the lease it lost
        mine = [h for h in seen if h[0] == account and h[3].endswith(f":{pid}")]
        assert all(token is not None and token > old_tokens[account] for _, _, token, _ in mine)
        # its client was replaced by the new holder's and stopped; if it connected again, it
        # was after it had taken a new lease
        intervals = [i for i in fleet.server.intervals(account) if i.instance == "i1"]
        assert intervals[0].ended == "replaced"
        if len(intervals) > 1:
            after = log[log.index(f"{account}: lease lost") :]
            assert f"{account}: lease acquired by i1" in after, (account, intervals)
    # the only two-clients moments: the paused holder's clients, replaced while it was paused
    for replacement in fleet.server.overlaps():
        assert replacement.old == "i1" and replacement.at < resumed, replacement
    assert {r.account for r in fleet.server.overlaps()} == set(frozen)
    print(f"SIGSTOP: taken over after {taken_at:.1f} s")


def test_sigterm_hands_every_account_over(fleet: Fleet) -> None:
    """Handed over, not left to expire: each lease is released on the way out, so the others
    take it at once (bench/lease_bench.py measures how fast; a busy machine is no test of it)."""
    start_three(fleet)
    leaving = sorted(fleet.by_instance()["i3"])
    message_all(fleet, leaving)
    heads = fleet.heads(leaving)
    daemon = fleet.daemons["i3"]
    daemon.proc.send_signal(signal.SIGTERM)
    asked = time.monotonic()
    fleet.wait(
        lambda: all(fleet.server.connected(a) in ("i1", "i2") for a in leaving), 60, "handed over"
    )
    took = time.monotonic() - asked
    assert daemon.proc.wait(30) == 0, daemon.log()[-6000:]
    for account in leaving:
        assert f"{account}: lease released (this instance stops)" in daemon.log(), daemon.log()
    assert not fleet.server.overlaps(), fleet.logs()
    after = fleet.heads(leaving)
    assert all(after[a].generation >= heads[a].generation for a in leaving)
    print(f"SIGTERM: {len(leaving)} accounts driven elsewhere after {took:.2f} s")


def test_a_fourth_instance_gets_a_share_without_disturbing_the_accounts_that_stay(
    fleet: Fleet,
) -> None:
    start_three(fleet)
    before = {i.account: i for i in fleet.server.intervals() if i.live}
    fleet.start("i4")
    wait_until(lambda: len(fleet.by_instance().get("i4", set())) >= 6, 60, 0.5)
    time.sleep(3 * 2.0)  # a few more balancing rounds: nothing else moves
    by = fleet.by_instance()
    assert sorted(len(by[n]) for n in ("i1", "i2", "i3", "i4")) == [6, 8, 8, 8], by
    moved = by["i4"]
    for account, interval in before.items():
        if account in moved:
            continue
        # still the very same connection: never stopped, never reconnected
        now = [i for i in fleet.server.intervals(account) if i.live]
        assert now and now[0].connected_at == interval.connected_at, account
    assert not fleet.server.overlaps(), fleet.logs()


def test_a_clock_10_seconds_ahead_on_one_instance_makes_no_second_holder(fleet: Fleet) -> None:
    if not os.path.exists(FAKETIME):
        pytest.fail(f"{FAKETIME} is missing: apt-get install faketime (scripts/test does)")
    accounts = ACCOUNTS[:12]
    fleet.seed(accounts)
    fleet.start("i1")
    fleet.wait_all_connected(accounts)
    # the skewed instance would see every lease of i1 as expired if it trusted its own clock
    before = time.time()
    fleet.start("i2", {"LD_PRELOAD": FAKETIME, "FAKETIME": "+10s"})
    first = fleet.daemons["i2"].log().splitlines()[0]  # "2026-11-28 07:17:01 INFO ..."
    logged = time.mktime(time.strptime(first[:19], "%Y-%m-%d %H:%M:%S"))  # local time
    assert logged - before >= 9, f"the clock is not skewed: {first}"  # its clock is ahead
    skewed = fleet.daemons["i2"]
    time.sleep(3 * TTL)
    assert not fleet.server.overlaps(), fleet.logs()
    live = fleet.server.live()
    # i2 got only what i1 handed over for the fair share, each handed over cleanly
    assert len([a for a in accounts if live[a] == "i2"]) == 6, live
    assert "lease lost" not in fleet.daemons["i1"].log()
    assert "lease lost" not in skewed.log()
    # and the other way round: i1 stops; the skewed instance takes over, once
    assert fleet.daemons["i1"].stop() == 0
    fleet.wait_all_connected(accounts)
    assert all(fleet.server.connected(a) == "i2" for a in accounts)
    assert not fleet.server.overlaps(), fleet.logs()


def test_a_firestore_outage_of_60_s_keeps_every_client_where_it_is(
    fleet: Fleet, firestore_emulator: Emulator
) -> None:
    proxy = TcpProxy(("127.0.0.1", int(firestore_emulator.address.rsplit(":", 1)[1])))
    fleet.firestore_host = proxy.address
    accounts = ACCOUNTS[:12]
    start_three(fleet, accounts)
    before = {i.account: i for i in fleet.server.intervals() if i.live}
    proxy.cut()
    time.sleep(60)  # ten TTLs: every lease runs out while nobody can reach Firestore
    live = fleet.server.live()
    where = {a: live.get(a) for a in accounts}
    assert where == {a: before[a].instance for a in accounts}, fleet.logs()
    for account in accounts[:3]:  # sessions keep changing meanwhile
        assert fleet.server.send_message(account, chat="during-the-outage")
    for account in accounts[:3]:  # and messages arrive: they wait in the holders' journals
        fake = fleet.root / before[account].instance / "fake"
        for n in range(30):
            send_event(fake, account, ev.message(CHAT, f"O{n:02d}", text=f"o{n}", ts=9000 + n))
    time.sleep(2)
    proxy.restore()
    time.sleep(4 * TTL)  # the holders renew, nobody takes anything over
    for name in ("i1", "i2", "i3"):
        assert "lease lost" not in fleet.daemons[name].log(), fleet.logs()
    for account in accounts:
        now = [i for i in fleet.server.intervals(account) if i.live]
        assert now and now[0].connected_at == before[account].connected_at, account
    assert not fleet.server.overlaps(), fleet.logs()
    settle(fleet, accounts)
    for account in accounts[:3]:  # the changes made during the outage are backed up
        holder = before[account].instance
        assert "during-the-outage" in session_rows(fleet.root / holder / "sessions" / account)
    fleet.wait(
        lambda: all(h.generation >= 2 for h in fleet.heads(accounts[:3]).values()),
        60,
        "the changes made during the outage backed up",
    )
    for account in accounts[:3]:  # every message that arrived during the outage is stored
        thread = fleet.store.client.document(f"threads/{account}:{CHAT}")
        fleet.wait(
            lambda t=thread: (t.get().to_dict() or {}).get("messages") == 30,
            60,
            "the messages that arrived during the outage written to Firestore",
        )


def handovers(fleet: Fleet, name: str) -> float:
    _, metrics = ask(fleet.socket(name), "GET", "/metrics")
    found = re.search(r'wadaemon_lease_events_total\{event="handover"\} ([0-9.]+)', str(metrics))
    return float(found.group(1)) if found else 0.0


def test_holders_are_shown_and_an_account_moves_on_request(fleet: Fleet) -> None:
    accounts = ACCOUNTS[:4]
    fleet.seed(accounts)
    fleet.start("i1")
    fleet.start("i2")
    fleet.wait_spread(accounts, [2, 2])
    mine = sorted(fleet.by_instance()["i1"])
    theirs = sorted(fleet.by_instance()["i2"])
    # accounts list: the holder of every account, `passive` where another instance drives it
    listed = fleet.cli("i1", "accounts", "list")
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line.split() for line in listed.stdout.splitlines()[1:]}
    assert "HOLDER" in listed.stdout.splitlines()[0]
    assert all(rows[a][1] == "connected" and rows[a][2] == "i1" for a in mine), listed.stdout
    assert all(rows[a][1] == "passive" and rows[a][2] == "i2" for a in theirs), listed.stdout
    status, health = ask(fleet.socket("i1"), "GET", "/health")
    assert status == 200 and health["instance"] == "i1"
    assert "2 accounts driven here, 2 passive" in health["checks"]["leases"]["detail"]
    _, metrics = ask(fleet.socket("i1"), "GET", "/metrics")
    assert "wadaemon_leases_held 2.0" in str(metrics)
    # moving: only where it is driven, only to a live instance
    wrong = fleet.cli("i1", "accounts", "move", theirs[0])
    assert (
        wrong.returncode == 1 and "run the command there" in wrong.stderr and "i2" in wrong.stderr
    )
    nowhere = fleet.cli("i1", "accounts", "move", mine[0], "--to", "i9")
    assert nowhere.returncode == 1 and "'i9' is not live" in nowhere.stderr
    before = handovers(fleet, "i1")  # (rebalancing handed two over when i2 started)
    moved = fleet.cli("i1", "accounts", "move", mine[0], "--to", "i2")
    assert moved.returncode == 0, moved.stderr
    asked = time.monotonic()
    fleet.wait(lambda: fleet.server.connected(mine[0]) == "i2", 10, "moved to i2")
    took = time.monotonic() - asked
    assert not fleet.server.overlaps(), fleet.logs()
    assert handovers(fleet, "i1") == before + 1
    print(f"moved in {took:.2f} s")


def test_a_second_instance_with_the_same_id_drives_nothing(fleet: Fleet) -> None:
    accounts = ACCOUNTS[:2]
    fleet.seed(accounts)
    fleet.start("i1")
    fleet.wait_spread(accounts, [2])
    twin = fleet.start("twin", restore_timeout=3, id="i1")  # a cloned host's configuration
    twin.wait_for("instance id 'i1' is in use by a live instance on host", timeout=30)
    time.sleep(3)
    assert set(fleet.server.live().values()) == {"i1"}
    assert "twin" not in fleet.server.connects(accounts[0]) + fleet.server.connects(accounts[1])
    assert "lease lost" not in fleet.daemons["i1"].log()


def test_a_replaced_holder_starts_its_client_once_more_then_stays_stopped(fleet: Fleet) -> None:
    """Another client took the session while this instance holds the lease: it may be an
    instance whose lease ran out (it stops its client within a TTL), so the holder starts its
    client once more after a TTL; replaced again, it leaves the session to that client."""
    fleet.seed(["acc1"])
    daemon = fleet.start("i1")
    fleet.wait_all_connected(["acc1"])
    outsider = RawClient(fleet.server.path, "acc1", "outsider")  # replaces i1's stream
    daemon.wait_for("this client starts once more")
    outsider.leave()  # gone, as a stale holder's client is once it noticed
    fleet.wait(lambda: fleet.server.connected("acc1") == "i1", 60, "i1 connected again")
    again = RawClient(fleet.server.path, "acc1", "outsider")  # and back: a client for good
    try:
        daemon.wait_for("took the session again")
        time.sleep(3 * TTL)
        assert fleet.server.connected("acc1") == "outsider", fleet.logs()  # not fought over
        assert daemon.log().count("its client starts again") == 1
    finally:
        again.leave()
