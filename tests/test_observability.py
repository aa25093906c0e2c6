"""Observability over real sockets: metrics after real traffic, the admin listener
(/healthz /readyz /metrics /geodes /status /route), the access log and ``geoproxy route``.

Every proxy gets a fresh ``CollectorRegistry`` (the ``proxy_factory`` fixture); values are
read with ``registry.get_sample_value`` or by parsing the real ``/metrics`` exposition.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
import shlex
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from datetime import datetime
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from test_forwarding import mark_unhealthy, start, three_geodes
from yarl import URL

from geoproxy import __version__
from geoproxy.config import loader as config_mod
from geoproxy.process.app import Gateway

from conftest import FakeGeode, GeodeFactory, Proxy, ProxyFactory, base_config, geode_entry

WriteConfig = Callable[..., Path]
MakeMmdb = Callable[..., Path]
Setup = Callable[[Proxy, tuple[FakeGeode, FakeGeode, FakeGeode]], Awaitable[None]]


# --- helpers -----------------------------------------------------------------------------


async def eventually(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Poll ``predicate`` until it holds; fail with ``what`` after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.01)


async def settled(proxy: Proxy) -> None:
    """Wait until no request is in flight. The middleware decrements the gauge and records
    metrics and the access-log line in one synchronous step, so once the gauge is back to 0
    after the client got its response, that request is fully accounted for."""
    await eventually(
        lambda: proxy.sample("geoproxy_inflight_requests") == 0,
        "geoproxy_inflight_requests to return to 0",
    )


def series(registry: CollectorRegistry, sample: str, *labels: str) -> dict[tuple[str, ...], float]:
    """Every non-zero sample called ``sample``, keyed by the given label values in order."""
    out: dict[tuple[str, ...], float] = {}
    for family in registry.collect():
        for s in family.samples:
            if s.name == sample and s.value:
                out[tuple(s.labels[name] for name in labels)] = s.value
    return out


def exact(registry: CollectorRegistry, sample: str, labels: dict[str, str]) -> float | None:
    """A sample's value, or None when the labelled series is not exported at all."""
    return registry.get_sample_value(sample, labels)


async def get_json(
    http: aiohttp.ClientSession, url: str, **kwargs: Any
) -> tuple[int, dict[str, Any]]:
    async with http.get(url, **kwargs) as resp:
        assert resp.content_type == "application/json", await resp.text()
        return resp.status, await resp.json()


async def refuse_connections(*geodes: FakeGeode) -> None:
    """Close the geodes' servers: still healthy on the board, but connections are refused."""
    for g in geodes:
        assert g.server is not None
        await g.server.close()


@contextlib.asynccontextmanager
async def raw_geode(reply: bytes) -> AsyncIterator[str]:
    """A loopback server that answers every request with ``reply`` verbatim (malformed
    HTTP included) and closes; yields its URL."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(reply)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def access_lines() -> Iterator[list[str]]:
    """Messages logged on ``geoproxy.access`` during the test (whatever else configured
    that logger, e.g. ``propagate = False`` after a CLI run in this process)."""
    logger = logging.getLogger("geoproxy.access")
    handler = _Lines()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler.lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


# --- metrics after real traffic ----------------------------------------------------------


async def _healthy(proxy: Proxy, geodes: tuple[FakeGeode, FakeGeode, FakeGeode]) -> None:
    pass


async def _home_unhealthy(proxy: Proxy, geodes: tuple[FakeGeode, FakeGeode, FakeGeode]) -> None:
    await mark_unhealthy(proxy, geodes[0])


async def _all_unhealthy(proxy: Proxy, geodes: tuple[FakeGeode, FakeGeode, FakeGeode]) -> None:
    await mark_unhealthy(proxy, *geodes)


async def _all_refuse(proxy: Proxy, geodes: tuple[FakeGeode, FakeGeode, FakeGeode]) -> None:
    await refuse_connections(*geodes)


@pytest.mark.parametrize(
    ("setup", "overrides", "country", "status", "geode", "region", "decision"),
    [
        (_healthy, {}, "FR", 200, "eu-1", "eu-west", "home"),
        (_home_unhealthy, {}, "FR", 200, "us-1", "eu-west", "fallback"),
        (_all_unhealthy, {}, "FR", 503, "none", "eu-west", "none_healthy"),
        (_all_refuse, {}, "JP", 502, "none", "ap-northeast", "all_failed"),
        (
            _all_unhealthy,
            {"forwarding": {"when_none_healthy": "try_all"}},
            "JP",
            200,
            "ap-1",
            "ap-northeast",
            "panic",
        ),
    ],
    ids=[
        "home",
        "fallback-when-home-unhealthy",
        "none-healthy-503",
        "all-refuse-502",
        "panic-when-none-healthy",
    ],
)
async def test_request_counts_its_routing_decision_geode_and_status_class(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    setup: Setup,
    overrides: dict[str, Any],
    country: str,
    status: int,
    geode: str,
    region: str,
    decision: str,
) -> None:
    geodes = await three_geodes(geode_factory)
    proxy = await start(proxy_factory, list(geodes), **overrides)
    await setup(proxy, geodes)
    async with http.get(f"{proxy.url}/whoami", headers={"CF-IPCountry": country}) as resp:
        assert resp.status == status
        assert resp.headers.get("X-Geoproxy-Geode", "none") == geode
    await settled(proxy)
    reg = proxy.registry
    assert series(
        reg, "geoproxy_routing_decisions_total", "client_region", "geode", "decision"
    ) == {(region, geode, decision): 1}
    assert series(reg, "geoproxy_requests_total", "geode", "code_class") == {
        (geode, f"{status // 100}xx"): 1
    }
    assert series(reg, "geoproxy_request_duration_seconds_count", "geode") == {(geode,): 1}


@pytest.mark.parametrize(
    ("headers", "overrides", "expected"),
    [
        ({"CF-IPCountry": "FR"}, {}, {("cf-ipcountry", "ok"): 1}),
        ({"X-Client-Region": "us-east"}, {}, {("x-client-region", "ok"): 1}),
        ({"CF-IPCountry": "XX"}, {}, {("cf-ipcountry", "unknown"): 1, ("default", "ok"): 1}),
        ({"CF-IPCountry": "garbage!"}, {}, {("cf-ipcountry", "invalid"): 1, ("default", "ok"): 1}),
        (
            {"X-Client-Region": "ZZ", "CF-IPCountry": "JP"},
            {},
            {("x-client-region", "invalid"): 1, ("cf-ipcountry", "ok"): 1},
        ),
        (
            {"CF-IPCountry": "FR", "X-Client-Region": "us-east"},
            {"trusted_proxies": ["10.0.0.0/8"]},
            {
                ("x-client-region", "untrusted"): 1,
                ("cf-ipcountry", "untrusted"): 1,
                ("default", "ok"): 1,
            },
        ),
        ({}, {}, {("default", "ok"): 1}),
    ],
    ids=[
        "cf-ok",
        "xcr-ok",
        "cf-xx-unknown",
        "cf-garbage-invalid",
        "xcr-invalid-then-cf",
        "untrusted-peer",
        "no-source-default",
    ],
)
async def test_region_resolution_results_are_counted_per_source(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    headers: dict[str, str],
    overrides: dict[str, Any],
    expected: dict[tuple[str, str], float],
) -> None:
    geodes = await three_geodes(geode_factory)
    proxy = await start(proxy_factory, list(geodes), **overrides)
    async with http.get(f"{proxy.url}/whoami", headers=headers) as resp:
        assert resp.status == 200
    await settled(proxy)
    assert (
        series(proxy.registry, "geoproxy_region_resolutions_total", "source", "result") == expected
    )


@pytest.mark.parametrize(
    ("forwarded_for", "expected"),
    [
        ("216.160.83.56", {("geoip", "ok"): 1}),
        ("10.0.0.7", {("geoip", "unknown"): 1, ("default", "ok"): 1}),
    ],
    ids=["public-ip-found", "private-ip-unknown"],
)
async def test_geoip_resolution_results_are_counted(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    make_mmdb: MakeMmdb,
    forwarded_for: str,
    expected: dict[tuple[str, str], float],
) -> None:
    geodes = await three_geodes(geode_factory)
    proxy = await start(proxy_factory, list(geodes), geoip={"database": str(make_mmdb())})
    async with http.get(f"{proxy.url}/whoami", headers={"X-Forwarded-For": forwarded_for}) as resp:
        assert resp.status == 200
    await settled(proxy)
    assert (
        series(proxy.registry, "geoproxy_region_resolutions_total", "source", "result") == expected
    )


async def test_geoip_lookup_that_fails_is_counted_as_error_not_unknown(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    make_broken_mmdb: MakeMmdb,
) -> None:
    geodes = await three_geodes(geode_factory)
    database = make_broken_mmdb(["2a02:cf40::/29"])  # FR's record: past the load probe
    proxy = await start(proxy_factory, list(geodes), geoip={"database": str(database)})
    for client in ("2a02:cf40::1", "8.8.8.8"):
        async with http.get(f"{proxy.url}/whoami", headers={"X-Forwarded-For": client}) as resp:
            assert resp.status == 200  # the default region serves, never a 500
            assert resp.headers["X-Geoproxy-Geode"] == "eu-1"
    await settled(proxy)
    assert series(proxy.registry, "geoproxy_region_resolutions_total", "source", "result") == {
        ("geoip", "error"): 1,
        ("geoip", "unknown"): 1,
        ("default", "ok"): 2,
    }


async def _home_refuses(proxy: Proxy, geodes: tuple[FakeGeode, FakeGeode, FakeGeode]) -> None:
    await refuse_connections(geodes[0])


async def _home_answers_503(proxy: Proxy, geodes: tuple[FakeGeode, FakeGeode, FakeGeode]) -> None:
    geodes[0].force_status = 503


@pytest.mark.parametrize(
    ("setup", "attempts", "failovers"),
    [
        (_healthy, {("eu-1", "response"): 1}, {}),
        (
            _home_refuses,
            {("eu-1", "connect_error"): 1, ("us-1", "response"): 1},
            {("eu-1", "us-1"): 1},
        ),
        (
            _home_answers_503,
            {("eu-1", "retry_status"): 1, ("us-1", "response"): 1},
            {("eu-1", "us-1"): 1},
        ),
    ],
    ids=["home-answers", "home-refuses-connections", "home-answers-503-to-get"],
)
async def test_upstream_attempts_and_failovers_are_counted(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    setup: Setup,
    attempts: dict[tuple[str, str], float],
    failovers: dict[tuple[str, str], float],
) -> None:
    geodes = await three_geodes(geode_factory)
    proxy = await start(proxy_factory, list(geodes))
    await setup(proxy, geodes)
    async with http.get(f"{proxy.url}/whoami", headers={"CF-IPCountry": "FR"}) as resp:
        assert resp.status == 200
        served = resp.headers["X-Geoproxy-Geode"]
    await settled(proxy)
    reg = proxy.registry
    assert series(reg, "geoproxy_upstream_attempts_total", "geode", "outcome") == attempts
    assert series(reg, "geoproxy_failovers_total", "from_geode", "to_geode") == failovers
    assert (served, "response") in attempts


async def test_geode_up_is_exported_as_0_for_every_geode_before_startup_health(
    write_config: WriteConfig, dead_url: str, http: aiohttp.ClientSession
) -> None:
    geodes = [
        ("eu-1", "eu-west"),
        ("eu-2", "eu-west"),
        ("us-1", "us-east"),
        ("ap-1", "ap-northeast"),
    ]
    cfg = config_mod.load(
        write_config(base_config([{"name": n, "region": r, "url": dead_url} for n, r in geodes]))
    )
    registry = CollectorRegistry()
    gateway = Gateway(cfg, registry=registry)  # not started: no health check ran
    for name, region in geodes:
        assert exact(registry, "geoproxy_geode_up", {"geode": name, "region": region}) == 0
    assert (
        exact(
            registry,
            "geoproxy_build_info",
            {"version": __version__, "aiohttp": aiohttp.__version__, "mode": "lean"},
        )
        == 1
    )
    # The admin listener of a proxy still starting: alive, not ready, geode_up exported.
    admin = TestServer(gateway.admin_app(), host="127.0.0.1")
    await admin.start_server()
    try:
        base = str(admin.make_url("")).rstrip("/")
        assert await get_json(http, f"{base}/healthz") == (200, {"status": "ok"})
        assert await get_json(http, f"{base}/readyz") == (
            503,
            {"ready": False, "reason": "first health round running"},
        )
        async with http.get(f"{base}/metrics") as resp:
            text = await resp.text()
        up = {
            (s.labels["geode"], s.labels["region"]): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "geoproxy_geode_up"
        }
        assert up == {g: 0.0 for g in geodes}
    finally:
        await admin.close()


async def test_geode_up_health_checks_and_transitions_follow_health(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory
) -> None:
    eu, us, ap = await three_geodes(geode_factory)
    proxy = await start(proxy_factory, [eu, us, ap])
    for g in (eu, us, ap):  # the start-up round passed once: healthy at once
        assert proxy.sample("geoproxy_geode_up", geode=g.name, region=g.region) == 1
        assert proxy.sample("geoproxy_geode_transitions_total", geode=g.name, to="healthy") == 1
        assert proxy.sample("geoproxy_health_checks_total", geode=g.name, result="pass") >= 1
        assert proxy.sample("geoproxy_health_check_duration_seconds_count", geode=g.name) >= 1
    assert proxy.sample("geoproxy_health_checks_total", geode="eu-1", result="fail") == 0

    await mark_unhealthy(proxy, eu)
    assert proxy.sample("geoproxy_geode_up", geode="eu-1", region="eu-west") == 0
    assert proxy.sample("geoproxy_geode_up", geode="us-1", region="us-east") == 1
    assert proxy.sample("geoproxy_geode_transitions_total", geode="eu-1", to="unhealthy") == 1
    threshold = proxy.gateway.config.health_check.unhealthy_threshold
    assert proxy.sample("geoproxy_health_checks_total", geode="eu-1", result="fail") >= threshold

    eu.health_status = 200
    checker = proxy.gateway.checker
    assert checker is not None
    for _ in range(proxy.gateway.config.health_check.healthy_threshold):
        await checker.check_once()
    assert proxy.sample("geoproxy_geode_up", geode="eu-1", region="eu-west") == 1
    assert proxy.sample("geoproxy_geode_transitions_total", geode="eu-1", to="healthy") == 2
    assert proxy.sample("geoproxy_geode_transitions_total", geode="us-1", to="unhealthy") == 0


async def test_inflight_requests_is_1_during_a_slow_request_and_0_after(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    geodes = await three_geodes(geode_factory)
    proxy = await start(proxy_factory, list(geodes))
    assert proxy.sample("geoproxy_inflight_requests") == 0

    async def slow() -> int:
        async with http.get(f"{proxy.url}/slow?delay=1") as resp:
            await resp.read()
            return resp.status

    task = asyncio.create_task(slow())
    try:
        await eventually(
            lambda: geodes[0].hits["/slow"] == 1, "the geode to receive the slow request"
        )
        assert not task.done()  # the geode is still sleeping on it
        assert proxy.sample("geoproxy_inflight_requests") == 1
    finally:
        status = await task
    assert status == 200
    await settled(proxy)
    for _ in range(3):
        async with http.get(f"{proxy.url}/whoami") as resp:
            assert resp.status == 200
    await settled(proxy)
    assert proxy.sample("geoproxy_requests_total", geode="eu-1", code_class="2xx") == 4


async def test_build_info_is_1_with_the_versions_and_the_mode(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory
) -> None:
    proxy = await start(proxy_factory, list(await three_geodes(geode_factory)))
    assert series(proxy.registry, "geoproxy_build_info", "version", "aiohttp", "mode") == {
        (__version__, aiohttp.__version__, "lean"): 1
    }


async def test_labels_stay_bounded_whatever_the_clients_send(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    geodes = await three_geodes(geode_factory)
    proxy = await start(proxy_factory, list(geodes))
    rng = random.Random(7)
    secrets: list[str] = []
    for _ in range(20):
        path, query, junk = (uuid.uuid4().hex for _ in range(3))
        octets = (
            rng.randrange(1, 223),
            rng.randrange(256),
            rng.randrange(256),
            rng.randrange(1, 255),
        )
        ip = ".".join(map(str, octets))
        secrets += [path, query, junk, ip]
        headers = {
            "X-Forwarded-For": ip,
            "CF-IPCountry": junk,
            "X-Client-Region": f"{junk}-region",
            "User-Agent": f"agent/{junk}",
            "Referer": f"http://example.com/{junk}",
        }
        async with http.get(f"{proxy.url}/{path}?q={query}", headers=headers) as resp:
            assert resp.status == 200
    await settled(proxy)
    async with http.get(f"{proxy.admin_url}/metrics") as resp:
        text = await resp.text()
    values = {
        value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        for value in s.labels.values()
    }
    assert "eu-1" in values  # the traffic is in the exposition...
    leaked = {secret for secret in secrets for value in values if secret in value}
    assert leaked == set()  # ...but nothing the clients chose
    assert (
        proxy.sample("geoproxy_region_resolutions_total", source="cf-ipcountry", result="invalid")
        == 20
    )


# --- admin endpoints over real sockets ---------------------------------------------------


async def test_healthz_and_readyz_answer_200_with_healthy_geodes(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    proxy = await start(proxy_factory, list(await three_geodes(geode_factory)))
    assert await get_json(http, f"{proxy.admin_url}/healthz") == (200, {"status": "ok"})
    assert await get_json(http, f"{proxy.admin_url}/readyz") == (
        200,
        {"ready": True, "healthy_geodes": ["ap-1", "eu-1", "us-1"]},
    )


async def test_readyz_is_503_when_every_geode_is_unhealthy(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    geodes = await three_geodes(geode_factory)
    proxy = await start(proxy_factory, list(geodes))
    await mark_unhealthy(proxy, *geodes[:2])
    assert (await get_json(http, f"{proxy.admin_url}/readyz"))[0] == 200  # one is enough
    await mark_unhealthy(proxy, geodes[2])
    assert await get_json(http, f"{proxy.admin_url}/readyz") == (
        503,
        {"ready": False, "reason": "no healthy geode"},
    )
    assert await get_json(http, f"{proxy.admin_url}/healthz") == (200, {"status": "ok"})


async def test_metrics_endpoint_serves_parsable_prometheus_text(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    proxy = await start(proxy_factory, list(await three_geodes(geode_factory)))
    async with http.get(f"{proxy.url}/whoami", headers={"CF-IPCountry": "JP"}) as resp:
        assert resp.status == 200
    await settled(proxy)
    async with http.get(f"{proxy.admin_url}/metrics") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/plain"
        assert resp.charset == "utf-8"
        assert re.search(r";\s*version=\d", resp.headers["Content-Type"])
        text = await resp.text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, kind in [
        ("geoproxy_requests", "counter"),
        ("geoproxy_request_duration_seconds", "histogram"),
        ("geoproxy_routing_decisions", "counter"),
        ("geoproxy_region_resolutions", "counter"),
        ("geoproxy_upstream_attempts", "counter"),
        ("geoproxy_failovers", "counter"),
        ("geoproxy_geode_up", "gauge"),
        ("geoproxy_health_checks", "counter"),
        ("geoproxy_health_check_duration_seconds", "histogram"),
        ("geoproxy_geode_transitions", "counter"),
        ("geoproxy_inflight_requests", "gauge"),
        ("geoproxy_build_info", "gauge"),
        ("process_cpu_seconds", "counter"),
    ]:
        assert name in families, name
        assert families[name].type == kind, name
    decisions = {
        tuple(sorted(s.labels.items())): s.value
        for s in families["geoproxy_routing_decisions"].samples
        if s.name == "geoproxy_routing_decisions_total"
    }
    key = (("client_region", "ap-northeast"), ("decision", "home"), ("geode", "ap-1"))
    assert decisions == {key: 1.0}
    buckets = [
        float(s.labels["le"])
        for s in families["geoproxy_request_duration_seconds"].samples
        if s.name.endswith("_bucket")
    ]
    assert min(buckets) <= 0.001 and max(b for b in buckets if b != float("inf")) >= 30


async def test_geodes_endpoint_lists_every_geode_with_its_health(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    eu, us, ap = await three_geodes(geode_factory)
    proxy = await start(proxy_factory, [eu, us, ap])
    await mark_unhealthy(proxy, ap)
    before = time.time()
    status, body = await get_json(http, f"{proxy.admin_url}/geodes")
    assert status == 200
    by_name = {g["name"]: g for g in body["geodes"]}
    assert list(by_name) == ["eu-1", "us-1", "ap-1"]
    fields = {
        "name",
        "region",
        "url",
        "weight",
        "healthy",
        "checked",
        "consecutive_passes",
        "consecutive_failures",
        "last_check",
        "last_latency_seconds",
        "last_error",
        "takes_traffic",
        "ejected",
        "ejected_until",
        "ejections",
        "consecutive_passive_failures",
        "state",
        "since",
    }
    for fake in (eu, us, ap):
        g = by_name[fake.name]
        assert set(g) == fields
        assert (g["region"], g["url"], g["weight"], g["checked"]) == (
            fake.region,
            fake.url,
            1,
            True,
        )
        assert before - 60 < g["last_check"] <= time.time()
        assert g["last_latency_seconds"] > 0
    assert by_name["eu-1"]["healthy"] is True
    assert (by_name["eu-1"]["state"], by_name["ap-1"]["state"]) == ("up", "down")
    assert before - 60 < by_name["ap-1"]["since"] <= time.time()
    assert by_name["eu-1"]["takes_traffic"] is True
    assert by_name["eu-1"]["ejected"] is False
    assert by_name["eu-1"]["consecutive_passes"] >= 1
    assert by_name["eu-1"]["consecutive_failures"] == 0
    assert by_name["eu-1"]["last_error"] is None
    assert by_name["ap-1"]["healthy"] is False
    assert by_name["ap-1"]["consecutive_passes"] == 0
    assert by_name["ap-1"]["consecutive_failures"] >= 2
    assert by_name["ap-1"]["last_error"] == "unexpected status 500"


class _Tables(HTMLParser):
    """Every <table> as a list of rows: (the row's class, the text of each <td>)."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[tuple[str | None, list[str]]]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append((dict(attrs).get("class"), []))
        elif tag == "td":
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None:
            self.tables[-1][-1][1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


SCRIPT = b"<script>alert(1)</script>"


async def test_status_page_shows_one_row_per_geode_and_escapes_error_text(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    eu = await geode_factory("eu-1", "eu-west")
    us = await geode_factory("us-1", "us-east")
    # ap-1 answers its health check with garbage that aiohttp quotes in its error message.
    async with raw_geode(SCRIPT + b"\r\n\r\n") as ap_url:
        proxy = await proxy_factory(
            base_config(
                [
                    geode_entry(eu),
                    geode_entry(us),
                    {"name": "ap-1", "region": "ap-northeast", "url": ap_url},
                ]
            )
        )
        last_error = proxy.gateway.board.states["ap-1"].last_error
        assert last_error is not None and SCRIPT.decode() in last_error  # the precondition
        for _ in range(2):
            async with http.get(f"{proxy.url}/whoami", headers={"CF-IPCountry": "FR"}) as resp:
                assert resp.status == 200
        await settled(proxy)
        await mark_unhealthy(proxy, us)
        async with http.get(f"{proxy.admin_url}/status") as resp:
            assert resp.status == 200
            assert resp.content_type == "text/html"
            html = await resp.text()

    assert re.search(r"<meta\s+http-equiv=[\"']?refresh[\"']?\s+content=[\"']?\d", html)
    assert not re.search(r"\b(src|href)\s*=", html, re.IGNORECASE)  # no external assets
    assert "@import" not in html and "url(" not in html
    assert "<script" not in html.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html

    parser = _Tables()
    parser.feed(html)
    geode_rows = [(css, cells) for css, cells in parser.tables[0] if cells]
    assert [cells[0] for _, cells in geode_rows] == ["eu-1", "us-1", "ap-1"]
    state = {cells[0]: (css, cells[1], cells[2]) for css, cells in geode_rows}
    assert state == {
        "eu-1": ("up", "eu-west", "UP"),
        "us-1": ("down", "us-east", "DOWN"),
        "ap-1": ("down", "ap-northeast", "DOWN"),
    }
    requests = {cells[0]: cells[8] for _, cells in geode_rows}
    assert requests == {"eu-1": "2", "us-1": "0", "ap-1": "0"}
    assert {cells[0] for _, cells in geode_rows if "alert(1)" in cells[-1]} == {"ap-1"}
    region_rows = [cells for _, cells in parser.tables[1] if cells]
    assert sorted(cells[0] for cells in region_rows) == ["ap-northeast", "eu-west", "us-east"]


async def test_start_up_names_the_geodes_that_failed_the_first_round_at_warning(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    dead_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    eu = await geode_factory("eu-1", "eu-west")
    caplog.set_level(logging.INFO, logger="geoproxy")
    await proxy_factory(
        base_config(
            [
                geode_entry(eu),
                {"name": "us-1", "region": "us-east", "url": dead_url},
                {"name": "ap-1", "region": "ap-northeast", "url": "http://no-such-geode.invalid"},
            ]
        )
    )
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and r.getMessage().startswith("first health round")
    ]
    assert warnings == [
        "first health round: 2 geodes of 3 failed: us-1 (us-east): connect failed: "
        "Connection refused; ap-1 (ap-northeast): cannot resolve host no-such-geode.invalid: "
        "Name or service not known"
    ]


async def _status_tables(http: aiohttp.ClientSession, proxy: Proxy) -> tuple[str, _Tables]:
    async with http.get(f"{proxy.admin_url}/status") as resp:
        assert resp.status == 200
        html = await resp.text()
    parser = _Tables()
    parser.feed(html)
    return html, parser


async def test_status_geodes_and_metrics_agree_on_an_ejected_a_down_and_an_up_geode(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    """A geode passive health ejected reads EJECTED (until when) on /status, "ejected" in
    /geodes and geode_up 0 / geode_ejected 1 in /metrics; the page's request counts are
    /metrics' counts."""
    eu, us, ap = await three_geodes(geode_factory)
    proxy = await start(
        proxy_factory,
        [eu, us, ap],
        outlier_detection={"consecutive_failures": 2, "base_ejection_time": "1h"},
        # No active check during the test: a pass would re-admit the ejected geode.
        health_check={"interval": "1h", "timeout": "500ms", "unhealthy_threshold": 2},
    )
    await mark_unhealthy(proxy, ap)
    eu.force_status = 503  # its /health still passes
    for _ in range(2):
        async with http.get(f"{proxy.url}/whoami", headers={"CF-IPCountry": "FR"}) as resp:
            assert resp.status == 200  # moved on to us-1
    await settled(proxy)
    html, tables = await _status_tables(http, proxy)
    rows = {cells[0]: (css, cells) for css, cells in tables.tables[0] if cells}
    status_word = {name: cells[2].split()[0].lower() for name, (_, cells) in rows.items()}
    assert status_word == {"eu-1": "ejected", "us-1": "up", "ap-1": "down"}
    assert {name: css for name, (css, _) in rows.items()} == {
        "eu-1": "ejected",
        "us-1": "up",
        "ap-1": "down",
    }
    until = proxy.gateway.board.states["eu-1"].ejected_until
    assert until is not None
    assert rows["eu-1"][1][2].startswith(
        "EJECTED until " + time.strftime("%H:%M:%S", time.localtime(until))
    )
    assert rows["ap-1"][1][3].startswith("down since ")
    assert "1 of 3 geodes take traffic" in html
    _, listed = await get_json(http, f"{proxy.admin_url}/geodes")
    states = {g["name"]: g for g in listed["geodes"]}
    async with http.get(f"{proxy.admin_url}/metrics") as resp:
        families = {f.name: f for f in text_string_to_metric_families(await resp.text())}

    def sample(family: str, sample: str, **labels: str) -> float:
        return sum(
            s.value
            for s in families[family].samples
            if s.name == sample and labels.items() <= s.labels.items()
        )

    for name, word in status_word.items():
        assert states[name]["state"] == word
        assert sample("geoproxy_geode_up", "geoproxy_geode_up", geode=name) == (word == "up")
        assert sample("geoproxy_geode_ejected", "geoproxy_geode_ejected", geode=name) == (
            word == "ejected"
        )
        assert float(rows[name][1][8]) == sample(
            "geoproxy_requests", "geoproxy_requests_total", geode=name
        )
    assert states["eu-1"]["ejected_until"] == until


async def test_status_page_shows_readiness_draining_and_a_failed_reload(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    write_config: WriteConfig,
) -> None:
    eu, us, ap = await three_geodes(geode_factory)
    data = base_config([geode_entry(g) for g in (eu, us, ap)])
    proxy = await proxy_factory(data)
    html, _ = await _status_tables(http, proxy)
    assert "<div>ready</div>" in html and "no reload since start-up" in html
    path = proxy.gateway.config.path
    path.write_text("regions: [unclosed\n")
    assert not await proxy.gateway.reload_from_file("SIGHUP")
    html, _ = await _status_tables(http, proxy)
    assert re.search(
        r"last reload \(SIGHUP\) at [\d:]+ FAILED; the running config stays: "
        + re.escape(str(path)),
        html,
    ), html
    data["countries"] = {**data["countries"], "FR": "us-east"}
    write_config(data)
    assert await proxy.gateway.reload_from_file("config file changed")
    html, _ = await _status_tables(http, proxy)
    assert re.search(
        r"last reload \(config file changed\) at [\d:]+: ok — countries moved: "
        r"FR eu-west -&gt; us-east",
        html,
    ), html
    proxy.gateway.start_draining()
    html, _ = await _status_tables(http, proxy)
    assert "not ready: shutting down" in html and "draining (shutting down)" in html


async def test_status_page_shows_recent_rates_and_tells_a_region_without_geodes_from_one_all_down(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
) -> None:
    """ap-northeast has no geodes (served through its fallback by design); us-east has one,
    down. Half the requests come from Japan: served outside their region."""
    eu = await geode_factory("eu-1", "eu-west")
    us = await geode_factory("us-1", "us-east")
    proxy = await start(
        proxy_factory,
        [eu, us],
        regions={
            "eu-west": {"fallback": ["us-east"]},
            "us-east": {"fallback": ["eu-west"]},
            "ap-northeast": {"fallback": ["eu-west"]},
        },
    )
    await mark_unhealthy(proxy, us)
    await asyncio.sleep(1.1)  # the rates need a second of history since the admin started
    for country in ("FR", "JP") * 3:
        async with http.get(f"{proxy.url}/whoami", headers={"CF-IPCountry": country}) as resp:
            assert resp.status == 200
    await settled(proxy)
    html, tables = await _status_tables(http, proxy)
    regions = {cells[0]: (css, cells[3]) for css, cells in tables.tables[1] if cells}
    assert regions == {
        "eu-west": ("up", "ok"),
        "us-east": ("down", "ALL DOWN: served by its fallback"),
        "ap-northeast": ("fallback", "no geodes by design: served through its fallback"),
    }
    assert re.search(
        r"last \d+ s: \d+\.\d\d requests/s routed, 0\.0 failovers/min, 50\.0 % "
        "served outside the client's region",
        html,
    ), html
    rows = {cells[0]: cells for _, cells in tables.tables[0] if cells}
    assert re.fullmatch(r"\d+\.\d\d/s", rows["eu-1"][6]) and rows["eu-1"][6] != "0.00/s"
    assert (rows["us-1"][6], rows["eu-1"][7]) == ("0.00/s", "0.0 %")


@pytest.mark.parametrize(
    ("query", "message"),
    [
        (
            "country=FR&client=1",
            "unknown parameter(s): client "
            "(known: ip, country, region, trusted, home_cookie, tenant, path)",
        ),
        ("ip=not-an-ip", "ip: not an IP address: 'not-an-ip'"),
        ("ip=999.1.1.1", "ip: not an IP address: '999.1.1.1'"),
        ("country=FR&trusted=maybe", "trusted: must be true or false"),
    ],
    ids=["unknown-parameter", "ip-not-an-address", "ip-out-of-range", "trusted-not-bool"],
)
async def test_route_rejects_a_bad_query_with_a_400_json_error(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    query: str,
    message: str,
) -> None:
    proxy = await start(proxy_factory, list(await three_geodes(geode_factory)))
    assert await get_json(http, f"{proxy.admin_url}/route?{query}") == (
        400,
        {
            "error": {
                "status": 400,
                "code": "bad_query",
                "message": message,
            }
        },
    )


# --- /route agrees with what the proxy does ----------------------------------------------


@pytest.mark.parametrize(
    ("query", "headers", "trusted", "expected"),
    [
        ({"country": "FR"}, {"CF-IPCountry": "FR"}, None, "eu-1"),
        ({"country": "JP"}, {"CF-IPCountry": "JP"}, None, "ap-1"),
        ({"country": "US"}, {"CF-IPCountry": "US"}, None, "us-1"),
        ({"country": "jp"}, {"cf-ipcountry": "jp"}, None, "ap-1"),
        (
            {"country": "JP"},
            CIMultiDict([("CF-IPCountry", "JP"), ("CF-IPCountry", "US")]),
            None,
            "ap-1",
        ),
        ({"region": "ap-northeast"}, {"X-Client-Region": "ap-northeast"}, None, "ap-1"),
        (
            {"region": "US", "country": "FR"},
            {"X-Client-Region": "US", "CF-IPCountry": "FR"},
            None,
            "us-1",
        ),
        ({"ip": "216.160.83.56"}, {"X-Forwarded-For": "216.160.83.56"}, None, "us-1"),
        ({"ip": "2001:218::1"}, {"X-Forwarded-For": "203.0.113.9, 2001:218::1"}, None, "ap-1"),
        (
            {"ip": "127.0.0.1", "country": "JP", "region": "us-east", "trusted": "false"},
            {"CF-IPCountry": "JP", "X-Client-Region": "us-east", "X-Forwarded-For": "2001:218::1"},
            ["10.0.0.0/8"],
            "eu-1",
        ),
    ],
    ids=[
        "cf-fr",
        "cf-jp",
        "cf-us",
        "cf-lowercase-header-name",
        "cf-header-twice-first-wins",
        "x-client-region",
        "x-client-region-before-cf",
        "geoip-v4-us",
        "geoip-v6-jp-rightmost",
        "untrusted-peer",
    ],
)
async def test_route_explanation_names_the_geode_that_really_serves(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    make_mmdb: MakeMmdb,
    query: dict[str, str],
    headers: Mapping[str, str],
    trusted: list[str] | None,
    expected: str,
) -> None:
    geodes = await three_geodes(geode_factory)
    overrides: dict[str, Any] = {"geoip": {"database": str(make_mmdb())}}
    if trusted is not None:
        overrides["trusted_proxies"] = trusted
    proxy = await start(proxy_factory, list(geodes), **overrides)

    status, by_query = await get_json(http, f"{proxy.admin_url}/route", params=query)
    assert status == 200
    status, by_headers = await get_json(http, f"{proxy.admin_url}/route", headers=headers)
    assert status == 200
    async with http.get(f"{proxy.url}/whoami", headers=headers) as resp:
        assert resp.status == 200
        served = (resp.headers["X-Geoproxy-Geode"], resp.headers["X-Geoproxy-Region"])
    await settled(proxy)

    for answer in (by_query, by_headers):
        assert (answer["chosen"], answer["chosen_region"]) == served
        assert answer["decision"] == "home"
    assert served[0] == expected
    for key in ("region", "source", "country"):
        assert by_query["resolution"][key] == by_headers["resolution"][key], key
    decided = series(
        proxy.registry, "geoproxy_routing_decisions_total", "client_region", "geode", "decision"
    )
    assert decided == {(by_headers["resolution"]["region"], served[0], "home"): 1}
    assert by_headers["client"]["peer"] == "127.0.0.1"
    assert by_headers["client"]["peer_trusted"] is (trusted is None)


@pytest.mark.parametrize(
    ("unhealthy", "status", "chosen", "decision"),
    [
        (["eu-1"], 200, "us-1", "fallback"),
        (["eu-1", "us-1"], 200, "ap-1", "fallback"),
        (["eu-1", "us-1", "ap-1"], 503, None, "none_healthy"),
    ],
    ids=["home-unhealthy", "home-and-first-fallback-unhealthy", "all-unhealthy"],
)
async def test_route_explanation_follows_health_like_the_proxy(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    unhealthy: list[str],
    status: int,
    chosen: str | None,
    decision: str,
) -> None:
    geodes = await three_geodes(geode_factory)
    proxy = await start(proxy_factory, list(geodes))
    await mark_unhealthy(proxy, *(g for g in geodes if g.name in unhealthy))
    headers = {"CF-IPCountry": "FR"}
    _, by_query = await get_json(http, f"{proxy.admin_url}/route?country=FR")
    _, by_headers = await get_json(http, f"{proxy.admin_url}/route", headers=headers)
    async with http.get(f"{proxy.url}/whoami", headers=headers) as resp:
        assert resp.status == status
        served = resp.headers.get("X-Geoproxy-Geode")
    await settled(proxy)
    assert served == chosen
    for answer in (by_query, by_headers):
        assert (answer["chosen"], answer["decision"]) == (chosen, decision)
        health = {c["geode"]: c["healthy"] for c in answer["candidates"]}
        assert health == {g.name: g.name not in unhealthy for g in geodes}
        assert [c["geode"] for c in answer["candidates"]] == ["eu-1", "us-1", "ap-1"]
    decided = series(
        proxy.registry, "geoproxy_routing_decisions_total", "client_region", "geode", "decision"
    )
    assert decided == {("eu-west", chosen or "none", decision): 1}


# --- access log --------------------------------------------------------------------------

ACCESS_FIELDS = {
    "time",
    "method",
    "path",
    "status",
    "duration_ms",
    "bytes",
    "client_ip",
    "client_region",
    "region_source",
    "geode",
    "decision",
    "attempts",
}


async def test_access_log_writes_one_json_line_per_request(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    access_lines: list[str],
) -> None:
    geodes = await three_geodes(geode_factory)
    proxy = await start(proxy_factory, list(geodes))
    headers = {"CF-IPCountry": "JP", "X-Forwarded-For": "203.0.113.9"}
    async with http.get(f"{proxy.url}/whoami?token=s3cret", headers=headers) as resp:
        assert resp.status == 200
        served_bytes = len(await resp.read())
    await settled(proxy)
    await mark_unhealthy(proxy, *geodes)
    async with http.post(f"{proxy.url}/orders?id=7", data=b"x" * 10) as resp:
        assert resp.status == 503
        error_bytes = len(await resp.read())
    await settled(proxy)

    assert len(access_lines) == 2
    served, rejected = (json.loads(line) for line in access_lines)
    assert set(served) == set(rejected) == ACCESS_FIELDS
    assert "s3cret" not in access_lines[0]
    when = datetime.fromisoformat(served.pop("time"))
    assert when.tzinfo is not None and abs(when.timestamp() - time.time()) < 60
    duration = served.pop("duration_ms")
    assert isinstance(duration, float | int) and 0 <= duration < 10_000
    assert served.pop("bytes") == served_bytes > 0
    assert served == {
        "method": "GET",
        "path": "/whoami",
        "status": 200,
        "client_ip": "203.0.113.9",
        "client_region": "ap-northeast",
        "region_source": "cf-ipcountry",
        "geode": "ap-1",
        "decision": "home",
        "attempts": 1,
    }
    del rejected["time"], rejected["duration_ms"]
    assert rejected == {
        "method": "POST",
        "path": "/orders",
        "status": 503,
        "bytes": error_bytes,
        "client_ip": "127.0.0.1",
        "client_region": "eu-west",
        "region_source": "default",
        "geode": None,
        "decision": "none_healthy",
        "attempts": 0,
    }


async def test_access_log_bytes_is_the_body_size_for_relayed_and_own_answers(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    access_lines: list[str],
) -> None:
    geodes = await three_geodes(geode_factory)
    proxy = await start(proxy_factory, list(geodes))
    sizes = []
    async with http.get(f"{proxy.url}/stream?size=5000&chunk=1000") as resp:
        sizes.append(len(await resp.read()))
    await mark_unhealthy(proxy, *geodes)
    async with http.get(f"{proxy.url}/whoami") as resp:
        sizes.append(len(await resp.read()))
    await settled(proxy)
    assert [json.loads(line)["bytes"] for line in access_lines] == sizes == [5000, 126]


async def test_access_log_counts_every_attempt_of_a_failed_over_request(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    access_lines: list[str],
) -> None:
    eu, us, ap = await three_geodes(geode_factory)
    proxy = await start(proxy_factory, [eu, us, ap])
    await refuse_connections(eu, us)
    async with http.get(f"{proxy.url}/whoami", headers={"CF-IPCountry": "FR"}) as resp:
        assert resp.status == 200
    await settled(proxy)
    (line,) = access_lines
    fields = json.loads(line)
    assert (fields["geode"], fields["decision"], fields["attempts"]) == ("ap-1", "fallback", 3)


async def test_plain_access_log_is_key_value_and_one_line_whatever_the_path(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    access_lines: list[str],
) -> None:
    proxy = await start(proxy_factory, list(await three_geodes(geode_factory)), access_log="plain")
    async with http.get(f"{proxy.url}/whoami?q=1", headers={"CF-IPCountry": "US"}) as resp:
        assert resp.status == 200
    # Paths that decode to spaces, quotes and a newline followed by fake fields must
    # neither add fields nor forge a second line.
    for raw in ("/a%20status=999%20geode=%22evil%22", "/b%0Astatus=999%20geode=evil"):
        async with http.get(URL(proxy.url + raw, encoded=True)) as resp:
            await resp.read()
    await settled(proxy)

    assert len(access_lines) == 3
    parsed = []
    for line in access_lines:
        assert "\n" not in line and not line.startswith("{")
        pairs = dict(token.split("=", 1) for token in shlex.split(line))
        assert set(pairs) == ACCESS_FIELDS, line
        parsed.append(pairs)
    first, spaced, newline = parsed
    assert {k: first[k] for k in ("method", "path", "status", "geode", "decision")} == {
        "method": "GET",
        "path": "/whoami",
        "status": "200",
        "geode": "us-1",
        "decision": "home",
    }
    assert spaced["path"] == '/a status=999 geode="evil"'
    assert (spaced["status"], spaced["geode"]) == ("200", "eu-1")
    assert newline["path"] == "/b\\nstatus=999 geode=evil"  # JSON-escaped, still one field
    assert newline["status"] != "999" and newline["geode"] != "evil"


async def test_access_log_off_logs_nothing(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    access_lines: list[str],
) -> None:
    proxy = await start(proxy_factory, list(await three_geodes(geode_factory)), access_log="off")
    for path in ("/whoami", "/status/500", "/nothing?x=1"):
        async with http.get(f"{proxy.url}{path}") as resp:
            await resp.read()
    await settled(proxy)
    assert access_lines == []
    # Off means no log line, not no metrics.
    assert proxy.sample("geoproxy_requests_total", geode="eu-1", code_class="2xx") == 2
    assert proxy.sample("geoproxy_requests_total", geode="eu-1", code_class="5xx") == 1


# --- geoproxy route (a real process) -----------------------------------------------------


def run_route(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "geoproxy", "route", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def route_config(write_config: WriteConfig, make_mmdb: MakeMmdb, dead_url: str) -> Path:
    """A config whose geodes need not run: ``route`` never connects to them."""
    geodes = [
        {"name": "eu-1", "region": "eu-west", "url": dead_url},
        {"name": "us-1", "region": "us-east", "url": dead_url},
        {"name": "ap-1", "region": "ap-northeast", "url": dead_url},
    ]
    return write_config(base_config(geodes, geoip={"database": str(make_mmdb())}))


def test_route_cli_names_the_chosen_geode_and_region_for_a_country(route_config: Path) -> None:
    done = run_route("--config", str(route_config), "--country", "JP")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "client region: ap-northeast (source: cf-ipcountry, country JP)" in lines
    assert "chosen geode: ap-1 (home)" in lines
    assert "try order: ap-northeast -> us-east -> eu-west" in lines


def test_route_cli_json_parses_and_matches_the_text(route_config: Path) -> None:
    done = run_route("--config", str(route_config), "--country", "JP", "--json")
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert (answer["chosen"], answer["chosen_region"], answer["decision"]) == (
        "ap-1",
        "ap-northeast",
        "home",
    )
    assert answer["resolution"]["source"] == "cf-ipcountry"
    assert answer["attempt_order"] == ["ap-1", "us-1", "eu-1"]


@pytest.mark.parametrize(
    ("ip", "geode", "region", "source"),
    [
        ("216.160.83.56", "us-1", "us-east", "geoip"),
        ("2001:218::1", "ap-1", "ap-northeast", "geoip"),
        ("175.16.199.7", "ap-1", "ap-northeast", "geoip"),  # continent rule
        ("10.0.0.7", "eu-1", "eu-west", "default"),
    ],
    ids=["v4-us", "v6-jp", "v4-continent", "private-default"],
)
def test_route_cli_picks_by_geoip_of_the_given_ip(
    route_config: Path, ip: str, geode: str, region: str, source: str
) -> None:
    done = run_route("--config", str(route_config), "--ip", ip, "--json")
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert (answer["chosen"], answer["resolution"]["region"], answer["resolution"]["source"]) == (
        geode,
        region,
        source,
    )
    assert answer["client"]["ip"] == ip


@pytest.mark.parametrize(
    ("args", "note"),
    [
        (
            ["--region", "mars"],
            "--region 'mars' is unknown: neither a region (eu-west, us-east, "
            "ap-northeast) nor an ISO 3166-1 alpha-2 country code; ignored",
        ),
        (
            ["--country", "ZZ"],
            "--country 'ZZ' is unknown: not an ISO 3166-1 alpha-2 country code; ignored",
        ),
        (
            ["--country", "XX"],
            "--country 'XX' means an unknown country (Cloudflare's XX or T1); ignored",
        ),
        (["--ip", "10.0.0.7"], "--ip '10.0.0.7' was not looked up: a private or reserved address"),
        (
            ["--ip", "8.8.8.8"],
            "--ip '8.8.8.8' is not in the GeoIP database, or has no country or continent there",
        ),
        (
            ["--region", "eu-west", "--ip", "216.160.83.56"],
            "--ip '216.160.83.56' was not consulted: x-client-region decided first",
        ),
    ],
    ids=[
        "unknown-region",
        "unknown-country",
        "unknown-by-design",
        "private-ip",
        "ip-not-in-database",
        "ip-after-a-deciding-header",
    ],
)
def test_route_cli_says_which_input_did_not_decide_and_why(
    route_config: Path, args: list[str], note: str
) -> None:
    done = run_route("--config", str(route_config), *args)
    assert done.returncode == 0
    assert done.stderr == f"geoproxy route: {note}\n"
    assert "chosen geode:" in done.stdout


def test_route_cli_says_an_ip_is_ignored_without_a_geoip_database(
    write_config: WriteConfig, dead_url: str
) -> None:
    path = write_config(
        base_config(
            [{"name": "eu-1", "region": "eu-west", "url": dead_url}],
            regions={"eu-west": None},
            countries={},
            continents={},
        )
    )
    done = run_route("--config", str(path), "--ip", "216.160.83.56", "--json")
    assert done.returncode == 0
    assert json.loads(done.stdout)["resolution"]["source"] == "default"
    assert done.stderr == (
        "geoproxy route: --ip '216.160.83.56' was ignored: the config sets no geoip.database\n"
    )


def test_route_cli_rejects_a_bad_ip_with_a_clear_message(route_config: Path) -> None:
    done = run_route("--config", str(route_config), "--ip", "not-an-ip")
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr == "geoproxy: --ip: not an IP address: 'not-an-ip'\n"


@pytest.mark.parametrize(
    ("mutate", "error"),
    [
        (
            lambda d: d["geodes"][0].update(region="eu-wst"),
            "geodes[0].region: unknown region 'eu-wst'",
        ),
        (lambda d: d.update(default_regon="eu-west"), "default_regon: unknown key"),
    ],
    ids=["unknown-region", "unknown-key"],
)
def test_route_cli_exits_1_on_an_invalid_config(
    write_config: WriteConfig, dead_url: str, mutate: Callable[[dict[str, Any]], None], error: str
) -> None:
    data = base_config(
        [
            {"name": "eu-1", "region": "eu-west", "url": dead_url},
            {"name": "us-1", "region": "us-east", "url": dead_url},
            {"name": "ap-1", "region": "ap-northeast", "url": dead_url},
        ]
    )
    mutate(data)
    path = write_config(data)
    done = run_route("--config", str(path), "--country", "JP")
    assert done.returncode == 1
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith(f"geoproxy: {path}: configuration is invalid\n")
    assert f"{path}: {error}" in done.stderr


def test_route_cli_exits_1_when_the_config_file_is_missing(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.yaml"
    done = run_route("--config", str(path), "--country", "JP")
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "cannot read" in done.stderr


async def test_a_request_the_client_abandons_is_logged_as_499(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    access_lines: list[str],
) -> None:
    geodes = await three_geodes(geode_factory)
    proxy = await start(proxy_factory, list(geodes))
    async with aiohttp.ClientSession() as client:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await client.get(f"{proxy.url}/slow?delay=2")
    await settled(proxy)
    assert [json.loads(line)["status"] for line in access_lines] == [499]
    assert proxy.sample("geoproxy_requests_total", geode="none", code_class="4xx") == 1
