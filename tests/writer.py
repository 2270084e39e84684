"""A session writer in its own process: inserts rows 1, 2, 3, ... one commit each.

Usage: python writer.py DB [--rate PER_SECOND] [--journal wal|delete] [--seconds S]
Every committed prefix 1..n is a state a backup may capture; a gap or a torn row is a bug.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("db")
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--journal", default="wal")
    parser.add_argument("--seconds", type=float, default=3600.0)
    parser.add_argument("--row-bytes", type=int, default=400)
    args = parser.parse_args()
    conn = sqlite3.connect(args.db, timeout=30)
    conn.execute(f"PRAGMA journal_mode={args.journal}")
    conn.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, v BLOB)")
    conn.commit()
    end = time.monotonic() + args.seconds
    pause = 1.0 / args.rate
    while time.monotonic() < end:
        conn.execute("INSERT INTO t (v) VALUES (?)", (os.urandom(args.row_bytes),))
        conn.commit()
        time.sleep(pause)


if __name__ == "__main__":
    main()
