"""Traffic over the last minutes, for the ``/status`` page: request and 5xx rates per
geode, failovers and the share served outside the client's region.

The counters are cumulative (as ``/metrics`` has them); ``TrafficHistory`` keeps a sample
every ``STEP`` seconds for ``WINDOW`` seconds, and a rate is the difference between now
and the oldest sample kept, over the time between them.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from dataclasses import dataclass, field

from geoproxy.surfaces.metrics import Metrics

WINDOW = 300.0  # seconds of history the rates cover (less until that much has passed)
STEP = 10.0  # seconds between two samples kept
#: Decisions that served a request outside the region it belongs to (its own, or its home).
_OFF_REGION = ("fallback", "affinity_fallback")


@dataclass(frozen=True, slots=True)
class Traffic:
    """Counts so far, as ``/metrics`` has them (summed over the workers of a fleet)."""

    requests: Mapping[tuple[str, ...], float] = field(default_factory=dict)  # (geode, class)
    failovers: float = 0.0
    decisions: Mapping[str, float] = field(default_factory=dict)  # by routing decision
    #: Geodes passive health ejected, in this process or (``--workers``) in any worker.
    ejected: frozenset[str] = frozenset()

    @classmethod
    def of(cls, metrics: Metrics, ejected: frozenset[str]) -> Traffic:
        """This process's counts."""
        decisions: dict[str, float] = collections.defaultdict(float)
        for (_region, _geode, decision), value in metrics.decisions.values.items():
            decisions[decision] += value
        return cls(
            dict(metrics.requests.values),
            sum(metrics.failovers.values.values()),
            dict(decisions),
            ejected,
        )

    def by_geode(self) -> dict[str, tuple[float, float]]:
        """(requests, 5xx answers) by geode."""
        out: dict[str, tuple[float, float]] = {}
        for (geode, code_class), value in self.requests.items():
            total, errors = out.get(geode, (0.0, 0.0))
            out[geode] = (total + value, errors + (value if code_class == "5xx" else 0.0))
        return out


@dataclass(frozen=True, slots=True)
class Rates:
    """What happened over the last ``seconds``."""

    seconds: float
    requests: Mapping[str, float]  # per second, by geode
    errors: Mapping[str, float]  # 5xx answers per second, by geode
    failovers: float  # per second
    decisions: float  # routing decisions, per second
    off_region: float | None  # share of decisions served outside the client's region

    def error_share(self, geode: str) -> float | None:
        total = self.requests.get(geode, 0.0)
        return self.errors.get(geode, 0.0) / total if total else None


class TrafficHistory:
    def __init__(self, window: float = WINDOW, step: float = STEP) -> None:
        self.window, self.step = window, step
        self._samples: collections.deque[tuple[float, Traffic]] = collections.deque()

    def note(self, now: float, traffic: Traffic) -> None:
        """Keep ``traffic`` if the last sample kept is ``step`` old; forget samples that
        left the window (keeping the newest of those as the window's start)."""
        if not self._samples or now - self._samples[-1][0] >= self.step:
            self._samples.append((now, traffic))
        while len(self._samples) > 1 and now - self._samples[1][0] >= self.window:
            self._samples.popleft()

    def rates(self, now: float, traffic: Traffic) -> Rates | None:
        """From the oldest sample kept to ``traffic`` now; None without a sample a second
        old (a fresh start)."""
        if not self._samples or now - self._samples[0][0] < 1.0:
            return None
        then, old = self._samples[0]
        seconds = now - then
        before, after = old.by_geode(), traffic.by_geode()
        requests, errors = {}, {}
        for geode, (total, bad) in after.items():
            total0, bad0 = before.get(geode, (0.0, 0.0))
            requests[geode] = max(0.0, total - total0) / seconds
            errors[geode] = max(0.0, bad - bad0) / seconds
        decided = sum(traffic.decisions.values()) - sum(old.decisions.values())
        fallback = sum(  # a home region's fallback too (home-stamp affinity)
            traffic.decisions.get(d, 0.0) - old.decisions.get(d, 0.0) for d in _OFF_REGION
        )
        return Rates(
            seconds,
            requests,
            errors,
            max(0.0, traffic.failovers - old.failovers) / seconds,
            max(0.0, decided) / seconds,
            fallback / decided if decided > 0 else None,
        )
