"""Baileys at a realistic pace under the sidecar daemon: how many generations hold a torn file.

    .venv/bin/python bench/baileys_bench.py [--seconds 120] [--rate 1] [--keys 3] [--busy-ms 2]
                                            [--debounce 1.0] [--accounts 1]

The real Baileys library (tests/baileys/writer.mjs, installed by scripts/test) writes each
account's multi-file auth state: `--rate` creds saves a second with `--keys` key writes each
(the default, one save and three key writes a second, is a busy connected gateway), while
`wadaemon run` in sidecar mode (debounce as configured, 1 s by default) backs the directories up.
Then every generation is rebuilt and each JSON file checked: empty or unparseable is torn.
Everything lives in a temporary directory removed at the end; prints numbers, asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from wadaemon.keyring import load_keyring, write_new_key
from wadaemon.replica import Replica
from wadaemon.store import DirectoryStore

BAILEYS = Path(__file__).resolve().parent.parent / "tests" / "baileys"
WRITER_JS = BAILEYS / "writer.mjs"
LIBRARY = BAILEYS / "node_modules" / "@whiskeysockets" / "baileys" / "package.json"


def torn_files(root: Path) -> list[str]:
    torn = []
    for path in sorted(root.rglob("*.json")):
        data = path.read_bytes()
        try:
            json.loads(data)
        except ValueError:
            torn.append(str(path.relative_to(root)))
    return torn


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--rate", type=float, default=1.0, help="creds saves a second")
    ap.add_argument("--keys", type=int, default=3, help="key writes per creds save")
    ap.add_argument("--busy-ms", type=float, default=2.0, help="CPU per event-loop turn")
    ap.add_argument("--debounce", type=float, default=1.0, help="backup.debounce_seconds")
    ap.add_argument("--accounts", type=int, default=1)
    args = ap.parse_args()
    node = shutil.which("node")
    if node is None or not LIBRARY.is_file():
        print("Node.js or tests/baileys/node_modules is missing: run scripts/test", file=sys.stderr)
        return 1
    baileys_version = json.loads(LIBRARY.read_text())["version"]

    with tempfile.TemporaryDirectory(prefix="wadaemon-baileys-bench-") as tmp:
        root = Path(tmp)
        sessions, backups, key = root / "sessions", root / "backups", root / "session.key"
        sessions.mkdir()
        backups.mkdir()  # the directory store never creates its root
        write_new_key(key)
        config = root / "wadaemon.yaml"
        config.write_text(
            f"sessions_path: {sessions}\nsocket_path: {root / 'wadaemon.sock'}\n"
            f"encryption:\n  key_file: {key}\n"
            f"backup:\n  target: directory\n  directory: {backups}\n"
            f"  debounce_seconds: {args.debounce}\n  keep_generations: 100000\n"
            "whatsapp:\n  enabled: false\n"
        )
        log = open(root / "daemon.log", "w")  # noqa: SIM115
        daemon = subprocess.Popen(
            [sys.executable, "-m", "wadaemon", "run", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while "ready" not in (root / "daemon.log").read_text():
            if daemon.poll() is not None or time.monotonic() > deadline:
                print((root / "daemon.log").read_text(), file=sys.stderr)
                return 1
            time.sleep(0.1)
        accounts = [f"acct{i}" for i in range(args.accounts)]
        writers = [
            subprocess.Popen(
                [
                    node,
                    str(WRITER_JS),
                    str(sessions / a),
                    "--rate",
                    str(args.rate),
                    "--keys",
                    str(args.keys),
                    "--busy-ms",
                    str(args.busy_ms),
                    "--seconds",
                    str(args.seconds),
                    "--journal",
                    str(root / f"{a}.journal"),
                ],
                cwd=BAILEYS,
                stderr=subprocess.DEVNULL,
            )
            for a in accounts
        ]
        for w in writers:
            w.wait()
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(120)
        log.close()

        replica = Replica(DirectoryStore(backups), load_keyring(key, [], environ={}), 100000)
        print(
            f"Baileys {baileys_version}, {args.seconds:.0f} s, {args.accounts} account(s): "
            f"{args.rate:g} creds saves/s, {args.keys} key writes per save, "
            f"busy {args.busy_ms:g} ms/turn, debounce {args.debounce:g} s"
        )
        header = ("account", "saves", "generations", "torn gens", "torn creds")
        print(f"{header[0]:10} {header[1]:>6} {header[2]:>12} {header[3]:>10} {header[4]:>11}")
        totals = [0, 0, 0]
        for a in accounts:
            saves = (root / f"{a}.journal").read_text().count('"phase":"saved"')
            head = replica.store.read_head(a)
            history = sorted(head.history) if head else []
            torn_gens = torn_creds = 0
            for g in history:
                dest = root / "drill" / f"{a}-{g}"
                for entry in replica.load_manifest(a, g).files:
                    target = dest / entry.path
                    target.parent.mkdir(parents=True, exist_ok=True)
                    replica.write_file(a, entry, target)
                torn = torn_files(dest)
                torn_gens += bool(torn)
                torn_creds += "creds.json" in torn
                shutil.rmtree(dest)
            totals = [totals[0] + len(history), totals[1] + torn_gens, totals[2] + torn_creds]
            print(f"{a:10} {saves:>6} {len(history):>12} {torn_gens:>10} {torn_creds:>11}")
        if args.accounts > 1:
            print(f"{'all':10} {'':>6} {totals[0]:>12} {totals[1]:>10} {totals[2]:>11}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
