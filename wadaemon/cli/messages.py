"""`wadaemon messages ACCOUNT`: the stored messages of an account, and new ones as they come."""

from __future__ import annotations

import argparse
import json
import time
import urllib.parse
from typing import Any

from wadaemon.cli.common import add_config_option, ask, ask_stream, load
from wadaemon.errors import WadaemonError
from wadaemon.layout import validate_account_id


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "messages",
        help="show an account's stored messages (--follow: and new ones as they arrive)",
        description="Reads the message store through the daemon.",
    )
    p.add_argument("account")
    p.add_argument("--chat", default="", help="only this conversation (a JID)")
    p.add_argument("--since", type=float, default=0.0, metavar="EPOCH")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--threads", action="store_true", help="list the conversations instead")
    p.add_argument("--follow", "-f", action="store_true", help="then print new events")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    add_config_option(p)
    p.set_defaults(handler=main)


def line(m: dict[str, Any]) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m.get("timestamp", 0)))
    who = "me" if m.get("from_me") else (m.get("push_name") or m.get("sender", ""))
    text = m.get("edited_text") or m.get("editedText") or m.get("text", "")
    kind = m.get("kind", "")
    if kind not in ("text", ""):
        text = f"[{kind}] {text}".rstrip()
    if m.get("revoked"):
        text = "[deleted]"
    status = f" ({m['status']})" if m.get("from_me") and m.get("status") else ""
    return f"{when}  {m.get('chat', '')}  {who}: {text}{status}"


def main(args: argparse.Namespace) -> int:
    config = load(args)
    account = validate_account_id(args.account)
    base = f"/accounts/{urllib.parse.quote(account)}"
    if args.threads:
        status, body = ask(config, "GET", f"{base}/threads")
        _check(status, body)
        for t in body["threads"]:
            print(
                json.dumps(t)
                if args.json
                else f"{t['chat']:<40} {t['name']:<24} "
                f"{t['messages']:>6} messages, {t['unread']} unread"
            )
        return 0
    query = {"since": f"{args.since:g}", "limit": str(args.limit)}
    if args.chat:
        query["chat"] = args.chat
    status, body = ask(config, "GET", f"{base}/messages?{urllib.parse.urlencode(query)}")
    _check(status, body)
    for m in body["messages"]:
        print(json.dumps(m, ensure_ascii=False) if args.json else line(m), flush=True)
    if not args.follow:
        return 0
    url = f"/events?{urllib.parse.urlencode({'account': account})}"
    for event in ask_stream(config, "GET", url, timeout=3600.0):
        if event.get("type") == "subscribed":
            continue
        if args.chat and event.get("chat") != args.chat:
            continue
        if args.json:
            print(json.dumps(event, ensure_ascii=False), flush=True)
        elif event.get("type") == "message":
            print(line(event), flush=True)
        elif event.get("type") == "receipt":
            print(f"  {event['chat']}: {', '.join(event['ids'])} {event['status']}", flush=True)
        elif event.get("type") == "outbox":
            print(
                f"  outbox {event['key']}: {event['state']} {event.get('reason', '')}".rstrip(),
                flush=True,
            )
    return 0


def _check(status: int, body: Any) -> None:
    if status != 200 or not isinstance(body, dict):
        message = body.get("error", body) if isinstance(body, dict) else body
        raise WadaemonError(str(message))
