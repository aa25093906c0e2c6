"""Metrics of a proxy run as several worker processes (``geoproxy run --workers N``).

Each worker counts its own requests in plain in-process families (no locks, no shared
memory on the hot path). The supervisor asks every worker for a ``snapshot`` of those
families before it answers a scrape (and every few seconds), and exposes one registry:
its own families (health checks, reloads, readiness, process) as they are, and the worker
families summed over the live workers plus what workers that have exited had counted
(``retire``), so counters never go backwards when a worker is restarted.

Merging rules, by sample: gauges of ejection and capacity (``geoproxy_geode_ejected``,
``geoproxy_geode_at_capacity``) take the maximum — a geode is ejected (or full) if any
worker says so; ``*_created`` takes the earliest; everything else is summed. Gauges are
not carried over from an exited worker.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from geoproxy.surfaces.metrics import worker_families
from geoproxy.surfaces.traffic import Traffic

#: Families counted by the workers (names as ``Metric.name``: counters without _total),
#: as metrics.py declares them.
WORKER_FAMILIES = worker_families()
_MAX = frozenset({"geoproxy_geode_ejected", "geoproxy_geode_at_capacity"})
_CUMULATIVE = frozenset({"counter", "histogram"})  # carried over when a worker exits

#: One family as JSON-able data: name, type, help and samples [name, labels, value].
Family = dict[str, Any]
Key = tuple[str, tuple[tuple[str, str], ...]]  # sample name, sorted labels


def snapshot(registry: CollectorRegistry) -> list[Family]:
    """A worker's families, to send to the supervisor."""
    return [
        {
            "name": f.name,
            "type": f.type,
            "help": f.documentation,
            "samples": [[s.name, s.labels, s.value] for s in f.samples],
        }
        for f in registry.collect()
        if f.name in WORKER_FAMILIES
    ]


def _key(sample: Sequence[Any]) -> Key:
    return sample[0], tuple(sorted(sample[1].items()))


def _merge(family: str, into: dict[Key, float], key: Key, value: float) -> None:
    if key not in into:
        into[key] = value
    elif key[0].endswith("_created"):
        into[key] = min(into[key], value)
    elif family in _MAX:
        into[key] = max(into[key], value)
    else:
        into[key] += value


def _without(geode_up: Metric, ejected: frozenset[str]) -> Metric:
    """The supervisor's geode_up (active health), 0 for geodes a worker ejected: a geode
    reads 1 only while it takes traffic, as in one process."""
    out = Metric(geode_up.name, geode_up.documentation, geode_up.type)
    for s in geode_up.samples:
        out.add_sample(s.name, s.labels, 0.0 if s.labels.get("geode") in ejected else s.value)
    return out


class Fleet(Collector):
    """The supervisor's exposition: ``own`` registry merged with the workers' snapshots."""

    def __init__(self, own: CollectorRegistry) -> None:
        self.own = own
        self.live: dict[int, list[Family]] = {}  # worker index -> its latest snapshot
        self.retired: dict[str, dict[Key, float]] = {}  # family -> cumulative samples
        self.retired_requests: dict[int, float] = {}  # worker index -> requests

    def update(self, worker: int, families: list[Family]) -> None:
        self.live[worker] = families

    def retire(self, worker: int) -> None:
        """A worker exited: keep what its counters and histograms had counted."""
        families = self.live.pop(worker, [])
        self.retired_requests[worker] = self._requests_in(worker, families)
        for f in families:
            if f["type"] not in _CUMULATIVE:
                continue
            into = self.retired.setdefault(f["name"], {})
            for sample in f["samples"]:
                if not sample[0].endswith("_created"):
                    _merge(f["name"], into, _key(sample), sample[2])

    def _requests_in(self, worker: int, families: list[Family]) -> float:
        total = self.retired_requests.get(worker, 0.0)
        for f in families:
            if f["name"] == "geoproxy_requests":
                total += sum(s[2] for s in f["samples"] if s[0] == "geoproxy_requests_total")
        return total

    def request_counts(self) -> dict[tuple[str, ...], float]:
        """``geoproxy_requests_total`` by (geode, code_class) over the fleet."""
        merged = self._merged("geoproxy_requests", [])
        return {
            (dict(labels)["geode"], dict(labels)["code_class"]): v
            for (name, labels), v in merged.items()
            if name == "geoproxy_requests_total"
        }

    def traffic(self) -> Traffic:
        """The fleet's counts for the status page; ejected: by any live worker."""
        decisions: dict[str, float] = {}
        for (name, labels), value in self._merged("geoproxy_routing_decisions", []).items():
            if name == "geoproxy_routing_decisions_total":
                decision = dict(labels)["decision"]
                decisions[decision] = decisions.get(decision, 0.0) + value
        failovers = sum(
            value
            for (name, _), value in self._merged("geoproxy_failovers", []).items()
            if name == "geoproxy_failovers_total"
        )
        return Traffic(self.request_counts(), failovers, decisions, self.ejected())

    def ejected(self) -> frozenset[str]:
        """Geodes a live worker has ejected (passive health)."""
        ejections = self._merged("geoproxy_geode_ejected", [])
        return frozenset(dict(labels)["geode"] for (_, labels), v in ejections.items() if v)

    def _merged(self, name: str, own_samples: Sequence[Any]) -> dict[Key, float]:
        merged: dict[Key, float] = {}
        for sample in own_samples:
            _merge(name, merged, _key(sample), sample[2])
        for key, value in self.retired.get(name, {}).items():
            _merge(name, merged, key, value)
        for families in self.live.values():
            for f in families:
                if f["name"] == name:
                    for sample in f["samples"]:
                        _merge(name, merged, _key(sample), sample[2])
        return merged

    def collect(self) -> Iterator[Metric]:
        ejected = self.ejected()
        for family in self.own.collect():
            if family.name == "geoproxy_geode_up" and ejected:
                yield _without(family, ejected)
                continue
            if family.name not in WORKER_FAMILIES:
                yield family
                continue
            own = [(s.name, s.labels, s.value) for s in family.samples]
            out = Metric(family.name, family.documentation, family.type)
            for (name, labels), value in self._merged(family.name, own).items():
                out.add_sample(name, dict(labels), value)
            yield out
        per_worker = CounterMetricFamily(
            "geoproxy_worker_requests",
            "Requests answered by each worker process (a "
            "restarted worker continues its predecessor's count).",
            labels=["worker"],
        )
        for worker in sorted(self.live.keys() | self.retired_requests.keys()):
            count = self._requests_in(worker, self.live.get(worker, []))
            per_worker.add_metric([str(worker)], count)
        yield per_worker
