"""What the daemon knows about itself and its accounts, as the health socket, the metrics, the
STATUS line and the watchdog see it. Only the event loop writes it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class AccountState:
    account: str
    # protected (a committed generation exists) | unprotected (none yet) | unreadable (the
    # daemon's user may not read it) | restoring | restore_failed | missing | conflict |
    # passive (another instance holds its lease: nothing is done with it here)
    state: str = "unprotected"
    holder: str | None = None  # with leases: the instance that drives it ("" none); else None
    last_backup_at: float | None = None  # wall clock, last successful backup (or unchanged)
    last_backup_generation: int | None = None
    last_backup_result: str = ""  # created | unchanged | skipped | failed
    last_error: str = ""
    consecutive_failures: int = 0
    backup_started: float | None = None  # monotonic, while a backup runs
    pending_since: float | None = None  # monotonic, oldest change no backup has covered yet
    # wall clock: the last change the watcher reported, or a backup found before it did
    last_change_at: float | None = None
    last_restore: str = ""  # one line: the boot restore outcome
    last_restore_at: float | None = None
    # the last restore drill (verify.interval_hours): ok | failed | repaired ("" before the first)
    last_drill_result: str = ""
    last_drill_at: float | None = None  # wall clock
    last_drill_generation: int | None = None
    last_drill_error: str = ""
    # the WhatsApp client ("" when the daemon runs none: sidecar mode):
    # needs_qr | pairing | connecting | connected | disconnected | offline | logged_out |
    # temp_banned | replaced | stopped
    client: str = ""
    client_detail: str = ""
    client_since: float | None = None  # wall clock, when `client` last changed
    phone: str = ""
    last_event: str = ""
    last_event_at: float | None = None
    last_message_at: float | None = None
    connect_failures: int = 0
    next_connect_at: float | None = None  # wall clock, the next connect attempt while offline


@dataclass
class StoreState:
    target: str
    reachable: bool | None = None  # None: not asked yet
    last_error: str = ""
    unreachable_since: float | None = None  # wall clock, start of the current outage
    last_ok_at: float | None = None


@dataclass
class DaemonState:
    version: str
    target: str
    started_at: float = field(default_factory=time.time)
    phase: str = "starting"  # starting | restoring | running | reloading | stopping
    accounts: dict[str, AccountState] = field(default_factory=dict)
    store: StoreState = field(default_factory=lambda: StoreState("none"))
    loop_lag: float = 0.0
    instance: str = ""
    leased: bool = False  # accounts are shared with other instances through leases

    def account(self, name: str) -> AccountState:
        if name not in self.accounts:
            self.accounts[name] = AccountState(name)
        return self.accounts[name]

    def last_backup_at(self) -> float | None:
        times = [a.last_backup_at for a in self.accounts.values() if a.last_backup_at]
        return max(times) if times else None


def iso_time(t: float | None) -> str | None:
    """A wall-clock time as ISO 8601 UTC, for JSON and the store's records."""
    return None if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
