"""Prometheus metrics (prometheus_client), one registry per daemon."""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
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
        if self.state.leased:
            held = sum(1 for a in self.state.accounts.values() if a.state != "passive")
            yield GaugeMetricFamily(
                "wadaemon_leases_held", "Account leases this instance holds (drives).", value=held
            )
        yield GaugeMetricFamily(
            "wadaemon_event_loop_lag_seconds",
            "Delay of the event loop's last heartbeat.",
            value=self.state.loop_lag,
        )


class _StoreCollector(Collector):
    def __init__(self, counters: Mapping[str, int]) -> None:
        self.counters = counters

    def collect(self) -> Iterator[Metric]:
        ops = CounterMetricFamily(
            "wadaemon_store_operations",
            "Operations this daemon made on the backup store, by kind (Firestore: documents "
            "read, written, deleted; bytes_written).",
            labels=["kind"],
        )
        for kind, n in sorted(dict(self.counters).items()):
            ops.add_metric([kind], n)
        yield ops


GAUGE_HELP = {
    "journal_entries": "Message changes waiting in the local journal for the store.",
    "journal_bytes": "Bytes of message changes waiting in the local journal.",
    "outbox_waiting": "Outbox entries queued or sending.",
    "outbox_oldest_seconds": "Age of the oldest outbox entry waiting (0: none).",
    "webhook_backlog": "Events waiting to be delivered to the webhook.",
    "webhook_oldest_seconds": "Age of the oldest event waiting for the webhook (0: none).",
}


class _GaugeCollector(Collector):
    def __init__(self, prefix: str, read: Callable[[], Mapping[str, float]]) -> None:
        self.prefix = prefix
        self.read = read

    def collect(self) -> Iterator[Metric]:
        for name, value in sorted(self.read().items()):
            yield GaugeMetricFamily(self.prefix + name, GAUGE_HELP.get(name, name), value=value)


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
        self.lease_events = Counter(
            "wadaemon_lease_events",
            "Lease events: takeover (an account taken over here), lost (a held lease was lost), "
            "handover (released on stop, move or rebalance), fenced (a head switch the store "
            "refused because another instance holds a newer token).",
            ["event"],
            registry=r,
        )
        self.messages = Counter(
            "wadaemon_messages",
            "Message events by account: received (journaled), stored (new in the message "
            "store), sent, failed, unknown (outbox entries), lost (could not be journaled), "
            "webhook_dropped (gave up after messages.webhook.max_attempts).",
            ["account", "event"],
            registry=r,
        )
        r.register(_StateCollector(state))
        ProcessCollector(registry=r)  # process_open_fds, process_resident_memory_bytes, ...

    def count_store_operations(self, counters: Mapping[str, int]) -> None:
        """Export a store's running operation counts (Firestore: reads, writes, deletes,
        bytes_written), the numbers its bill is made of."""
        self.registry.register(_StoreCollector(counters))

    def count_messages(self, gauges: Callable[[], Mapping[str, float]]) -> None:
        """Export the message parts' levels (journal, outbox, webhook backlog)."""
        self.registry.register(_GaugeCollector("wadaemon_messages_", gauges))

    def render(self) -> bytes:
        return generate_latest(self.registry)
