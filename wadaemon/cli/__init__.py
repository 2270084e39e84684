"""The `wadaemon` command: one module per subcommand, each a thin layer over the library."""

from __future__ import annotations

import argparse
import logging
import sys

from wadaemon import __version__
from wadaemon.cli import (
    accounts,
    backup,
    check_config,
    generations,
    keygen,
    messages,
    restore,
    run,
    send,
    status,
    verify,
)
from wadaemon.errors import EXIT_FAILURE, WadaemonError

COMMANDS = (
    run,
    status,
    accounts,
    send,
    messages,
    check_config,
    keygen,
    backup,
    restore,
    generations,
    verify,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wadaemon",
        description="Keeps WhatsApp Web sessions alive: encrypted, verified, versioned backups "
        "of every session directory, restored at boot.",
    )
    parser.add_argument("--version", action="version", version=f"wadaemon {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except WadaemonError as exc:
        logging.shutdown()
        print(f"wadaemon {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"wadaemon {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        print(f"wadaemon {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
