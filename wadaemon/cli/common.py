"""What several subcommands share: the --config option and loading what it names."""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wadaemon.config import CONFIG_ENV, DEFAULT_CONFIG_PATH, Config, config_path_from, load_config
from wadaemon.errors import WadaemonError
from wadaemon.keyring import Keyring, load_keyring_for
from wadaemon.layout import SessionsLayout, validate_account_id
from wadaemon.replica import Replica
from wadaemon.socket_client import request, stream
from wadaemon.store import open_store


def add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="PATH",
        help=f"configuration file (default: ${CONFIG_ENV}, else {DEFAULT_CONFIG_PATH})",
    )


def load(args: argparse.Namespace) -> Config:
    return load_config(config_path_from(args.config))


@dataclass(frozen=True)
class DaemonHints:
    """What to tell the user about the daemon that reads a given configuration: systemd's
    commands for the package's configuration, `wadaemon run --config PATH` for any other (a
    clone's `local/wadaemon.yaml`, a file of one's own), so that every hint can be pasted as is.
    """

    systemd: bool
    config: str  # the path as the user gave it, quoted for a shell
    program: str  # how the user runs this command: `wadaemon` or `.venv/bin/wadaemon`

    def command(self, *args: str) -> str:
        """A wadaemon command line for the same configuration, e.g. `wadaemon status`."""
        words = [self.program, *args]
        if not self.systemd:
            words += ["--config", self.config]
        return " ".join(words)

    @property
    def start(self) -> str:
        if self.systemd:
            return "start it with `systemctl start wadaemon`"
        return f"start it with `{self.command('run')}`"

    @property
    def log(self) -> str:
        if self.systemd:
            return "its log (`journalctl -u wadaemon`)"
        return f"its log (in the terminal where `{self.command('run')}` runs)"


def _program() -> str:
    """`wadaemon` when that is what the shell finds, else the path it was run as."""
    argv0 = sys.argv[0] if sys.argv else ""
    if os.path.basename(argv0) != "wadaemon" or os.sep not in argv0:
        return "wadaemon"
    found = shutil.which("wadaemon")
    try:
        if found and os.path.samefile(found, argv0):
            return "wadaemon"
    except OSError:
        pass
    return shlex.quote(argv0)


def daemon_hints(config_path: Path) -> DaemonHints:
    """The one place that decides how hints name the daemon (see DaemonHints)."""
    systemd = Path(os.path.abspath(config_path)) == DEFAULT_CONFIG_PATH
    return DaemonHints(systemd, shlex.quote(str(config_path)), _program())


def ask(
    config: Config, method: str, url: str, timeout: float = 30.0, body: Any = None
) -> tuple[int, Any]:
    """A request to the daemon of this configuration; if it is not running, say how to start
    it."""
    hint = daemon_hints(config.path).start
    return request(config.socket_path, method, url, timeout, hint=hint, body=body)


def ask_stream(
    config: Config,
    method: str,
    url: str,
    timeout: float,
    accepted: Callable[[], object] | None = None,
) -> Iterator[dict[str, Any]]:
    """JSON lines from a streaming endpoint of this configuration's daemon (see `ask`)."""
    hint = daemon_hints(config.path).start
    return stream(config.socket_path, method, url, timeout, hint=hint, accepted=accepted)


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
