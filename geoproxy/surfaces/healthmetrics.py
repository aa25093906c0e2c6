"""The health board's events as metrics: active checks (count and duration), transitions,
ejections, TLS failures of checks, and the per-geode gauges (up, ejected, in flight, at
capacity), read as health stands when they are published or scraped."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from geoproxy.config.values import Geode
from geoproxy.health.board import GeodeHealth, HealthBoard
from geoproxy.health.load import GeodeLoad
from geoproxy.health.tls import TLSFailure
from geoproxy.surfaces.metrics import Metrics


class HealthMetrics:
    """Hooks itself into ``board``; ``geodes`` gives the geodes of the config in force."""

    def __init__(
        self,
        metrics: Metrics,
        board: HealthBoard,
        load: GeodeLoad,
        geodes: Callable[[], Iterable[Geode]],
    ) -> None:
        self.metrics, self.load, self.geodes = metrics, load, geodes
        board.on_check.append(self.on_check)
        board.on_transition.append(self.on_transition)
        board.on_eject.append(self.on_eject)
        metrics.geode_inflight.source = self.geode_inflight
        metrics.geode_full.source = self.geode_full

    def on_check(self, state: GeodeHealth, ok: bool, latency: float | None) -> None:
        name = state.geode.name
        self.metrics.health_checks.labels(name, "pass" if ok else "fail").inc()
        if latency is not None:
            self.metrics.health_check_duration.labels(name).observe(latency)

    def on_transition(self, state: GeodeHealth) -> None:
        self.publish(state)
        self.metrics.transitions.labels(
            state.geode.name, "healthy" if state.takes_traffic else "unhealthy"
        ).inc()

    def publish(self, state: GeodeHealth) -> None:
        """The geode's gauges as its state is now."""
        g = state.geode
        self.metrics.geode_up.labels(g.name, g.region).set(1 if state.takes_traffic else 0)
        self.metrics.ejected.labels(g.name, g.region).set(1 if state.ejected else 0)

    def geode_inflight(self) -> list[tuple[tuple[str, str], float]]:
        inflight = self.load.inflight
        return [((g.name, g.region), inflight.get(g.name, 0)) for g in self.geodes()]

    def geode_full(self) -> list[tuple[tuple[str, str], float]]:
        full = self.load.full
        return [((g.name, g.region), float(g.name in full)) for g in self.geodes()]

    def on_eject(self, state: GeodeHealth) -> None:
        self.metrics.ejections.labels(state.geode.name).inc()

    def on_tls_failure(self, geode: Geode, failure: TLSFailure) -> None:
        self.metrics.tls_errors.labels(geode.name, failure.reason, "health_check").inc()
