"""Edge access control (geoproxy/config/access.py): CONNECT and TRACE stop at the edge, access
rules fence paths off, on both request paths, against real geodes that record what
reached them."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry
from test_config import edited, problems_of
from test_forwarding import lane, raw_client, read_response  # noqa: F401  (lane: a fixture)
from test_observability import access_lines, settled  # noqa: F401  (a fixture)
from test_workers import get_fresh, one_region, supervised, total

from geoproxy.config import access as access_mod
from geoproxy.config import loader as config_mod
from geoproxy.config.access import AccessRule, AccessRules
from geoproxy.stamp.app import STATE, build_stamp_app
from geoproxy.stamp.config import StampConfig

from conftest import FakeGeode, GeodeFactory, Proxy, ProxyFactory, base_config, geode_entry

REPO = Path(__file__).resolve().parent.parent
WriteConfig = Callable[..., Path]

#: What config/demo.yaml and config/geoproxy.yaml deny (the reference stamp's internals).
STAMP_RULES = [
    {"name": "stamp-replication", "path_prefix": "/replication/", "action": "deny"},
    {"name": "stamp-events", "path_prefix": "/events", "action": "deny"},
    {"name": "stamp-dead-letters", "path_prefix": "/dead-letters", "action": "deny"},
    {"name": "stamp-metrics", "path_prefix": "/metrics", "action": "deny"},
]


async def fenced(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    rules: list[dict[str, Any]] = STAMP_RULES,
    **overrides: Any,
) -> tuple[Proxy, FakeGeode]:
    """A proxy with ``rules`` in front of one geode per region; the eu-west one returned."""
    eu = await geode_factory("eu-1", "eu-west")
    us = await geode_factory("us-1", "us-east")
    ap = await geode_factory("ap-1", "ap-northeast")
    data = base_config([geode_entry(g) for g in (eu, us, ap)], access=rules, **overrides)
    return await proxy_factory(data), eu


def reached(geode: FakeGeode) -> set[str]:
    """The paths of every request that reached the geode, health checks aside."""
    return set(geode.hits) - {"/health"}


async def exchange(proxy: Proxy, request: bytes) -> tuple[bytes, list[bytes], bytes]:
    """One request on a new raw connection, as written; the response."""
    reader, writer = await raw_client(proxy)
    try:
        writer.write(request)
        async with asyncio.timeout(5):
            return await read_response(reader)
    finally:
        writer.close()


def get(target: str) -> bytes:
    return f"GET {target} HTTP/1.1\r\nHost: shop.example\r\n\r\n".encode()


# --- the path-confusion matrix -------------------------------------------------------------

NOT_FOUND = (b"HTTP/1.1 404 Not Found", "not_found")
BAD_PATH = (b"HTTP/1.1 400 Bad Request", "bad_path")


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/replication/changes", NOT_FOUND),
        ("/replication/changes?since=0&origin=x", NOT_FOUND),
        ("/%72eplication/changes", NOT_FOUND),
        ("/%72%65%70lication/changes", NOT_FOUND),
        ("//replication/changes", NOT_FOUND),
        ("/replication//changes", NOT_FOUND),
        ("/./replication/changes", NOT_FOUND),
        ("/items/../replication/changes", NOT_FOUND),
        ("/items/%2e%2e/replication/changes", NOT_FOUND),
        ("/../replication/changes", NOT_FOUND),
        ("/REPLICATION/changes", NOT_FOUND),
        ("/Replication/Changes", NOT_FOUND),
        ("/replication;jsessionid=1/changes", NOT_FOUND),
        ("/items/..;/replication/changes", NOT_FOUND),
        ("/events", NOT_FOUND),
        ("/events;x?since=0", NOT_FOUND),
        ("/Metrics", NOT_FOUND),
        ("/metrics/", NOT_FOUND),
        ("http://shop.example/replication/changes", NOT_FOUND),
        ("http://shop.example/items/../replication/changes", NOT_FOUND),
        ("http://shop.example//%72eplication/changes", NOT_FOUND),
        ("/replication%2Fchanges", BAD_PATH),
        ("/replication%2fchanges", BAD_PATH),
        ("/replication%5Cchanges", BAD_PATH),
        ("/replication\\changes", BAD_PATH),
        ("/items/%00/../../replication/changes", BAD_PATH),
        ("/items/%ff", BAD_PATH),
        ("/items/%C3%28", BAD_PATH),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
async def test_a_denied_path_never_reaches_the_geode_however_it_is_spelled(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    target: str,
    expected: tuple[bytes, str],
) -> None:
    proxy, eu = await fenced(geode_factory, proxy_factory)
    status, lines, body = await exchange(proxy, get(target))
    assert (status, json.loads(body)["error"]["code"]) == expected
    assert b"Content-Type: application/json; charset=utf-8" in lines
    assert not [line for line in lines if line.lower().startswith(b"x-geoproxy-geode")]
    assert reached(eu) == set()


@pytest.mark.parametrize(
    "target",
    [
        "/items/1",
        "/items/1?next=/replication/changes",
        "/replication",
        "/items/%41b",
        "/a%0Ab",
        "/items/caf%C3%A9",
        "/%7Eme/x",
        "http://shop.example/items/2",
    ],
)
async def test_paths_no_rule_denies_reach_the_geode_as_sent(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, target: str
) -> None:
    proxy, _ = await fenced(geode_factory, proxy_factory)
    status, _, body = await exchange(proxy, get(target))
    assert status == b"HTTP/1.1 200 OK"
    sent = target.removeprefix("http://shop.example")
    assert json.loads(body) == {"geode": "eu-1", "path": sent}


async def test_a_post_with_a_body_to_a_denied_path_is_answered_without_reading_it(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory
) -> None:
    proxy, eu = await fenced(geode_factory, proxy_factory)
    reader, writer = await raw_client(proxy)
    try:
        writer.write(
            b"POST /%72eplication/changes HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: 10000\r\n\r\n{"
        )
        async with asyncio.timeout(5):
            status, lines, _ = await read_response(reader)  # before the body was sent
            writer.write(b" " * 9999)
            assert await reader.read() == b""  # then closed, not kept alive
    finally:
        writer.close()
    assert status == b"HTTP/1.1 404 Not Found"
    assert b"Connection: close" in lines
    assert reached(eu) == set()


async def test_a_kept_alive_connection_is_judged_per_request(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory
) -> None:
    """The fast lane keeps what a connection's repeated header lines decided; the path of
    each request is judged on its own."""
    proxy, eu = await fenced(geode_factory, proxy_factory)
    reader, writer = await raw_client(proxy)
    statuses = []
    try:
        for target in ("/items/1", "/replication/changes", "/items/2", "/%65vents", "/items/3"):
            writer.write(get(target))
            async with asyncio.timeout(5):
                statuses.append((await read_response(reader))[0].split(b" ")[1])
    finally:
        writer.close()
    assert statuses == [b"200", b"404", b"200", b"404", b"200"]
    assert reached(eu) == {"/items/1", "/items/2", "/items/3"}


async def test_an_allow_rule_makes_an_exception_only_for_the_path_as_geodes_read_it(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory
) -> None:
    rules = [
        {"path_prefix": "/Public/", "action": "allow"},
        {"name": "default-deny", "path_prefix": "/", "action": "deny", "status": 403},
    ]
    proxy, eu = await fenced(geode_factory, proxy_factory, rules)
    got = {}
    for target in (
        "/Public/a",
        "/Public/%61",
        "/PUBLIC/a",
        "/Public;/../secret",
        "/Public//../secret",
        "/Public/../secret",
        "/secret",
    ):
        got[target] = (await exchange(proxy, get(target)))[0].split(b" ")[1]
    assert got == {
        "/Public/a": b"200",
        "/Public/%61": b"200",
        "/PUBLIC/a": b"403",
        "/Public;/../secret": b"403",
        "/Public//../secret": b"403",
        "/Public/../secret": b"403",
        "/secret": b"403",
    }
    assert reached(eu) == {"/Public/a"}  # /Public/%61 too: the geode decodes it


# --- what operators see --------------------------------------------------------------------


async def test_a_denial_is_counted_by_rule_and_logged_with_it(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    access_lines: list[str],  # noqa: F811  (the fixture)
) -> None:
    rules = [
        {"name": "internal", "path_prefix": "/replication/", "action": "deny", "status": 403},
        {"path_prefix": "/events", "action": "deny"},
    ]
    proxy, _ = await fenced(geode_factory, proxy_factory, rules)
    for target in ("/replication/changes", "//replication/x", "/events", "/items/1", "/items\\1"):
        await exchange(proxy, get(target))
    await settled(proxy)
    denied = "geoproxy_requests_denied_total"
    assert proxy.sample(denied, rule="internal") == 2
    assert proxy.sample(denied, rule="access[1]") == 1
    assert proxy.sample(denied, rule="path:unsafe") == 1
    assert proxy.sample("geoproxy_requests_total", geode="none", code_class="4xx") == 4
    logged = [json.loads(line) for line in access_lines]
    assert [(e["path"], e["status"], e.get("denied"), e["geode"]) for e in logged] == [
        ("/replication/changes", 403, "internal", None),
        ("//replication/x", 403, "internal", None),
        ("/events", 404, "access[1]", None),
        ("/items/1", 200, None, "eu-1"),
        ("/items\\1", 400, "path:unsafe", None),
    ]
    _, _, body = await exchange(proxy, get("/replication/changes"))
    assert json.loads(body) == {
        "error": {"status": 403, "code": "forbidden", "message": "access to this path is denied"}
    }


async def test_access_rules_follow_a_reload(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, write_config: WriteConfig
) -> None:
    proxy, eu = await fenced(geode_factory, proxy_factory, [])
    reader, writer = await raw_client(proxy)  # one connection across the reload
    try:
        writer.write(get("/replication/changes"))
        assert (await read_response(reader))[0] == b"HTTP/1.1 200 OK"
        data = yaml.safe_load(proxy.gateway.config.path.read_text())
        data["access"] = STAMP_RULES
        write_config(data)
        assert await proxy.gateway.reload_from_file("test")
        writer.write(get("/replication/changes"))
        assert (await read_response(reader))[0] == b"HTTP/1.1 404 Not Found"
    finally:
        writer.close()
    assert eu.hits["/replication/changes"] == 1


# --- CONNECT and TRACE -------------------------------------------------------------------


async def test_connect_is_refused_with_405_and_never_tunnelled(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory
) -> None:
    proxy, eu = await fenced(geode_factory, proxy_factory, [])
    reader, writer = await raw_client(proxy)
    try:
        writer.write(
            b"CONNECT shop.example:443 HTTP/1.1\r\nHost: shop.example:443\r\n\r\n"
            b"\x16\x03\x01 tunnel bytes"
        )
        async with asyncio.timeout(5):
            status, lines, body = await read_response(reader)
            assert await reader.read() == b""  # closed: what follows is not HTTP
    finally:
        writer.close()
    assert status == b"HTTP/1.1 405 Method Not Allowed"
    assert b"Allow: GET, HEAD, OPTIONS, POST, PUT, PATCH, DELETE" in lines
    assert json.loads(body)["error"]["code"] == "method_not_allowed"
    assert reached(eu) == set()
    await settled(proxy)
    assert proxy.sample("geoproxy_requests_denied_total", rule="method:CONNECT") == 1


@pytest.mark.parametrize("forward", [False, True], ids=["default", "forward_trace"])
async def test_trace_is_refused_unless_forwarding_it_is_configured(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    forward: bool,
) -> None:
    proxy, eu = await fenced(
        geode_factory, proxy_factory, [], forwarding={"forward_trace": forward}
    )
    async with http.request("TRACE", f"{proxy.url}/whoami", headers={"Cookie": "s=1"}) as resp:
        if forward:
            assert resp.status == 200
            assert reached(eu) == {"/whoami"}
        else:
            assert resp.status == 405
            assert resp.headers["Allow"] == "GET, HEAD, OPTIONS, POST, PUT, PATCH, DELETE"
            assert (await resp.json())["error"]["code"] == "method_not_allowed"
            assert reached(eu) == set()


# --- the reference stamp, behind the shipped rules ------------------------------------------


@pytest.mark.parametrize("shipped", ["demo.yaml", "geoproxy.yaml"])
async def test_shipped_configs_fence_off_the_reference_stamps_internal_paths(
    proxy_factory: ProxyFactory, http: aiohttp.ClientSession, tmp_path: Path, shipped: str
) -> None:
    """The stamp serves its internal endpoints on its peer listener: a geode URL pointing
    there by mistake still exposes none of them through the edge."""
    rules = config_mod.load(REPO / "config" / shipped).access
    stamp = StampConfig(
        path=None,
        name="stamp-eu",
        region="eu-west",
        host="127.0.0.1",
        port=0,
        database=tmp_path / "stamp.db",
        peers=(),
        peer_port=0,
    )
    app = build_stamp_app(stamp, CollectorRegistry())
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        url = "http://{}:{}".format(*app[STATE].peer_address)
        proxy = await proxy_factory(
            base_config(
                [
                    {"name": n, "region": r, "url": url}
                    for n, r in (("s-eu", "eu-west"), ("s-us", "us-east"), ("s-ap", "ap-northeast"))
                ],
                access=[
                    {"name": r.name, "path_prefix": r.path_prefix, "action": r.action}
                    for r in rules
                ],
            )
        )
        for path in ("/replication/changes", "/events", "/dead-letters", "/metrics"):
            async with http.get(url + path) as resp:
                assert resp.status != 404, path  # the stamp has it
            async with http.get(proxy.url + path) as resp:
                assert (resp.status, "X-Geoproxy-Geode" in resp.headers) == (404, False), path
                assert (await resp.json())["error"]["code"] == "not_found"
        async with http.get(proxy.url + "/health") as resp:
            assert resp.status == 200
    finally:
        await server.close()


# --- config, check-config, route ---------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        (
            {"path_prefix": "replication/", "action": "deny"},
            "access[0].path_prefix: must start with '/': 'replication/'",
        ),
        (
            {"path_prefix": "/a//b", "action": "deny"},
            "access[0].path_prefix: not a normalised path: '/a//b' (geodes read it as '/a/b')",
        ),
        (
            {"path_prefix": "/a/../b", "action": "deny"},
            "access[0].path_prefix: not a normalised path: '/a/../b' (geodes read it as '/b')",
        ),
        (
            {"path_prefix": "/%72eplication", "action": "deny"},
            "access[0].path_prefix: must not contain percent-encoding (write the path decoded): "
            "'/%72eplication'",
        ),
        (
            {"path_prefix": "/a;v=1", "action": "deny"},
            "access[0].path_prefix: must not contain a ';' parameter (geodes may cut it off): "
            "'/a;v=1'",
        ),
        (
            {"path_prefix": "/a?b", "action": "deny"},
            "access[0].path_prefix: must not contain a query: '/a?b'",
        ),
        (
            {"path_prefix": "/a", "action": "block"},
            "access[0].action: unknown value 'block' (choose from: deny, allow)",
        ),
        (
            {"path_prefix": "/a", "action": "deny", "status": 401},
            "access[0].status: must be 403 or 404, got 401",
        ),
        (
            {"path_prefix": "/a", "action": "allow", "status": 403},
            "access[0].status: only a deny rule has a status",
        ),
        (
            {"path_prefix": "/a", "action": "deny", "name": "rule:1"},
            "access[0].name: invalid rule name 'rule:1' (letters, digits and '._-', at most 63)",
        ),
        (
            {"path_prefix": "/a", "action": "deny", "prefix": "/b"},
            "access[0].prefix: unknown key (did you mean 'path_prefix'?)",
        ),
        ({"action": "deny"}, "access[0].path_prefix: is required"),
        ("/a", "access[0]: must be a mapping, got '/a'"),
    ],
    ids=[
        "relative",
        "repeated-slash",
        "dot-segment",
        "encoded",
        "parameter",
        "query",
        "bad-action",
        "bad-status",
        "status-on-allow",
        "bad-name",
        "unknown-key",
        "missing-prefix",
        "not-a-mapping",
    ],
)
def test_a_bad_access_rule_is_named_with_its_path_and_value(
    write_config: WriteConfig, rule: Any, message: str
) -> None:
    path = write_config(edited(access=[rule]))
    assert problems_of(path) == [f"{path}: {message}"]


def test_duplicate_rule_names_and_a_list_that_is_not_one_are_rejected(
    write_config: WriteConfig,
) -> None:
    rule = {"name": "x", "path_prefix": "/a", "action": "deny"}
    path = write_config(edited(access=[rule, rule]))
    assert problems_of(path) == [
        f"{path}: access[1].name: duplicate rule name 'x' (first at access[0])"
    ]
    path = write_config(edited(access={"path_prefix": "/a"}))
    assert problems_of(path) == [f"{path}: access: must be a list, got {{'path_prefix': '/a'}}"]


def test_check_config_and_route_show_the_rule_a_path_meets(tmp_path: Path) -> None:
    config = REPO / "config" / "demo.yaml"
    done = subprocess.run(
        [sys.executable, "-m", "geoproxy", "check-config", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    lines = done.stdout.splitlines()
    at = lines.index("access rules (first match per reading of the path; none: forwarded):")
    assert [line.split() for line in lines[at + 1 : at + 6]] == [
        ["stamp-replication", "deny", "404", "/replication/"],
        ["stamp-events", "deny", "404", "/events"],
        ["stamp-dead-letters", "deny", "404", "/dead-letters"],
        ["stamp-metrics", "deny", "404", "/metrics"],
        ["methods", "refused", "at", "the", "edge:", "CONNECT", "(405);", "TRACE:", "405"],
    ]
    route = [sys.executable, "-m", "geoproxy", "route", "--config", str(config), "--path"]
    done = subprocess.run(
        [*route, "/items/../REPLICATION/changes"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.splitlines()[-1] == (
        "access: /items/../REPLICATION/changes -> denied "
        "by rule 'stamp-replication' (/replication/): 404"
    )
    done = subprocess.run(
        [*route, "/items/1", "--json"], capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(done.stdout)["access"] == {
        "path": "/items/1",
        "allowed": True,
        "rule": None,
        "status": None,
        "reason": "allowed: no rule matches",
    }


async def test_admin_route_names_the_rule_the_proxy_applies(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    proxy, _ = await fenced(geode_factory, proxy_factory)
    for path, rule, status in (
        ("/%65vents", "stamp-events", 404),
        ("/items/1", None, None),
        ("/a%2Fb", "path:unsafe", 400),
    ):
        async with http.get(f"{proxy.admin_url}/route", params={"path": path}) as resp:
            access = (await resp.json())["access"]
        assert (access["rule"], access["status"]) == (rule, status)
        served = (await exchange(proxy, get(path)))[0].split(b" ")[1]
        assert int(served) == (status or 200)


# --- the decision itself ----------------------------------------------------------------


def test_decisions_are_remembered_per_path_but_bounded() -> None:
    rules = AccessRules((AccessRule("r", "/a/", "deny"),))
    assert rules.decide("/a/x?q=1") is rules.decide("/a/x?q=2")
    for i in range(5000):
        rules.decide(f"/b/{i}")
    assert len(rules._cache) <= 4096
    assert not rules.decide("/A/x").allowed


async def test_a_websocket_upgrade_to_a_denied_path_is_refused(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    proxy, eu = await fenced(
        geode_factory, proxy_factory, [{"path_prefix": "/ws", "action": "deny"}]
    )
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await http.ws_connect(f"{proxy.url}/%77s")
    assert info.value.status == 404
    assert reached(eu) == set()


async def test_denials_in_workers_are_summed_by_the_supervisor(
    geode_factory: GeodeFactory, write_config: WriteConfig, http: aiohttp.ClientSession
) -> None:
    eu = await geode_factory("eu-1", "eu-west")
    data = one_region([eu], access=STAMP_RULES[:1])
    async with supervised(write_config(data), workers=2) as proxy:
        assert await get_fresh(http, f"{proxy.proxy_url}/%72eplication/x", 20) == [(404, "")] * 20
        assert await get_fresh(http, f"{proxy.proxy_url}/items/1", 4) == [(200, "eu-1")] * 4
        m = await proxy.metrics(http)
        assert total(m, "geoproxy_requests_denied_total", rule="stamp-replication") == 20
        assert await proxy.stop() == 0
    assert reached(eu) == {"/items/1"}


# --- slow request bodies -----------------------------------------------------------------


class BodyGeode:
    """A geode that reads whatever a request sends and never answers: it records, per
    connection, the bytes received and whether (and when) the proxy closed it."""

    def __init__(self) -> None:
        self.received: list[bytearray] = []
        self.closed: list[asyncio.Event] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            if head.startswith(b"GET /health "):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                return
            data, closed = bytearray(head), asyncio.Event()
            self.received.append(data)
            self.closed.append(closed)
            try:
                while chunk := await reader.read(65536):
                    data += chunk
            except ConnectionError:
                pass
            closed.set()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
async def body_geode(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory
) -> AsyncIterator[tuple[BodyGeode, Proxy]]:
    """A ``BodyGeode`` in eu-west behind a proxy with a 300 ms body timeout."""
    geode = BodyGeode()
    url = await geode.start()
    us = await geode_factory("us-1", "us-east")
    ap = await geode_factory("ap-1", "ap-northeast")
    proxy = await proxy_factory(
        base_config(
            [{"name": "slow-1", "region": "eu-west", "url": url}, geode_entry(us), geode_entry(ap)],
            limits={"body_timeout": "300ms", "body_min_rate": "1KiB"},
            forwarding={"response_timeout": "5s"},
        )
    )
    yield geode, proxy
    await geode.close()


async def request_timed_out(
    proxy: Proxy,
    head: bytes,
    pieces: list[bytes],
    pause: float,
) -> tuple[bytes, dict[str, Any], float]:
    """Send ``head``, then each piece ``pause`` seconds apart (until the proxy answers);
    the status line, the JSON error, and seconds from the head to the answer."""
    reader, writer = await raw_client(proxy)
    loop = asyncio.get_running_loop()
    began = loop.time()
    writer.write(head)

    async def trickle() -> None:
        for piece in pieces:
            await asyncio.sleep(pause)
            writer.write(piece)

    sending = asyncio.create_task(trickle())
    try:
        async with asyncio.timeout(10):
            status, lines, body = await read_response(reader)
            took = loop.time() - began
            assert b"Connection: close" in lines
            assert await reader.read() == b""  # the client connection is closed too
    finally:
        sending.cancel()
        writer.close()
    return status, json.loads(body), took


@pytest.mark.parametrize(
    "head",
    [
        b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n",
        b"PUT /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n",
    ],
    ids=["content-length", "chunked", "get-with-body"],
)
async def test_a_body_that_stalls_gets_408_and_the_geode_connection_is_closed(
    body_geode: tuple[BodyGeode, Proxy], head: bytes
) -> None:
    geode, proxy = body_geode
    first = b"5\r\nhello\r\n" if b"chunked" in head else b"hello"
    status, error, took = await request_timed_out(proxy, head, [first], 0.05)
    assert status == b"HTTP/1.1 408 Request Timeout"
    assert error["error"]["code"] == "request_timeout"
    assert 0.3 <= took < 3
    async with asyncio.timeout(3):  # the part that went out is not left pending
        await geode.closed[0].wait()
    assert b"hello" in geode.received[0].partition(b"\r\n\r\n")[2]
    assert len(geode.received) == 1
    await settled(proxy)
    assert (
        proxy.sample(
            "geoproxy_upstream_attempts_total", geode="slow-1", outcome="client_body_timeout"
        )
        == 1
    )


async def test_a_body_trickled_below_the_minimum_rate_gets_408(
    body_geode: tuple[BodyGeode, Proxy],
) -> None:
    """Each byte comes well within body_timeout, but at about 20 bytes/s: cut once the
    time spent waiting for it passes body_timeout."""
    geode, proxy = body_geode
    head = b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
    status, error, took = await request_timed_out(proxy, head, [b"x"] * 100, 0.05)
    assert status == b"HTTP/1.1 408 Request Timeout"
    assert error["error"]["code"] == "request_timeout"
    assert 0.3 <= took < 3
    async with asyncio.timeout(3):
        await geode.closed[0].wait()
    assert 5 <= len(geode.received[0].partition(b"\r\n\r\n")[2]) < 100


async def test_a_body_whose_pauses_stay_within_the_limits_is_forwarded_whole(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory
) -> None:
    proxy, eu = await fenced(
        geode_factory, proxy_factory, [], limits={"body_timeout": "400ms", "body_min_rate": "1B"}
    )
    reader, writer = await raw_client(proxy)
    try:
        writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\n")
        for piece in (b"ab", b"cd", b"ef"):
            await asyncio.sleep(0.15)
            writer.write(piece)
        async with asyncio.timeout(5):
            status, _, body = await read_response(reader)
    finally:
        writer.close()
    assert status == b"HTTP/1.1 200 OK"
    assert json.loads(body)["size"] == 6
    assert eu.hits["/echo"] == 1


def test_body_limits_are_read_and_bad_values_named(write_config: WriteConfig) -> None:
    cfg = config_mod.load(
        write_config(edited(limits={"body_timeout": "2s", "body_min_rate": "1KiB"}))
    )
    assert (cfg.limits.body_timeout, cfg.limits.body_min_rate) == (2.0, 1024)
    path = write_config(edited(limits={"body_timeout": 5, "body_min_rate": "fast"}))
    assert problems_of(path) == [
        f"{path}: limits.body_timeout: a duration needs a unit: 5 (e.g. '5s' or '5ms')",
        f"{path}: limits.body_min_rate: not a size: 'fast' (e.g. 64KiB, 100MiB, 2GiB)",
    ]


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/items/1",
        "/Items/A/",
        "/replication/x",
        "/REPLICATION/x",
        "/metricsx",
        "/a.b/c..d",
        "/e/f.",
        "/.well-known/x",
    ],
)
def test_a_plain_path_is_judged_as_the_full_reading_would(path: str) -> None:
    """Paths without escapes, parameters, empty or dot segments skip the splitting: the
    verdict is the one the full reading gives."""
    rules = AccessRules(
        tuple(
            AccessRule(n, p, a)
            for n, p, a in (
                ("m", "/metrics", "deny"),
                ("i", "/Items/", "allow"),
                ("r", "/replication/", "deny"),
                ("all", "/", "deny"),
            )
        )
    )
    segments = access_mod._segments(path)
    assert segments is not None
    full = [rules._first(text, folded) for text, folded in access_mod._readings(segments)]
    denied = [i for i in full if i is not None and rules.rules[i].action == "deny"]
    assert rules.decide(path).allowed == (not denied)
    assert rules.decide(path).rule == rules.rules[min(denied) if denied else full[0]]
