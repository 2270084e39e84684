"""Measure account leases: takeover time after kill -9 and after SIGTERM, what leases cost in
Firestore operations, and how long a new instance takes to carry its share.

    .venv/bin/python bench/lease_bench.py                     # defaults: TTL 30 s, 20 trials
    .venv/bin/python bench/lease_bench.py --ttl 6 --renew 2   # short leases, a quicker run

Three instances of the real `wadaemon run` share ACCOUNTS accounts (default 12) through one
Firestore emulator, with the test suite's fake WhatsApp client and fake server (tests/) playing
WhatsApp's part: the server says when an account's client is connected, on which instance.
Each trial kills one instance (kill -9, or SIGTERM), times until every account it drove is
connected on another instance, then starts it again and waits until the accounts are spread
evenly again. Prints plain tables; asserts nothing about time. See docs/performance.md.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import fleet as fleet_module  # noqa: E402
from conftest import DaemonProcess  # noqa: E402
from firestore_emulator import Emulator, find_emulator, free_port  # noqa: E402
from fleet import Fleet  # noqa: E402


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def store_ops(fleet: Fleet, name: str) -> dict[str, float]:
    from wadaemon.socket_client import request

    status, text = request(fleet.socket(name), "GET", "/metrics", timeout=10)
    assert status == 200
    found = re.findall(r'wadaemon_store_operations_total\{kind="(\w+)"\} ([0-9.e+]+)', str(text))
    return {k: float(v) for k, v in found}


def trial(fleet: Fleet, victim: str, how: str, accounts: list[str], per: int) -> float:
    mine = sorted(fleet.by_instance()[victim])
    daemon = fleet.daemons[victim]
    start = time.monotonic()
    if how == "kill":
        daemon.kill()
    else:
        daemon.proc.send_signal(signal.SIGTERM)
    others = set(fleet.daemons) - {victim}
    fleet.wait(lambda: all(fleet.server.connected(a) in others for a in mine), 300, "taken over")
    took = time.monotonic() - start
    if how != "kill":
        daemon.proc.wait(60)
    fleet.start(victim)
    fleet.wait_spread(accounts, [per] * len(fleet.daemons), 300)
    return took


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--accounts", type=int, default=12)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--ttl", type=float, default=30.0)
    ap.add_argument("--renew", type=float, default=10.0)
    ap.add_argument("--idle", type=float, default=120.0, help="seconds of idle cost measurement")
    args = ap.parse_args()
    fleet_module.TTL, fleet_module.RENEW = args.ttl, args.renew

    java, jar = find_emulator()
    with tempfile.TemporaryDirectory(prefix="lease-bench-") as tmp:
        root = Path(tmp)
        emulator = Emulator(jar, java, free_port(), root / "emulator.log")
        emulator.start()
        os.environ["FIRESTORE_EMULATOR_HOST"] = emulator.address
        os.environ["GOOGLE_CLOUD_PROJECT"] = emulator.project
        started: list[DaemonProcess] = []

        class Factory(DaemonProcess):
            def __init__(self, e, extra_env=None, prefix=()):  # type: ignore[no-untyped-def]
                super().__init__(e, extra_env, prefix)
                started.append(self)

        (root / "fleet").mkdir()
        fleet = Fleet(root / "fleet", emulator, Factory)
        try:
            accounts = [f"acct{n:03d}" for n in range(args.accounts)]
            fleet.seed(accounts)
            names = ["i1", "i2", "i3"]
            for name in names:
                fleet.start(name)
            per = args.accounts // len(names)
            fleet.wait_spread(accounts, [per] * 3, 300)
            print(
                f"{args.accounts} accounts over 3 instances, TTL {args.ttl:g} s, renewal every "
                f"{args.renew:g} s, {args.trials} trials each"
            )

            # idle cost: Firestore operations per account per day, all instances together
            before = {n: store_ops(fleet, n) for n in names}
            t0 = time.monotonic()
            time.sleep(args.idle)
            seconds = time.monotonic() - t0
            after = {n: store_ops(fleet, n) for n in names}
            print(f"\nlease cost while idle ({seconds:.0f} s, 3 instances):")
            for kind in ("reads", "writes", "deletes"):
                total = sum(after[n].get(kind, 0) - before[n].get(kind, 0) for n in names)
                per_day = total / seconds * 86400 / args.accounts
                print(f"  {kind:<8} {per_day:10.0f} per account per day")

            for how in ("kill", "term"):
                times = []
                for n in range(args.trials):
                    times.append(trial(fleet, names[n % 3], how, accounts, per))
                label = "kill -9" if how == "kill" else "SIGTERM"
                print(
                    f"\ntakeover after {label}: p50 {pct(times, 50):.2f} s, "
                    f"max {max(times):.2f} s, mean {statistics.mean(times):.2f} s "
                    f"over {len(times)} trials"
                )

            # a fourth instance joins: time until it carries its share
            t0 = time.monotonic()
            fleet.start("i4")
            joined = time.monotonic() - t0
            # the others give up what they hold above ceil(N/4); the newcomer takes it
            expected = args.accounts - 3 * -(-args.accounts // 4)
            fleet.wait(
                lambda: len(fleet.by_instance().get("i4", set())) >= expected > 0,
                300,
                f"the fourth instance's share ({expected})",
            )
            print(
                f"\na fourth instance: ready after {joined:.1f} s, carries its share "
                f"({len(fleet.by_instance()['i4'])} accounts) {time.monotonic() - t0:.1f} s "
                "after it was started"
            )
            print(f"replacements seen by the fake WhatsApp server: {len(fleet.server.overlaps())}")
        finally:
            fleet.close()
            for d in started:
                if d.proc.poll() is None:
                    d.kill()
            emulator.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
