"""`wadaemon keygen PATH`: create a new encryption key file (mode 0600, never overwritten)."""

from __future__ import annotations

import argparse
from pathlib import Path

from wadaemon.keyring import write_new_key


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("keygen", help="write a new 256-bit encryption key file")
    p.add_argument("path", metavar="PATH", help="where to write the key (must not exist)")
    p.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    key = write_new_key(Path(args.path))
    print(f"wrote {args.path} (key id {key.key_id}, mode 0600)")
    print("Keep a copy of this file somewhere safe: without it no backup can be restored.")
    return 0
