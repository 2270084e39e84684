"""Restore drills: every backed-up account's head is restored to nowhere once per
verify.interval_hours, one account at a time, each at its own offset in the interval. Damaged
pieces a drill finds are uploaded again from a healthy local session and the drill repeated;
/health shows the last drill of each account."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time

from wadaemon.account_backups import AccountBackups
from wadaemon.restore import DrillResult, drill, inspect_local
from wadaemon.runtime import Runtime

log = logging.getLogger("wadaemon")

DRILL_POLL_S = 30.0  # the drill loop looks at the configuration and the accounts this often


def drill_offset(account: str) -> float:
    """Where in the drill interval an account's drill falls, from 0 to 1: the same on every
    host and after every restart, and spread from account to account."""
    return int.from_bytes(hashlib.sha256(account.encode()).digest()[:8], "big") / 2**64


def next_drill_at(account: str, interval: float, now: float) -> float:
    """The account's next drill time after `now` (wall clock): its offset in every interval."""
    offset = drill_offset(account) * interval
    return offset + (math.floor((now - offset) / interval) + 1) * interval


class Drills:
    def __init__(self, rt: Runtime, backups: AccountBackups) -> None:
        self.rt = rt
        self.backups = backups

    async def run(self) -> None:
        """Drill every backed-up account's head once per verify.interval_hours, one account at
        a time, each at its own offset in the interval (next_drill_at)."""
        rt = self.rt
        due: dict[str, float] = {}
        interval = 0.0
        while not rt.stop_event.is_set():
            hours = rt.config.verify.interval_hours
            if hours * 3600.0 != interval:  # started, or changed by a reload
                interval = hours * 3600.0
                due.clear()
            if interval <= 0 or rt.replica is None:
                await rt.sleep(DRILL_POLL_S)
                continue
            now = time.time()
            drillable = {
                a
                for a, st in rt.state.accounts.items()
                if st.last_backup_generation is not None
                and not self.backups.held(a)
                and self.backups.drives(a)
            }
            for account in list(due):
                if account not in drillable:
                    del due[account]
            for account in drillable:
                due.setdefault(account, next_drill_at(account, interval, now))
            if not due:
                await rt.sleep(min(DRILL_POLL_S, interval))
                continue
            account = min(due, key=lambda a: due[a])
            wait = due[account] - now
            if wait > 0:
                await rt.sleep(min(wait, DRILL_POLL_S))
                continue
            await self._drill(account)
            due[account] = next_drill_at(account, interval, time.time())

    async def _drill(self, account: str) -> None:
        """One drill of the account's head. Damaged pieces are uploaded again from a healthy
        local session and the drill repeated; the failure shows in /health meanwhile."""
        assert self.rt.replica is not None
        state = self.rt.state
        result = await asyncio.to_thread(drill, self.rt.replica, account)
        outcome, error = ("ok", "") if result.ok else ("failed", result.error)
        if not result.ok and result.damaged and account in state.accounts:
            self._drilled(account, result, "failed", result.error + "; repairing", final=False)
            repaired, error = await self._repair(account, result)
            if repaired is not None:
                result, outcome = repaired, "repaired"
        if self.rt.stop_event.is_set() or account not in state.accounts:
            return  # stopping, or removed meanwhile
        self._drilled(account, result, outcome, error)
        if outcome == "failed":
            log.error("drill: %s: generation %s: %s", account, result.generation, error)
        elif outcome == "repaired":
            log.warning(
                "drill: %s: repaired: generation %s restores again (%d files, %d bytes)",
                account,
                result.generation,
                result.files,
                result.size,
            )
        else:
            log.info(
                "drill: %s: generation %s restores (%d files, %d bytes, %.2f s)",
                account,
                result.generation,
                result.files,
                result.size,
                result.seconds,
            )

    def _drilled(
        self, account: str, result: DrillResult, outcome: str, error: str, *, final: bool = True
    ) -> None:
        """What /health shows of the account's last drill; a final outcome is also counted."""
        st = self.rt.state.account(account)
        st.last_drill_result = outcome
        st.last_drill_at = time.time()
        st.last_drill_generation = result.generation
        st.last_drill_error = error
        if final:
            self.rt.metrics.drills.labels(outcome).inc()

    async def _repair(self, account: str, failed: DrillResult) -> tuple[DrillResult | None, str]:
        """Upload again the damaged pieces a drill found, from the local session if it is
        healthy, then drill again: (the passing drill, "") or (None, why it still fails)."""
        assert self.rt.replica is not None
        n = len(failed.damaged)
        local = await asyncio.to_thread(inspect_local, self.rt.layout.account_dir(account))
        if local.state != "healthy":
            return None, (
                f"{failed.error}; not repaired: the local session is {local.state}, so the "
                "damaged pieces cannot be uploaded again from it"
            )
        log.warning(
            "drill: %s: generation %s has %d damaged pieces in the store; uploading them again "
            "from the local session",
            account,
            failed.generation,
            n,
        )
        why = f"a restore drill found {n} damaged pieces"
        backup = await self.backups.reupload(account, frozenset(failed.damaged), why)
        if not backup["ok"] or backup["result"] == "skipped":
            why = backup["error"] or "the backup was skipped"
            return None, f"{failed.error}; not repaired: the backup that uploads them failed: {why}"
        again = await asyncio.to_thread(drill, self.rt.replica, account)
        if again.ok:
            return again, ""
        return None, f"{again.error} (after {n} damaged pieces were uploaded again)"
