"""What several subcommands share: the --config option and loading what it names."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from wadaemon.config import CONFIG_ENV, DEFAULT_CONFIG_PATH, Config, config_path_from, load_config
from wadaemon.errors import WadaemonError
from wadaemon.keyring import Keyring, load_keyring_for
from wadaemon.layout import SessionsLayout, validate_account_id
from wadaemon.replica import Replica
from wadaemon.store import open_store


def add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="PATH",
        help=f"configuration file (default: ${CONFIG_ENV}, else {DEFAULT_CONFIG_PATH})",
    )


def load(args: argparse.Namespace) -> Config:
    return load_config(config_path_from(args.config))


def keyring_for(config: Config) -> Keyring:
    return load_keyring_for(config)


@dataclass
class Context:
    config: Config
    layout: SessionsLayout
    replica: Replica


def open_replica(args: argparse.Namespace) -> Context:
    config = load(args)
    store = open_store(config)
    if store is None:
        raise WadaemonError(
            f"{config.path}: backup.target is none, so there are no backups; set it to directory"
        )
    replica = Replica(store, keyring_for(config), config.backup.keep_generations)
    become_data_owner(config)
    return Context(config, SessionsLayout(config.sessions_path), replica)


def become_data_owner(config: Config) -> None:
    """Run as root, switch to the user who owns the sessions (or the backups) once the secrets
    are read, so that files this command creates belong to the daemon's user, not to root: a
    root-owned file in the backup directory would lock the daemon out of that account."""
    if os.geteuid() != 0:
        return
    for path in (config.sessions_path, config.backup.directory):
        try:
            st = path.stat()
        except OSError:
            continue
        if st.st_uid == 0:
            return
        os.setgroups([])
        os.setgid(st.st_gid)
        os.setuid(st.st_uid)
        return


def accounts_arg(ctx: Context, given: list[str], *, local: bool) -> list[str]:
    """The accounts named on the command line, or all of them."""
    if given:
        return [validate_account_id(a) for a in given]
    names = set(ctx.layout.local_accounts()) if local else set(ctx.replica.store.list_accounts())
    return sorted(names)


def age(seconds: float | None) -> str:
    """How long ago, for tables: `12s ago`, `5m ago`, `3.0h ago`, `never`."""
    if seconds is None:
        return "never"
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"
