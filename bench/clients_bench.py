"""Measure the daemon running real neonize clients with no route out (`unshare -rn`).

    .venv/bin/python bench/clients_bench.py [--accounts 1,20,50]

For each account count: N paired-looking sessions (whatsmeow's schema, made by the Go library,
and a device row), the daemon started in a network namespace with no route, so every first
connect fails at once and retries back off. Prints, per count: the time to READY, to every
client's first failure, RSS, threads and descriptors then and 40 s later (after the retries),
and how long SIGTERM takes. Everything lives in a temporary directory removed at the end.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTLE_S = 40.0


def paired_looking_session(db: Path) -> None:
    db.parent.mkdir(parents=True, exist_ok=True)
    code = "import sys\nfrom neonize.client import ClientFactory\n"
    code += "ClientFactory.get_all_devices_from_db(sys.argv[1])\n"
    subprocess.run([sys.executable, "-c", code, str(db)], check=True, capture_output=True)
    conn = sqlite3.connect(db)
    r = os.urandom  # keys of the sizes the schema checks
    conn.execute(
        "INSERT INTO whatsmeow_device (jid, registration_id, noise_key, identity_key, "
        "signed_pre_key, signed_pre_key_id, signed_pre_key_sig, adv_key, adv_details, "
        "adv_account_sig, adv_account_sig_key, adv_device_sig) "
        "VALUES (?, 1234, ?, ?, ?, 1, ?, ?, ?, ?, ?, ?)",
        ("15551234567:7@s.whatsapp.net", *(r(n) for n in (32, 32, 32, 64, 32, 40, 64, 32, 64))),
    )
    conn.commit()
    conn.close()


def proc_stats(pid: int) -> tuple[float, int, int]:
    """(RSS MiB, threads, open descriptors)."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]
    threads = int(re.search(r"Threads:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    return rss, threads, len(os.listdir(f"/proc/{pid}/fd"))


def run(n: int, root: Path) -> str:
    sessions = root / "sessions"
    template = root / "template.db"
    paired_looking_session(template)
    for i in range(n):
        (sessions / f"acc{i:03d}").mkdir(parents=True)
        (sessions / f"acc{i:03d}" / "session.db").write_bytes(template.read_bytes())
    key = root / "key"
    (root / "backups").mkdir()
    subprocess.run([sys.executable, "-m", "wadaemon", "keygen", str(key)], check=True)
    config = root / "c.yaml"
    config.write_text(
        f"sessions_path: {sessions}\nsocket_path: {root / 'sock'}\n"
        f"encryption: {{key_file: {key}}}\nbackup: {{directory: {root / 'backups'}}}\n"
        "whatsapp: {enabled: true}\n"
    )
    log_path = root / "daemon.log"
    with open(log_path, "w") as log:
        started = time.monotonic()
        proc = subprocess.Popen(
            ["unshare", "-rn", sys.executable, "-m", "wadaemon", "run", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            while "ready:" not in log_path.read_text():
                time.sleep(0.05)
            ready = time.monotonic() - started
            while len(re.findall(r"connect failed", log_path.read_text())) < n:
                time.sleep(0.05)
            failed = time.monotonic() - started
            first = proc_stats(proc.pid)
            time.sleep(SETTLE_S)
            later = proc_stats(proc.pid)
            retries = len(re.findall(r"retrying in", log_path.read_text()))
            stop_started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(120)
            stop = time.monotonic() - stop_started
        finally:
            if proc.poll() is None:
                proc.kill()
    return (
        f"{n:>8} {ready:>8.2f} {failed:>10.2f} {first[0]:>8.0f} {later[0]:>8.0f} "
        f"{first[1]:>4}/{later[1]:<4} {first[2]:>5}/{later[2]:<5} {retries:>7} "
        f"{stop:>7.2f} {code:>4}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--accounts", default="1,20,50")
    args = parser.parse_args()
    print(
        f"{'accounts':>8} {'ready s':>8} {'failed s':>10} {'RSS MiB':>8} {'+40 s':>8} "
        f"{'threads':>9} {'fds':>11} {'retries':>7} {'stop s':>7} {'exit':>4}"
    )
    for n in (int(x) for x in args.accounts.split(",")):
        with tempfile.TemporaryDirectory(prefix="wadaemon-clients-") as tmp:
            print(run(n, Path(tmp)), flush=True)


if __name__ == "__main__":
    main()
