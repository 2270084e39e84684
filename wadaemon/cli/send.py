"""`wadaemon send ACCOUNT TO TEXT`: queue a message in the running daemon's outbox."""

from __future__ import annotations

import argparse
import json
import urllib.parse

from wadaemon.cli.common import add_config_option, ask, load
from wadaemon.errors import EXIT_FAILURE, WadaemonError
from wadaemon.layout import validate_account_id

FINAL = ("sent", "failed", "unknown")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "send",
        help="send a WhatsApp text message from an account (through the daemon's outbox)",
        description="Queues the message in the outbox of the daemon that drives ACCOUNT and "
        "waits until it is sent. TO is a phone number with country code (4915112345678) or a "
        "JID (...@s.whatsapp.net, ...@g.us). The same --key never sends twice: repeat the "
        "command with the same key after a timeout to see what became of it. Exit status: 0 "
        "sent (or queued with --no-wait), 1 failed or unknown, 2 still waiting.",
    )
    p.add_argument("account")
    p.add_argument("to", help="phone number with country code, or a JID")
    p.add_argument("text")
    p.add_argument("--key", default="", help="idempotency key (default: a new random one)")
    p.add_argument("--reply-to", default="", metavar="ID", help="WhatsApp id of a message to quote")
    p.add_argument(
        "--resend",
        action="store_true",
        help="if the daemon stops while sending it, send it again rather than mark it unknown "
        "(it may then arrive twice)",
    )
    p.add_argument("--wait", type=float, default=120.0, metavar="SECONDS")
    p.add_argument("--no-wait", action="store_true", help="return once it is queued")
    p.add_argument("--json", action="store_true", help="print the outbox entry as JSON")
    add_config_option(p)
    p.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    config = load(args)
    account = validate_account_id(args.account)
    body = {"to": args.to, "text": args.text, "reply_to": args.reply_to, "resend": args.resend}
    if args.key:
        body["key"] = args.key
    wait = 0.0 if args.no_wait else max(0.0, args.wait)
    url = f"/accounts/{urllib.parse.quote(account)}/messages?wait={wait:g}"
    status, entry = ask(config, "POST", url, timeout=wait + 30.0, body=body)
    if status not in (200, 201) or not isinstance(entry, dict):
        message = entry.get("error", entry) if isinstance(entry, dict) else entry
        raise WadaemonError(str(message))
    if args.json:
        print(json.dumps(entry, indent=2))
    else:
        seen = "" if entry["created"] else " (this key was queued before)"
        line = f"{entry['key']}: {entry['state']}{seen}"
        if entry["state"] == "sent":
            line += f", WhatsApp id {entry['wa_id']}"
        elif entry.get("reason"):
            line += f": {entry['reason']}"
        print(line)
    if entry["state"] in ("failed", "unknown"):
        return EXIT_FAILURE
    if entry["state"] not in FINAL and not args.no_wait:
        return 2
    return 0
