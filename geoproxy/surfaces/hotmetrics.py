"""Counter and histogram families for the per-request hot path, kept in plain dicts.

prometheus_client's ``Counter``/``Histogram`` take a lock and validate labels on every
update; the proxy updates half a dozen series per request from a single event-loop thread,
and the admin scrape reads them from that same thread. These families do just the
arithmetic and are exposed through a ``Collector`` in the standard format.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector


class HotCounter:
    def __init__(self, name: str, documentation: str, labels: Sequence[str]) -> None:
        self.name, self.documentation, self.labels = name, documentation, tuple(labels)
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        values = self.values
        values[labels] = values.get(labels, 0.0) + amount

    def family(self) -> Metric:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        for labels, value in self.values.items():
            family.add_metric(labels, value)
        return family


class HotHistogram:
    def __init__(
        self, name: str, documentation: str, labels: Sequence[str], buckets: Sequence[float]
    ) -> None:
        self.name, self.documentation, self.labels = name, documentation, tuple(labels)
        self.bounds = tuple(buckets)
        self._le = [*(_le(b) for b in self.bounds), "+Inf"]
        self.counts: dict[tuple[str, ...], list[int]] = {}  # per bucket, not cumulative
        self.sums: dict[tuple[str, ...], float] = {}

    def observe(self, value: float, *labels: str) -> None:
        counts = self.counts.get(labels)
        if counts is None:
            counts = self.counts[labels] = [0] * (len(self.bounds) + 1)
            self.sums[labels] = 0.0
        counts[bisect_left(self.bounds, value)] += 1  # le: a value on a bound counts in it
        self.sums[labels] += value

    def family(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labels)
        for labels, counts in self.counts.items():
            cumulative, running = [], 0
            for le, count in zip(self._le, counts, strict=True):
                running += count
                cumulative.append((le, float(running)))
            family.add_metric(labels, cumulative, self.sums[labels])
        return family


class LiveGauge:
    """A gauge family whose samples are read from ``source`` when scraped: nothing is
    updated per request."""

    def __init__(self, name: str, documentation: str, labels: Sequence[str]) -> None:
        self.name, self.documentation, self.labels = name, documentation, tuple(labels)
        self.source: Callable[[], Iterable[tuple[Sequence[str], float]]] = tuple

    def family(self) -> Metric:
        family = GaugeMetricFamily(self.name, self.documentation, labels=self.labels)
        for labels, value in self.source():
            family.add_metric(labels, value)
        return family


Family = HotCounter | HotHistogram | LiveGauge


def _le(bound: float) -> str:
    return repr(float(bound))


class HotCollector(Collector):
    def __init__(self, families: Sequence[Family]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        for f in self.families:
            yield f.family()


def register(registry: CollectorRegistry, *families: Family) -> None:
    registry.register(HotCollector(families))
