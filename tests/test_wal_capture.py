"""Captures of a WAL database by what changed, against another process writing it.

Every image rebuilt from a full capture and the deltas after it must be a database SQLite
accepts (integrity_check) holding a prefix 1..n of the writer's commits, n never going back;
and once the writer stops, the rebuilt image holds exactly what the database holds.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from wadaemon import sqlite_worker, wal_capture
from wadaemon.db_image import opened_image

HERE = Path(__file__).resolve().parent
PIECE = 64 * 1024


class Rebuilt:
    """The image a daemon would hold: pieces, replaced by each delta."""

    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.pages = 0
        self.position: list[int] | None = None
        self.kinds: list[str] = []

    def since(self) -> dict[str, dict[str, Any]]:
        if self.position is None:
            return {}
        return {"session.db": {"wal": self.position, "pages": self.pages}}

    def take(self, root: Path) -> None:
        out, copies = sqlite_worker.snapshot(
            str(root), "/nonexistent", {}, inline=True, since=self.since(), piece_size=PIECE
        )
        (f,) = [f for f in out["files"] if f["path"] == "session.db"]
        assert not out["warnings"], out["warnings"]
        self.kinds.append(f["status"])
        if f["status"] == "copied":
            image = copies["session.db"]
            self.pieces = [image[o : o + PIECE] for o in range(0, len(image), PIECE)]
        else:
            assert f["status"] == "delta"
            size = f["pages"] * f["page_size"]
            count = -(-size // PIECE)
            self.pieces = (self.pieces + [b""] * count)[:count]
            for key, data in copies.items():
                self.pieces[int(key.split("#")[1])] = data
        self.pages = f["pages"]
        self.position = f["wal"]
        assert f["devices"] is None  # not a WhatsApp client database

    def image(self) -> bytes:
        return b"".join(self.pieces)


def rows_of(image: bytes) -> list[int]:
    with opened_image(image[:18] + b"\x01\x01" + image[20:]) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return [r[0] for r in conn.execute("SELECT id FROM t ORDER BY id")]


def rows_in_another_process(db: Path) -> list[int]:
    """The rows of table t as a fresh process sees them (after SQLite's own recovery of a
    writer killed mid-commit; in this process SQLite may keep an older view of the WAL)."""
    script = (
        "import sqlite3, sys, json\n"
        "c = sqlite3.connect(sys.argv[1])\n"
        "t = c.execute(\"SELECT 1 FROM sqlite_master WHERE name='t'\").fetchone()\n"
        "print(json.dumps([r[0] for r in c.execute('SELECT id FROM t ORDER BY id')] if t else []))"
    )
    out = subprocess.run([sys.executable, "-c", script, str(db)], capture_output=True, text=True)
    return list(json.loads(out.stdout))


@pytest.fixture(autouse=True)
def fresh_states() -> None:
    wal_capture._STATES.clear()


def start_writer(db: Path, rate: float) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, str(HERE / "writer.py"), str(db), "--rate", str(rate)])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if rows_in_another_process(db):
            return proc
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("the writer did not start")


def test_deltas_rebuild_every_committed_prefix_while_another_process_writes(
    tmp_path: Path,
) -> None:
    root = tmp_path / "alice"
    root.mkdir()
    db = root / "session.db"
    with sqlite3.connect(db) as c:  # about 2 MB before the writer starts
        c.execute("PRAGMA journal_mode=WAL")
        c.execute("CREATE TABLE filler (v BLOB)")
        c.executemany("INSERT INTO filler VALUES (?)", [(os.urandom(1000),) for _ in range(2000)])
    writer = start_writer(db, rate=200)
    rebuilt = Rebuilt()
    seen = 0
    try:
        for _ in range(60):
            rebuilt.take(root)
            rows = rows_of(rebuilt.image())
            assert rows == list(range(1, len(rows) + 1)), "a gap: not a committed prefix"
            assert len(rows) >= seen, "went back"
            seen = len(rows)
            time.sleep(0.02)
    finally:
        writer.kill()
        writer.wait()
    rebuilt.take(root)
    assert rows_of(rebuilt.image()) == rows_in_another_process(db)
    assert rebuilt.kinds[0] == "copied"
    assert rebuilt.kinds.count("delta") > 40, rebuilt.kinds  # deltas, not full reads
    assert seen > 20


def test_a_checkpoint_that_restarts_the_wal_makes_the_next_capture_full(tmp_path: Path) -> None:
    root = tmp_path / "alice"
    root.mkdir()
    db = root / "session.db"
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
    rebuilt = Rebuilt()
    for i in range(30):
        conn.execute("INSERT INTO t (v) VALUES (?)", (os.urandom(3000),))
        if i % 10 == 9:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the next write restarts the WAL
        rebuilt.take(root)
        assert rows_of(rebuilt.image()) == list(range(1, i + 2))
    conn.close()
    assert rebuilt.kinds.count("copied") >= 3 and "delta" in rebuilt.kinds, rebuilt.kinds


def test_a_worker_that_lost_its_state_still_gives_deltas_from_the_daemons_position(
    tmp_path: Path,
) -> None:
    root = tmp_path / "alice"
    root.mkdir()
    db = root / "session.db"
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
    rebuilt = Rebuilt()
    rebuilt.take(root)
    for _ in range(5):
        conn.execute("INSERT INTO t (v) VALUES (?)", (os.urandom(3000),))
    wal_capture._STATES.clear()  # a new worker process
    rebuilt.take(root)
    assert rebuilt.kinds == ["copied", "delta"]
    assert rows_of(rebuilt.image()) == [1, 2, 3, 4, 5]
    # a position the WAL never had is not trusted: read in full
    rebuilt.position = [rebuilt.position[0], rebuilt.position[1], 999, 1, 2]
    conn.execute("INSERT INTO t (v) VALUES (?)", (b"x",))
    rebuilt.take(root)
    assert rebuilt.kinds[-1] == "copied"
    assert rows_of(rebuilt.image()) == [1, 2, 3, 4, 5, 6]
    conn.close()
