"""Health: is every core part alive (the watchdog's question), and how is everything (/health).

Core parts are the event loop, the watcher and the backup engine. A backup store that cannot be
reached makes the daemon `degraded`, never `failing`: restarting would not bring Firestore back,
and the local sessions keep working meanwhile. A lost key (see key_watch), a backup head that
does not authenticate and a failed restore drill make it `failing` but do not gate the watchdog
either: a restart would fix none of them.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from wadaemon.state import AccountState, DaemonState, iso_time

LOOP_LAG_FAILING_S = 10.0
CLIENT_STATES_OK = ("connected", "connecting", "pairing", "stopped")
WATCHER_GRACE_S = 5.0
HEADS_LISTED = 3  # heads check: whole messages for this many accounts, then their names


@dataclass(frozen=True)
class Check:
    status: str  # ok | degraded | failing
    detail: str

    def as_dict(self) -> dict[str, str]:
        return {"status": self.status, "detail": self.detail}


def _worst(statuses: list[str]) -> str:
    for level in ("failing", "degraded"):
        if level in statuses:
            return level
    return "ok"


def core_checks(
    state: DaemonState,
    *,
    watcher_down_since: float | None,
    watching: bool,
    backup_timeout: float,
    now: float | None = None,
) -> dict[str, Check]:
    """The checks that gate the watchdog. `now` is time.monotonic()."""
    mono = time.monotonic() if now is None else now
    checks: dict[str, Check] = {}
    lag = state.loop_lag
    checks["event_loop"] = Check(
        "failing" if lag > LOOP_LAG_FAILING_S else "ok", f"heartbeat lag {lag:.3f} s"
    )
    if not watching:
        checks["watcher"] = Check("ok", "not needed (backup target none)")
    elif watcher_down_since is None:
        checks["watcher"] = Check("ok", "watching")
    else:
        down = mono - watcher_down_since
        status = "failing" if down > WATCHER_GRACE_S else "degraded"
        checks["watcher"] = Check(status, f"not watching for {down:.0f} s")
    stuck = [
        f"{a.account} ({mono - a.backup_started:.0f} s)"
        for a in state.accounts.values()
        if a.backup_started is not None and mono - a.backup_started > backup_timeout
    ]
    checks["backup_engine"] = Check(
        "failing" if stuck else "ok",
        f"stuck beyond {backup_timeout:.0f} s: {', '.join(stuck)}" if stuck else "no backup stuck",
    )
    return checks


def alive(checks: dict[str, Check]) -> bool:
    return all(c.status != "failing" for c in checks.values())


def report(
    state: DaemonState,
    core: dict[str, Check],
    keys: Check | None = None,
    heads: Check | None = None,
    drills: Check | None = None,
    messages: Check | None = None,
) -> tuple[int, dict[str, Any]]:
    """(HTTP status, JSON body) for GET /health. `keys` (see key_watch), `heads` and `drills`
    (see heads_check, drills_check): absent without a backup target."""
    now = time.time()
    mono = time.monotonic()
    checks = dict(core)
    store = state.store
    if store.target == "none":
        checks["store"] = Check("ok", "no backup target (local sessions only)")
    elif store.reachable is None:
        checks["store"] = Check("degraded", f"{store.target} not reached yet")
    elif store.reachable:
        checks["store"] = Check("ok", f"{store.target} reachable")
    else:
        since = f" since {_ago(now, store.unreachable_since)}" if store.unreachable_since else ""
        checks["store"] = Check(
            "degraded", f"{store.target} unreachable{since}: {store.last_error}"
        )
    for name, check in (
        ("keys", keys),
        ("heads", heads),
        ("drills", drills),
        ("messages", messages),
    ):
        if check is not None:
            checks[name] = check
    checks["accounts"] = _accounts_check(state)
    if state.leased:
        passive = sum(1 for a in state.accounts.values() if a.state == "passive")
        checks["leases"] = Check(
            "ok",
            f"instance {state.instance}: {len(state.accounts) - passive} accounts driven here, "
            f"{passive} passive (held by other instances)",
        )
    clients = [a for a in state.accounts.values() if a.client and a.state != "passive"]
    if clients:
        attention = sorted(
            f"{a.account} ({a.client.replace('_', ' ')})"
            for a in clients
            if a.client not in CLIENT_STATES_OK
        )
        checks["whatsapp"] = Check(
            "degraded" if attention else "ok",
            "need attention: " + ", ".join(attention)
            if attention
            else f"{len(clients)} client{'s' if len(clients) != 1 else ''} running",
        )
    overall = _worst([c.status for c in checks.values()])
    accounts: dict[str, Any] = {}
    for a in sorted(state.accounts.values(), key=lambda a: a.account):
        accounts[a.account] = {
            "state": a.state,
            "last_backup_at": iso_time(a.last_backup_at),
            "seconds_since_last_backup": round(now - a.last_backup_at, 3)
            if a.last_backup_at
            else None,
            "generation": a.last_backup_generation,
            "last_backup_result": a.last_backup_result or None,
            "backup_running_seconds": round(mono - a.backup_started, 3)
            if a.backup_started is not None
            else None,
            "pending_since_seconds": round(mono - a.pending_since, 3)
            if a.pending_since is not None
            else None,
            "consecutive_failures": a.consecutive_failures,
            "last_error": a.last_error or None,
            "last_restore": a.last_restore or None,
            "last_restore_at": iso_time(a.last_restore_at),
            "last_drill": {
                "result": a.last_drill_result,
                "at": iso_time(a.last_drill_at),
                "generation": a.last_drill_generation,
                "error": a.last_drill_error or None,
            }
            if a.last_drill_result
            else None,
            "whatsapp": _client(a, now) if a.client else None,
        }
        if state.leased:
            accounts[a.account]["holder"] = a.holder or None
    body: dict[str, Any] = {
        "status": overall,
        "phase": state.phase,
        "version": state.version,
        **({"instance": state.instance} if state.instance else {}),
        "uptime_seconds": round(now - state.started_at, 3),
        "checks": {name: c.as_dict() for name, c in checks.items()},
        "accounts_by_state": dict(Counter(a.state for a in state.accounts.values())),
        "accounts": accounts,
    }
    return (503 if overall == "failing" else 200), body


def heads_check(problems: dict[str, str]) -> Check:
    """failing while a backup head does not authenticate (altered in the store): nothing is
    restored, backed up or collected for that account until it is fixed."""
    if problems:
        listed = sorted(problems)
        detail = "; ".join(problems[a] for a in listed[:HEADS_LISTED])
        if len(listed) > HEADS_LISTED:
            detail += f"; and {len(listed) - HEADS_LISTED} more: {', '.join(listed[HEADS_LISTED:])}"
        return Check("failing", detail)
    return Check("ok", "every backup head read authenticates")


def drills_check(state: DaemonState, interval_hours: float) -> Check:
    """failing while the last restore drill of an account failed (and was not repaired)."""
    if interval_hours <= 0:
        return Check("ok", "off (verify.interval_hours is 0)")
    every = f"every {interval_hours:g} h"
    failed = sorted(
        (a for a in state.accounts.values() if a.last_drill_result == "failed"),
        key=lambda a: a.account,
    )
    if failed:
        return Check(
            "failing",
            "last drill failed: "
            + "; ".join(
                f"{a.account} (generation {a.last_drill_generation}): {a.last_drill_error}"
                for a in failed
            ),
        )
    drilled = [a for a in state.accounts.values() if a.last_drill_result]
    if not drilled:
        return Check("ok", f"no drill yet (each backed-up account {every})")
    n = len(drilled)
    return Check(
        "ok",
        f"{n} account{'s' if n != 1 else ''} drilled, the last drill of each restored "
        f"({every}; last {_ago(time.time(), max(a.last_drill_at or 0 for a in drilled))})",
    )


def _accounts_check(state: DaemonState) -> Check:
    """failing: an account the daemon cannot read, or whose local session conflicts with its
    backup (neither is protected, and no restart helps); degraded: never backed up, restore
    failed, or backups failing."""
    failing = sorted(
        (a for a in state.accounts.values() if a.state in ("unreadable", "conflict")),
        key=lambda a: a.account,
    )
    if failing:
        return Check(
            "failing", "; ".join(a.last_error or f"{a.account}: {a.state}" for a in failing)
        )
    problems = sorted(
        f"{a.account} ({a.state.replace('_', ' ')})"
        if a.state in ("unprotected", "restore_failed")
        else f"{a.account} ({a.consecutive_failures} failed backups)"
        for a in state.accounts.values()
        if a.state in ("unprotected", "restore_failed") or a.consecutive_failures > 0
    )
    if problems:
        return Check("degraded", "problems: " + ", ".join(problems))
    return Check("ok", "all protected")


def _client(a: AccountState, now: float) -> dict[str, Any]:
    return {
        "state": a.client,
        "detail": a.client_detail or None,
        "since": iso_time(a.client_since),
        "phone": a.phone or None,
        "last_event": a.last_event or None,
        "last_event_at": iso_time(a.last_event_at),
        "last_message_at": iso_time(a.last_message_at),
        "connect_failures": a.connect_failures,
        "next_connect_in_seconds": round(a.next_connect_at - now, 1)
        if a.next_connect_at is not None
        else None,
    }


def status_line(state: DaemonState) -> str:
    """The one-line STATUS for `systemctl status`."""
    now = time.time()
    n = len(state.accounts)
    if state.leased:
        passive = sum(1 for a in state.accounts.values() if a.state == "passive")
        driven = Counter(
            a.client or a.state for a in state.accounts.values() if a.state != "passive"
        )
        detail = ", ".join(f"{c} {s.replace('_', ' ')}" for s, c in sorted(driven.items()))
        parts = f"{n - passive} driven here" + (f" ({detail})" if detail else "")
        parts += f", {passive} passive"
    else:
        counts = Counter(a.client or a.state for a in state.accounts.values())
        parts = ", ".join(f"{c} {s.replace('_', ' ')}" for s, c in sorted(counts.items()))
    line = f"{n} account{'s' if n != 1 else ''}" + (f": {parts}" if parts else "")
    last = state.last_backup_at()
    if state.store.target != "none":
        line += f" · last backup {_ago(now, last) if last else 'never'}"
        line += (
            " · store "
            + {None: "not reached yet", True: "ok", False: "unreachable"}[state.store.reachable]
        )
    else:
        line += " · backups off"
    if state.phase not in ("running",):
        line = f"{state.phase} · " + line
    return line


def _ago(now: float, then: float | None) -> str:
    if then is None:
        return "never"
    s = max(0, int(now - then))
    if s < 120:
        return f"{s}s ago"
    if s < 7200:
        return f"{s // 60}m ago"
    return f"{s // 3600}h ago"
