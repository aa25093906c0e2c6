"""Every metric geoproxy exports: names, labels and help text in one place.

Declared on an injected ``CollectorRegistry`` (tests use a fresh one each). Labels are
bounded sets — regions, geode names, sources, outcomes — never client IPs, paths or raw
header values.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import aiohttp
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

from geoproxy import __version__
from geoproxy.proxy import compat
from geoproxy.surfaces import hotmetrics
from geoproxy.surfaces.hotmetrics import HotCounter, HotHistogram, LiveGauge

#: Buckets fit for a proxy: 1 ms to 30 s.
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
#: The ``geode`` label when no geode served (geoproxy answered itself).
NO_GEODE = "none"


def code_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status < 600 else "other"  # 499 is a 4xx


class Metrics:
    def __init__(self, registry: CollectorRegistry, process_metrics: bool = True) -> None:
        self.registry = registry
        r = registry
        # The per-request families: lock-free (hotmetrics.py), one collector.
        self.requests = HotCounter(
            "geoproxy_requests",
            "Requests answered, by the geode that served them ('none' "
            "when geoproxy answered itself) and status class.",
            ["geode", "code_class"],
        )
        self.request_duration = HotHistogram(
            "geoproxy_request_duration_seconds",
            "Time from request head to the last byte of the response, by geode.",
            ["geode"],
            LATENCY_BUCKETS,
        )
        self.decisions = HotCounter(
            "geoproxy_routing_decisions",
            "Routing decisions: home (the client's own "
            "region), proximity (the client's own region, the nearest by geoproximity), "
            "fallback (another region), spill (another region: the healthy geodes before "
            "it were at capacity), panic (health ignored), none_healthy (503), fenced "
            "(refused by a residency fence: no healthy geode inside it), over_capacity "
            "(503: every healthy geode at capacity), all_failed (every attempt failed); "
            "affinity (the request's home region, home_affinity), affinity_fallback (a "
            "fallback of the home region), affinity_rejected (503: no healthy geode at "
            "home, on_unavailable: reject).",
            ["client_region", "geode", "decision"],
        )
        self.resolutions = HotCounter(
            "geoproxy_region_resolutions",
            "Region sources consulted, by result: ok, "
            "unknown, invalid, untrusted (a header from an untrusted peer, ignored), error "
            "(a GeoIP look-up failed: a corrupt database).",
            ["source", "result"],
        )
        self.attempts = HotCounter(
            "geoproxy_upstream_attempts",
            "Attempts to forward to a geode, by outcome: "
            "response, retry_status (502/503/504, tried elsewhere), connect_error, "
            "tls_error (the TLS handshake failed), timeout, reset, cut_by_drain (still "
            "waiting when the shutdown drain ended).",
            ["geode", "outcome"],
        )
        self.failovers = HotCounter(
            "geoproxy_failovers",
            "A request moved from one geode to the next after a failed attempt.",
            ["from_geode", "to_geode"],
        )
        self.fast_lane = HotCounter(
            "geoproxy_fast_lane_requests",
            "Requests that took the fast lane, by how they "
            "ended: answered (from callbacks), handed_over (finished on the coroutine path: "
            "a failure, a retry status, a body to stream), client_closed.",
            ["outcome"],
        )
        self.denied = HotCounter(
            "geoproxy_requests_denied",
            "Requests refused at the edge, never forwarded, by "
            "the access rule that denied them (its name, else access[N]), or method:CONNECT, "
            "method:TRACE (405), path:unsafe (400: a path no rule can judge).",
            ["rule"],
        )
        self.fence_refusals = HotCounter(
            "geoproxy_fence_refusals",
            "Requests a residency fence refused (the fence's "
            "status, 503 by default): no healthy geode inside it, and its clients are never "
            "sent outside it. By fence and client region.",
            ["fence", "client_region"],
        )
        self.home_affinity = HotCounter(
            "geoproxy_home_affinity",
            "Requests that named a home region (home_affinity), by source (cookie, tenant) "
            "and result: ok (routed home), malformed, forged, expired, unknown_key (a "
            "cookie ignored), unknown_region, unknown_tenant, invalid, untrusted (a tenant "
            "header from an untrusted peer, ignored), fenced (a home outside the client's "
            "residency fence, ignored).",
            ["source", "result"],
        )
        self.home_stamps = HotCounter(
            "geoproxy_home_stamps",
            "Geoproxy-Home answer headers from geodes, by what the edge did: set (the home "
            "cookie), cleared ('none'), unknown_region, ignored (no home_affinity.cookie).",
            ["result"],
        )
        self.geode_inflight = LiveGauge(
            "geoproxy_geode_inflight_requests",
            "Requests whose attempt is at the geode now (WebSockets included), as "
            "max_inflight counts them.",
            ["geode", "region"],
        )
        self.geode_full = LiveGauge(
            "geoproxy_geode_at_capacity",
            "1 while the geode takes no new requests for capacity: max_inflight reached, "
            "or it reported a Geoproxy-Load of 100 or more.",
            ["geode", "region"],
        )
        hot = (
            self.requests,
            self.request_duration,
            self.decisions,
            self.resolutions,
            self.attempts,
            self.failovers,
            self.fast_lane,
            self.denied,
            self.fence_refusals,
            self.home_affinity,
            self.home_stamps,
            self.geode_inflight,
            self.geode_full,
        )
        hotmetrics.register(r, *hot)
        self.geode_up = Gauge(
            "geoproxy_geode_up",
            "1 when the geode is healthy and takes traffic, else 0. "
            "Emitted for every configured geode from start-up.",
            ["geode", "region"],
            registry=r,
        )
        self.health_checks = Counter(
            "geoproxy_health_checks",
            "Active health checks, by result (pass, fail).",
            ["geode", "result"],
            registry=r,
        )
        self.health_check_duration = Histogram(
            "geoproxy_health_check_duration_seconds",
            "Duration of active health checks that got an answer.",
            ["geode"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.transitions = Counter(
            "geoproxy_geode_transitions",
            "Health state changes of a geode, by the state it moved to.",
            ["geode", "to"],
            registry=r,
        )
        self.ready = Gauge(
            "geoproxy_ready",
            "1 when the proxy is ready (first health round done and at "
            "least one geode healthy), as /readyz answers; else 0.",
            registry=r,
        )
        self.reloads = Counter(
            "geoproxy_config_reloads",
            "Config reloads (SIGHUP or a changed file), by result "
            "(success, failure: the old config keeps serving).",
            ["result"],
            registry=r,
        )
        self.last_reload = Gauge(
            "geoproxy_config_last_reload_success_timestamp_seconds",
            "When the config in force was loaded (start-up or the last good reload).",
            registry=r,
        )
        self.geoip_built = Gauge(
            "geoproxy_geoip_database_build_timestamp_seconds",
            "When the GeoIP database "
            "in use was built (its metadata's build_epoch), by its type (GeoLite2-City, say); "
            "absent without geoip.database.",
            ["database_type"],
            registry=r,
        )
        self.geoip_reloads = Counter(
            "geoproxy_geoip_reloads",
            "GeoIP database files that changed on disk, by result "
            "(success: re-opened and in use; failure: unreadable or corrupt, the old "
            "database keeps answering).",
            ["result"],
            registry=r,
        )
        self.certificate_expiry = Gauge(
            "geoproxy_tls_certificate_expiry_timestamp_seconds",
            "When each certificate the proxy listener serves, or presents to geodes as a "
            "client certificate (forwarding.tls, a geode's tls), expires (its notAfter), "
            "by its file; absent without any.",
            ["certificate"],
            registry=r,
        )
        self.ejections = Counter(
            "geoproxy_geode_ejections",
            "Geodes ejected by passive health (consecutive failures of live traffic).",
            ["geode"],
            registry=r,
        )
        self.ejected = Gauge(
            "geoproxy_geode_ejected",
            "1 while a geode is ejected by passive health.",
            ["geode", "region"],
            registry=r,
        )
        self.tls_errors = Counter(
            "geoproxy_geode_tls_errors",
            "TLS handshakes with a geode that failed, by reason (untrusted, expired, "
            "not_yet_valid, hostname_mismatch, verify_failed, client_cert_required, "
            "client_cert_refused, not_tls, handshake_timeout, handshake_failed) and source "
            "(health_check, traffic).",
            ["geode", "reason", "source"],
            registry=r,
        )
        self.inflight = Gauge(
            "geoproxy_inflight_requests", "Requests being handled right now.", registry=r
        )
        self.build_info = Gauge(
            "geoproxy_build_info",
            "Always 1; geoproxy's and aiohttp's versions, and the mode: lean, or public "
            "(aiohttp's public API only: an aiohttp outside the tested window).",
            ["version", "aiohttp", "mode"],
            registry=r,
        )
        self.build_info.labels(__version__, aiohttp.__version__, compat.mode()).set(1)
        #: Families each worker of ``--workers`` counts for itself and the supervisor sums
        #: (fleet.py): every per-request family, passive health (each worker sees its own
        #: traffic), in-flight requests and TLS failures (of traffic; the supervisor adds
        #: its health checks' own). The rest is the supervisor's own: active
        #: health, reloads, readiness, build and process.
        self.worker_families = frozenset(
            {f.name for f in hot}
            | {
                m.name
                for c in (self.ejections, self.ejected, self.inflight, self.tls_errors)
                for m in c.describe()
            }
        )
        if process_metrics:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)

    def declare_geodes(self, geodes: Iterable[tuple[str, str]]) -> None:
        """Emit ``geoproxy_geode_up`` (0) for every (geode, region) before any check."""
        for name, region in geodes:
            self.geode_up.labels(name, region).set(0)
            self.ejected.labels(name, region).set(0)

    def forget_geodes(self, geodes: Iterable[tuple[str, str]]) -> None:
        """Drop the per-geode gauges of geodes a reload removed."""
        for name, region in geodes:
            for gauge in (self.geode_up, self.ejected):
                with contextlib.suppress(KeyError):  # never declared: nothing to drop
                    gauge.remove(name, region)


def worker_families() -> frozenset[str]:
    """``Metrics.worker_families``, as ``Metric.name`` (counters without ``_total``)."""
    return Metrics(CollectorRegistry(), process_metrics=False).worker_families


class WorkerMetrics:
    """The supervisor's metrics about its worker processes (``geoproxy run --workers``)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.running = Gauge(
            "geoproxy_workers", "Worker processes serving the proxy listener.", registry=registry
        )
        self.restarts = Counter(
            "geoproxy_worker_restarts",
            "Worker processes that exited unexpectedly and were started again.",
            registry=registry,
        )
