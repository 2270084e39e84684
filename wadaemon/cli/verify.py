"""`wadaemon verify [ACCOUNT...]`: a restore drill into a temporary directory."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from wadaemon.cli.common import accounts_arg, add_config_option, human_size, open_replica
from wadaemon.errors import WadaemonError
from wadaemon.layout import SessionsLayout
from wadaemon.restore import Restorer


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "verify",
        help="prove that backups restore: rebuild and check them in a temporary directory",
        description="For each account (all backed-up accounts by default), rebuild the head "
        "generation in a temporary directory and check it completely: decryption and "
        "authentication, every file's size and SHA-256, PRAGMA integrity_check. Exits 1 if any "
        "account's head generation cannot be restored. Nothing local is touched.",
    )
    p.add_argument("accounts", nargs="*", metavar="ACCOUNT")
    p.add_argument("--all-generations", action="store_true", help="check every kept generation")
    add_config_option(p)
    p.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    ctx = open_replica(args)
    accounts = accounts_arg(ctx, args.accounts, local=False)
    if not accounts:
        print(f"no backups in {ctx.replica.store.describe()}")
        return 0
    failed = 0
    with tempfile.TemporaryDirectory(prefix="wadaemon-verify-") as tmp:
        restorer = Restorer(SessionsLayout(Path(tmp)), ctx.replica)
        for account in accounts:
            head = ctx.replica.store.read_head(account)
            if head is None:
                print(f"{account}: FAILED: no backup", file=sys.stderr)
                failed += 1
                continue
            gens = [head.generation]
            if args.all_generations:
                gens = [i.generation for i in ctx.replica.generations(account)]
            for g in gens:
                started = time.monotonic()
                dest = Path(tmp) / f"{account}-{g}"
                try:
                    m = restorer.build(account, g, dest)
                except (WadaemonError, OSError) as exc:
                    failed += 1
                    print(f"{account}: generation {g}: FAILED: {exc}", file=sys.stderr)
                    continue
                finally:
                    shutil.rmtree(dest, ignore_errors=True)
                head_mark = " (head)" if g == head.generation else ""
                print(
                    f"{account}: generation {g}{head_mark}: ok, {len(m.files)} files, "
                    f"{human_size(m.size)}, {time.monotonic() - started:.2f} s"
                )
    return 1 if failed else 0
