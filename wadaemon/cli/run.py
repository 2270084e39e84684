"""`wadaemon run`: the daemon, in the foreground."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from typing import TYPE_CHECKING

from wadaemon.cli.common import add_config_option, load
from wadaemon.errors import EXIT_FAILURE, WadaemonError
from wadaemon.logs import setup_logging

if TYPE_CHECKING:
    from wadaemon.daemon import Daemon


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("run", help="run the daemon in the foreground (systemd runs this)")
    add_config_option(p)
    p.set_defaults(handler=main)


async def _run(daemon: Daemon) -> int:
    code = await daemon.run()
    if daemon.supervisor is not None and daemon.supervisor.started:
        # Every backup is done and the store closed. A thread still inside the Go library (a
        # call that never returns) would keep asyncio.run() waiting for the executor forever.
        logging.getLogger("wadaemon").debug("exiting without waiting for client threads")
        logging.shutdown()
        sys.stderr.flush()
        os._exit(code)
    return code


def main(args: argparse.Namespace) -> int:
    from wadaemon.daemon import keyring_for

    setup_logging()
    log = logging.getLogger("wadaemon")
    try:
        config = load(args)
        setup_logging(config.log_level)
        keyring = keyring_for(config)
        if keyring:
            log.info("encryption: %s", keyring.describe())
        from wadaemon.daemon import Daemon

        daemon = Daemon(config, keyring)
        code = asyncio.run(_run(daemon))
        return code
    except WadaemonError as exc:
        log.critical("cannot continue: %s", exc)
        return exc.exit_code
    except Exception as exc:  # the last line in the journal must say why we died
        log.critical("fatal error: %r", exc, exc_info=True)
        return EXIT_FAILURE
