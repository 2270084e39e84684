"""`wadaemon status`: ask the running daemon how it is."""

from __future__ import annotations

import argparse
import json
from typing import Any

from wadaemon.cli.common import add_config_option, age, ask, load


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "status",
        help="show the running daemon's health and accounts (exit 3 if it is not running)",
        description="Asks the daemon over its socket. Exit status: 0 ok or degraded, 1 failing, "
        "3 not running.",
    )
    p.add_argument("--json", action="store_true", help="print the health document as JSON")
    add_config_option(p)
    p.set_defaults(handler=main)


def render(health: dict[str, Any]) -> str:
    lines = [
        f"wadaemon {health['version']}: {health['status']} ({health['phase']}), "
        f"up {age(health['uptime_seconds']).replace(' ago', '')}"
    ]
    for name, check in health["checks"].items():
        mark = {"ok": " ", "degraded": "!", "failing": "X"}.get(check["status"], "?")
        lines.append(f"  {mark} {name:<14} {check['detail']}")
    accounts = health["accounts"]
    lines.append(f"{len(accounts)} account{'s' if len(accounts) != 1 else ''}")
    if accounts:
        lines.append(f"  {'ACCOUNT':<20} {'STATE':<15} {'GEN':>5}  {'LAST BACKUP':<12} PROBLEM")
    for name, a in accounts.items():
        gen = a["generation"] if a["generation"] is not None else "-"
        wa = a.get("whatsapp") or {}
        state = wa.get("state") or a["state"]
        problem = a["last_error"] or ""
        if wa and state not in ("connected", "connecting", "pairing"):
            problem = problem or wa.get("detail") or ""
        if state == "unprotected":
            problem = problem or "never backed up"
        if a["pending_since_seconds"] is not None:
            problem = problem or f"change pending for {a['pending_since_seconds']:.0f}s"
        lines.append(
            f"  {name:<20} {state:<15} {gen:>5}  "
            f"{age(a['seconds_since_last_backup']):<12} {problem}"
        )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    config = load(args)
    status, health = ask(config, "GET", "/health")
    if not isinstance(health, dict):
        print(health)
        return 1
    print(json.dumps(health, indent=2) if args.json else render(health))
    return 1 if status >= 500 else 0
