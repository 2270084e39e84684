"""Sidecar mode against the real Baileys library writing its multi-file auth state.

`tests/baileys/writer.mjs` runs @whiskeysockets/baileys (pinned in tests/baileys/package-lock.json)
with `useMultiFileAuthState` and writes creds and signal keys as a connected gateway does; Baileys
rewrites each file in place (open with O_TRUNC, then write, on different event-loop turns), so a
file is empty or half there for a few milliseconds at a time. `tests/baileys/load.mjs` loads a
directory the way the gateway does at start and says whether every file loaded and whether the
creds are the ones on disk (Baileys silently makes new ones, `initAuthCreds()`, when creds.json
does not parse: the account would have to be paired again).

The packages are installed by scripts/test (`ensure_node_packages` in scripts/setup.sh); without
them these tests fail and say so, they are never skipped.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import DaemonProcess, Env, wait_until

pytestmark = pytest.mark.slow

BAILEYS = Path(__file__).with_name("baileys")
WRITER_JS = BAILEYS / "writer.mjs"
LOAD_JS = BAILEYS / "load.mjs"
LIBRARY = BAILEYS / "node_modules" / "@whiskeysockets" / "baileys" / "package.json"
BAILEYS_VERSION = "7.0.0-rc14"

# The gateway's pace in these tests: creds saved 40 times a second with 3 key writes each time,
# and the event loop kept busy 2 ms at a turn, so that the empty window of each in-place write
# is hit by backups within seconds (a real gateway saves less often; bench/baileys_bench.py runs
# a realistic pace).
RATE = 40
KEYS_PER_TICK = 3
BUSY_MS = 2


def require_baileys() -> str:
    """The path of node; fails (never skips) when Node or the pinned Baileys is missing."""
    node = shutil.which("node")
    if node is None or not LIBRARY.is_file():
        pytest.fail(
            f"Node.js or the Baileys test packages are missing ({LIBRARY} not found): run "
            "scripts/test, which installs them (ensure_node_packages: npm ci in tests/baileys)",
            pytrace=False,
        )
    version = json.loads(LIBRARY.read_text())["version"]
    assert version == BAILEYS_VERSION, f"tests/baileys has Baileys {version}: run scripts/test"
    return node


def start_writer(
    node: str,
    session: Path,
    journal: Path,
    seconds: float = 0,
    rate: float = RATE,
    keys: int = KEYS_PER_TICK,
    busy_ms: float = BUSY_MS,
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            node,
            str(WRITER_JS),
            str(session),
            "--rate",
            str(rate),
            "--keys",
            str(keys),
            "--busy-ms",
            str(busy_ms),
            "--seconds",
            str(seconds),
            "--journal",
            str(journal),
        ],
        cwd=BAILEYS,
    )


def load(node: str, session: Path) -> dict[str, Any]:
    """load.mjs's summary of a session directory (its exit status is in "ok")."""
    proc = subprocess.run(
        [node, str(LOAD_JS), str(session)],
        cwd=BAILEYS,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.stdout.strip(), f"load.mjs printed nothing ({proc.returncode}): {proc.stderr}"
    summary: dict[str, Any] = json.loads(proc.stdout)
    assert (proc.returncode == 0) == summary["ok"], (proc.returncode, summary, proc.stderr)
    return summary


def canonical(creds: object) -> str:
    return json.dumps(creds, sort_keys=True, separators=(",", ":"))


def journal_creds(journal: Path) -> dict[str, int]:
    """Every creds text the writer meant to save (canonical JSON -> its position)."""
    lines = journal.read_text().splitlines()
    meant: dict[str, int] = {}
    for i, line in enumerate(lines):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            # the writer is killed with SIGKILL: only its very last line may be cut short
            assert i == len(lines) - 1, f"journal line {i + 1} is not JSON: {line[:80]}"
            continue
        if entry["phase"] == "meant":
            meant.setdefault(canonical(entry["creds"]), i)
    return meant


def torn_files(root: Path) -> dict[str, str]:
    """JSON files of a session copy that Baileys could not load: empty or not parseable."""
    torn: dict[str, str] = {}
    for path in sorted(root.rglob("*.json")):
        data = path.read_bytes()
        rel = str(path.relative_to(root))
        if not data:
            torn[rel] = "0 bytes"
            continue
        try:
            json.loads(data)
        except ValueError as exc:
            torn[rel] = f"{len(data)} bytes, not JSON: {exc}"
    return torn


def file_kind(name: str) -> str:
    """creds, pre-key, session, sender-key, ... from a Baileys file name."""
    if name == "creds.json":
        return "creds"
    for kind in (
        "app-state-sync-version",
        "app-state-sync-key",
        "sender-key-memory",
        "sender-key",
        "pre-key",
        "session",
    ):
        if name.startswith(kind + "-"):
            return kind
    return "other"


def test_every_generation_of_a_live_baileys_session_is_whole(
    env: Env, daemon_factory: type[DaemonProcess]
) -> None:
    """Baileys writes for 25 s at a gateway's busiest; every committed generation must hold
    only whole JSON files (none empty, none cut short)."""
    node = require_baileys()
    env.write_config(debounce_seconds=0.1, keep_generations=1000)
    env.sessions.mkdir()
    alice = env.sessions / "alice"
    journal = env.root / "alice.journal"
    daemon = daemon_factory()
    daemon.wait_for("ready")
    started = time.monotonic()
    writer = start_writer(node, alice, journal, seconds=25)
    assert writer.wait(timeout=120) == 0
    writer_seconds = time.monotonic() - started
    assert daemon.stop() == 0  # the final backup holds the writer's last state
    assert "backup failed" not in daemon.log()

    replica = env.replica()
    head = replica.store.read_head("alice")
    assert head is not None
    generations = sorted(head.history)
    assert generations == list(range(1, head.generation + 1)), "retention dropped generations"
    # Rebuild each generation file by file through the Replica (pieces authenticated, sizes and
    # SHA-256 checked) and look at the JSON ourselves: what was committed, not what a restore
    # would accept.
    drill = env.root / "drill"
    torn_by_generation: dict[int, dict[str, str]] = {}
    file_counts: list[int] = []
    for g in generations:
        manifest = replica.load_manifest("alice", g)
        dest = drill / str(g)
        for entry in manifest.files:
            target = dest / entry.path
            target.parent.mkdir(parents=True, exist_ok=True)
            replica.write_file("alice", entry, target)
        file_counts.append(len(manifest.files))
        torn = torn_files(dest)
        if torn:
            torn_by_generation[g] = torn
        if g != generations[-1]:
            shutil.rmtree(dest)

    kinds = Counter(file_kind(n) for t in torn_by_generation.values() for n in t)
    empty = sum(1 for t in torn_by_generation.values() for why in t.values() if why == "0 bytes")
    creds_torn = sum(1 for t in torn_by_generation.values() if "creds.json" in t)
    saves = sum(1 for line in journal.read_text().splitlines() if '"phase":"saved"' in line)
    print(
        f"\nbaileys {BAILEYS_VERSION}: writer {writer_seconds:.1f} s, {saves} creds saves, "
        f"rate {RATE}/s, {KEYS_PER_TICK} key writes a tick, busy {BUSY_MS} ms; "
        f"{len(generations)} generations of {min(file_counts)}-{max(file_counts)} files; "
        f"{len(torn_by_generation)} of {len(generations)} held a torn JSON file "
        f"({creds_torn} a torn creds.json); {sum(kinds.values())} torn files ({empty} of "
        f"0 bytes), by kind: {dict(kinds)}"
    )
    for g, torn in list(torn_by_generation.items())[:5]:
        print(f"  generation {g}: {torn}")

    # the last generation (taken after the writer stopped) is what the writer saved last
    last = load(node, drill / str(generations[-1]))
    assert last["ok"], last["failed"]
    assert (
        canonical(last["creds"]) == max(journal_creds(journal).items(), key=lambda item: item[1])[0]
    )

    first = min(torn_by_generation, default=None)
    assert first is None, (
        f"{len(torn_by_generation)} of {len(generations)} generations hold a torn JSON file "
        f"({creds_torn} of them creds.json, which Baileys replaces with new credentials); "
        f"first: generation {first}: {torn_by_generation[first]}"
    )


def repair_for_next_round(session: Path, journal: Path) -> None:
    """After a round that restored a torn session: put the writer's last meant creds back and
    drop torn key files, so that the next round starts from the same account, not from the new
    credentials Baileys would make (every round then measures the daemon on its own)."""
    for rel in torn_files(session):
        (session / rel).unlink()
    last = max(journal_creds(journal).items(), key=lambda item: item[1])[0]
    (session / "creds.json").write_text(last)


def test_kill_9_and_lost_disk_bring_back_a_session_baileys_loads(
    env: Env, daemon_factory: type[DaemonProcess]
) -> None:
    """Rounds of: Baileys writing, the daemon backing up, both killed with SIGKILL at a random
    moment, the session directory lost, the daemon started again. The restored directory must
    load completely in Baileys, with creds the writer meant at some point (not new ones)."""
    node = require_baileys()
    env.write_config(debounce_seconds=0.1, keep_generations=1000)
    env.sessions.mkdir()
    alice = env.sessions / "alice"
    journal = env.root / "alice.journal"
    seed = int(os.environ.get("WADAEMON_TEST_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    rounds = 12

    daemon = daemon_factory()
    daemon.wait_for("ready")
    writer = start_writer(node, alice, journal)
    wait_until(lambda: (env.head_generation("alice") or 0) >= 1, timeout=30)
    identity: str | None = None
    results: list[dict[str, Any]] = []
    try:
        for i in range(rounds):
            if i > 0:
                writer = start_writer(node, alice, journal)
            wait_until(lambda: journal.exists() and journal.stat().st_size > 0, timeout=30)
            pause = rng.uniform(0.5, 3.0)
            time.sleep(pause)
            daemon.kill()
            writer.kill()
            writer.wait(10)
            head = env.head_generation("alice")
            shutil.rmtree(alice)  # the disk is lost

            daemon = daemon_factory()
            daemon.wait_for("ready", timeout=60)
            restored = re.search(r"restore: alice: restored \(generation (\d+)\)", daemon.log())
            assert restored, daemon.log()
            summary = load(node, alice)
            meant = journal_creds(journal)
            if identity is None:
                first = min(meant.items(), key=lambda item: item[1])[0]
                identity = canonical(json.loads(first)["noiseKey"])
            creds = summary["creds"]
            result = {
                "round": i + 1,
                "pause": round(pause, 2),
                "head": head,
                "restored": int(restored.group(1)),
                "ok": summary["ok"],
                "creds_file": summary["creds_file"],
                "fresh": summary["fresh"],
                "same_account": canonical(creds.get("noiseKey")) == identity,
                "creds_meant": canonical(creds) in meant,
                "failed": summary["failed"],
            }
            results.append(result)
            if not (result["ok"] and result["creds_meant"]):
                repair_for_next_round(alice, journal)
    finally:
        writer.kill()
        writer.wait(10)
    assert daemon.stop() == 0

    good = [r for r in results if r["ok"] and r["creds_meant"] and r["same_account"]]
    fresh = [r for r in results if r["fresh"]]
    torn_keys = sum(1 for r in results for f in r["failed"] if f["file"] != "creds.json")
    print(
        f"\nbaileys kill -9 rounds (seed {seed}): {len(good)} of {len(results)} restored "
        f"sessions loaded whole with creds the writer meant; {len(fresh)} restored a torn "
        f"creds.json (Baileys made new credentials); {torn_keys} torn key files"
    )
    for r in results:
        print(f"  {r}")
    bad = [r for r in results if r not in good]
    assert not bad, f"{len(bad)} of {len(results)} restored sessions did not load whole: {bad}"
