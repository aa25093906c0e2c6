"""The fast lane (geoproxy/proxy/fastlane.py): which requests take it, that what reaches the
client is what the coroutine path sends, and that everything it cannot finish (failures,
retry statuses, streamed bodies) is handed over without a second request to the geode.
Also pins the aiohttp internals it leans on: the keep-alive timer, the head timeout,
pipelining order, client disconnects and the shutdown drain.

tests/test_forwarding.py, test_faults.py and test_resilience.py run on both lanes too."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import importlib
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry
from test_forwarding import RawGeode, start_with_raw_home
from test_upstream import ScriptedGeode, two_geode_proxy

from geoproxy.config import loader as config_mod
from geoproxy.process.app import Gateway
from geoproxy.process.server import make_proxy_runner

from conftest import FakeGeode, GeodeFactory, Proxy, ProxyFactory, base_config, geode_entry

FAST = "geoproxy_fast_lane_requests_total"


def lane_count(proxy: Proxy, outcome: str) -> float:
    return proxy.sample(FAST, outcome=outcome)


async def start(
    proxy_factory: ProxyFactory, geodes: list[dict[str, Any]], **overrides: Any
) -> Proxy:
    return await proxy_factory(base_config(geodes, **overrides))


class Raw:
    """A client connection over a real socket that sends bytes as given and reads whole
    responses (Content-Length or chunked), for pipelining and connection-level checks."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, url: str) -> Raw:
        host, port = url.removeprefix("http://").split(":")
        return cls(*await asyncio.open_connection(host, int(port)))

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def response(self, head_only: bool = False) -> tuple[str, dict[str, str], bytes]:
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 10)
        status, *lines = head.decode("latin-1").split("\r\n")[:-2]
        headers: dict[str, str] = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if head_only:
            body = b""
        elif "content-length" in headers:
            body = await self.reader.readexactly(int(headers["content-length"]))
        else:  # chunked
            body = b""
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                chunk = await self.reader.readexactly(size + 2)
                body += chunk[:-2]
                if size == 0:  # (no trailers: the CRLF after it was read)
                    break
        return status, headers, body

    async def closed(self, within: float = 5) -> bool:
        """True when the proxy closes the connection within ``within`` seconds."""
        return await asyncio.wait_for(self.reader.read(1), within) == b""

    def close(self) -> None:
        self.writer.close()


def get(path: str, *extra: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: example.test", *extra, "", ""]
    return "\r\n".join(lines).encode()


@pytest.fixture
async def raw() -> AsyncIterator[list[Raw]]:
    opened: list[Raw] = []
    yield opened
    for conn in opened:
        conn.close()


async def connect(raw: list[Raw], url: str) -> Raw:
    conn = await Raw.open(url)
    raw.append(conn)
    return conn


async def test_a_plain_get_is_answered_on_the_fast_lane_with_the_bytes_the_coroutine_path_sends(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, raw: list[Raw]
) -> None:
    eu = await geode_factory("eu-1", "eu-west")
    fast = await start(proxy_factory, [geode_entry(eu)])
    slow = await start(proxy_factory, [geode_entry(eu)], forwarding={"fast_lane": False})
    answers = []
    for proxy in (fast, slow):
        conn = await connect(raw, proxy.url)
        for _ in range(2):  # a new geode connection, then a pooled one
            conn.send(get("/hop-headers?x=1", "X-Forwarded-For: 81.2.69.1"))
            answers.append(await conn.response())
    assert lane_count(fast, "answered") == 2
    assert lane_count(slow, "answered") == lane_count(slow, "handed_over") == 0

    def comparable(answer: tuple[str, dict[str, str], bytes]) -> tuple[Any, ...]:
        status, headers, body = answer
        # Date is the clock's; Via names the instance.
        rest = {k: v for k, v in headers.items() if k not in ("date", "via")}
        via = re.sub(r"geoproxy-[0-9a-f]+", "geoproxy-X", headers["via"])
        return status, tuple(sorted(rest.items())), body, via

    assert len({comparable(a) for a in answers}) == 1, answers
    status, headers, _ = answers[0]
    assert status == "HTTP/1.1 200 OK"
    assert headers["x-geoproxy-geode"] == "eu-1"
    assert headers["x-end-to-end"] == "kept"
    assert "x-private-hop" not in headers and "keep-alive" not in headers
    # The geode saw the same forwarded headers from both lanes.
    assert eu.last_headers["x-forwarded-for"] == ["81.2.69.1, 127.0.0.1"]
    assert fast.sample("geoproxy_requests_total", geode="eu-1", code_class="2xx") == 2
    assert fast.sample("geoproxy_upstream_attempts_total", geode="eu-1", outcome="response") == 2
    assert fast.sample("geoproxy_request_duration_seconds_count", geode="eu-1") == 2


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /whoami HTTP/1.0\r\nHost: a\r\n\r\n",
        b"HEAD /whoami HTTP/1.1\r\nHost: a\r\n\r\n",
        b"POST /whoami HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi",
        b"GET /whoami HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi",
        b"GET /whoami HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n",
        b"GET /whoami HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\n\r\n",
        b"GET http://a/whoami HTTP/1.1\r\nHost: a\r\n\r\n",
    ],
    ids=["http-1.0", "head", "post", "get-with-body", "expect", "upgrade", "absolute-form"],
)
async def test_requests_the_fast_lane_leaves_to_the_coroutine_path(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    raw: list[Raw],
    request_bytes: bytes,
) -> None:
    eu = await geode_factory("eu-1", "eu-west")
    proxy = await start(proxy_factory, [geode_entry(eu)])
    conn = await connect(raw, proxy.url)
    conn.send(request_bytes)
    status, _, _ = await conn.response(head_only=request_bytes.startswith(b"HEAD"))
    assert status.split()[1] in ("200", "417")
    assert lane_count(proxy, "answered") == lane_count(proxy, "handed_over") == 0
    assert (
        proxy.sample("geoproxy_requests_total", geode="eu-1", code_class="2xx")
        + (proxy.sample("geoproxy_requests_total", geode="none", code_class="4xx"))
        == 1
    )


async def test_geoproxys_own_answers_are_left_to_the_coroutine_path(
    proxy_factory: ProxyFactory, dead_url: str, raw: list[Raw]
) -> None:
    proxy = await start(proxy_factory, [{"name": "eu-1", "region": "eu-west", "url": dead_url}])
    conn = await connect(raw, proxy.url)
    conn.send(get("/"))
    status, headers, body = await conn.response()
    assert status.startswith("HTTP/1.1 503")
    assert b"no_healthy_geode" in body and headers["retry-after"] == "1"
    assert lane_count(proxy, "answered") == lane_count(proxy, "handed_over") == 0


async def test_a_retry_status_is_handed_over_and_fails_over_without_a_second_request(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, raw: list[Raw]
) -> None:
    eu = await geode_factory("eu-1", "eu-west")
    us = await geode_factory("us-1", "us-east")
    eu.force_status = 503
    proxy = await start(proxy_factory, [geode_entry(eu), geode_entry(us)])
    conn = await connect(raw, proxy.url)
    conn.send(get("/whoami"))
    status, headers, _ = await conn.response()
    assert (status, headers["x-geoproxy-geode"]) == ("HTTP/1.1 200 OK", "us-1")
    assert (eu.hits["/whoami"], us.hits["/whoami"]) == (1, 1)
    assert lane_count(proxy, "handed_over") == 1
    assert lane_count(proxy, "answered") == 0
    attempts = "geoproxy_upstream_attempts_total"
    assert proxy.sample(attempts, geode="eu-1", outcome="retry_status") == 1
    assert proxy.sample(attempts, geode="us-1", outcome="response") == 1
    assert proxy.sample("geoproxy_failovers_total", from_geode="eu-1", to_geode="us-1") == 1


async def test_a_geode_that_refuses_the_connection_is_handed_over_and_failed_over(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, dead_url: str, raw: list[Raw]
) -> None:
    us = await geode_factory("us-1", "us-east")
    geodes = [{"name": "eu-1", "region": "eu-west", "url": dead_url}, geode_entry(us)]
    proxy = await start(proxy_factory, geodes)
    proxy.gateway.board.states["eu-1"].healthy = True  # as if it died after its last check
    proxy.gateway.board.version += 1
    proxy.gateway.board.healthy = frozenset({"eu-1", "us-1"})
    conn = await connect(raw, proxy.url)
    conn.send(get("/whoami"))
    status, headers, _ = await conn.response()
    assert (status, headers["x-geoproxy-geode"]) == ("HTTP/1.1 200 OK", "us-1")
    assert lane_count(proxy, "handed_over") == 1
    attempts = "geoproxy_upstream_attempts_total"
    assert proxy.sample(attempts, geode="eu-1", outcome="connect_error") == 1
    assert proxy.sample(attempts, geode="us-1", outcome="response") == 1


@pytest.mark.parametrize(
    ("path", "size"),
    [("/stream?size=300000", 300000), ("/stream?size=70000&chunk=70000", 70000)],
    ids=["chunked", "larger-than-64k"],
)
async def test_a_body_to_stream_is_handed_over_and_arrives_whole(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    raw: list[Raw],
    path: str,
    size: int,
) -> None:
    eu = await geode_factory("eu-1", "eu-west")
    proxy = await start(proxy_factory, [geode_entry(eu)])
    conn = await connect(raw, proxy.url)
    conn.send(get(path))
    status, _, body = await conn.response()
    assert (status, len(body)) == ("HTTP/1.1 200 OK", size)
    assert eu.hits["/stream"] == 1
    assert lane_count(proxy, "handed_over") == 1
    conn.send(get("/whoami"))  # the connection goes on, and takes the fast lane again
    status, _, _ = await conn.response()
    assert status == "HTTP/1.1 200 OK"
    assert lane_count(proxy, "answered") == 1


async def test_a_geode_that_stays_silent_gets_a_504_after_the_hand_over(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, raw: list[Raw]
) -> None:
    eu = await geode_factory("eu-1", "eu-west")
    proxy = await start(proxy_factory, [geode_entry(eu)], forwarding={"response_timeout": "300ms"})
    conn = await connect(raw, proxy.url)
    begun = time.monotonic()
    conn.send(get("/slow?delay=2"))
    status, _, body = await conn.response()
    assert status.startswith("HTTP/1.1 504") and b"gateway_timeout" in body
    assert time.monotonic() - begun < 1.5
    assert eu.hits["/slow"] == 1
    assert lane_count(proxy, "handed_over") == 1
    timeouts = proxy.sample("geoproxy_upstream_attempts_total", geode="eu-1", outcome="timeout")
    assert timeouts == 1


async def test_requests_sent_while_one_is_in_flight_are_answered_in_order(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, raw: list[Raw]
) -> None:
    eu = await geode_factory("eu-1", "eu-west")
    proxy = await start(proxy_factory, [geode_entry(eu)])
    conn = await connect(raw, proxy.url)
    conn.send(get("/slow?delay=0.4"))
    await asyncio.sleep(0.1)  # the first is on the fast lane, waiting for the geode
    conn.send(get("/whoami?n=2"))
    conn.send(get("/whoami?n=3") + get("/whoami?n=4"))  # and two pipelined in one write
    first = await conn.response()
    assert b'"geode": "eu-1"' in first[2] and b"path" not in first[2]
    paths = [(await conn.response())[2] for _ in range(3)]
    assert [re.search(rb'"path": "([^"]+)"', p).group(1) for p in paths] == [  # type: ignore[union-attr]
        b"/whoami?n=2",
        b"/whoami?n=3",
        b"/whoami?n=4",
    ]
    # The first on the fast lane; what came meanwhile was held, then parsed one request
    # at a time (ProxyConnection._pieces): each in turn on the fast lane.
    assert lane_count(proxy, "answered") == 4
    assert proxy.sample("geoproxy_requests_total", geode="eu-1", code_class="2xx") == 4


async def test_a_client_that_goes_away_is_counted_499_and_its_geode_connection_is_dropped(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, raw: list[Raw]
) -> None:
    eu = await geode_factory("eu-1", "eu-west")
    proxy = await start(proxy_factory, [geode_entry(eu)])
    conn = await connect(raw, proxy.url)
    conn.send(get("/slow?delay=0.5"))
    await asyncio.sleep(0.15)
    conn.close()
    for _ in range(50):
        if lane_count(proxy, "client_closed"):
            break
        await asyncio.sleep(0.02)
    assert lane_count(proxy, "client_closed") == 1
    assert proxy.sample("geoproxy_requests_total", geode="none", code_class="4xx") == 1
    assert proxy.gateway.observer.inflight == 0
    await asyncio.sleep(0.6)  # the geode answers into a closed connection
    forwarder = proxy.gateway.forwarder
    assert forwarder is not None
    assert forwarder.pool.get(proxy.gateway.config.geodes[0]) is None  # not pooled
    again = await connect(raw, proxy.url)
    again.send(get("/whoami"))
    assert (await again.response())[0] == "HTTP/1.1 200 OK"


async def test_connection_close_from_the_client_is_answered_then_the_connection_closes(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, raw: list[Raw]
) -> None:
    eu = await geode_factory("eu-1", "eu-west")
    proxy = await start(proxy_factory, [geode_entry(eu)])
    conn = await connect(raw, proxy.url)
    conn.send(get("/whoami", "Connection: close"))
    status, headers, _ = await conn.response()
    assert (status, headers["connection"]) == ("HTTP/1.1 200 OK", "close")
    assert await conn.closed()
    assert lane_count(proxy, "answered") == 1


async def test_the_keepalive_timer_waits_for_a_slow_exchange_and_then_closes_the_idle_connection(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, raw: list[Raw]
) -> None:
    eu = await geode_factory("eu-1", "eu-west")
    limits = {"keepalive_timeout": "300ms", "header_timeout": "300ms"}
    proxy = await start(proxy_factory, [geode_entry(eu)], limits=limits)
    conn = await connect(raw, proxy.url)
    conn.send(get("/slow?delay=0.9"))  # longer than both timeouts: neither may cut it
    status, _, _ = await conn.response()
    assert status == "HTTP/1.1 200 OK"
    assert lane_count(proxy, "answered") == 1
    idle_since = time.monotonic()
    assert await conn.closed(within=3)
    assert 0.2 < time.monotonic() - idle_since < 2


async def test_shutdown_drains_an_exchange_in_flight_on_the_fast_lane(
    geode_factory: GeodeFactory, write_config: Any, raw: list[Raw]
) -> None:
    eu = await geode_factory("eu-1", "eu-west")
    cfg = config_mod.load(write_config(base_config([geode_entry(eu)])))
    gateway = Gateway(cfg, registry=CollectorRegistry())
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(gateway.lifespan())
        runner = make_proxy_runner(gateway)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        host, port = runner.addresses[0][:2]
        conn = await connect(raw, f"http://{host}:{port}")
        conn.send(get("/slow?delay=0.5"))
        await asyncio.sleep(0.15)
        cleanup = asyncio.create_task(runner.cleanup())
        status, _, body = await conn.response()
        assert status == "HTTP/1.1 200 OK" and b"eu-1" in body
        await asyncio.wait_for(cleanup, 5)
        assert await conn.closed()
        assert gateway.metrics.fast_lane.values == {("answered",): 1.0}


async def test_fast_lane_off_in_the_config_serves_every_request_on_the_coroutine_path(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, raw: list[Raw]
) -> None:
    eu: FakeGeode = await geode_factory("eu-1", "eu-west")
    proxy = await start(proxy_factory, [geode_entry(eu)], forwarding={"fast_lane": False})
    assert proxy.gateway.config.forwarding.fast_lane is False
    conn = await connect(raw, proxy.url)
    for _ in range(3):
        conn.send(get("/whoami"))
        assert (await conn.response())[0] == "HTTP/1.1 200 OK"
    assert lane_count(proxy, "answered") == lane_count(proxy, "handed_over") == 0
    assert proxy.sample("geoproxy_requests_total", geode="eu-1", code_class="2xx") == 3


@pytest.mark.parametrize(
    "broken",
    ["fastlane.request_wire", "fastexchange.FastExchange.send", "fastexchange.response_head"],
)
async def test_an_unexpected_error_in_the_fast_lane_leaves_the_request_to_the_coroutine_path(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    raw: list[Raw],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    broken: str,
) -> None:
    """Fault injection into geoproxy's own code (not the HTTP layer): a bug while the
    request is prepared, sent (on a new connection, then on a pooled one) or answered
    must never leave the client without an answer, nor reach the geode twice."""
    eu = await geode_factory("eu-1", "eu-west")
    proxy = await start(proxy_factory, [geode_entry(eu)])
    conn = await connect(raw, proxy.url)

    def fail(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("injected")

    module, *owners, name = broken.split(".")
    target: Any = importlib.import_module(f"geoproxy.proxy.{module}")
    for owner in owners:
        target = getattr(target, owner)
    monkeypatch.setattr(target, name, fail)
    for n in (1, 2):  # the pool is empty, then holds the first request's connection
        conn.send(get(f"/whoami?n={n}"))
        status, headers, _ = await conn.response()
        assert (status, headers["x-geoproxy-geode"]) == ("HTTP/1.1 200 OK", "eu-1")
        assert eu.hits["/whoami"] == n
    assert lane_count(proxy, "answered") == 0
    assert proxy.gateway.observer.inflight == 0
    errors = [r for r in caplog.records if "fast lane: unexpected error" in r.getMessage()]
    assert len(errors) == 2


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 2x0 OK\r\nContent-Length: 2\r\n\r\nok",
        b"garbage\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
    ],
    ids=["bad-status", "garbage", "two-lengths"],
)
async def test_an_answer_the_parser_rejects_is_handed_over_and_failed_over(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    raw: list[Raw],
    reply: bytes,
) -> None:
    home = RawGeode(reply)
    try:
        proxy = await start_with_raw_home(proxy_factory, geode_factory, home)
        conn = await connect(raw, proxy.url)
        conn.send(get("/x"))
        status, headers, _ = await conn.response()
    finally:
        await home.close()
    assert (status, headers["x-geoproxy-geode"]) == ("HTTP/1.1 200 OK", "us-1")
    assert len(home.requests) == 1
    assert lane_count(proxy, "handed_over") == 1
    attempts = "geoproxy_upstream_attempts_total"
    assert proxy.sample(attempts, geode="raw-1", outcome="bad_response") == 1


@pytest.mark.parametrize(
    ("size", "outcome"),
    [(0, "answered"), (5000, "answered"), (65536, "answered"), (65537, "handed_over")],
)
async def test_answers_up_to_64_kib_go_out_whole_from_the_fast_lane(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    raw: list[Raw],
    size: int,
    outcome: str,
) -> None:
    eu = await geode_factory("eu-1", "eu-west")
    proxy = await start(proxy_factory, [geode_entry(eu)])
    conn = await connect(raw, proxy.url)
    pattern = bytes(range(256))
    for _ in range(2):  # a new geode connection, then a pooled one
        conn.send(get(f"/bytes?size={size}"))
        status, headers, body = await conn.response()
        assert (status, headers["content-length"]) == ("HTTP/1.1 200 OK", str(size))
        assert body == (pattern * (size // 256 + 1))[:size]
    assert lane_count(proxy, outcome) == 2


class TwoPieces(ScriptedGeode):
    """Each answer in two writes, 50 ms apart: its body arrives in two reads."""

    async def _write(self, writer: asyncio.StreamWriter, answer: bytes) -> None:
        for piece in (answer[:-5], answer[-5:]):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.05)


class Held(ScriptedGeode):
    """Answers nothing by itself: the test writes on ``writers_held`` when it wants."""

    def __init__(self) -> None:
        super().__init__(lambda n, line: b"")
        self.writers_held: list[asyncio.StreamWriter] = []

    async def _write(self, writer: asyncio.StreamWriter, answer: bytes) -> None:
        self.writers_held.append(writer)
        await asyncio.sleep(30)  # the test closes the geode long before


@pytest.mark.parametrize("fast_lane", [True, False], ids=["fast", "coroutine"])
async def test_a_geode_connection_answered_in_pieces_is_pooled_without_a_read_deadline(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, raw: list[Raw], fast_lane: bool
) -> None:
    """A body that arrives in two reads, then an idle pause longer than
    response_timeout (but shorter than the pool's keep-alive): the next request reuses
    the connection (a leftover read deadline would have failed it while idle)."""

    seen: list[int] = []  # the request's number on its geode connection

    def answer(n: int, line: str) -> bytes:
        seen.append(n)
        return b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhelloworld"

    geode = TwoPieces(answer)
    try:
        forwarding = {
            "response_timeout": "500ms",
            "keepalive_timeout": "4s",
            "fast_lane": fast_lane,
        }
        proxy, _ = await two_geode_proxy(
            proxy_factory, geode_factory, await geode.start(), forwarding=forwarding
        )
        conn = await connect(raw, proxy.url)
        for path in ("/a", "/b"):
            conn.send(get(path))
            status, _, body = await conn.response()
            assert (status, body) == ("HTTP/1.1 200 OK", b"helloworld")
            await asyncio.sleep(0.8)
        assert seen == [0, 1]  # the second came on the same geode connection
        assert lane_count(proxy, "answered") == (2 if fast_lane else 0)
    finally:
        await geode.close()


@pytest.mark.parametrize("fast_lane", [True, False], ids=["fast", "coroutine"])
async def test_a_geode_host_name_the_resolver_rejects_is_a_connect_failure(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    raw: list[Raw],
    fast_lane: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from geoproxy.config import schema

    us = await geode_factory("us-1", "us-east")
    bad = "http://" + "a" * 64 + ".test:8080"  # a DNS label over 63 bytes: UnicodeError
    # check-config rejects this one; the forwarder must survive any the resolver rejects.
    monkeypatch.setattr(schema, "host_name_problem", lambda host: None)
    geodes = [{"name": "eu-1", "region": "eu-west", "url": bad}, geode_entry(us)]
    proxy = await start(proxy_factory, geodes, forwarding={"fast_lane": fast_lane})
    board = proxy.gateway.board
    board.states["eu-1"].healthy = True  # as if it had passed its checks
    board.version += 1
    board.healthy = frozenset({"eu-1", "us-1"})
    conn = await connect(raw, proxy.url)
    conn.send(get("/whoami"))
    status, headers, _ = await conn.response()
    assert (status, headers["x-geoproxy-geode"]) == ("HTTP/1.1 200 OK", "us-1")
    attempts = "geoproxy_upstream_attempts_total"
    assert proxy.sample(attempts, geode="eu-1", outcome="connect_error") == 1
    assert proxy.gateway.observer.inflight == 0


@pytest.mark.parametrize("broken", ["answer_lines", "whole_head"])
async def test_an_unexpected_error_while_the_answer_is_made_still_answers(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    raw: list[Raw],
    monkeypatch: pytest.MonkeyPatch,
    broken: str,
) -> None:
    """Fault injection as above, in the last steps before the answer is written: the
    answer is still on the geode connection, and the coroutine path relays it."""
    from geoproxy.proxy import fastexchange

    eu = await geode_factory("eu-1", "eu-west")
    proxy = await start(proxy_factory, [geode_entry(eu)])

    def fail(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("injected")

    monkeypatch.setattr(fastexchange, broken, fail)
    conn = await connect(raw, proxy.url)
    conn.send(get("/whoami"))
    status, headers, _ = await conn.response()
    assert (status, headers["x-geoproxy-geode"]) == ("HTTP/1.1 200 OK", "eu-1")
    assert eu.hits["/whoami"] == 1
    assert lane_count(proxy, "handed_over") == 1
    assert proxy.sample("geoproxy_upstream_attempts_total", geode="eu-1", outcome="response") == 1


async def test_a_client_that_leaves_as_the_exchange_is_handed_over_is_counted_once(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, raw: list[Raw]
) -> None:
    geode = Held()
    try:
        proxy, _ = await two_geode_proxy(proxy_factory, geode_factory, await geode.start())
        conn = await connect(raw, proxy.url)
        conn.send(get("/x"))
        for _ in range(200):
            if geode.writers_held:
                break
            await asyncio.sleep(0.01)
        # In one go, before the proxy's loop (this loop) polls again: the client's FIN,
        # then the geode's 503 (which the fast lane hands over).
        assert conn.writer.transport.can_write_eof()
        conn.writer.transport.write_eof()
        geode.writers_held[0].write(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"
        )
        time.sleep(0.05)  # noqa: ASYNC251 -- both must be on the wire before the next poll
        await asyncio.sleep(0.3)
        assert sum(proxy.gateway.metrics.fast_lane.values.values()) == 1
        assert proxy.gateway.observer.inflight == 0
    finally:
        await geode.close()


async def test_a_connection_that_changes_its_headers_or_outlives_a_reload_is_routed_anew(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    raw: list[Raw],
    write_config: Callable[[dict[str, Any]], Any],
) -> None:
    """The fast lane keeps what the last request's headers decided, per connection: a
    request with other headers, or the same headers under a reloaded config, is routed
    from scratch."""
    geodes = [
        await geode_factory("eu-1", "eu-west"),
        await geode_factory("us-1", "us-east"),
        await geode_factory("ap-1", "ap-northeast"),
    ]
    data = base_config([geode_entry(g) for g in geodes])
    proxy = await proxy_factory(data)
    conn = await connect(raw, proxy.url)

    async def served(country: str) -> str:
        conn.send(get("/whoami", f"CF-IPCountry: {country}"))
        status, headers, _ = await conn.response()
        assert status == "HTTP/1.1 200 OK"
        return headers["x-geoproxy-geode"]

    assert [await served(c) for c in ("FR", "FR", "JP", "FR", "US")] == [
        "eu-1",
        "eu-1",
        "ap-1",
        "eu-1",
        "us-1",
    ]
    data["countries"] = {**data["countries"], "US": "ap-northeast"}
    data["forwarding"] = {**data.get("forwarding", {}), "fast_lane": True}
    assert write_config(data) == proxy.gateway.config.path
    assert await proxy.gateway.reload_from_file("test")
    assert await served("US") == "ap-1"  # the same header lines, on the same connection
    assert lane_count(proxy, "answered") == 6


# -- answer heads seen before (fastexchange.KNOWN) -----------------------------------------

FIXED_HEAD = (
    b"HTTP/1.1 200 OK\r\nDate: Sun, 06 Dec 2026 01:00:00 GMT\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 5\r\n"
)


async def ask(
    geode: ScriptedGeode,
    proxy_factory: ProxyFactory,
    geode_factory: GeodeFactory,
    raw: list[Raw],
    count: int,
) -> tuple[Proxy, Raw, list[tuple[str, dict[str, str], bytes]]]:
    """A proxy in front of ``geode`` (with a second geode to fail over to), and the
    answers to ``count`` GETs on one client connection."""
    proxy, _ = await two_geode_proxy(proxy_factory, geode_factory, await geode.start())
    conn = await connect(raw, proxy.url)
    answers = []
    for _ in range(count):
        conn.send(get("/x"))
        answers.append(await conn.response())
    return proxy, conn, answers


class Numbered(ScriptedGeode):
    """Answers the n-th request on a geode connection with ``reply(n)`` (``seen`` lists
    each n), whole or, for the answers numbered in ``split``, in two writes 50 ms
    apart."""

    def __init__(self, reply: Callable[[int], bytes], split: frozenset[int] = frozenset()) -> None:
        self.seen: list[int] = []
        self.split = split
        self.count = 0

        def numbered(n: int, line: str) -> bytes:
            self.seen.append(n)
            return reply(n)

        super().__init__(numbered)

    async def _write(self, writer: asyncio.StreamWriter, answer: bytes) -> None:
        n, self.count = self.count, self.count + 1
        pieces = (answer[:-2], answer[-2:]) if n in self.split else (answer,)
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.05)


@pytest.fixture
async def numbered() -> AsyncIterator[Callable[..., Numbered]]:
    """Makes ``Numbered`` geodes (started by ``ask`` or the test) and closes them after."""
    made: list[Numbered] = []

    def make(reply: Callable[[int], bytes], split: frozenset[int] = frozenset()) -> Numbered:
        made.append(Numbered(reply, split))
        return made[-1]

    yield make
    for geode in made:
        if geode.server is not None:  # (started)
            await geode.close()


async def test_an_answer_head_seen_before_is_taken_without_the_parser_and_relayed_the_same(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    raw: list[Raw],
    numbered: Callable[..., Numbered],
) -> None:
    """The first answer is parsed and its head kept; the same head again (with the whole
    body in the same read) is taken from what was kept. Proof that it was: the kept
    entry's reason phrase, changed by the test, is what the client gets."""
    from geoproxy.proxy import fastexchange

    head = FIXED_HEAD + b"\r\n"
    geode = numbered(lambda n: head + b"hello")
    proxy, conn, answers = await ask(geode, proxy_factory, geode_factory, raw, 3)
    assert answers[0] == answers[1] == answers[2]
    status, headers, body = answers[0]
    assert (status, body, headers["x-geoproxy-geode"]) == ("HTTP/1.1 200 OK", b"hello", "eu-1")
    assert headers["date"] == "Sun, 06 Dec 2026 01:00:00 GMT"
    assert head in fastexchange.KNOWN
    status_code, reason, should_close, out = fastexchange.KNOWN[head]
    assert (status_code, reason, should_close, out.length) == (200, "OK", False, 5)
    fastexchange.KNOWN[head] = (200, "Known", False, out)
    try:
        conn.send(get("/x"))
        status, _, body = await conn.response()
    finally:
        fastexchange.KNOWN.pop(head, None)
    assert (status, body) == ("HTTP/1.1 200 Known", b"hello")
    assert geode.seen == [0, 1, 2, 3]  # one geode connection, pooled between answers
    assert lane_count(proxy, "answered") == 4
    assert proxy.sample("geoproxy_requests_total", geode="eu-1", code_class="2xx") == 4


async def test_a_known_head_that_closes_the_connection_is_not_pooled(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    raw: list[Raw],
    numbered: Callable[..., Numbered],
) -> None:
    """A geode that says it closes but leaves the connection open: the answer taken
    from a kept head still keeps the connection out of the pool."""
    # (lower case: ScriptedGeode closes after "Connection: close", not after this)
    geode = numbered(lambda n: FIXED_HEAD + b"connection: close\r\n\r\nhello")
    proxy, _, answers = await ask(geode, proxy_factory, geode_factory, raw, 3)
    assert [(s, b) for s, _, b in answers] == [("HTTP/1.1 200 OK", b"hello")] * 3
    assert geode.seen == [0, 0, 0]  # each on a new geode connection, none sent twice
    assert lane_count(proxy, "answered") == 3


async def test_a_known_head_whose_body_comes_in_pieces_or_with_bytes_after_it_is_parsed(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    raw: list[Raw],
    numbered: Callable[..., Numbered],
) -> None:
    """Only an answer whose whole body is in the read with its head is taken from the
    kept head: a body in two reads goes through the parser; so do bytes after the body
    (the start of another answer nobody asked for: the parser reads the answer, and the
    next request gets a fresh parser, as without kept heads)."""
    head = FIXED_HEAD + b"\r\n"
    stray = b"HTTP/1.1 200 OK\r\n"
    geode = numbered(lambda n: head + b"hello" + (stray if n == 2 else b""), frozenset({1}))
    proxy, _, replies = await ask(geode, proxy_factory, geode_factory, raw, 4)
    assert [(s, b) for s, _, b in replies] == [("HTTP/1.1 200 OK", b"hello")] * 4
    assert {h["x-geoproxy-geode"] for _, h, _ in replies} == {"eu-1"}
    assert geode.seen == [0, 1, 2, 3]
    assert lane_count(proxy, "answered") == 4


async def test_answer_heads_that_differ_every_time_are_each_parsed_and_kept_bounded(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, numbered: Callable[..., Numbered]
) -> None:
    """A geode that echoes a request id builds a new head every answer: each is parsed
    (its own id reaches the client) and what is kept stays bounded."""
    from geoproxy.proxy import fastexchange

    geode = numbered(lambda n: FIXED_HEAD + b"X-Request-Id: r-%d\r\n\r\nhello" % n)
    proxy, _ = await two_geode_proxy(proxy_factory, geode_factory, await geode.start())
    reader, writer = await asyncio.open_connection(*proxy.url[7:].split(":"))
    try:
        for n in range(300):
            writer.write(get("/x"))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert b"\r\nX-Request-Id: r-%d\r\n" % n in head
            assert await reader.readexactly(5) == b"hello"
            assert len(fastexchange.KNOWN) <= 256
    finally:
        writer.close()
    assert lane_count(proxy, "answered") == 300


async def test_a_browsers_new_cookies_and_ids_go_on_and_a_new_region_header_is_routed_anew(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, raw: list[Raw]
) -> None:
    """Requests on one connection whose cookie and request id change every time (what
    ``Routing.prelude`` keeps a prelude for): each geode gets each request's own values,
    and a new CF-IPCountry or Host is worked out afresh."""
    eu = await geode_factory("eu-1", "eu-west")
    ap = await geode_factory("ap-1", "ap-northeast")
    proxy = await proxy_factory(
        base_config([geode_entry(eu), geode_entry(ap)], limits={"max_header_bytes": "1KiB"})
    )
    conn = await connect(raw, proxy.url)
    served = []
    for n, (country, host) in enumerate(
        [("FR", "a.test"), ("FR", "a.test"), ("JP", "a.test"), ("JP", "b.test"), ("FR", "b.test")]
    ):
        conn.send(
            f"GET /whoami HTTP/1.1\r\nHost: {host}\r\nCookie: sid={n}\r\n"
            f"X-Request-Id: id-{n}\r\nCF-IPCountry: {country}\r\n\r\n".encode()
        )
        status, headers, _ = await conn.response()
        assert status == "HTTP/1.1 200 OK"
        geode = {"eu-1": eu, "ap-1": ap}[headers["x-geoproxy-geode"]]
        seen = geode.last_headers
        served.append(headers["x-geoproxy-geode"])
        assert (seen["cookie"], seen["x-request-id"]) == ([f"sid={n}"], [f"id-{n}"])
        assert (seen["host"], seen["x-forwarded-host"]) == ([host], [host])
    assert served == ["eu-1", "eu-1", "ap-1", "ap-1", "eu-1"]
    assert lane_count(proxy, "answered") == 5
    # The same names and deciding values, a cookie past the limit: still refused.
    conn.send(
        b"GET /whoami HTTP/1.1\r\nHost: b.test\r\nCookie: sid=%s\r\n"
        b"X-Request-Id: id-5\r\nCF-IPCountry: FR\r\n\r\n" % (b"x" * 1100)
    )
    status, _, body = await conn.response()
    assert (status, json.loads(body)["error"]["code"]) == (
        "HTTP/1.1 431 Request Header Fields Too Large",
        "headers_too_large",
    )


async def test_a_compressed_answer_taken_from_a_kept_head_reaches_the_client_byte_for_byte(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    raw: list[Raw],
    numbered: Callable[..., Numbered],
) -> None:
    """A gzip body with its Content-Encoding, answered again and again: the kept-head
    path passes the compressed bytes and the head lines on as the parser's path does."""
    from geoproxy.proxy import fastexchange

    payload = gzip.compress(b"geoproxy " * 500)
    head = FIXED_HEAD.replace(b"Content-Length: 5", b"Content-Length: %d" % len(payload))
    head += b"Content-Encoding: gzip\r\nVary: Accept-Encoding\r\n\r\n"
    geode = numbered(lambda n: head + payload)
    _, _, answers = await ask(geode, proxy_factory, geode_factory, raw, 3)
    assert head in fastexchange.KNOWN  # the second and third came through it
    for status, headers, body in answers:
        assert (status, body) == ("HTTP/1.1 200 OK", payload)
        assert (headers["content-encoding"], headers["vary"]) == ("gzip", "Accept-Encoding")
        assert headers["content-length"] == str(len(payload))
    assert gzip.decompress(answers[2][2]) == b"geoproxy " * 500
    assert geode.seen == [0, 1, 2]
