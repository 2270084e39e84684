"""`wadaemon verify [ACCOUNT...]`: a restore drill into a temporary directory."""

from __future__ import annotations

import argparse
import sys

from wadaemon.cli.common import accounts_arg, add_config_option, human_size, open_replica
from wadaemon.errors import WadaemonError
from wadaemon.replica import Replica
from wadaemon.restore import DrillResult, drill


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "verify",
        help="prove that backups restore: rebuild and check them in a temporary directory",
        description="For each account (all backed-up accounts by default), rebuild the head "
        "generation in a temporary directory and check it completely: decryption and "
        "authentication, every file's size and SHA-256, PRAGMA integrity_check. Exits 1 if any "
        "generation checked cannot be restored (FAILED), or could not be checked because of a "
        "problem on this machine or with the store (NOT VERIFIED: not the backup's fault). "
        "Nothing local is touched.",
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
    for account in accounts:
        if args.all_generations:
            results = all_generations(ctx.replica, account)
        else:
            results = [drill(ctx.replica, account)]
        for r in results:
            label = f"generation {r.generation}" if r.generation is not None else "no generation"
            if r.dropped:
                print(f"{account}: {label}: not checked: {r.error}")
            elif not r.ok:
                failed += 1
                print(f"{account}: {label}: {r.verdict()}", file=sys.stderr)
            else:
                head_mark = " (head)" if r.is_head else ""
                print(
                    f"{account}: {label}{head_mark}: ok, {r.files} files, "
                    f"{human_size(r.size)}, {r.seconds:.2f} s"
                )
    return 1 if failed else 0


def all_generations(replica: Replica, account: str) -> list[DrillResult]:
    """Drill every kept generation. On a daemon that is backing up, retention may drop a listed
    generation before its turn: then the kept generations are listed once more and those not
    checked yet are drilled; one dropped again is reported as not checked, not as failed."""
    results: dict[int, DrillResult] = {}
    for attempt in range(2):
        try:
            head = replica.read_head(account)
        except WadaemonError as exc:
            return [DrillResult(account, None, False, False, error=str(exc))]
        if head is None:
            return [drill(replica, account)]  # says there is no backup
        for g in head.history:
            if g not in results:
                results[g] = drill(replica, account, g)
        dropped = [g for g, r in results.items() if r.dropped]
        if not dropped:
            break
        if attempt == 0:
            for g in dropped:
                del results[g]  # drilled again below if the new listing still keeps it
    return [results[g] for g in sorted(results, reverse=True)]
