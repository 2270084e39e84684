"""`wadaemon check-config`: validate the configuration and the keys, then say what they mean."""

from __future__ import annotations

import argparse
import sys

from wadaemon.cli.common import add_config_option, keyring_for, load
from wadaemon.config import Config
from wadaemon.errors import EXIT_CONFIG, WadaemonError
from wadaemon.keyring import Keyring
from wadaemon.lost_keys import FIX, sealed_heads, with_unknown_keys
from wadaemon.store import Store, open_store


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("check-config", help="validate the configuration file and the key files")
    add_config_option(p)
    p.set_defaults(handler=main)


def check_backups(config: Config, store: Store, keyring: Keyring) -> tuple[str, list[str]]:
    """(the `backups` line, one error per account whose backup the loaded keys cannot read).
    An unreachable store is a warning, not an error: the daemon checks again when it starts."""
    try:
        heads = sealed_heads(store)
    except (WadaemonError, OSError) as exc:
        print(
            "wadaemon check-config: warning: the keys could not be checked against the backups "
            f"in {store.describe()}: {exc}; run check-config again once the store answers",
            file=sys.stderr,
        )
        return "not checked: the store cannot be reached", []
    where = config.where("encryption", "old_key_files")
    errors = [
        f"{where}: the backup of {h.describe()} is sealed with key {h.key_id}, which is not "
        f"loaded ({keyring.describe()}); {FIX}"
        for h in with_unknown_keys(heads, keyring)
    ]
    n = len(heads)
    return f"{n} account{'s' if n != 1 else ''}, every head readable with the loaded keys", errors


def messages_line(config: Config) -> str:
    m = config.messages
    if not (m.enabled and config.whatsapp.enabled):
        return "off (they need whatsapp.enabled and messages.enabled)"
    if config.backup.target == "firestore":
        where = "Firestore (threads, outbox)"
    else:
        protected = " (backed up)" if config.backup.target == "directory" else ""
        where = f"embedded store in {m.path}{protected}"
    hook = f"webhook {m.webhook.url}, signed" if m.webhook.url else "no webhook"
    media = f"media up to {m.media_max_mb} MiB" if m.download_media else "media not downloaded"
    return (
        f"{where}; journal {m.path}; sends {m.send_gap_seconds:g} s apart, "
        f"{m.per_recipient_per_hour}/h per recipient; {media}; {hook}"
    )


def main(args: argparse.Namespace) -> int:
    config = load(args)
    if config.messages.webhook.url:
        from wadaemon.messages.webhooks import read_secret

        read_secret(config.messages.webhook)  # ConfigError (78): the daemon could not sign
    keyring = keyring_for(config) if config.backup.target != "none" else None
    store = open_store(config)  # builds the client (credentials checked), no network call
    backups = ""
    errors: list[str] = []
    try:
        if store is not None and keyring is not None:
            backups, errors = check_backups(config, store, keyring)
    finally:
        if store is not None:
            store.close()
    if errors:
        for line in errors:
            print(f"wadaemon check-config: {line}", file=sys.stderr)
        return EXIT_CONFIG
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
    hours = config.verify.interval_hours
    if store is not None:
        drills = f"every {hours:g} h, each account at its own moment" if hours else "off"
        print(f"  restore drills  {drills}")
    wa = config.whatsapp
    if wa.enabled:
        print(
            f"  whatsapp        clients on (neonize), log level {wa.log_level}, pairing timeout "
            f"{wa.pairing_timeout_seconds:g} s, retry after logout {wa.retry_after_logout}, "
            f"checks every {wa.health_check_seconds:g} s"
        )
    else:
        print("  whatsapp        sidecar mode: no clients, protects the directories only")
    if wa.enabled and config.backup.target == "firestore":
        lease = config.leases
        cap = config.instance.max_accounts
        print(
            f"  instance        {config.instance.id}: shares the accounts with the other "
            f"instances of this project (leases: TTL {lease.ttl_seconds:g} s, renewed every "
            f"{lease.renew_seconds:g} s; drives {f'at most {cap}' if cap else 'its fair share'})"
        )
    else:
        print(f"  instance        {config.instance.id}: drives every account under sessions_path")
    print(f"  messages        {messages_line(config)}")
    if keyring is not None:
        print(f"  encryption      {keyring.describe()}")
    if backups:
        print(f"  backups         {backups}")
    return 0
