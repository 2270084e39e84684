"""Measure wadaemon backups: full, unchanged, one-row change, restore, and daemon head latency.

    .venv/bin/python bench/backup_bench.py [--quick]

Everything is created in a temporary directory that is removed at the end; the script only
measures and prints a plain-text table (no timed assertions). SQLite session databases are only
ever opened by child processes (this script re-run with --writer), like a WhatsApp client would.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from wadaemon.backup import BackupEngine, BackupResult
from wadaemon.keyring import Key, Keyring
from wadaemon.layout import SessionsLayout
from wadaemon.replica import Replica
from wadaemon.restore import Restorer
from wadaemon.store import DirectoryStore

ACCOUNT = "bench"
MB = 1024 * 1024
OUR_JID = "491701234567.0:1@s.whatsapp.net"
SCHEMA = """CREATE TABLE IF NOT EXISTS whatsmeow_sessions (
    our_jid TEXT, their_id TEXT, session BLOB, PRIMARY KEY (our_jid, their_id))"""
Row = tuple[str, ...]


# --- the writer: a separate process, the only one that opens the live databases ---------------


def writer(db: Path, grow_to: int, update: bool) -> None:
    """Grow `db` to `grow_to` bytes (WAL mode), or insert/update one row; print the commit time."""
    rng = random.Random()

    def row() -> tuple[str, str, bytes]:  # ~200-500 bytes, mostly key material as in whatsmeow
        their = f"{rng.randrange(10**11, 10**12)}.0:{rng.randrange(1, 30)}@s.whatsapp.net"
        return OUR_JID, their, rng.randbytes(rng.randint(150, 430))

    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(SCHEMA)
    insert = "INSERT OR REPLACE INTO whatsmeow_sessions VALUES (?, ?, ?)"
    if update:
        (top,) = conn.execute("SELECT max(rowid) FROM whatsmeow_sessions").fetchone()
        conn.execute(
            "UPDATE whatsmeow_sessions SET session = randomblob(length(session)) WHERE rowid = ?",
            (rng.randint(1, top),),
        )
    elif grow_to == 0:
        conn.execute(insert, row())
    while grow_to:
        conn.executemany(insert, [row() for _ in range(1000)])
        conn.commit()
        pages, size = (
            conn.execute(f"PRAGMA {p}").fetchone()[0] for p in ("page_count", "page_size")
        )
        if pages * size >= grow_to:
            break
    conn.commit()
    print(time.monotonic(), conn.execute("SELECT count(*) FROM whatsmeow_sessions").fetchone()[0])
    sys.stdout.flush()
    conn.close()  # the last connection: SQLite checkpoints and removes the WAL


def writer_cmd(db: Path, grow_to: int = 0, update: bool = False) -> list[str]:
    flags = ["--update"] if update else []
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        "--writer",
        str(db),
        "--grow-to",
        str(grow_to),
        *flags,
    ]


def write(db: Path, grow_to: int = 0, update: bool = False) -> tuple[float, int]:
    out = subprocess.run(
        writer_cmd(db, grow_to, update), check=True, capture_output=True, text=True
    )
    committed, rows = out.stdout.split()
    return float(committed), int(rows)


# --- helpers -----------------------------------------------------------------------------------


def make_template(path: Path, size: int) -> int:
    """An account directory: a WAL-mode session.db of `size` bytes and two small JSON files."""
    account = path / ACCOUNT
    account.mkdir(parents=True, mode=0o700)
    _, rows = write(account / "session.db", grow_to=size)
    creds = {"platform": "android", "push_name": "Bench", "registration_id": 12345}
    (account / "creds.json").write_text(json.dumps(creds))
    (account / "meta.json").write_text(json.dumps({"account": ACCOUNT, "created": time.time()}))
    return rows


def rig(work: Path, template: Path, keyring: Keyring) -> tuple[Path, BackupEngine]:
    base = Path(tempfile.mkdtemp(dir=work))
    shutil.copytree(template, base / "sessions")
    layout = SessionsLayout(base / "sessions")
    return base, BackupEngine(layout, Replica(DirectoryStore(base / "store"), keyring, 5))


def human(n: float) -> str:
    return f"{n / MB:.2f} MiB" if n >= MB else f"{n / 1024:.0f} KiB"


def secs(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def backup_row(name: str, label: str, results: list[BackupResult], note: str = "") -> Row:
    commits = [r.commit for r in results if r.commit is not None]
    created = [c for c in commits if c.created]
    pieces = "/".join(sorted({f"{c.uploaded_pieces}/{c.pieces}" for c in commits}, key=len))
    uploaded = ", ".join(human(c.uploaded_bytes) for c in created) if created else "0"
    if len(created) != len(results) and created:
        note = f"{len(results) - len(created)} of {len(results)} unchanged; " + note
    pieces = pieces if created else f"0/{commits[0].pieces}"
    return (
        name,
        label,
        str(len(results)),
        secs([r.seconds for r in results]),
        pieces,
        uploaded,
        note,
    )


# --- library measurements ----------------------------------------------------------------------


def bench_library(work: Path, template: Path, label: str, runs: int, rows: int) -> list[Row]:
    keyring = Keyring(Key.from_bytes(os.urandom(32), "bench"))
    out: list[Row] = []
    firsts: list[BackupResult] = []
    for _ in range(runs):  # each full backup into a fresh store
        base, engine = rig(work, template, keyring)
        firsts.append(engine.backup(ACCOUNT))
    out.append(backup_row("full first backup", label, firsts))
    again = [engine.backup(ACCOUNT) for _ in range(runs)]
    note = "no generation created" if all(r.status == "unchanged" for r in again) else "CREATED"
    out.append(backup_row("unchanged re-backup", label, again, note))
    db = base / "sessions" / ACCOUNT / "session.db"
    for what, update in (("insert", False), ("update", True)):
        results = []
        for _ in range(runs):
            _, rows = write(db, update=update)
            results.append(engine.backup(ACCOUNT))
        out.append(backup_row(f"one-row {what} + backup", label, results))
    restorer = Restorer(engine.layout, engine.replica)
    times: list[float] = []
    for i in range(runs):
        dest = base / f"restored-{i}"
        started = time.monotonic()
        outcome = restorer.restore_to(ACCOUNT, dest)
        times.append(time.monotonic() - started)
        conn = sqlite3.connect(f"file:{dest / 'session.db'}?immutable=1", uri=True)
        got = conn.execute("SELECT count(*) FROM whatsmeow_sessions").fetchone()[0]
        conn.close()
        if outcome.status != "restored" or got != rows:
            raise SystemExit(f"restore check failed: {outcome.line()}, {got} rows, want {rows}")
    note = f"generation {outcome.generation}, {got} rows verified"
    out.append(("restore_to + verify", label, str(runs), secs(times), "", "", note))
    return out


# --- daemon head latency -----------------------------------------------------------------------


def read_generation(head: Path) -> int:
    try:
        return int(json.loads(head.read_bytes())["generation"])
    except (FileNotFoundError, ValueError, KeyError):
        return 0


def wait_for(what: str, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.01)


def bench_daemon(work: Path, template: Path, label: str, debounce: float, reps: int) -> Row:
    base = Path(tempfile.mkdtemp(dir=work))
    shutil.copytree(template, base / "sessions")
    cli = [str(Path(sys.executable).with_name("wadaemon"))]
    key = base / "session.key"
    subprocess.run([*cli, "keygen", str(key)], check=True, capture_output=True)
    config = {
        "sessions_path": str(base / "sessions"),
        "socket_path": str(base / "wadaemon.sock"),
        "log_level": "debug",
        "encryption": {"key_file": str(key)},
        "backup": {
            "target": "directory",
            "directory": str(base / "store"),
            "debounce_seconds": debounce,
        },
        "whatsapp": {"enabled": False},
    }
    (base / "wadaemon.yaml").write_text(yaml.safe_dump(config))
    log = base / "daemon.log"
    head = base / "store" / ACCOUNT / "HEAD.json"
    db = base / "sessions" / ACCOUNT / "session.db"
    with open(log, "wb") as log_fh:
        proc = subprocess.Popen(
            [*cli, "run", "--config", str(base / "wadaemon.yaml")], stderr=log_fh
        )
    latencies: list[float] = []
    try:
        wait_for("ready", lambda: " ready: " in log.read_text(), 60)
        wait_for("the startup backup", lambda: read_generation(head) > 0, 120)
        time.sleep(2 * debounce + 1.0)
        for _ in range(reps):
            before = read_generation(head)
            w = subprocess.Popen(writer_cmd(db), stdout=subprocess.PIPE, text=True)
            while read_generation(head) == before:
                time.sleep(0.01)
            moved = time.monotonic()
            committed = float(w.communicate()[0].split()[0])
            latencies.append(moved - committed)
            time.sleep(2 * debounce + 1.0)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    text = log.read_text()
    created, unchanged = text.count(f"backup: {ACCOUNT}: generation"), text.count("unchanged since")
    note = f"daemon ran {created} created + {unchanged} unchanged backups; exit {code}"
    lat = f"{min(latencies):.3f} / {statistics.median(latencies):.3f} / {max(latencies):.3f}"
    return (f"head latency, debounce {debounce:g} s", label, str(reps), lat, "", "", note)


# --- main --------------------------------------------------------------------------------------


def machine() -> str:
    models = [ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in ln]
    cpu = models[0].split(":", 1)[1].strip() if models else "?"
    python, sqlite = platform.python_version(), sqlite3.sqlite_version
    return f"nproc {os.cpu_count()}, CPU {cpu}, Python {python}, SQLite {sqlite}"


def print_table(rows: list[Row]) -> None:
    header = (
        "measurement",
        "db",
        "runs",
        "seconds: median (min-max)",
        "pieces up/total",
        "uploaded",
        "notes",
    )
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    for r in (header, tuple("-" * w for w in widths), *rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs (about 30 s)")
    parser.add_argument("--writer", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--grow-to", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--update", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.writer:
        return writer(args.writer, args.grow_to, args.update)
    runs, reps = (1, 3) if args.quick else (5, 5)
    print(machine())
    rows: list[Row] = []
    work = Path(tempfile.mkdtemp(prefix="wadaemon-bench-"))
    try:
        templates: dict[str, Path] = {}
        for size in (10, 20):
            templates[f"{size} MB"] = work / f"template-{size}"
            count = make_template(templates[f"{size} MB"], size * MB)
            rows += bench_library(work, templates[f"{size} MB"], f"{size} MB", runs, count)
        label = "10 MB" if args.quick else "20 MB"
        for debounce in (1.0, 0.2):
            rows.append(bench_daemon(work, templates[label], label, debounce, reps))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(rows)


if __name__ == "__main__":
    main()
