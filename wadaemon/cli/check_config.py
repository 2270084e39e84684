"""`wadaemon check-config`: validate the configuration and the keys, then say what they mean."""

from __future__ import annotations

import argparse

from wadaemon.cli.common import add_config_option, keyring_for, load
from wadaemon.store import open_store


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("check-config", help="validate the configuration file and the key files")
    add_config_option(p)
    p.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    config = load(args)
    keyring = keyring_for(config) if config.backup.target != "none" else None
    store = open_store(config)  # builds the client (credentials checked), no network call
    print(f"{config.path}: ok")
    print(f"  sessions_path   {config.sessions_path}")
    print(f"  socket_path     {config.socket_path}")
    b = config.backup
    target = store.describe() if store is not None else "none (local sessions only)"
    print(
        f"  backup          {target}, debounce {b.debounce_seconds:g} s, "
        f"every {b.interval_seconds:g} s, keep {b.keep_generations} generations"
    )
    print(
        f"  restore         on_boot={config.restore.on_boot}, "
        f"timeout {config.restore.timeout_seconds:g} s"
    )
    wa = config.whatsapp
    if wa.enabled:
        print(
            f"  whatsapp        clients on (neonize), log level {wa.log_level}, pairing timeout "
            f"{wa.pairing_timeout_seconds:g} s, retry after logout {wa.retry_after_logout}, "
            f"checks every {wa.health_check_seconds:g} s"
        )
    else:
        print("  whatsapp        sidecar mode: no clients, protects the directories only")
    if keyring is not None:
        print(f"  encryption      {keyring.describe()}")
    if store is not None:
        store.close()
    return 0
