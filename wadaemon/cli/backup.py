"""`wadaemon backup [ACCOUNT...]`: back up now, without a running daemon."""

from __future__ import annotations

import argparse
import sys

from wadaemon.backup import BackupEngine
from wadaemon.cli.common import accounts_arg, add_config_option, open_replica
from wadaemon.errors import WadaemonError


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("backup", help="back up accounts now (all local accounts by default)")
    p.add_argument("accounts", nargs="*", metavar="ACCOUNT")
    add_config_option(p)
    p.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    ctx = open_replica(args)
    ctx.layout.prepare_tmp()
    accounts = accounts_arg(ctx, args.accounts, local=True)
    if not accounts:
        print(f"no accounts under {ctx.layout.root}")
        return 0
    engine = BackupEngine(ctx.layout, ctx.replica)
    failed = 0
    for account in accounts:
        try:
            result = engine.backup(account)
        except WadaemonError as exc:
            failed += 1
            print(f"{account}: FAILED: {exc}", file=sys.stderr)
            continue
        for warning in result.warnings:
            print(f"{account}: warning: {warning}", file=sys.stderr)
        print(result.line())
        if result.status == "skipped" and args.accounts:
            failed += 1
    return 1 if failed else 0
