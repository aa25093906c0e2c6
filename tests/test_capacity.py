"""Capacity spill and latency within a region (issue 17, item 4): per-geode ``max_inflight``
and the ``Geoproxy-Load`` report, the ``spill`` and ``over_capacity`` decisions, the
``peak_ewma`` balance, and the in-flight counts (one ``Ticket`` per request) returning to
zero however a request ends, on both request paths, through real sockets."""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from geoproxy.config import loader as config_mod
from geoproxy.config.model import Topology
from geoproxy.errors import ConfigError
from geoproxy.health.load import LOAD_HEADER, GeodeLoad
from geoproxy.process.offline import describe, route_cmd
from geoproxy.routing.router import (
    FALLBACK,
    HOME,
    NONE_HEALTHY,
    OVER_CAPACITY,
    PANIC,
    SPILL,
    candidates,
    two_choices,
)

from conftest import REGIONS, GeodeFactory, Proxy, ProxyFactory, base_config, geode_entry

WriteConfig = Callable[..., Path]

# Try orders (conftest REGIONS): eu-west -> us-east -> ap-northeast.
GEODES: list[dict[str, Any]] = [
    {"name": "eu-1", "region": "eu-west", "url": "http://127.0.0.1:9101", "max_inflight": 2},
    {"name": "eu-2", "region": "eu-west", "url": "http://127.0.0.1:9102"},
    {"name": "us-1", "region": "us-east", "url": "http://127.0.0.1:9201"},
    {"name": "ap-1", "region": "ap-northeast", "url": "http://127.0.0.1:9301"},
]
ALL = frozenset(g["name"] for g in GEODES)


@pytest.fixture
def topology(write_config: WriteConfig) -> Topology:
    return Topology.build(config_mod.load(write_config(base_config(GEODES))))


# --- the decision, pure ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("healthy", "full", "first", "decision"),
    [
        (ALL, set(), {"eu-1", "eu-2"}, HOME),
        (ALL, {"eu-1"}, {"eu-2"}, HOME),  # the region's other geode has room
        (ALL, {"eu-1", "eu-2"}, {"us-1"}, SPILL),
        (ALL, {"eu-1", "eu-2", "us-1"}, {"ap-1"}, SPILL),
        (ALL - {"eu-1", "eu-2"}, {"us-1"}, {"ap-1"}, SPILL),  # health, then capacity
        (ALL - {"eu-1", "eu-2"}, set(), {"us-1"}, FALLBACK),
        (ALL, set(ALL), set(), OVER_CAPACITY),
        (frozenset(), set(), set(), NONE_HEALTHY),
        (ALL - {"eu-1", "eu-2", "us-1"}, {"eu-1", "eu-2"}, {"ap-1"}, FALLBACK),  # full, down
    ],
    ids=[
        "room",
        "in-region",
        "spill",
        "spill-twice",
        "down-then-full",
        "fallback",
        "all-full",
        "none-healthy",
        "full-but-down",
    ],
)
def test_a_full_home_region_spills_down_the_try_order(
    topology: Topology,
    healthy: frozenset[str],
    full: set[str],
    first: set[str],
    decision: str,
) -> None:
    cands, got = candidates(topology, "eu-west", healthy, 3, random.Random(1).random, full=full)
    assert got == decision
    assert not full & {c.geode.name for c in cands}
    if first:
        assert cands[0].geode.name in first
    else:
        assert cands == []


def test_panic_mode_leaves_out_full_geodes_and_refuses_when_all_are(
    write_config: WriteConfig,
) -> None:
    data = base_config(GEODES)
    data["forwarding"]["when_none_healthy"] = "try_all"
    topology = Topology.build(config_mod.load(write_config(data)))
    cands, decision = candidates(topology, "eu-west", set(), 9, full={"eu-1"})
    assert decision == PANIC
    assert [c.geode.name for c in cands if c.geode.region != "eu-west"] == ["us-1", "ap-1"]
    assert "eu-1" not in {c.geode.name for c in cands}
    assert candidates(topology, "eu-west", set(), 9, full=set(ALL))[1] == OVER_CAPACITY


def test_two_choices_puts_the_less_costly_of_the_two_draws_first(topology: Topology) -> None:
    eu1, eu2 = topology.geodes_by_region["eu-west"]
    costs = {"eu-1": 0.5, "eu-2": 0.01}
    for seed in range(20):
        order = two_choices([eu1, eu2], random.Random(seed).random, costs.__getitem__)
        assert [g.name for g in order] == ["eu-2", "eu-1"]


# --- GeodeLoad -----------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_ticket_counts_at_one_geode_at_a_time_and_releases_once(
    topology: Topology,
) -> None:
    load = GeodeLoad()
    load.configure(topology.config)
    first, second = load.ticket(), load.ticket()
    first.at("eu-1")
    assert (load.total, load.full) == (2, frozenset())
    second.at("eu-1")
    assert load.full == {"eu-1"} and load.why_full("eu-1") == "2/2 in flight"
    version = load.version
    second.at("us-1")  # failed over: no longer at eu-1
    assert load.inflight == {"eu-1": 1, "us-1": 1} and load.full == frozenset()
    assert load.version == version + 1
    for _ in range(3):
        second.release()
        first.release()
    assert load.total == 0 and set(load.inflight.values()) == {0}


def test_each_worker_allows_its_share_of_max_inflight_rounded_up(topology: Topology) -> None:
    load = GeodeLoad(share=4)
    load.configure(topology.config)
    assert load.limits == {"eu-1": 1}


def test_a_load_report_of_100_makes_a_geode_full_until_a_lower_report_or_the_hold_ends(
    topology: Topology, caplog: pytest.LogCaptureFixture
) -> None:
    timers: list[Callable[[], None]] = []
    load = GeodeLoad()
    load.configure(topology.config)
    load.schedule = lambda _delay, call: timers.append(call)
    load.report("us-1", b"100")
    assert load.full == {"us-1"} and load.why_full("us-1") == f"reports {LOAD_HEADER}: 100"
    load.report("us-1", b" 40% ")
    assert load.full == frozenset()
    load.report("us-1", b"120")
    load.report("us-1", b"100")  # a later report: the first hold does not end it
    timers[1]()
    assert load.full == {"us-1"}
    timers[2]()
    assert load.full == frozenset()
    with caplog.at_level(logging.WARNING, logger="geoproxy.load"):
        load.report("us-1", b"lots")
        load.report("us-1", b"lots")
    assert load.reported["us-1"][0] == 100  # ignored
    assert [r.getMessage() for r in caplog.records] == [
        "geode us-1: Geoproxy-Load 'lots' is not a whole percentage; ignored"
    ]


def test_peak_ewma_takes_a_peak_at_once_and_forgets_it_with_time() -> None:
    clock = Clock()
    load = GeodeLoad(clock=clock)
    assert load.cost("eu-1") == 0.0  # never measured, nothing in flight: try it
    load.latency("eu-1", 0.010)
    load.latency("eu-1", 0.200)
    assert load.ewma("eu-1") == pytest.approx(0.200)
    clock.now += 10.0  # one decay time: e^-1 of it is left
    assert load.ewma("eu-1") == pytest.approx(0.200 / 2.718281828, rel=1e-3)
    load.latency("eu-1", 0.010)
    assert load.ewma("eu-1") == pytest.approx(0.200 * 0.3679 + 0.010 * 0.6321, rel=1e-3)
    load.ticket().at("eu-1")
    assert load.cost("eu-1") == pytest.approx(2 * load.ewma("eu-1"))  # type: ignore[operator]


# --- config and check-config -------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda d: d["geodes"][0].update(max_inflight=0),
            "geodes[0].max_inflight: must be from 1 to 1000000, got 0",
        ),
        (
            lambda d: d["geodes"][0].update(max_inflight="10"),
            "geodes[0].max_inflight: must be a whole number from 1 to 1000000, got '10'",
        ),
        (
            lambda d: d["regions"]["eu-west"].update(balance="fastest"),
            "regions.eu-west.balance: unknown value 'fastest' (choose from: weighted, peak_ewma)",
        ),
    ],
    ids=["zero", "string", "unknown-balance"],
)
def test_capacity_and_balance_errors_name_the_path_and_value(
    write_config: WriteConfig, change: Callable[[dict[str, Any]], None], message: str
) -> None:
    data = json.loads(json.dumps(base_config(GEODES)))
    change(data)
    path = write_config(data)
    with pytest.raises(ConfigError) as raised:
        config_mod.load(path)
    assert raised.value.problems == [f"{path}: {message}"]


def test_check_config_shows_max_inflight_and_the_balance_of_each_region(
    write_config: WriteConfig,
) -> None:
    data = json.loads(json.dumps(base_config(GEODES)))
    data["regions"]["eu-west"]["balance"] = "peak_ewma"
    text = describe(Topology.build(config_mod.load(write_config(data))))
    assert "weight=1  max_inflight=2  check=/health" in text
    assert "eu-west        eu-west(2), us-east(1), ap-northeast(1)   balance: peak_ewma   " in text
    assert "us-east        us-east(1), eu-west(2), ap-northeast(1)   countries: " in text


def test_geoproxy_route_names_the_balance_and_each_geodes_limit(
    write_config: WriteConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    data = json.loads(json.dumps(base_config(GEODES)))
    data["regions"]["eu-west"]["balance"] = "peak_ewma"
    assert route_cmd(write_config(data), None, None, "eu-west", True) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["balance"] == "peak_ewma"
    assert answer["at_capacity"] == {}
    first = answer["candidates"][0]
    assert (first["geode"], first["inflight"], first["max_inflight"]) == ("eu-1", 0, 2)
    assert "picked by latency (peak EWMA, the less loaded of two) among" in answer["reason"]


# --- through real sockets ----------------------------------------------------------------


@pytest.fixture(params=["fast", "coroutine"])
def lane(request: pytest.FixtureRequest) -> str:
    """Every test below runs on both request paths (conftest.py's ``lane``)."""
    return str(request.param)


async def start(
    proxy_factory: ProxyFactory, geodes: list[dict[str, Any]], **overrides: Any
) -> Proxy:
    return await proxy_factory(base_config(geodes, **overrides))


def assert_nothing_in_flight(proxy: Proxy) -> None:
    load = proxy.gateway.load
    assert (load.total, {k: v for k, v in load.inflight.items() if v}) == (0, {})
    assert proxy.sample("geoproxy_inflight_requests") == 0
    for geode in proxy.gateway.config.geodes:
        series = {"geode": geode.name, "region": geode.region}
        assert proxy.registry.get_sample_value("geoproxy_geode_inflight_requests", series) == 0


async def settled(proxy: Proxy) -> None:
    """Until nothing is in flight (a request's end is noted after its last byte)."""
    for _ in range(100):
        if proxy.gateway.load.total == 0:
            return
        await asyncio.sleep(0.01)


async def until_inflight(proxy: Proxy, geode: str, count: int = 1) -> None:
    for _ in range(200):
        if proxy.gateway.load.inflight.get(geode, 0) >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{geode} never had {count} in flight: {proxy.gateway.load.inflight}")


async def test_counts_go_back_to_zero_after_success_failover_timeout_and_reset(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    dead_url: str,
) -> None:
    eu = await geode_factory("eu-1", "eu-west")
    us = await geode_factory("us-1", "us-east")
    proxy = await start(
        proxy_factory,
        [geode_entry(eu), geode_entry(us)],
        forwarding={"connect_timeout": "1s", "response_timeout": "300ms"},
    )
    # success
    async with http.get(f"{proxy.url}/whoami") as resp:
        assert (await resp.json())["geode"] == "eu-1"
    await settled(proxy)
    assert_nothing_in_flight(proxy)
    # failover: eu-1 answers 503, us-1 serves
    eu.force_status = 503
    async with http.get(f"{proxy.url}/whoami") as resp:
        assert (await resp.json())["geode"] == "us-1"
    eu.force_status = None
    await settled(proxy)
    assert_nothing_in_flight(proxy)
    # timeout: both stay silent past response_timeout
    eu.delay = us.delay = 1.0
    async with http.get(f"{proxy.url}/whoami") as resp:
        assert resp.status == 504
    eu.delay = us.delay = 0.0
    await settled(proxy)
    assert_nothing_in_flight(proxy)
    # geode reset mid-answer
    async with http.get(f"{proxy.url}/reset") as resp:
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    await settled(proxy)
    assert_nothing_in_flight(proxy)


async def test_counts_go_back_to_zero_when_the_client_goes_away(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory
) -> None:
    eu = await geode_factory("eu-1", "eu-west")
    eu.delay = 0.5
    proxy = await start(proxy_factory, [geode_entry(eu, max_inflight=5)])
    host, port = proxy.url.removeprefix("http://").split(":")
    _, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /whoami HTTP/1.1\r\nHost: x\r\n\r\n")
    await until_inflight(proxy, "eu-1")
    assert proxy.gateway.load.total == 1
    writer.close()
    await settled(proxy)
    assert_nothing_in_flight(proxy)
    await asyncio.sleep(0.6)  # the geode answers into a closed connection
    assert_nothing_in_flight(proxy)


async def test_a_websocket_counts_at_its_geode_while_it_is_open(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    eu = await geode_factory("eu-1", "eu-west")
    us = await geode_factory("us-1", "us-east")
    proxy = await start(proxy_factory, [geode_entry(eu, max_inflight=1), geode_entry(us)])
    async with http.ws_connect(f"{proxy.url}/ws") as ws:
        assert (await ws.receive_json())["geode"] == "eu-1"
        assert proxy.gateway.load.inflight["eu-1"] == 1
        # eu-1 is full while the session is open: the next request spills to us-east
        async with http.get(f"{proxy.url}/whoami") as resp:
            assert (await resp.json())["geode"] == "us-1"
        await ws.close()
    await settled(proxy)
    assert_nothing_in_flight(proxy)


async def test_a_full_geode_spills_to_the_next_region_counted_logged_and_explained(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    access_lines: list[str],
) -> None:
    eu = await geode_factory("eu-1", "eu-west")
    us = await geode_factory("us-1", "us-east")
    proxy = await start(proxy_factory, [geode_entry(eu, max_inflight=1), geode_entry(us)])
    eu.delay = 0.5
    held = asyncio.create_task(http.get(f"{proxy.url}/whoami"))
    await until_inflight(proxy, "eu-1")
    eu_series = {"geode": "eu-1", "region": "eu-west"}
    assert proxy.sample("geoproxy_geode_inflight_requests", **eu_series) == 1
    assert proxy.sample("geoproxy_geode_at_capacity", **eu_series) == 1
    async with http.get(f"{proxy.url}/whoami") as resp:
        assert (await resp.json())["geode"] == "us-1"
    async with http.get(f"{proxy.admin_url}/route?region=eu-west") as resp:
        explained = await resp.json()
    async with await held as resp:
        assert (await resp.json())["geode"] == "eu-1"
    await settled(proxy)
    assert_nothing_in_flight(proxy)
    assert proxy.sample("geoproxy_geode_at_capacity", **eu_series) == 0
    assert explained["decision"] == SPILL
    assert explained["chosen"] == "us-1"
    assert explained["at_capacity"] == {"eu-1": "1/1 in flight"}
    assert explained["reason"] == (
        "client region eu-west from x-client-region; healthy geodes before us-east in the "
        "try order are at capacity (eu-1: 1/1 in flight): spilled to us-east"
    )
    eu_row = explained["candidates"][0]
    assert (eu_row["geode"], eu_row["inflight"], eu_row["max_inflight"]) == ("eu-1", 1, 1)
    labels = {"client_region": "eu-west", "geode": "us-1", "decision": SPILL}
    assert proxy.sample("geoproxy_routing_decisions_total", **labels) == 1
    logged = [json.loads(line) for line in access_lines]
    assert [(e["geode"], e["decision"]) for e in logged] == [("us-1", SPILL), ("eu-1", HOME)]


async def test_every_geode_full_is_a_503_over_capacity(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    eu = await geode_factory("eu-1", "eu-west")
    eu.delay = 0.5
    proxy = await start(proxy_factory, [geode_entry(eu, max_inflight=1)])
    held = asyncio.create_task(http.get(f"{proxy.url}/whoami"))
    await until_inflight(proxy, "eu-1")
    async with http.get(f"{proxy.url}/whoami") as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "1"
        body = await resp.json()
    assert (body["error"]["code"], body["error"]["region"]) == ("over_capacity", "eu-west")
    async with await held as resp:
        assert resp.status == 200
    labels = {"client_region": "eu-west", "geode": "none", "decision": OVER_CAPACITY}
    assert proxy.sample("geoproxy_routing_decisions_total", **labels) == 1
    await settled(proxy)
    assert_nothing_in_flight(proxy)


async def test_a_geode_reporting_full_load_gets_no_new_requests_and_the_client_never_sees_it(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    eu = await geode_factory("eu-1", "eu-west")
    us = await geode_factory("us-1", "us-east")
    proxy = await start(proxy_factory, [geode_entry(eu), geode_entry(us)])
    eu.headers = {LOAD_HEADER: "100"}
    async with http.get(f"{proxy.url}/whoami") as resp:
        assert (await resp.json())["geode"] == "eu-1"
        assert LOAD_HEADER not in resp.headers
    async with http.get(f"{proxy.url}/whoami") as resp:
        assert (await resp.json())["geode"] == "us-1"
    async with http.get(f"{proxy.admin_url}/route?region=eu-west") as resp:
        explained = await resp.json()
    assert explained["at_capacity"] == {"eu-1": f"reports {LOAD_HEADER}: 100"}
    assert explained["candidates"][0]["reported_load"] == 100
    proxy.gateway.load.report("eu-1", b"30")  # as its next answer would say
    async with http.get(f"{proxy.url}/whoami") as resp:
        assert (await resp.json())["geode"] == "eu-1"


async def test_a_peak_ewma_region_sends_almost_nothing_to_its_slow_geode(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    fast = await geode_factory("eu-1", "eu-west")
    slow = await geode_factory("eu-2", "eu-west")
    slow.delay = 0.1
    regions = {**REGIONS, "eu-west": {**REGIONS["eu-west"], "balance": "peak_ewma"}}
    proxy = await start(proxy_factory, [geode_entry(fast), geode_entry(slow)], regions=regions)
    for _ in range(20):
        async with http.get(f"{proxy.url}/whoami") as resp:
            assert resp.status == 200
    # Once each (a geode never measured is tried), then the fast one: the slow one's
    # 100 ms takes about 46 s of decay to fall under the fast one's time (a loaded test
    # machine may slow a fast answer enough for a second try).
    assert 1 <= slow.hits["/whoami"] <= 2
    assert fast.hits["/whoami"] == 20 - slow.hits["/whoami"]
    async with http.get(f"{proxy.admin_url}/route?region=eu-west") as resp:
        explained = await resp.json()
    assert explained["balance"] == "peak_ewma"
    assert explained["chosen"] == "eu-1"
    assert explained["candidates"][1]["latency_ewma_seconds"] >= 0.1
    assert (
        "picked by latency (peak EWMA, the less loaded of two) among eu-1, eu-2"
        in (explained["reason"])
    )


@pytest.fixture
def access_lines() -> Iterator[list[str]]:
    """Messages logged on ``geoproxy.access`` during the test."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger = logging.getLogger("geoproxy.access")
    handler, level = Keep(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


async def test_a_reload_that_lowers_max_inflight_makes_a_busy_geode_full_at_once(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    write_config: WriteConfig,
) -> None:
    eu = await geode_factory("eu-1", "eu-west")
    us = await geode_factory("us-1", "us-east")
    proxy = await start(proxy_factory, [geode_entry(eu), geode_entry(us)])
    eu.delay = 0.5
    held = asyncio.create_task(http.get(f"{proxy.url}/whoami"))
    await until_inflight(proxy, "eu-1")
    lower = base_config([geode_entry(eu, max_inflight=1), geode_entry(us)])
    lower["regions"] = {**REGIONS, "eu-west": {**REGIONS["eu-west"], "balance": "peak_ewma"}}
    what = await proxy.gateway.reload(config_mod.load(write_config(lower, "lower.yaml")))
    assert "1 geode changed: eu-1 (max_inflight none -> 1)" in what
    assert any(w.startswith("regions: eu-west[us-east,ap-northeast](peak_ewma)") for w in what)
    assert proxy.gateway.load.full == {"eu-1"}
    async with http.get(f"{proxy.url}/whoami") as resp:
        assert (await resp.json())["geode"] == "us-1"
    async with await held as resp:
        assert resp.status == 200
    await settled(proxy)
    assert_nothing_in_flight(proxy)
    assert proxy.gateway.load.full == frozenset()
