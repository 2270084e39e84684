"""Prometheus metrics (prometheus_client), one registry per daemon."""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections.abc import Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from wadaemon.state import DaemonState


class _StateCollector(Collector):
    """Gauges read from the daemon state at scrape time."""

    def __init__(self, state: DaemonState) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        now = time.time()
        by_state = GaugeMetricFamily("wadaemon_accounts", "Accounts by state.", labels=["state"])
        for name, count in sorted(Tally(a.state for a in self.state.accounts.values()).items()):
            by_state.add_metric([name], count)
        yield by_state
        clients = GaugeMetricFamily(
            "wadaemon_whatsapp_accounts",
            "Accounts by WhatsApp client state (connected, needs_qr, logged_out, ...).",
            labels=["state"],
        )
        tally = Tally(a.client for a in self.state.accounts.values() if a.client)
        for name, count in sorted(tally.items()):
            clients.add_metric([name], count)
        yield clients
        age = GaugeMetricFamily(
            "wadaemon_seconds_since_last_backup",
            "Seconds since the last good backup of each account (absent: never backed up).",
            labels=["account"],
        )
        for a in self.state.accounts.values():
            if a.last_backup_at is not None:
                age.add_metric([a.account], now - a.last_backup_at)
        yield age
        up = GaugeMetricFamily("wadaemon_store_up", "1 if the backup store answered last time.")
        up.add_metric([], 1.0 if self.state.store.reachable is True else 0.0)
        yield up
        yield GaugeMetricFamily(
            "wadaemon_uptime_seconds",
            "Seconds since the daemon started.",
            value=now - self.state.started_at,
        )
        yield GaugeMetricFamily(
            "wadaemon_event_loop_lag_seconds",
            "Delay of the event loop's last heartbeat.",
            value=self.state.loop_lag,
        )


class Metrics:
    def __init__(self, state: DaemonState) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.backups = Counter(
            "wadaemon_backups", "Backup attempts by result.", ["account", "result"], registry=r
        )
        self.backup_seconds = Histogram(
            "wadaemon_backup_duration_seconds",
            "Time to snapshot and commit one account.",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=r,
        )
        self.uploaded_bytes = Counter(
            "wadaemon_backup_uploaded_bytes", "Encrypted bytes uploaded to the store.", registry=r
        )
        self.restores = Counter(
            "wadaemon_restores",
            "Restore attempts by result (restored, failed); success rate = restored / (restored "
            "+ failed).",
            ["result"],
            registry=r,
        )
        self.drills = Counter(
            "wadaemon_drills",
            "Restore drills by result: ok, failed, repaired (damaged pieces were uploaded again "
            "and the drill then passed).",
            ["result"],
            registry=r,
        )
        self.store_errors = Counter(
            "wadaemon_store_errors", "Failed operations against the backup store.", registry=r
        )
        r.register(_StateCollector(state))
        ProcessCollector(registry=r)  # process_open_fds, process_resident_memory_bytes, ...

    def render(self) -> bytes:
        return generate_latest(self.registry)
