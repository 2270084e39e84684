"""`wadaemon run`: the daemon, in the foreground."""

from __future__ import annotations

import argparse
import asyncio
import logging

from wadaemon.cli.common import add_config_option, load
from wadaemon.errors import EXIT_FAILURE, WadaemonError
from wadaemon.logs import setup_logging


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("run", help="run the daemon in the foreground (systemd runs this)")
    add_config_option(p)
    p.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    from wadaemon.daemon import Daemon, keyring_for

    setup_logging()
    log = logging.getLogger("wadaemon")
    try:
        config = load(args)
        setup_logging(config.log_level)
        keyring = keyring_for(config)
        if keyring:
            log.info("encryption: %s", keyring.describe())
        return asyncio.run(Daemon(config, keyring).run())
    except WadaemonError as exc:
        log.critical("cannot continue: %s", exc)
        return exc.exit_code
    except Exception as exc:  # the last line in the journal must say why we died
        log.critical("fatal error: %r", exc, exc_info=True)
        return EXIT_FAILURE
