"""The stamp's metrics (``stamp_`` prefix), on an injected registry."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from geoproxy.stamp.config import StampConfig
from geoproxy.stamp.store import Store


class _StoreCollector(Collector):
    """Read at scrape time from the store: items, and per peer the replication backlog
    and its lag (age of the oldest change the peer has not acknowledged)."""

    def __init__(self, store: Store, config: StampConfig) -> None:
        self.store = store
        self.config = config

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            yield from self._collect()
        except sqlite3.Error:
            return  # the store is unusable (/health says so): export the other metrics

    def _collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "stamp_items", "Live items in the local store.", value=self.store.count()
        )
        backlog = GaugeMetricFamily(
            "stamp_replication_backlog",
            "This stamp's changes a peer has not acknowledged.",
            labels=["peer"],
        )
        lag = GaugeMetricFamily(
            "stamp_replication_lag_seconds",
            "Age of the oldest change a peer has not "
            "acknowledged: the oldest unsent change (0 when none).",
            labels=["peer"],
        )
        for peer in self.config.peers:
            count, age = self.store.backlog(peer.name)
            backlog.add_metric([peer.name], count)
            lag.add_metric([peer.name], age or 0.0)
        yield backlog
        yield lag


class StampMetrics:
    def __init__(self, registry: CollectorRegistry, store: Store, config: StampConfig) -> None:
        self.registry = registry
        r = registry
        registry.register(_StoreCollector(store, config))
        self.writes = Counter(
            "stamp_writes", "Local writes, by kind (put, delete, counter).", ["kind"], registry=r
        )
        self.applied = Counter(
            "stamp_changes_applied",
            "Peers' changes applied here, by result (applied, ignored: older or duplicate).",
            ["result"],
            registry=r,
        )
        self.conflicts = Counter(
            "stamp_conflicts_resolved",
            "Concurrent writes from different stamps settled by last-write-wins.",
            registry=r,
        )
        self.apply_errors = Counter(
            "stamp_apply_errors",
            "Replication batches refused as invalid or failed to apply.",
            registry=r,
        )
        self.pushes = Counter(
            "stamp_replication_pushes",
            "Pushes to peers, by result.",
            ["peer", "result"],
            registry=r,
        )
        self.quarantined = Counter(
            "stamp_quarantined_changes",
            "Changes put in the dead-letter table, by direction "
            "(received: a peer's change refused here; sent: ours a peer refused for good) and "
            "reason (invalid, wrong_origin, clock_skew, refused).",
            ["direction", "reason"],
            registry=r,
        )
        self.auth_failures = Counter(
            "stamp_peer_auth_failures",
            "Requests to the replication endpoints refused as "
            "not from an authenticated peer (401), by reason.",
            ["reason"],
            registry=r,
        )
        self.sync_writes = Counter(
            "stamp_sync_writes",
            "Writes asked to be confirmed by peers, by result (confirmed, unconfirmed).",
            ["result"],
            registry=r,
        )
