"""`wadaemon accounts add|list|remove`: pair, list and remove WhatsApp accounts.

Every subcommand talks to the running daemon over its socket: the daemon runs the clients.
"""

from __future__ import annotations

import argparse
import calendar
import sys
import time
import urllib.parse
from functools import partial
from typing import Any, TextIO

from wadaemon.cli.common import add_config_option, age, ask, ask_stream, daemon_hints, load
from wadaemon.errors import EXIT_FAILURE, WadaemonError
from wadaemon.layout import validate_account_id

STREAM_MARGIN_S = 60.0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "accounts",
        help="pair, list and remove WhatsApp accounts (asks the running daemon)",
        description="Manage the WhatsApp accounts the daemon runs.",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    add = actions.add_parser(
        "add",
        help="pair a new account: shows QR codes to scan, or a code with --phone",
        description="Shows the QR code in the terminal as it rotates, until the phone scans it "
        "(WhatsApp → Settings → Linked devices → Link a device) or the pairing times out "
        "(whatsapp.pairing_timeout_seconds). With --phone, prints a code to enter on the phone "
        "instead (Link with phone number instead). The account is backed up the moment it is "
        "paired.",
    )
    add.add_argument("account", metavar="ID", help="the new account's id (a-z, 0-9, _ and -)")
    add.add_argument("--phone", metavar="NUMBER", help="phone number with country code")
    add_config_option(add)
    add.set_defaults(handler=main_add)

    ls = actions.add_parser("list", help="list the accounts: state, phone, last backup, event")
    ls.add_argument("--json", action="store_true", help="print the accounts as JSON")
    add_config_option(ls)
    ls.set_defaults(handler=main_list)

    rm = actions.add_parser(
        "remove",
        help="log an account out and delete its local session and every backup of it",
        description="Logs the account out of WhatsApp (if connected), stops its client, deletes "
        "every backup of it and then the local session. This cannot be undone: the phone has to "
        "pair again.",
    )
    rm.add_argument("account", metavar="ID")
    rm.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    add_config_option(rm)
    rm.set_defaults(handler=main_remove)

    res = actions.add_parser(
        "resolve",
        help="end a conflict between a local session and its backup",
        description="An account is in conflict when its local session does not descend from "
        "its backup head (an old disk put back, another host's copy, a session made while the "
        "store was down): nothing is backed up over the head until you choose. --keep-backup "
        "restores the head (the local copy is moved to .quarantine/, never deleted); "
        "--keep-local backs the local copy up as the next generation (the head's generations "
        "stay restorable until retention drops them).",
    )
    res.add_argument("account", metavar="ID")
    side = res.add_mutually_exclusive_group(required=True)
    side.add_argument("--keep-backup", action="store_true", help="restore the backup head")
    side.add_argument("--keep-local", action="store_true", help="back up the local copy")
    add_config_option(res)
    res.set_defaults(handler=main_resolve)

    mv = actions.add_parser(
        "move",
        help="hand an account this instance drives over to another instance (Firestore leases)",
        description="With several instances sharing one Firestore project: stops the "
        "account's client here, backs up its last changes and releases its lease, so that "
        "another instance takes it over within seconds (--to INSTANCE: that one only). Run it "
        "on the instance that drives the account (`wadaemon accounts list` shows it).",
    )
    mv.add_argument("account", metavar="ID")
    mv.add_argument("--to", metavar="INSTANCE", default="", help="the instance to take it over")
    add_config_option(mv)
    mv.set_defaults(handler=main_move)


def show_qr(code: str, out: TextIO, *, first: bool) -> None:
    import segno

    if out.isatty() and not first:
        out.write("\x1b[2J\x1b[H")  # a fresh screen for the next code
    out.write(
        "Scan with WhatsApp on the phone: Settings → Linked devices → Link a device.\n"
        "The code changes every 20 seconds or so; this one replaces the last.\n"
    )
    segno.make_qr(code).terminal(out=out, compact=True)
    out.flush()


class Waiting:
    """One line on stderr per phase of a pairing, saying what the command waits for; a phase the
    daemon skipped (or, being older, does not announce) is passed over, never gone back to."""

    def __init__(self, account: str, phone: bool, out: TextIO) -> None:
        self.out = out
        self.phase = -1
        code = "the pairing code" if phone else "the first QR code"
        scan = "the code to be entered on the phone" if phone else "the phone to scan the code"
        self.lines = [
            f"{account}: waiting for the daemon to start the client…",  # the daemon answered
            f"{account}: waiting for {code} from WhatsApp…",  # "connecting"
            f"{account}: waiting for {scan}…",  # "qr" or "code"
            f"{account}: linked; waiting for the pairing to be backed up…",  # "linked"
        ]

    def reached(self, phase: int) -> None:
        if phase > self.phase:
            self.phase = phase
            print(self.lines[phase], file=self.out, flush=True)


WAITING_PHASE = {"connecting": 1, "qr": 2, "code": 2, "linked": 3}


def main_add(args: argparse.Namespace) -> int:
    account = validate_account_id(args.account)
    config = load(args)
    url = f"/accounts/{account}/pair"
    if args.phone:
        url += "?" + urllib.parse.urlencode({"phone": args.phone})
    timeout = config.whatsapp.pairing_timeout_seconds + STREAM_MARGIN_S
    shown = 0
    waiting = Waiting(account, bool(args.phone), sys.stderr)
    accepted = partial(waiting.reached, 0)  # the daemon took the request: its answer streams
    for update in ask_stream(config, "POST", url, timeout, accepted=accepted):
        event = update.get("event")
        if event == "qr" and args.phone:
            continue  # neonize shows a QR code before it takes a phone number: not for the user
        if event == "qr":
            show_qr(str(update["code"]), sys.stdout, first=shown == 0)
            shown += 1
        elif event == "code":
            print(
                f"Pairing code for +{update.get('phone')}: {update['code']}\n"
                "On the phone: WhatsApp → Settings → Linked devices → Link a device → "
                "Link with phone number instead, then enter the code.",
                flush=True,
            )
        elif event == "paired":
            backup = (
                f"backed up as generation {update['generation']}"
                if update.get("generation") is not None
                else f"backup: {update.get('backup')} {update.get('error') or ''}".strip()
            )
            phone = f"+{update['phone']}" if update.get("phone") else "the phone"
            print(f"{account}: paired with {phone}; {backup}")
            return 0
        elif event == "failed":
            raise WadaemonError(f"{account}: {update.get('error')}")
        if event in WAITING_PHASE:
            waiting.reached(WAITING_PHASE[str(event)])
    raise WadaemonError(
        f"{account}: the daemon ended the pairing without a result; "
        f"{daemon_hints(config.path).log} says why"
    )


def _age(iso: str | None) -> str:
    """The age of an ISO 8601 UTC time from the daemon (as iso_time writes them)."""
    if not iso:
        return "never"
    then = calendar.timegm(time.strptime(iso, "%Y-%m-%dT%H:%M:%SZ"))
    return age(max(0.0, time.time() - then))


def render(accounts: list[dict[str, Any]]) -> str:
    if not accounts:
        return "no accounts; pair one with `wadaemon accounts add ID`"
    leased = any(a.get("holder") is not None for a in accounts)
    holder_head = f"{'HOLDER':<16} " if leased else ""
    lines = [
        f"{'ACCOUNT':<20} {'STATE':<13} {holder_head}{'PHONE':<16} {'LAST BACKUP':<12} LAST EVENT"
    ]
    for a in accounts:
        wa = a.get("whatsapp") or {}
        state = a["state"] if a["state"] == "passive" else wa.get("state") or a["state"]
        holder = f"{a.get('holder') or '-':<16} " if leased else ""
        phone = f"+{wa['phone']}" if wa.get("phone") else "-"
        event = wa.get("last_event") or "-"
        if wa.get("last_event_at"):
            event += f" ({_age(wa['last_event_at'])})"
        if wa.get("detail") and state not in ("connected",):
            event += f"; {wa['detail']}"
        lines.append(
            f"{a['account']:<20} {state.replace('_', ' '):<13} {holder}{phone:<16} "
            f"{_age(a.get('last_backup_at')):<12} {event}"
        )
    return "\n".join(lines)


def main_list(args: argparse.Namespace) -> int:
    import json

    config = load(args)
    status, body = ask(config, "GET", "/accounts")
    if status != 200 or not isinstance(body, dict):
        error = body.get("error") if isinstance(body, dict) else body
        raise WadaemonError(str(error))
    accounts = body["accounts"]
    print(json.dumps(accounts, indent=2) if args.json else render(accounts))
    return 0


def main_remove(args: argparse.Namespace) -> int:
    account = validate_account_id(args.account)
    config = load(args)
    if not args.yes:
        if not sys.stdin.isatty():
            raise WadaemonError(
                f"{account}: removal deletes the session and every backup of it; confirm with "
                "--yes when not running in a terminal"
            )
        answer = input(
            f"This logs {account} out of WhatsApp and deletes its local session and every "
            f"backup of it; it cannot be undone. Type {account} to confirm: "
        )
        if answer.strip() != account:
            print("not removed", file=sys.stderr)
            return EXIT_FAILURE
    status, body = ask(config, "DELETE", f"/accounts/{account}", timeout=600)
    if status != 200 or not isinstance(body, dict):
        error = body.get("error") if isinstance(body, dict) else body
        raise WadaemonError(str(error))
    print(f"{account}: removed ({body['logout']}; {body['deleted']} backup objects deleted)")
    return 0


def main_resolve(args: argparse.Namespace) -> int:
    account = validate_account_id(args.account)
    config = load(args)
    keep = "local" if args.keep_local else "backup"
    status, body = ask(config, "POST", f"/accounts/{account}/resolve?keep={keep}", timeout=600)
    if status != 200 or not isinstance(body, dict):
        error = body.get("error") if isinstance(body, dict) else body
        raise WadaemonError(str(error))
    if keep == "local":
        if not body.get("ok"):
            raise WadaemonError(
                f"{account}: the local copy is kept but not backed up yet: {body.get('error')}"
            )
        print(f"{account}: the local session is kept; backed up as generation {body['generation']}")
        return 0
    if not body.get("ok"):
        raise WadaemonError(f"{account}: {body['result']}")
    moved = f"; the local copy is in {body['quarantined']}" if body.get("quarantined") else ""
    print(f"{account}: the backup is kept: {body['result']}{moved}")
    return 0


def main_move(args: argparse.Namespace) -> int:
    account = validate_account_id(args.account)
    config = load(args)
    path = f"/accounts/{account}/move" + (f"?to={args.to}" if args.to else "")
    status, body = ask(config, "POST", path, timeout=600)
    if status != 200 or not isinstance(body, dict):
        error = body.get("error") if isinstance(body, dict) else body
        raise WadaemonError(str(error))
    to = f" for {body['to']}" if body.get("to") else ""
    print(f"{account}: handed over{to}: its client stopped here, its lease released")
    return 0
