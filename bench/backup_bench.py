"""Measure wadaemon: full, unchanged and one-row backups, restore, and the daemon's head latency.

    .venv/bin/python bench/backup_bench.py [--quick]

Everything lives in a temporary directory removed at the end; the script only measures and
prints a plain-text table. Live session databases are only opened by child processes (this
script re-run with --writer), as a WhatsApp client would be a process of its own.
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
from functools import partial
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
TABLE = "whatsmeow_sessions"
Row = tuple[str, ...]
DB_SIZE = "SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()"
UPDATE_ONE = f"""UPDATE {TABLE} SET session = randomblob(length(session))
    WHERE rowid = abs(random()) % (SELECT max(rowid) FROM {TABLE}) + 1"""


def writer(db: Path, grow_to: int, update: bool) -> None:
    """Child mode: grow `db` (WAL) to `grow_to` bytes, or change one row; print the commit time."""
    rng = random.Random()

    def row() -> tuple[str, str, bytes]:  # 200-500 bytes, mostly key material as in whatsmeow
        their = f"{rng.randrange(10**11, 10**12)}.0:{rng.randrange(1, 30)}@s.whatsapp.net"
        return "491701234567.0:1@s.whatsapp.net", their, rng.randbytes(rng.randint(150, 430))

    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(
        f"CREATE TABLE IF NOT EXISTS {TABLE} (our_jid TEXT, their_id TEXT, "
        "session BLOB, PRIMARY KEY (our_jid, their_id))"
    )
    insert = f"INSERT OR REPLACE INTO {TABLE} VALUES (?, ?, ?)"
    if update:  # a new blob of the same length in one random row
        conn.execute(UPDATE_ONE)
    elif not grow_to:
        conn.execute(insert, row())
    while grow_to:
        conn.executemany(insert, [row() for _ in range(1000)])
        conn.commit()
        if conn.execute(DB_SIZE).fetchone()[0] >= grow_to:
            break
    conn.commit()
    print(time.monotonic(), conn.execute(f"SELECT count(*) FROM {TABLE}").fetchone()[0], flush=True)
    conn.close()  # the last connection: SQLite checkpoints and removes the WAL


def writer_cmd(db: Path, grow_to: int = 0, update: bool = False) -> list[str]:
    me, flags = str(Path(__file__).resolve()), ["--update"] if update else []
    return [sys.executable, me, "--writer", str(db), "--grow-to", str(grow_to), *flags]


def write(db: Path, grow_to: int = 0, update: bool = False) -> int:
    """Run the writer; the table's row count after its commit."""
    cmd = writer_cmd(db, grow_to, update)
    return int(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()[1])


def make_template(path: Path, size: int) -> int:
    """An account directory: a WAL-mode session.db of `size` bytes and two small JSON files."""
    account = path / ACCOUNT
    account.mkdir(parents=True, mode=0o700)
    rows = write(account / "session.db", grow_to=size)
    creds = {"platform": "android", "push_name": "Bench", "registration_id": 12345}
    (account / "creds.json").write_text(json.dumps(creds))
    (account / "meta.json").write_text(json.dumps({"account": ACCOUNT, "created": time.time()}))
    return rows


def spread(values: list[float], fmt: Callable[[float], str]) -> str:
    """The median, and the range when the values differ."""
    med = fmt(statistics.median(values))
    return med if min(values) == max(values) else f"{med} ({fmt(min(values))}-{fmt(max(values))})"


def human(n: float) -> str:
    return f"{n / MB:.2f} MiB" if n >= MB else f"{n / 1024:.0f} KiB"


def backup_row(name: str, label: str, results: list[BackupResult], note: str = "") -> Row:
    commits = [r.commit for r in results if r.commit is not None]
    pieces, uploaded = "", "0 KiB"  # no commit at all: the directory's fingerprint matched
    if commits:
        up = [float(c.uploaded_pieces) for c in commits]
        pieces = f"{spread(up, lambda v: f'{v:g}')}/{commits[0].pieces}"
        uploaded = spread([float(c.uploaded_bytes) for c in commits], human)
    seconds = spread([r.seconds for r in results], lambda v: f"{v:.3f}")
    return (name, label, str(len(results)), seconds, pieces, uploaded, note)


def bench_library(work: Path, template: Path, label: str, runs: int, rows: int) -> list[Row]:
    keyring = Keyring(Key.from_bytes(os.urandom(32), "bench"))
    out: list[Row] = []
    firsts: list[BackupResult] = []
    for _ in range(runs):  # each first backup goes to a fresh store
        base = Path(tempfile.mkdtemp(dir=work))
        shutil.copytree(template, base / "sessions")
        (base / "store").mkdir()
        replica = Replica(DirectoryStore(base / "store"), keyring, 5)
        engine = BackupEngine(SessionsLayout(base / "sessions"), replica)
        firsts.append(engine.backup(ACCOUNT))
    out.append(backup_row("full first backup", label, firsts))
    again = [engine.backup(ACCOUNT) for _ in range(runs)]
    created = sum(r.status != "unchanged" for r in again)
    note = f"{created} generations created; files' size, mtime and inode unchanged: no snapshot"
    out.append(backup_row("unchanged re-backup", label, again, note))
    forced = [engine.backup(ACCOUNT, force=True) for _ in range(runs)]
    created = sum(r.status != "unchanged" for r in forced)
    note = f"{created} generations created; snapshot and compare, as the safety pass does"
    out.append(backup_row("unchanged, forced", label, forced, note))
    for what, update in (("insert", False), ("update", True)):
        results = []
        for _ in range(runs):
            rows = write(base / "sessions" / ACCOUNT / "session.db", update=update)
            results.append(engine.backup(ACCOUNT))
        out.append(backup_row(f"one-row {what} + backup", label, results))
    times: list[float] = []
    for i in range(runs):
        dest = base / f"restored-{i}"
        started = time.monotonic()
        outcome = Restorer(engine.layout, replica).restore_to(ACCOUNT, dest)
        times.append(time.monotonic() - started)
        conn = sqlite3.connect(f"file:{dest / 'session.db'}?immutable=1", uri=True)
        got = conn.execute(f"SELECT count(*) FROM {TABLE}").fetchone()[0]
        conn.close()
        if outcome.status != "restored" or got != rows:
            raise SystemExit(f"restore check failed: {outcome.line()}; {got} rows, not {rows}")
    note = f"generation {outcome.generation}, {got} rows as written"
    seconds = spread(times, lambda v: f"{v:.3f}")
    out.append(("restore_to (verifies)", label, str(runs), seconds, "", "", note))
    return out


def read_generation(head: Path) -> int:
    try:
        return int(json.loads(head.read_bytes())["generation"])
    except (FileNotFoundError, ValueError, KeyError):
        return 0


def head_moved(head: Path, before: int) -> bool:
    return read_generation(head) != before


def wait_for(what: str, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.01)


def bench_daemon(work: Path, template: Path, label: str, debounce: float, reps: int) -> Row:
    base = Path(tempfile.mkdtemp(dir=work))
    shutil.copytree(template, base / "sessions")
    (base / "store").mkdir()
    cli = str(Path(sys.executable).with_name("wadaemon"))
    subprocess.run([cli, "keygen", str(base / "session.key")], check=True, capture_output=True)
    config = {
        "sessions_path": str(base / "sessions"),
        "socket_path": str(base / "wadaemon.sock"),
        "log_level": "debug",  # so that unchanged backups are logged too
        "encryption": {"key_file": str(base / "session.key")},
        "backup": {
            "target": "directory",
            "directory": str(base / "store"),
            "debounce_seconds": debounce,
        },
        "whatsapp": {"enabled": False},
    }
    (base / "wadaemon.yaml").write_text(yaml.safe_dump(config))
    log, head = base / "daemon.log", base / "store" / ACCOUNT / "HEAD.json"
    db = base / "sessions" / ACCOUNT / "session.db"
    pause = debounce + 0.5  # between writes: longer than the debounce
    argv = [cli, "run", "--config", str(base / "wadaemon.yaml")]
    with open(log, "wb") as log_fh:
        proc = subprocess.Popen(argv, stderr=log_fh)
    latencies: list[float] = []
    try:
        wait_for("ready", lambda: " ready: " in log.read_text(), 60)
        wait_for("the startup backup", lambda: read_generation(head) > 0, 120)
        time.sleep(pause)
        for _ in range(reps):
            before = read_generation(head)
            w = subprocess.Popen(writer_cmd(db), stdout=subprocess.PIPE, text=True)
            wait_for("the head to move", partial(head_moved, head, before), 60)
            moved = time.monotonic()
            latencies.append(moved - float(w.communicate()[0].split()[0]))
            time.sleep(pause)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    text = log.read_text()
    created, same = text.count(f"backup: {ACCOUNT}: generation"), text.count("unchanged since")
    note = f"daemon ran {created} created + {same} unchanged backups; exit {code}"
    lo, med, hi = min(latencies), statistics.median(latencies), max(latencies)
    lat = f"{lo:.3f} / {med:.3f} / {hi:.3f}"
    return (f"head latency, debounce {debounce:g} s", label, str(reps), lat, "", "", note)


def machine() -> str:
    models = [ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in ln]
    cpu = models[0].split(":", 1)[1].strip() if models else "?"
    python, sqlite = platform.python_version(), sqlite3.sqlite_version
    return f"nproc {os.cpu_count()}, CPU {cpu}, Python {python}, SQLite {sqlite}"


def print_table(rows: list[Row]) -> None:
    header = ("measurement", "db", "runs", "seconds", "pieces up/total", "uploaded", "notes")
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    for r in (header, tuple("-" * w for w in widths), *rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    print("seconds: median (min-max) of the runs; for head latency min / median / max of the")
    print("seconds from the writer's commit until HEAD.json names a new generation")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs, about 30 s")
    parser.add_argument("--writer", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--grow-to", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--update", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.writer:
        return writer(args.writer, args.grow_to, args.update)
    runs, reps, daemon_size = (1, 3, 10) if args.quick else (5, 5, 20)
    print(machine(), flush=True)
    rows: list[Row] = []
    work = Path(tempfile.mkdtemp(prefix="wadaemon-bench-"))
    try:
        for size in (10, 20):
            template = work / f"template-{size}"
            count = make_template(template, size * MB)
            rows += bench_library(work, template, f"{size} MB", runs, count)
        for debounce in (1.0, 0.2):
            template = work / f"template-{daemon_size}"
            rows.append(bench_daemon(work, template, f"{daemon_size} MB", debounce, reps))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(rows)


if __name__ == "__main__":
    main()
