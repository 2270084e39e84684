"""`wadaemon generations ACCOUNT`: list an account's backup generations."""

from __future__ import annotations

import argparse
import json
import time

from wadaemon.cli.common import Context, add_config_option, daemon_hints, human_size, open_replica
from wadaemon.errors import WadaemonError
from wadaemon.layout import validate_account_id
from wadaemon.store.base import Head

WAIT_POLL_S = 0.2  # one head read per poll: a small file, or one Firestore document


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("generations", help="list the backup generations of an account")
    p.add_argument("account", metavar="ACCOUNT")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument(
        "--wait",
        type=float,
        metavar="SECONDS",
        help="if the account has no backup yet, wait up to SECONDS for the daemon to make one "
        "(exit 1 if none appears)",
    )
    add_config_option(p)
    p.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    account = validate_account_id(args.account)
    if args.wait is not None and args.wait < 0:
        raise WadaemonError(f"--wait {args.wait:g}: the number of seconds cannot be negative")
    ctx = open_replica(args)
    head = ctx.replica.read_head(account)
    if head is None and args.wait:
        head = wait_for_head(ctx, account, args.wait)
    if head is None:
        raise WadaemonError(f"{account}: no backups in {ctx.replica.store.describe()}")
    infos = ctx.replica.generations(account)
    if args.json:
        rows = []
        for i in infos:
            m = i.manifest
            rows.append(
                {
                    "generation": i.generation,
                    "head": i.is_head,
                    "key_id": i.key_id,
                    "created_at": m.created_at if m else None,
                    "host": m.host if m else None,
                    "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in m.files]
                    if m
                    else None,
                    "size": m.size if m else None,
                    "error": i.error or None,
                }
            )
        print(json.dumps({"account": account, "state": head.state, "generations": rows}, indent=2))
        return 0
    print(f"{account}: state {head.state}, head generation {head.generation}")
    print(f"{'GEN':>6}  {'CREATED':<24}  {'FILES':>5}  {'SIZE':>10}  {'KEY':<16}  HOST")
    for i in infos:
        mark = "*" if i.is_head else " "
        m = i.manifest
        if m is None:
            print(f"{i.generation:>5}{mark}  unreadable: {i.error}")
            continue
        print(
            f"{i.generation:>5}{mark}  {m.created_at:<24}  {len(m.files):>5}  "
            f"{human_size(m.size):>10}  {i.key_id:<16}  {m.host}"
        )
    return 0


def wait_for_head(ctx: Context, account: str, seconds: float) -> Head:
    """The account's head, as soon as the daemon has switched it (its first backup exists)."""
    deadline = time.monotonic() + seconds
    while True:
        time.sleep(max(0.0, min(WAIT_POLL_S, deadline - time.monotonic())))
        head = ctx.replica.read_head(account)
        if head is not None:
            return head
        if time.monotonic() >= deadline:
            break
    hints = daemon_hints(ctx.config.path)
    raise WadaemonError(
        f"{account}: no backup appeared within {seconds:g} s in {ctx.replica.store.describe()}. "
        f"Is the daemon running (`{hints.command('status')}`; if not, {hints.start})? Does "
        f"{ctx.layout.account_dir(account)} exist? Otherwise {hints.log} says why."
    )
