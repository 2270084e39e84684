"""`wadaemon restore ACCOUNT`: restore an account from its backups."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from wadaemon.cli.common import add_config_option, open_replica
from wadaemon.layout import validate_account_id
from wadaemon.restore import Restorer


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "restore",
        help="restore an account (only if its local session is missing, empty or corrupt)",
        description="Restore the newest generation that verifies (falling back to older ones "
        "only when a newer one is bad; a problem on this machine, such as a full disk, or a store "
        "that cannot be read stops the restore instead). "
        "A healthy local session is kept unless --force; anything replaced is moved to "
        "<sessions_path>/.quarantine/, never deleted. Stop the daemon (or the program using the "
        "session) before forcing a restore over a session in use.",
    )
    p.add_argument("account", metavar="ACCOUNT")
    p.add_argument("--generation", type=int, metavar="N", help="restore exactly generation N")
    p.add_argument("--to", metavar="DIR", help="restore into DIR instead of the sessions path")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace a healthy local session (it is moved to .quarantine/)",
    )
    add_config_option(p)
    p.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    account = validate_account_id(args.account)
    ctx = open_replica(args)
    restorer = Restorer(ctx.layout, ctx.replica)
    if args.to:
        outcome = restorer.restore_to(account, Path(args.to), args.generation)
    else:
        ctx.layout.prepare_tmp()
        outcome = restorer.restore_account(account, force=args.force, generation=args.generation)
    for failure in outcome.failures:
        print(f"{account}: warning: {failure}; fell back to an older generation", file=sys.stderr)
    if outcome.status == "kept":
        print(
            f"{account}: not restored: the local session is healthy and is never overwritten; "
            "use --force to replace it (it is moved to .quarantine/) or --to DIR",
            file=sys.stderr,
        )
        return 1
    stream = sys.stdout if outcome.ok and outcome.status == "restored" else sys.stderr
    print(outcome.line(), file=stream)
    return 0 if outcome.status == "restored" else 1
