"""Session databases with neonize's own schema, filled like an active WhatsApp account.

    python bench/neonize_db.py schema PATH               create the schema with neonize itself
    python bench/neonize_db.py fill SPEC.json        [{"path", "scale", "seed", "marker"}, ...]
    python bench/neonize_db.py write --rate R --seconds T --log OUT DB...
    python bench/neonize_db.py message DB [--count N] [--update-only]
    python bench/neonize_db.py hold DB                   keep the database open until killed

Each command is meant to run in a process of its own (bench/firestore_bench.py starts them):
`schema` imports neonize (0.5.2, whatsmeow inside) and lets it create its 17 whatsmeow tables
through `ClientFactory.get_all_devices_from_db`; nothing else here imports neonize, and no process
that imports it opens the file with Python's sqlite3 (see the shared notes on neonize).
`fill` switches the file to WAL (as a deployment would before the client first opens it) and
inserts rows with the sizes whatsmeow stores. `write` is the client's stand-in during the RPO
measurement: one "message" per second per database, each the two transactions whatsmeow commits
when it decrypts an incoming message (ratchet session update + event buffer insert, then the
buffered plaintext cleared), and a JSON line per message with its wall-clock commit time.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import sqlite3
import time
from pathlib import Path

OUR_JID = "491701234567:12@s.whatsapp.net"
MARKER_TABLE = "wadaemon_bench_marker"
MARKER_WIDTH = 12  # digits of the message number in the marker: "SEQ:000000000042;"
DB_SIZE = "SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()"

# Rows of an active account at scale 1.0 (about 4.5 MB): a few thousand contacts' devices,
# some hundreds of groups. Key material is random bytes, as it is in whatsmeow's tables.
PROFILE = {
    "identity_keys": 1600,  # one per contact device: 32-byte identity key
    "sessions": 1600,  # Signal session records, 0.3-12 KB (median 1.1 KB)
    "sender_keys": 900,  # group sender-key states, 200-700 B
    "mutation_macs": 5000,  # app-state mutation MACs, 2 x 32 B each
    "contacts": 900,
    "chat_settings": 120,
    "message_secrets": 600,
    "privacy_tokens": 300,
    "lid_map": 1300,
    "event_buffer": 40,
}
PRE_KEYS = 812  # whatsmeow keeps ~800 one-time pre-keys (not scaled)
APP_STATE_NAMES = (
    "critical_block",
    "critical_unblock_low",
    "regular",
    "regular_high",
    "regular_low",
)


def create_schema(path: Path) -> None:
    """In this (fresh) process: let neonize create its schema in `path`."""
    logging.basicConfig(level=logging.WARNING)  # before the import: neonize configures INFO
    from neonize.client import ClientFactory  # type: ignore[import-untyped]

    devices = ClientFactory.get_all_devices_from_db(str(path))
    if devices:
        raise SystemExit(f"{path}: expected an empty device list, got {devices!r}")


def _phone(rng: random.Random) -> str:
    return str(rng.randrange(10**10, 10**12))


def _session_blob(rng: random.Random) -> bytes:
    size = int(min(12_000, max(300, rng.lognormvariate(math.log(1100), 0.6))))
    return rng.randbytes(size)


def fill(path: Path, scale: float, seed: int, marker: bool) -> dict[str, int | None]:
    """Fill a database that has the schema; its size and the marker table's page."""
    rng = random.Random(seed)
    n = {k: max(1, round(v * scale)) for k, v in PROFILE.items()}
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if "whatsmeow_device" not in tables:
        raise SystemExit(f"{path}: no whatsmeow schema (run the schema command first)")
    with conn:
        if marker:  # created first, so its single row stays on one low, fixed page
            conn.execute(f"CREATE TABLE {MARKER_TABLE} (id INTEGER PRIMARY KEY, marker TEXT)")
            conn.execute(f"INSERT INTO {MARKER_TABLE} VALUES (1, ?)", (_marker(0),))
        conn.execute(
            "INSERT INTO whatsmeow_device (jid, lid, registration_id, noise_key, identity_key,"
            " signed_pre_key, signed_pre_key_id, signed_pre_key_sig, adv_key, adv_details,"
            " adv_account_sig, adv_account_sig_key, adv_device_sig, platform, push_name)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                OUR_JID,
                f"{rng.randrange(10**14, 10**15)}:12@lid",
                rng.randrange(2**32),
                rng.randbytes(32),
                rng.randbytes(32),
                rng.randbytes(32),
                1,
                rng.randbytes(64),
                rng.randbytes(32),
                rng.randbytes(180),
                rng.randbytes(64),
                rng.randbytes(32),
                rng.randbytes(64),
                "android",
                "Bench",
            ),
        )
        conn.executemany(
            "INSERT INTO whatsmeow_pre_keys VALUES (?,?,?,?)",
            ((OUR_JID, i, rng.randbytes(32), True) for i in range(2, PRE_KEYS + 2)),
        )
        devices = [f"{_phone(rng)}.0:{rng.choice((0, 0, 1, 2, 21))}" for _ in range(n["sessions"])]
        conn.executemany(
            "INSERT OR IGNORE INTO whatsmeow_identity_keys VALUES (?,?,?)",
            ((OUR_JID, d, rng.randbytes(32)) for d in devices[: n["identity_keys"]]),
        )
        conn.executemany(
            "INSERT OR IGNORE INTO whatsmeow_sessions VALUES (?,?,?)",
            ((OUR_JID, d, _session_blob(rng)) for d in devices),
        )
        groups = [f"120363{rng.randrange(10**11, 10**12)}@g.us" for _ in range(150)]
        conn.executemany(
            "INSERT OR IGNORE INTO whatsmeow_sender_keys VALUES (?,?,?,?)",
            (
                (
                    OUR_JID,
                    rng.choice(groups),
                    rng.choice(devices),
                    rng.randbytes(rng.randint(200, 700)),
                )
                for _ in range(n["sender_keys"])
            ),
        )
        conn.executemany(
            "INSERT INTO whatsmeow_app_state_sync_keys VALUES (?,?,?,?,?)",
            (
                (OUR_JID, rng.randbytes(6), rng.randbytes(110), int(time.time()), rng.randbytes(24))
                for _ in range(40)
            ),
        )
        conn.executemany(
            "INSERT INTO whatsmeow_app_state_version VALUES (?,?,?,?)",
            (
                (OUR_JID, name, rng.randrange(100, 5000), rng.randbytes(128))
                for name in APP_STATE_NAMES
            ),
        )
        conn.executemany(
            "INSERT OR IGNORE INTO whatsmeow_app_state_mutation_macs VALUES (?,?,?,?,?)",
            (
                (
                    OUR_JID,
                    rng.choice(APP_STATE_NAMES[2:]),
                    rng.randrange(1, 5000),
                    rng.randbytes(32),
                    rng.randbytes(32),
                )
                for _ in range(n["mutation_macs"])
            ),
        )
        conn.executemany(
            "INSERT OR IGNORE INTO whatsmeow_contacts VALUES (?,?,?,?,?,?,?)",
            (
                (
                    OUR_JID,
                    f"{_phone(rng)}@s.whatsapp.net",
                    "Firstname",
                    f"Firstname Lastname {i}",
                    f"push {i}",
                    "",
                    "",
                )
                for i in range(n["contacts"])
            ),
        )
        conn.executemany(
            "INSERT OR IGNORE INTO whatsmeow_chat_settings VALUES (?,?,?,?,?)",
            (
                (OUR_JID, rng.choice(groups), 0, False, rng.random() < 0.2)
                for _ in range(n["chat_settings"])
            ),
        )
        conn.executemany(
            "INSERT OR IGNORE INTO whatsmeow_message_secrets VALUES (?,?,?,?,?)",
            (
                (
                    OUR_JID,
                    rng.choice(groups),
                    f"{_phone(rng)}@s.whatsapp.net",
                    rng.randbytes(10).hex().upper(),
                    rng.randbytes(32),
                )
                for _ in range(n["message_secrets"])
            ),
        )
        conn.executemany(
            "INSERT OR IGNORE INTO whatsmeow_privacy_tokens VALUES (?,?,?,?,?)",
            (
                (
                    OUR_JID,
                    f"{_phone(rng)}@s.whatsapp.net",
                    rng.randbytes(40),
                    int(time.time()),
                    None,
                )
                for _ in range(n["privacy_tokens"])
            ),
        )
        conn.executemany(
            "INSERT OR IGNORE INTO whatsmeow_lid_map VALUES (?,?)",
            (
                (f"{rng.randrange(10**14, 10**15)}@lid", f"{_phone(rng)}@s.whatsapp.net")
                for _ in range(n["lid_map"])
            ),
        )
        conn.execute("INSERT INTO whatsmeow_nct_salt VALUES (?,?)", (OUR_JID, rng.randbytes(32)))
        now = int(time.time())
        conn.executemany(
            "INSERT INTO whatsmeow_event_buffer VALUES (?,?,?,?,?)",
            ((OUR_JID, rng.randbytes(32), None, now, now) for _ in range(n["event_buffer"])),
        )
    root = conn.execute(
        "SELECT rootpage FROM sqlite_master WHERE name = ?", (MARKER_TABLE,)
    ).fetchone()
    size = conn.execute(DB_SIZE).fetchone()[0]
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return {"size": size, "page_size": page_size, "marker_page": root[0] if root else None}


def _marker(seq: int) -> str:
    return f"SEQ:{seq:0{MARKER_WIDTH}d};"


def read_marker(page: bytes) -> int | None:
    """The message number in a marker table page (stale copies in free space are older)."""
    found = []
    start = 0
    while (at := page.find(b"SEQ:", start)) >= 0:
        digits = page[at + 4 : at + 4 + MARKER_WIDTH]
        if digits.isdigit() and page[at + 4 + MARKER_WIDTH : at + 5 + MARKER_WIDTH] == b";":
            found.append(int(digits))
        start = at + 4
    return max(found) if found else None


class Messenger:
    """Applies whatsmeow's writes for one incoming message to an open session database."""

    def __init__(self, db: Path, seed: int) -> None:
        self.conn = sqlite3.connect(db, timeout=30, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")  # persistent; a restored copy keeps it too
        self.rng = random.Random(seed)
        self.has_marker = bool(
            self.conn.execute(
                "SELECT 1 FROM sqlite_master WHERE name = ?", (MARKER_TABLE,)
            ).fetchone()
        )
        self.peers = [r[0] for r in self.conn.execute("SELECT their_id FROM whatsmeow_sessions")]
        self.seq = 0

    def message(self) -> float:
        """One message; returns the wall-clock time its decryption transaction committed."""
        self.seq += 1
        rng, c = self.rng, self.conn
        hash_ = rng.randbytes(32)
        now = int(time.time())
        c.execute("BEGIN IMMEDIATE")
        c.execute(  # the ratchet advanced: a new session record of about the same size
            "UPDATE whatsmeow_sessions SET session = randomblob(length(session) + ?)"
            " WHERE our_jid = ? AND their_id = ?",
            (rng.randint(-8, 8), OUR_JID, rng.choice(self.peers)),
        )
        c.execute(
            "INSERT INTO whatsmeow_event_buffer VALUES (?,?,?,?,?)",
            (OUR_JID, hash_, rng.randbytes(rng.randint(80, 400)), now, now),
        )
        if self.has_marker:
            c.execute(f"UPDATE {MARKER_TABLE} SET marker = ? WHERE id = 1", (_marker(self.seq),))
        c.execute("COMMIT")
        committed = time.time()
        c.execute(  # handled: the buffered plaintext is dropped, the hash kept
            "UPDATE whatsmeow_event_buffer SET plaintext = NULL"
            " WHERE our_jid = ? AND ciphertext_hash = ?",
            (OUR_JID, hash_),
        )
        return committed

    def update_one_row(self) -> None:
        """The smallest change: one session record rewritten in place."""
        self.conn.execute(
            "UPDATE whatsmeow_sessions SET session = randomblob(length(session))"
            " WHERE our_jid = ? AND their_id = ?",
            (OUR_JID, self.rng.choice(self.peers)),
        )

    def close(self) -> None:
        self.conn.close()


def write(dbs: list[Path], rate: float, seconds: float, log_path: Path) -> None:
    """Send `rate` messages per second to every database, spread evenly, for `seconds`."""
    writers = [Messenger(db, seed=i) for i, db in enumerate(dbs)]
    period = 1.0 / rate
    start = time.monotonic() + 0.2
    slots = sorted(
        (start + period * i / len(dbs), i) for i in range(len(dbs))
    )  # (due time, writer)
    late = 0.0
    with open(log_path, "w", encoding="utf-8") as log:
        end = start + seconds
        while True:
            due, i = slots[0]
            if due >= end:
                break
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            else:
                late = max(late, -wait)
            w = writers[i]
            t = w.message()
            log.write(json.dumps({"db": str(dbs[i]), "seq": w.seq, "t": t}) + "\n")
            slots[0] = (due + period, i)
            slots.sort()
    for w in writers:
        w.close()
    print(json.dumps({"messages": sum(w.seq for w in writers), "max_late_s": round(late, 3)}))


def messages(db: Path, count: int, update_only: bool) -> None:
    m = Messenger(db, seed=os.getpid())
    for _ in range(count):
        if update_only:
            m.update_one_row()
        else:
            m.message()
    m.close()


def hold(db: Path) -> None:
    """The WhatsApp client's open connection, while `message` processes come and go: so that
    the last one to close does not checkpoint and delete the `-wal` (a client keeps its
    database open, and its WAL with it)."""
    conn = sqlite3.connect(db)
    conn.execute("SELECT count(*) FROM sqlite_master").fetchall()
    print("held", flush=True)
    while True:
        time.sleep(3600)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("schema")
    p.add_argument("path", type=Path)
    p = sub.add_parser("fill")
    p.add_argument("spec", type=Path)
    p = sub.add_parser("write")
    p.add_argument("dbs", type=Path, nargs="+")
    p.add_argument("--rate", type=float, default=1.0)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--log", type=Path, required=True)
    p = sub.add_parser("message")
    p.add_argument("db", type=Path)
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--update-only", action="store_true")
    p = sub.add_parser("hold")
    p.add_argument("db", type=Path)
    args = parser.parse_args()
    if args.command == "schema":
        create_schema(args.path)
    elif args.command == "fill":
        for item in json.loads(args.spec.read_text()):
            path = Path(item["path"])
            info = fill(path, float(item["scale"]), int(item["seed"]), bool(item["marker"]))
            print(json.dumps({"path": str(path), **info}), flush=True)
    elif args.command == "write":
        write(args.dbs, args.rate, args.seconds, args.log)
    elif args.command == "hold":
        hold(args.db)
    else:
        messages(args.db, args.count, args.update_only)


if __name__ == "__main__":
    main()
