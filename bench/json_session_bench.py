"""Measure backups of a big Baileys-style JSON session: about 830 small files in one directory.

    .venv/bin/python bench/json_session_bench.py [--quick] [--rounds N]

A Node gateway using Baileys' multi-file auth state keeps one JSON file per key: creds.json, a
pre-key-N.json for every uploaded pre-key (Baileys keeps hundreds), a session-*.json per peer
device, app-state-sync-key-*.json and app-state-sync-version-*.json. The script builds such a
directory, then times `BackupEngine(layout, replica).backup(account, force=...)` (the daemon's
own code path: snapshot worker, hashing, sealing, the directory store) in these cases:

    first backup         every round a fresh store, so every file is new
    unchanged            nothing changed, force=False (the engine trusts the stat fingerprint)
    unchanged, forced    nothing changed, force=True (what the startup pass and the daily
                         full pass do)
    3 files changed      creds.json, one session and one pre-key rewritten in place (as
                         Baileys writes them), then backup() as a watcher-triggered one

Per case: the median and the maximum wall-clock seconds of the backup call, the median CPU
seconds (this process and its waited-for children: the snapshot worker), the opens of files in
the account directory during one backup ("source opens": inotify IN_OPEN on the directory, which
sees the worker's child process too) and the distinct files among them ("files opened"), and
what was uploaded. Everything lives in a temporary directory removed at the end; the script only
prints: nothing is asserted about time. It uses only BackupEngine's public API, so that it can
be re-run unchanged against a faster engine.
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import ctypes.util
import json
import os
import random
import resource
import shutil
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from backup_bench import human, machine

from wadaemon.backup import BackupEngine, BackupResult
from wadaemon.keyring import Key, Keyring
from wadaemon.layout import SessionsLayout
from wadaemon.replica import Replica
from wadaemon.store import DirectoryStore

ACCOUNT = "baileys"
PRE_KEYS = 810
SESSIONS = 12
SYNC_KEYS = 7
SYNC_VERSIONS = ("critical_block", "critical_unblock_low", "regular", "regular_high", "regular_low")
Row = tuple[str, ...]

rng = random.Random(20261128)


# --- the session directory, shaped like Baileys' useMultiFileAuthState -----------------------


def buf(n: int) -> dict[str, str]:
    """A Buffer as Baileys' BufferJSON.replacer writes it."""
    return {"type": "Buffer", "data": base64.b64encode(rng.randbytes(n)).decode()}


def key_pair() -> dict[str, object]:
    return {"private": buf(32), "public": buf(32)}


def creds() -> dict[str, object]:
    me = f"{rng.randrange(10**10, 10**11)}:{rng.randrange(1, 60)}@s.whatsapp.net"
    return {
        "noiseKey": key_pair(),
        "pairingEphemeralKeyPair": key_pair(),
        "signedIdentityKey": key_pair(),
        "signedPreKey": {"keyPair": key_pair(), "signature": buf(64), "keyId": 1},
        "registrationId": rng.randrange(1, 16380),
        "advSecretKey": base64.b64encode(rng.randbytes(32)).decode(),
        "processedHistoryMessages": [],
        "nextPreKeyId": PRE_KEYS + 1,
        "firstUnuploadedPreKeyId": PRE_KEYS + 1,
        "accountSyncCounter": 1,
        "accountSettings": {"unarchiveChats": False},
        "registered": True,
        "pairingCode": None,
        "me": {"id": me, "name": "Bench", "lid": f"{rng.randrange(10**14, 10**15)}:12@lid"},
        "account": {
            "details": base64.b64encode(rng.randbytes(90)).decode(),
            "accountSignatureKey": base64.b64encode(rng.randbytes(32)).decode(),
            "accountSignature": base64.b64encode(rng.randbytes(64)).decode(),
            "deviceSignature": base64.b64encode(rng.randbytes(64)).decode(),
        },
        "signalIdentities": [
            {"identifier": {"name": me, "deviceId": 0}, "identifierKey": buf(33)},
            {
                "identifier": {"name": me.replace("s.whatsapp.net", "lid"), "deviceId": 0},
                "identifierKey": buf(33),
            },
        ],
        "platform": "android",
        "lastAccountSyncTimestamp": int(time.time()),
        "myAppStateKeyId": "AAAAA" + base64.b64encode(rng.randbytes(3)).decode(),
        "routingInfo": buf(24),
        "lastPropHash": base64.b64encode(rng.randbytes(4)).decode(),
    }


def pre_key() -> dict[str, object]:
    return {"private": buf(32), "public": buf(33)}


def session_record() -> dict[str, object]:
    """A libsignal SessionRecord as Baileys stores it: base64 keys in nested chains."""

    def b64(n: int) -> str:
        return base64.b64encode(rng.randbytes(n)).decode()

    chains = {
        b64(33): {
            "chainKey": {"counter": rng.randrange(0, 50), "key": b64(32)},
            "chainType": rng.choice((1, 2)),
            "messageKeys": {str(i): b64(32) for i in range(rng.randrange(35, 55))},
        }
        for _ in range(2)
    }
    entry = {
        "registrationId": rng.randrange(1, 16380),
        "currentRatchet": {
            "ephemeralKeyPair": {"pubKey": b64(33), "privKey": b64(32)},
            "lastRemoteEphemeralKey": b64(33),
            "previousCounter": rng.randrange(0, 20),
            "rootKey": b64(32),
        },
        "indexInfo": {
            "baseKey": b64(33),
            "baseKeyType": 1,
            "closed": -1,
            "used": int(time.time() * 1000),
            "created": int(time.time() * 1000),
            "remoteIdentityKey": b64(33),
        },
        "_chains": chains,
    }
    return {"_sessions": {b64(33): entry}, "version": "v1"}


def sync_key() -> dict[str, object]:
    return {
        "keyData": base64.b64encode(rng.randbytes(32)).decode(),
        "fingerprint": {
            "rawId": rng.randrange(10**8, 10**9),
            "currentIndex": rng.randrange(1, 9),
            "deviceIndexes": [0, rng.randrange(1, 9)],
        },
        "timestamp": str(int(time.time() * 1000)),
    }


def sync_version() -> dict[str, object]:
    index = {
        base64.b64encode(rng.randbytes(32)).decode(): {"valueMac": buf(32)}
        for _ in range(rng.randrange(3, 12))
    }
    return {"version": rng.randrange(1, 400), "hash": buf(128), "indexValueMap": index}


def dump(path: Path, value: object) -> None:
    path.write_text(json.dumps(value, separators=(",", ":")))  # JSON.stringify: no spaces


def make_session(root: Path) -> tuple[int, int]:
    """The account directory; (files, bytes)."""
    account = root / ACCOUNT
    account.mkdir(parents=True, mode=0o700)
    dump(account / "creds.json", creds())
    for i in range(1, PRE_KEYS + 1):
        dump(account / f"pre-key-{i}.json", pre_key())
    for i in range(SESSIONS):
        peer = (
            f"{rng.randrange(10**10, 10**11)}.0"
            if i % 3
            else f"{rng.randrange(10**10, 10**11)}_1.0"
        )
        dump(account / f"session-{peer}.json", session_record())
    for _ in range(SYNC_KEYS):
        key_id = base64.b64encode(b"\0\0\0" + rng.randbytes(3)).decode()
        dump(account / f"app-state-sync-key-{key_id.replace('/', '__')}.json", sync_key())
    for name in SYNC_VERSIONS:
        dump(account / f"app-state-sync-version-{name}.json", sync_version())
    files = list(account.iterdir())
    return len(files), sum(f.stat().st_size for f in files)


def change_three(account: Path) -> None:
    """What one incoming message may make Baileys write: creds, a session, a pre-key."""
    dump(account / "creds.json", creds())
    sessions = sorted(account.glob("session-*.json"))
    dump(rng.choice(sessions), session_record())
    dump(account / f"pre-key-{rng.randrange(1, PRE_KEYS + 1)}.json", pre_key())


# --- counting opens: inotify on the account directory ----------------------------------------

IN_CLOSE_NOWRITE = 0x10
IN_OPEN = 0x20
IN_Q_OVERFLOW = 0x4000
IN_ISDIR = 0x40000000
IN_NONBLOCK = 0o4000
_EVENT = struct.Struct("iIII")


class OpenCounter:
    """Opens of files in one directory, by any process (the snapshot worker is a child)."""

    def __init__(self, directory: Path) -> None:
        self.libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self.fd = self.libc.inotify_init1(IN_NONBLOCK)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        # the kernel merges an event identical to the last one queued: with the closes
        # watched too, two opens of the same file in a row are two events
        mask = IN_OPEN | IN_CLOSE_NOWRITE
        if self.libc.inotify_add_watch(self.fd, str(directory).encode(), mask) < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {directory}")
        self.overflowed = False

    def take(self) -> tuple[int, int]:
        """(opens, distinct files) since the last call."""
        opens, names = 0, set()
        while True:
            try:
                data = os.read(self.fd, 1 << 20)
            except BlockingIOError:
                return opens, len(names)
            pos = 0
            while pos < len(data):
                _wd, mask, _cookie, size = _EVENT.unpack_from(data, pos)
                name = data[pos + _EVENT.size : pos + _EVENT.size + size].rstrip(b"\0")
                pos += _EVENT.size + size
                if mask & IN_Q_OVERFLOW:
                    self.overflowed = True
                elif mask & IN_OPEN and not mask & IN_ISDIR:
                    opens += 1
                    names.add(name)

    def close(self) -> None:
        os.close(self.fd)


# --- measuring -------------------------------------------------------------------------------


def cpu_seconds() -> float:
    me, children = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def load() -> str:
    return "load average " + " ".join(f"{v:.2f}" for v in os.getloadavg())


def measure(
    name: str,
    rounds: int,
    run: Callable[[int], tuple[BackupEngine, Callable[[], BackupResult]]],
    counter: OpenCounter,
    note: str = "",
) -> Row:
    """`run(i)` prepares round i and returns the engine and the call to time."""
    seconds: list[float] = []
    opens: list[int] = []
    distinct: list[int] = []
    results: list[BackupResult] = []
    cpu: list[float] = []
    for i in range(rounds):
        _engine, call = run(i)
        counter.take()  # forget what preparing the round opened
        cpu_before = cpu_seconds()
        started = time.perf_counter()
        result = call()
        seconds.append(time.perf_counter() - started)
        cpu.append(cpu_seconds() - cpu_before)
        n, d = counter.take()
        opens.append(n)
        distinct.append(d)
        results.append(result)
    statuses = sorted({r.status for r in results})
    commits = [r.commit for r in results if r.commit is not None and r.commit.created]
    pieces, uploaded = "", "0 KiB"
    if commits:
        up = statistics.median(c.uploaded_pieces for c in commits)
        pieces = f"{up:g}/{commits[0].pieces}"
        uploaded = human(statistics.median(c.uploaded_bytes for c in commits))
    med, worst = statistics.median(seconds), max(seconds)
    opened = f"{statistics.median(distinct):g}"
    opened_all = f"{statistics.median(opens):g}"
    status = "/".join(statuses)
    return (
        name,
        str(rounds),
        f"{med:.3f}",
        f"{worst:.3f}",
        f"{statistics.median(cpu):.3f}",
        opened,
        opened_all,
        pieces,
        uploaded,
        f"{status}{'; ' + note if note else ''}",
    )


def print_table(rows: list[Row]) -> None:
    header = (
        "case",
        "rounds",
        "median s",
        "max s",
        "CPU s",
        "files opened",
        "source opens",
        "pieces up/total",
        "uploaded",
        "result",
    )
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    for r in (header, tuple("-" * w for w in widths), *rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    print("seconds: BackupEngine.backup, wall clock; CPU s: median user + system CPU of this")
    print("process and its children (the snapshot worker) per backup; files opened / source")
    print("opens: median per backup of the distinct files in the account directory that were")
    print("opened, and of all opens of them")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 rounds per case instead of 15")
    parser.add_argument("--rounds", type=int, help="rounds per case")
    args = parser.parse_args()
    rounds = args.rounds or (5 if args.quick else 15)
    begun = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="wadaemon-json-bench-"))
    keyring = Keyring(Key.from_bytes(os.urandom(32), "bench"))
    try:
        sessions = work / "sessions"
        files, size = make_session(sessions)
        account = sessions / ACCOUNT
        layout = SessionsLayout(sessions)
        layout.prepare_tmp()
        print(f"{machine()}, {load()}", flush=True)
        print(
            f"{ACCOUNT}: {files} JSON files, {human(size)} ({size} bytes); sizes: "
            f"creds.json {(account / 'creds.json').stat().st_size} B, pre-key "
            f"{statistics.mean(p.stat().st_size for p in account.glob('pre-key-*')):.0f} B, "
            f"session {statistics.mean(p.stat().st_size for p in account.glob('session-*')):.0f} B "
            f"(means)",
            flush=True,
        )
        time.sleep(2.1)  # older than the engine's racy window: the fingerprint can be trusted
        counter = OpenCounter(account)
        engines: list[BackupEngine] = []

        def first(i: int) -> tuple[BackupEngine, Callable[[], BackupResult]]:
            (work / f"store-{i}").mkdir()  # the directory store never creates its root
            engine = BackupEngine(layout, Replica(DirectoryStore(work / f"store-{i}"), keyring, 5))
            engines.append(engine)
            return engine, lambda: engine.backup(ACCOUNT)

        rows = [measure("first backup", rounds, first, counter, "a fresh store each round")]
        engine = engines[-1]

        def same(force: bool) -> Callable[[int], tuple[BackupEngine, Callable[[], BackupResult]]]:
            return lambda _i: (engine, lambda: engine.backup(ACCOUNT, force=force))

        rows.append(measure("unchanged", rounds, same(False), counter))
        rows.append(measure("unchanged, forced", rounds, same(True), counter))

        def changed(_i: int) -> tuple[BackupEngine, Callable[[], BackupResult]]:
            change_three(account)
            return engine, lambda: engine.backup(ACCOUNT)

        rows.append(measure("3 files changed", rounds, changed, counter))
        if counter.overflowed:
            print("warning: the inotify queue overflowed; open counts are too low", file=sys.stderr)
        counter.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(rows)
    print(f"whole run {time.monotonic() - begun:.0f} s; {load()} at the end")


if __name__ == "__main__":
    main()
