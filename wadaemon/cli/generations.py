"""`wadaemon generations ACCOUNT`: list an account's backup generations."""

from __future__ import annotations

import argparse
import json

from wadaemon.cli.common import add_config_option, human_size, open_replica
from wadaemon.errors import WadaemonError
from wadaemon.layout import validate_account_id


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("generations", help="list the backup generations of an account")
    p.add_argument("account", metavar="ACCOUNT")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_config_option(p)
    p.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    account = validate_account_id(args.account)
    ctx = open_replica(args)
    head = ctx.replica.read_head(account)
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
