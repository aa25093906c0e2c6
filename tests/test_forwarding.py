"""End to end through a real proxy: real geode servers on loopback, real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import gzip
import socket
import struct
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict

from conftest import FakeGeode, GeodeFactory, Proxy, ProxyFactory, base_config, geode_entry


@pytest.fixture(params=["fast", "coroutine", "public"])
def lane(request: pytest.FixtureRequest) -> str:
    """Every test here runs on both request paths (conftest.py's ``lane``)."""
    return str(request.param)


def lean_only(lane: str, why: str) -> None:
    """A guarantee of the lean mode: the public mode (compat.py) does without it."""
    if lane == "public":
        pytest.skip(f"lean mode only: {why}")


async def three_geodes(geode_factory: GeodeFactory) -> tuple[FakeGeode, FakeGeode, FakeGeode]:
    eu = await geode_factory("eu-1", "eu-west")
    us = await geode_factory("us-1", "us-east")
    ap = await geode_factory("ap-1", "ap-northeast")
    return eu, us, ap


async def start(proxy_factory: ProxyFactory, geodes: list[FakeGeode], **overrides: Any) -> Proxy:
    return await proxy_factory(base_config([geode_entry(g) for g in geodes], **overrides))


async def mark_unhealthy(proxy: Proxy, *geodes: FakeGeode) -> None:
    """Fail health checks until the board takes the geodes out (one round each)."""
    for g in geodes:
        g.health_status = 500
    checker = proxy.gateway.checker
    assert checker is not None
    for _ in range(proxy.gateway.config.health_check.unhealthy_threshold):
        await checker.check_once()
    for g in geodes:
        assert g.name not in proxy.gateway.board.healthy


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"CF-IPCountry": "FR"}, "eu-1"),
        ({"CF-IPCountry": "jp"}, "ap-1"),
        ({"CF-IPCountry": "US"}, "us-1"),
        ({"X-Client-Region": "ap-northeast"}, "ap-1"),
        ({"X-Client-Region": "US", "CF-IPCountry": "FR"}, "us-1"),
        ({"CF-IPCountry": "XX"}, "eu-1"),  # unknown -> default region
        ({}, "eu-1"),
    ],
    ids=["cf-fr", "cf-jp-lowercase", "cf-us", "xcr-region", "xcr-before-cf", "cf-xx", "none"],
)
async def test_routes_to_home_region_geode_from_trusted_peer_headers(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    headers: dict[str, str],
    expected: str,
) -> None:
    geodes = await three_geodes(geode_factory)
    proxy = await start(proxy_factory, list(geodes))
    async with http.get(f"{proxy.url}/whoami", headers=headers) as resp:
        assert resp.status == 200
        body = await resp.json()
        assert body["geode"] == expected
        assert resp.headers["X-Geoproxy-Geode"] == expected
        by_name = {g.name: g for g in geodes}
        assert resp.headers["X-Geoproxy-Region"] == by_name[expected].region


async def test_untrusted_peer_cannot_set_client_region(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    eu, us, ap = await three_geodes(geode_factory)
    proxy = await start(proxy_factory, [eu, us, ap], trusted_proxies=["10.0.0.0/8"])
    spoof = {"CF-IPCountry": "JP", "X-Client-Region": "us-east", "X-Forwarded-For": "1.2.3.4"}
    async with http.get(f"{proxy.url}/echo", headers=spoof) as resp:
        body = await resp.json()
    assert body["geode"] == "eu-1"  # the default region, not what the headers claimed
    seen = body["headers"]
    assert "cf-ipcountry" not in seen and "x-client-region" not in seen
    assert seen["x-forwarded-for"] == ["127.0.0.1"]  # the forged entry is not passed on


async def test_trusted_peer_forwarded_for_is_appended(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    eu, us, ap = await three_geodes(geode_factory)
    proxy = await start(proxy_factory, [eu, us, ap])
    headers = {
        "X-Forwarded-For": "203.0.113.9",
        "X-Forwarded-Proto": "https",
        "Host": "shop.example.com",
        "Via": "1.1 cdn",
    }
    async with http.get(f"{proxy.url}/echo", headers=headers) as resp:
        seen = (await resp.json())["headers"]
        assert resp.headers["Via"] == f"1.1 {proxy.gateway.via}"
    assert seen["x-forwarded-for"] == ["203.0.113.9, 127.0.0.1"]
    assert seen["x-forwarded-proto"] == ["https"]
    assert seen["x-forwarded-host"] == ["shop.example.com"]
    assert seen["host"] == ["shop.example.com"]  # the original Host is kept by default
    assert seen["via"] == [f"1.1 cdn, 1.1 {proxy.gateway.via}"]


async def test_host_is_the_geodes_when_preserve_host_is_off(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    eu, us, ap = await three_geodes(geode_factory)
    proxy = await start(proxy_factory, [eu, us, ap], forwarding={"preserve_host": False})
    async with http.get(f"{proxy.url}/echo", headers={"Host": "shop.example.com"}) as resp:
        seen = (await resp.json())["headers"]
    assert seen["host"] == [eu.url.removeprefix("http://")]
    assert seen["x-forwarded-host"] == ["shop.example.com"]


async def test_hop_by_hop_headers_are_removed_both_ways(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    eu, us, ap = await three_geodes(geode_factory)
    proxy = await start(proxy_factory, [eu, us, ap])
    headers = {
        "Connection": "keep-alive, X-Hop-Secret",
        "X-Hop-Secret": "1",
        "Keep-Alive": "300",
        "TE": "trailers",
        "Proxy-Authorization": "Basic Zm9vOmJhcg==",
        "Trailer": "X-Sum",
        "Upgrade": "h2c",
        "Proxy-Connection": "keep-alive",
        "X-Geoproxy-Geode": "forged",
        "X-End-To-End": "kept",
    }
    async with http.get(f"{proxy.url}/echo", headers=headers) as resp:
        seen = (await resp.json())["headers"]
    for name in (
        "x-hop-secret",
        "keep-alive",
        "te",
        "proxy-authorization",
        "trailer",
        "upgrade",
        "proxy-connection",
        "x-geoproxy-geode",
    ):
        assert name not in seen, name
    assert seen["x-end-to-end"] == ["kept"]

    async with http.get(f"{proxy.url}/hop-headers") as resp:
        assert resp.status == 200
        for name in ("Keep-Alive", "Proxy-Authenticate", "Trailer", "X-Private-Hop"):
            assert name not in resp.headers, name
        assert resp.headers["X-End-To-End"] == "kept"


async def test_path_and_query_reach_the_geode_byte_for_byte(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    eu, us, ap = await three_geodes(geode_factory)
    proxy = await start(proxy_factory, [eu, us, ap])
    target = "/a%2Fb/c%20d?x=1&y=%2F&z"
    async with http.get(aiohttp.client.URL(proxy.url + target, encoded=True)) as resp:
        assert (await resp.json())["path"] == target


async def test_geode_base_path_is_prefixed(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    eu = await geode_factory("eu-1", "eu-west")
    us = await geode_factory("us-1", "us-east")
    proxy = await proxy_factory(
        base_config(
            [
                geode_entry(eu, url=eu.url + "/api/"),
                geode_entry(us),
            ],
            regions={"eu-west": {"fallback": ["us-east"]}, "us-east": {"fallback": ["eu-west"]}},
            countries={},
            continents={},
        )
    )
    async with http.get(f"{proxy.url}/items?id=1") as resp:
        assert (await resp.json())["path"] == "/api/items?id=1"


async def test_falls_back_in_order_when_home_region_is_unhealthy(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    eu, us, ap = await three_geodes(geode_factory)
    proxy = await start(proxy_factory, [eu, us, ap])
    await mark_unhealthy(proxy, eu)
    async with http.get(f"{proxy.url}/whoami", headers={"CF-IPCountry": "FR"}) as resp:
        assert (await resp.json())["geode"] == "us-1"  # eu-west falls back to us-east first
    await mark_unhealthy(proxy, us)
    async with http.get(f"{proxy.url}/whoami", headers={"CF-IPCountry": "FR"}) as resp:
        assert (await resp.json())["geode"] == "ap-1"
    assert eu.hits["/whoami"] == 0 and us.hits["/whoami"] == 1


async def test_fails_over_to_fallback_region_when_home_geode_refuses_connections(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    eu, us, ap = await three_geodes(geode_factory)
    proxy = await start(proxy_factory, [eu, us, ap])
    assert eu.server is not None
    await eu.server.close()  # still healthy on the board: the forwarder meets the refusal
    payload = b"order-42" * 1000
    async with http.post(f"{proxy.url}/echo", data=payload, headers={"CF-IPCountry": "FR"}) as resp:
        body = await resp.json()
    # A refused connect sent no byte, so even a POST moves on, with its body intact.
    assert resp.status == 200 and body["geode"] == "us-1"
    assert body["size"] == len(payload)


async def test_get_moves_on_after_503_but_post_is_not_retried_after_body_sent(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    eu, us, ap = await three_geodes(geode_factory)
    proxy = await start(proxy_factory, [eu, us, ap])
    eu.force_status = 503
    async with http.get(f"{proxy.url}/whoami", headers={"CF-IPCountry": "FR"}) as resp:
        assert resp.status == 200 and (await resp.json())["geode"] == "us-1"
    assert eu.hits["/whoami"] == 1

    async with http.post(
        f"{proxy.url}/echo", data=b"pay once" * 4096, headers={"CF-IPCountry": "FR"}
    ) as resp:
        assert resp.status == 503  # the geode's own answer, passed through
        assert (await resp.json())["geode"] == "eu-1"
    assert us.hits["/echo"] == 0 and ap.hits["/echo"] == 0


async def test_put_with_a_body_answered_503_is_not_retried_after_the_body_was_sent(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    """PUT is idempotent, yet its body cannot be replayed once it went out: the geode's 503
    is the answer (a POST alone cannot show this: it is never retried anyway)."""
    eu, us, ap = await three_geodes(geode_factory)
    proxy = await start(proxy_factory, [eu, us, ap])
    eu.force_status = 503  # /echo reads the whole body, then answers 503
    async with http.put(
        f"{proxy.url}/echo", data=b"put once" * 4096, headers={"CF-IPCountry": "FR"}
    ) as resp:
        assert resp.status == 503
        assert (await resp.json())["geode"] == "eu-1"
    assert (eu.hits["/echo"], us.hits["/echo"], ap.hits["/echo"]) == (1, 0, 0)
    # Without a body the same PUT moves on: the rule is the body, not the method.
    async with http.put(f"{proxy.url}/echo", headers={"CF-IPCountry": "FR"}) as resp:
        assert resp.status == 200
        assert (await resp.json())["geode"] == "us-1"


async def test_503_with_json_and_retry_after_when_no_geode_is_healthy(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    eu, us, ap = await three_geodes(geode_factory)
    proxy = await start(proxy_factory, [eu, us, ap])
    await mark_unhealthy(proxy, eu, us, ap)
    async with http.get(f"{proxy.url}/whoami", headers={"CF-IPCountry": "JP"}) as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "1"
        assert resp.content_type == "application/json"
        assert await resp.json() == {
            "error": {
                "status": 503,
                "code": "no_healthy_geode",
                "region": "ap-northeast",
                "message": "no healthy geode can serve region 'ap-northeast'",
            }
        }
    assert eu.hits["/whoami"] == us.hits["/whoami"] == ap.hits["/whoami"] == 0


async def test_panic_mode_tries_geodes_even_when_none_is_healthy(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    eu, us, ap = await three_geodes(geode_factory)
    proxy = await start(proxy_factory, [eu, us, ap], forwarding={"when_none_healthy": "try_all"})
    await mark_unhealthy(proxy, eu, us, ap)
    async with http.get(f"{proxy.url}/whoami", headers={"CF-IPCountry": "JP"}) as resp:
        assert resp.status == 200 and (await resp.json())["geode"] == "ap-1"


async def test_panic_mode_spreads_over_the_geodes_of_a_region_not_one_memoised_order(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    """With none healthy, each request draws its own weighted order: the try order is
    never kept from one request for the next (it would send every panic request to the
    same geode of a region while it still answers)."""
    one, two = await geode_factory("eu-1", "eu-west"), await geode_factory("eu-2", "eu-west")
    forwarding = {"when_none_healthy": "try_all", "max_attempts": 1}
    proxy = await start(proxy_factory, [one, two], forwarding=forwarding)
    await mark_unhealthy(proxy, one, two)
    for _ in range(40):
        async with http.get(f"{proxy.url}/whoami") as resp:
            assert resp.status == 200
    assert one.hits["/whoami"] > 0 and two.hits["/whoami"] > 0, (one.hits, two.hits)


async def test_502_json_when_every_candidate_refuses(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    geodes = await three_geodes(geode_factory)
    proxy = await start(proxy_factory, list(geodes))
    for g in geodes:
        assert g.server is not None
        await g.server.close()
    async with http.get(f"{proxy.url}/whoami") as resp:
        assert resp.status == 502
        assert await resp.json() == {
            "error": {
                "status": 502,
                "code": "bad_gateway",
                "message": "no geode could be reached",
                "attempts": 3,
            }
        }


async def test_max_attempts_caps_the_geodes_tried(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    eu, us, ap = await three_geodes(geode_factory)
    proxy = await start(proxy_factory, [eu, us, ap], forwarding={"max_attempts": 2})
    for g in (eu, us):
        assert g.server is not None
        await g.server.close()
    async with http.get(f"{proxy.url}/whoami", headers={"CF-IPCountry": "FR"}) as resp:
        assert resp.status == 502
        assert (await resp.json())["error"]["attempts"] == 2
    assert ap.hits["/whoami"] == 0


async def test_504_when_geodes_do_not_answer_in_time(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    eu, us, ap = await three_geodes(geode_factory)
    proxy = await start(
        proxy_factory, [eu, us, ap], forwarding={"response_timeout": "200ms", "max_attempts": 2}
    )
    async with http.get(f"{proxy.url}/slow?delay=2", headers={"CF-IPCountry": "FR"}) as resp:
        assert resp.status == 504
        assert (await resp.json())["error"]["code"] == "gateway_timeout"
    assert eu.hits["/slow"] == 1 and us.hits["/slow"] == 1  # GET: retried elsewhere once


async def test_post_is_not_retried_after_response_timeout(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    eu, us, ap = await three_geodes(geode_factory)
    proxy = await start(proxy_factory, [eu, us, ap], forwarding={"response_timeout": "200ms"})
    async with http.post(
        f"{proxy.url}/slow?delay=2", data=b"x", headers={"CF-IPCountry": "FR"}
    ) as resp:
        assert resp.status == 504
    assert eu.hits["/slow"] == 1 and us.hits["/slow"] == 0


async def test_geode_reset_mid_response_aborts_the_client_connection(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    eu, us, ap = await three_geodes(geode_factory)
    proxy = await start(proxy_factory, [eu, us, ap])
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.get(f"{proxy.url}/reset") as resp:
            assert resp.status == 200
            await resp.read()
    # The proxy is fine afterwards.
    async with http.get(f"{proxy.url}/whoami") as resp:
        assert resp.status == 200


async def test_redirects_reach_the_client_unfollowed(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    eu, us, ap = await three_geodes(geode_factory)
    proxy = await start(proxy_factory, [eu, us, ap])
    async with http.get(f"{proxy.url}/status/302", allow_redirects=False) as resp:
        assert resp.status == 302
        assert resp.headers["X-Geoproxy-Geode"] == "eu-1"


async def test_compressed_bodies_pass_through_undecoded(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    eu, us, ap = await three_geodes(geode_factory)
    proxy = await start(proxy_factory, [eu, us, ap])
    async with http.get(f"{proxy.url}/gzip", headers={"Accept-Encoding": "gzip"}) as resp:
        raw = await resp.read()
        assert resp.headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(raw) == b"hello from eu-1"


async def test_cookies_are_never_shared_between_clients(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory
) -> None:
    eu, us, ap = await three_geodes(geode_factory)
    proxy = await start(proxy_factory, [eu, us, ap])
    async with aiohttp.ClientSession() as alice, alice.get(f"{proxy.url}/set-cookie") as resp:
        assert "session" in resp.cookies
    async with aiohttp.ClientSession() as bob, bob.get(f"{proxy.url}/echo") as resp:
        seen = (await resp.json())["headers"]
    assert "cookie" not in seen


async def test_head_keeps_content_length_without_a_body(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    eu, us, ap = await three_geodes(geode_factory)
    proxy = await start(proxy_factory, [eu, us, ap])
    async with http.get(f"{proxy.url}/whoami") as resp:
        length = resp.headers["Content-Length"]
    async with http.head(f"{proxy.url}/whoami") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == length
        assert await resp.read() == b""


async def test_keep_alive_connection_serves_many_requests(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    eu, us, ap = await three_geodes(geode_factory)
    proxy = await start(proxy_factory, [eu, us, ap])

    async def one(i: int) -> str:
        async with http.post(f"{proxy.url}/echo", data=str(i).encode() * 100) as resp:
            body = await resp.json()
            assert body["size"] == len(str(i)) * 100
            return str(body["geode"])

    results = await asyncio.gather(*(one(i) for i in range(200)))
    assert set(results) == {"eu-1"}


@pytest.mark.parametrize("edition", ["City", "Country"])
@pytest.mark.parametrize(
    ("forwarded_for", "expected"),
    [
        ("81.2.69.160", "eu-1"),  # GB
        ("175.16.199.7", "ap-1"),  # CN, by the AS continent default
        ("216.160.83.56", "us-1"),  # US
        ("2001:218::1", "ap-1"),  # JP over IPv6
        ("10.0.0.7", "eu-1"),  # private: falls through to the default region
        ("203.0.113.9, 81.2.69.160", "eu-1"),  # the right-most untrusted entry decides
    ],
    ids=["v4-gb", "v4-continent", "v4-us", "v6-jp", "private", "rightmost"],
)
async def test_geoip_of_the_real_client_ip_picks_the_region(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    make_mmdb: Any,
    edition: str,
    forwarded_for: str,
    expected: str,
) -> None:
    geodes = await three_geodes(geode_factory)
    database = make_mmdb(edition, 6)
    proxy = await start(proxy_factory, list(geodes), geoip={"database": str(database)})
    async with http.get(f"{proxy.url}/whoami", headers={"X-Forwarded-For": forwarded_for}) as resp:
        assert (await resp.json())["geode"] == expected


async def test_geoip_ignores_forwarded_for_from_an_untrusted_peer(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    make_mmdb: Any,
) -> None:
    geodes = await three_geodes(geode_factory)
    proxy = await start(
        proxy_factory,
        list(geodes),
        trusted_proxies=[],
        geoip={"database": str(make_mmdb("City", 6))},
    )
    # The peer (127.0.0.1, private) is the client; a forged XFF cannot pick Japan.
    async with http.get(f"{proxy.url}/whoami", headers={"X-Forwarded-For": "2001:218::1"}) as resp:
        assert (await resp.json())["geode"] == "eu-1"


async def test_expect_100_continue_upload_is_forwarded(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    eu, us, ap = await three_geodes(geode_factory)
    proxy = await start(proxy_factory, [eu, us, ap])
    async with http.put(f"{proxy.url}/echo", data=b"z" * 100_000, expect100=True) as resp:
        body = await resp.json()
    assert resp.status == 200 and body["size"] == 100_000
    assert "expect" not in body["headers"]


async def test_expect_100_continue_is_answered_before_the_body_and_others_get_417(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory
) -> None:
    eu, us, ap = await three_geodes(geode_factory)
    proxy = await start(proxy_factory, [eu, us, ap])
    port = int(proxy.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"PUT /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    )
    async with asyncio.timeout(5):
        assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"hello")
        assert (await reader.readline()).startswith(b"HTTP/1.1 200")
    writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"PUT /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: something-else\r\n\r\n"
    )
    async with asyncio.timeout(5):
        assert (await reader.readline()).startswith(b"HTTP/1.1 417")
    writer.close()
    assert eu.hits["/echo"] == 1


async def test_path_with_an_encoded_newline_is_forwarded_not_404(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    eu, us, ap = await three_geodes(geode_factory)
    proxy = await start(proxy_factory, [eu, us, ap])
    url = aiohttp.client.URL(f"{proxy.url}/a%0Ab", encoded=True)
    async with http.get(url) as resp:
        assert resp.status == 200
        assert resp.headers["X-Geoproxy-Geode"] == "eu-1"


class RawGeode:
    """A geode speaking raw HTTP/1.1 from a script, for responses aiohttp would not send.
    ``/health`` answers 200; every other request gets ``reply`` and then, with ``reset``,
    an RST instead of a clean close (``reply=None``: close without answering)."""

    def __init__(self, reply: bytes | None, reset: bool = False) -> None:
        self.reply = reply
        self.reset = reset
        self.requests: list[str] = []
        self.heads: list[bytes] = []  # every request head, as received
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            line = head.split(b"\r\n", 1)[0].decode()
            if " /health " in line:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
                await writer.drain()
                return
            self.requests.append(line)
            self.heads.append(head)
            if self.reply is not None:
                writer.write(self.reply)
                await writer.drain()
                await asyncio.sleep(0.05)
            if self.reset:
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        for writer in self.writers:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


@pytest.fixture
async def raw_geodes() -> AsyncIterator[list[RawGeode]]:
    made: list[RawGeode] = []
    yield made
    for geode in made:
        await geode.close()


async def start_with_raw_home(
    proxy_factory: ProxyFactory, geode_factory: GeodeFactory, raw: RawGeode, **overrides: Any
) -> Proxy:
    """eu-west is the raw geode; us-east a FakeGeode (its fallback)."""
    url = await raw.start()
    us = await geode_factory("us-1", "us-east")
    ap = await geode_factory("ap-1", "ap-northeast")
    return await proxy_factory(
        base_config(
            [{"name": "raw-1", "region": "eu-west", "url": url}, geode_entry(us), geode_entry(ap)],
            **overrides,
        )
    )


@pytest.mark.parametrize(
    "head",
    [b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", b"HTTP/1.0 200 OK\r\n\r\n"],
    ids=["http11-connection-close", "http10"],
)
async def test_reset_of_a_close_delimited_body_aborts_the_client(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    raw_geodes: list[RawGeode],
    head: bytes,
) -> None:
    raw = RawGeode(head + b"partial-" * 10, reset=True)
    raw_geodes.append(raw)
    proxy = await start_with_raw_home(proxy_factory, geode_factory, raw)
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.get(f"{proxy.url}/file") as resp:
            await resp.read()


async def test_clean_close_of_a_close_delimited_body_is_complete(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    raw_geodes: list[RawGeode],
) -> None:
    raw = RawGeode(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nwhole body")
    raw_geodes.append(raw)
    proxy = await start_with_raw_home(proxy_factory, geode_factory, raw)
    async with http.get(f"{proxy.url}/file") as resp:
        assert await resp.read() == b"whole body"


async def test_a_geode_is_never_sent_the_same_request_twice(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    raw_geodes: list[RawGeode],
) -> None:
    raw = RawGeode(None)  # reads the request, closes without answering
    raw_geodes.append(raw)
    proxy = await start_with_raw_home(proxy_factory, geode_factory, raw)
    for method in ("GET", "PUT", "DELETE"):
        async with http.request(method, f"{proxy.url}/whoami") as resp:
            assert resp.status == 200
            assert resp.headers["X-Geoproxy-Geode"] == "us-1"
    assert [r.split()[0] for r in raw.requests] == ["GET", "PUT", "DELETE"]


async def test_no_content_type_or_server_header_is_invented(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    raw_geodes: list[RawGeode],
    lane: str,
) -> None:
    lean_only(lane, "aiohttp's public response adds Content-Type and Server")
    raw = RawGeode(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
    raw_geodes.append(raw)
    proxy = await start_with_raw_home(proxy_factory, geode_factory, raw)
    async with http.get(f"{proxy.url}/x") as resp:
        assert await resp.read() == b"hello"
        assert "Content-Type" not in resp.headers
        assert "Server" not in resp.headers


async def test_unsupported_transfer_coding_from_a_geode_is_a_502(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    raw_geodes: list[RawGeode],
) -> None:
    body = gzip.compress(b"secret")
    chunk = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    raw = RawGeode(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n" + chunk)
    raw_geodes.append(raw)
    proxy = await start_with_raw_home(proxy_factory, geode_factory, raw)
    async with http.get(f"{proxy.url}/x") as resp:
        assert resp.status == 502
        assert (await resp.json())["error"]["code"] == "bad_response"


@pytest.mark.parametrize("trusted", [True, False], ids=["trusted-peer", "untrusted-peer"])
async def test_client_identity_headers_pass_only_from_trusted_peers(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    trusted: bool,
) -> None:
    eu, us, ap = await three_geodes(geode_factory)
    cidrs = ["127.0.0.1/32"] if trusted else ["10.0.0.0/8"]
    proxy = await start(proxy_factory, [eu, us, ap], trusted_proxies=cidrs)
    claims = {
        "Forwarded": "for=6.6.6.6",
        "X-Real-IP": "6.6.6.6",
        "True-Client-IP": "6.6.6.6",
        "X-Forwarded-Port": "443",
        "CF-Connecting-IP": "6.6.6.6",
    }
    async with http.get(f"{proxy.url}/echo", headers=claims) as resp:
        seen = (await resp.json())["headers"]
    for name in claims:
        assert (name.lower() in seen) is trusted, name


async def test_every_via_and_forwarded_value_is_kept(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    eu, us, ap = await three_geodes(geode_factory)
    proxy = await start(proxy_factory, [eu, us, ap])
    headers = CIMultiDict(
        [
            ("Via", "1.0 a"),
            ("Via", "1.1 b"),
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-For", "203.0.113.1"),
            ("X-Forwarded-For", "198.51.100.2"),
        ]
    )
    async with http.get(f"{proxy.url}/echo", headers=headers) as resp:
        seen = (await resp.json())["headers"]
    assert seen["via"] == [f"1.0 a, 1.1 b, 1.1 {proxy.gateway.via}"]
    assert seen["x-forwarded-for"] == ["203.0.113.1, 198.51.100.2, 127.0.0.1"]


def test_aiohttp_is_recent_and_runs_its_c_parser() -> None:
    """The issue asks for aiohttp >= 3.14.4 (parser advisories) with its C extensions."""
    from aiohttp import http_parser

    version = tuple(int(p) for p in aiohttp.__version__.split(".")[:3])
    assert version >= (3, 14, 4)
    assert http_parser.HttpRequestParser.__module__ == "aiohttp._http_parser"
    assert http_parser.HttpResponseParser.__module__ == "aiohttp._http_parser"


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b'HTTP/1.1 304 Not Modified\r\nContent-Length: 1234\r\nETag: "v1"\r\n\r\n', 304),
        (b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n", 204),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 200),
    ],
    ids=["304-with-representation-length", "204", "empty-200"],
)
async def test_bodiless_responses_pass_through_on_a_kept_alive_connection(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    raw_geodes: list[RawGeode],
    head: bytes,
    status: int,
) -> None:
    raw = RawGeode(head)
    raw_geodes.append(raw)
    proxy = await start_with_raw_home(proxy_factory, geode_factory, raw)
    async with http.get(f"{proxy.url}/x") as resp:
        assert resp.status == status
        assert await resp.read() == b""
        assert resp.headers["X-Geoproxy-Geode"] == "raw-1"


async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, list[bytes], bytes]:
    """One response off a raw client connection: status line, header lines, body (by
    Content-Length, else to the end of the connection)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status, *lines = head[:-4].split(b"\r\n")
    length = [
        int(v) for n, _, v in (h.partition(b": ") for h in lines) if n.lower() == b"content-length"
    ]
    body = await reader.readexactly(length[0]) if length else await reader.read()
    return status, lines, body


def values(lines: list[bytes], name: bytes) -> list[bytes]:
    return [v for n, _, v in (h.partition(b": ") for h in lines) if n.lower() == name]


async def raw_client(proxy: Proxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = proxy.url.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


@pytest.mark.parametrize("trusted", [True, False], ids=["trusted-peer", "untrusted-peer"])
async def test_request_head_keeps_duplicates_in_order_and_drops_what_connection_names(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    raw_geodes: list[RawGeode],
    trusted: bool,
    lane: str,
) -> None:
    lean_only(lane, "ClientSession rebuilds the request head (order, case, bytes)")
    raw = RawGeode(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    raw_geodes.append(raw)
    cidrs = ["127.0.0.1/32"] if trusted else ["10.0.0.0/8"]
    proxy = await start_with_raw_home(proxy_factory, geode_factory, raw, trusted_proxies=cidrs)
    reader, writer = await raw_client(proxy)
    writer.write(
        b"GET /x?a=1&b HTTP/1.1\r\nX-Dup: 1\r\nHost: shop.example\r\n"
        b"Connection: keep-alive, X-Private\r\nX-Private: secret\r\nAccept: */*\r\n"
        b"X-Dup: 2\r\nKeep-Alive: 300\r\nX-Forwarded-For: 203.0.113.9\r\n"
        b"X-Forwarded-For: 198.51.100.2\r\nX-Obs: caf\xe9\r\nCF-IPCountry: FR\r\n"
        b"X-Geoproxy-Region: forged\r\nVia: 1.0 cdn\r\n\r\n"
    )
    async with asyncio.timeout(5):
        status, _, body = await read_response(reader)
    writer.close()
    assert (status, body) == (b"HTTP/1.1 200 OK", b"ok")
    line, *lines = raw.heads[0][:-4].split(b"\r\n")
    assert line == b"GET /x?a=1&b HTTP/1.1"
    assert lines[0] == b"Host: shop.example"  # first, as RFC 9110 7.2 asks
    passed = [h for h in lines[1:] if not h.lower().startswith((b"x-forwarded-", b"via:"))]
    identity = [b"CF-IPCountry: FR"] if trusted else []
    assert passed == [b"X-Dup: 1", b"Accept: */*", b"X-Dup: 2", b"X-Obs: caf\xe9", *identity]
    via = proxy.gateway.via.encode()
    xff = b"203.0.113.9, 198.51.100.2, 127.0.0.1" if trusted else b"127.0.0.1"
    assert values(lines, b"x-forwarded-for") == [xff]
    assert values(lines, b"x-forwarded-proto") == [b"http"]
    assert values(lines, b"x-forwarded-host") == [b"shop.example"]
    assert values(lines, b"via") == [b"1.0 cdn, 1.1 " + via]


@pytest.mark.parametrize("dated", [True, False], ids=["geode-date", "no-geode-date"])
async def test_response_head_keeps_duplicates_and_drops_what_connection_names(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    raw_geodes: list[RawGeode],
    dated: bool,
    lane: str,
) -> None:
    lean_only(lane, "aiohttp's public response rebuilds the head")
    date = b"Date: Tue, 01 Jan 2030 00:00:00 GMT\r\n" if dated else b""
    raw = RawGeode(
        b"HTTP/1.1 201 Made Here\r\nConnection: keep-alive, X-Private\r\nX-Private: 1\r\n"
        b"Set-Cookie: a=1\r\nKeep-Alive: timeout=5\r\nSet-Cookie: b=2\r\n"
        + date
        + b"Via: 1.1 origin\r\nX-Geoproxy-Geode: forged\r\nX-Obs: caf\xe9\r\n"
        b"Content-Length: 5\r\n\r\nhello"
    )
    raw_geodes.append(raw)
    proxy = await start_with_raw_home(proxy_factory, geode_factory, raw)
    reader, writer = await raw_client(proxy)
    async with asyncio.timeout(5):
        for path in (b"/a", b"/b"):  # the second on the same connection: framing is right
            writer.write(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            status, lines, body = await read_response(reader)
            assert (status, body) == (b"HTTP/1.1 201 Made Here", b"hello")
    writer.close()
    names = [h.partition(b": ")[0].lower() for h in lines]
    for gone in (b"connection", b"x-private", b"keep-alive", b"server", b"content-type"):
        assert gone not in names, gone
    assert values(lines, b"set-cookie") == [b"a=1", b"b=2"]
    assert values(lines, b"x-obs") == [b"caf\xe9"]
    assert values(lines, b"via") == [b"1.1 origin, 1.1 " + proxy.gateway.via.encode()]
    assert values(lines, b"x-geoproxy-geode") == [b"raw-1"]
    assert values(lines, b"x-geoproxy-region") == [b"eu-west"]
    assert values(lines, b"content-length") == [b"5"]
    assert len(values(lines, b"date")) == 1
    if dated:
        assert values(lines, b"date") == [b"Tue, 01 Jan 2030 00:00:00 GMT"]


async def test_an_answer_without_a_date_gets_the_current_one_every_time(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    raw_geodes: list[RawGeode],
    lane: str,
) -> None:
    """The fast lane keeps the head it wrote for the next answer with the same geode
    lines (fastexchange.answer_head), but never one whose Date geoproxy added itself."""
    lean_only(lane, "aiohttp's public response rebuilds the head")
    raw = RawGeode(b"HTTP/1.1 200 OK\r\nX-Same: 1\r\nContent-Length: 2\r\n\r\nok")
    raw_geodes.append(raw)
    proxy = await start_with_raw_home(proxy_factory, geode_factory, raw)
    reader, writer = await raw_client(proxy)
    dates = []
    async with asyncio.timeout(10):
        for path in (b"/a", b"/b"):
            writer.write(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            status, lines, body = await read_response(reader)
            assert (status, body) == (b"HTTP/1.1 200 OK", b"ok")
            dates += values(lines, b"date")
            await asyncio.sleep(1.1)
    writer.close()
    assert len(dates) == 2
    assert email.utils.parsedate_to_datetime(dates[1].decode()) > email.utils.parsedate_to_datetime(
        dates[0].decode()
    )


@pytest.mark.parametrize(
    ("request_head", "connection", "closes"),
    [
        (b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n", [], False),
        (b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", [b"close"], True),
        (b"GET /x HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n", [b"keep-alive"], False),
        (b"GET /x HTTP/1.0\r\nHost: x\r\n\r\n", [], True),
    ],
    ids=["http11", "http11-close", "http10-keep-alive", "http10"],
)
async def test_whole_responses_follow_the_clients_keep_alive_and_version(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    raw_geodes: list[RawGeode],
    request_head: bytes,
    connection: list[bytes],
    closes: bool,
    lane: str,
) -> None:
    lean_only(lane, "aiohttp's public response frames HTTP/1.0 keep-alive its own way")
    raw = RawGeode(b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok")
    raw_geodes.append(raw)
    proxy = await start_with_raw_home(proxy_factory, geode_factory, raw)
    reader, writer = await raw_client(proxy)
    writer.write(request_head)
    async with asyncio.timeout(5):
        status, lines, body = await read_response(reader)
        assert status == request_head.split(b"\r\n")[0][-8:] + b" 200 OK"
        assert body == b"ok"
        assert values(lines, b"connection") == connection
        assert (await reader.read() == b"") if closes else not reader.at_eof()
    writer.close()


async def test_a_control_character_in_a_geode_response_head_is_a_502(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    raw_geodes: list[RawGeode],
    caplog: pytest.LogCaptureFixture,
) -> None:
    raw = RawGeode(b"HTTP/1.1 200 OK\r\nX-Bad: a\x01b\r\nContent-Length: 2\r\n\r\nok")
    raw_geodes.append(raw)
    proxy = await start_with_raw_home(proxy_factory, geode_factory, raw)
    async with http.get(f"{proxy.url}/x") as resp:
        assert resp.status == 502
        assert (await resp.json())["error"]["code"] == "bad_response"
    assert "Traceback" not in caplog.text


async def through_raw_home(
    proxy_factory: ProxyFactory,
    geode_factory: GeodeFactory,
    raw_geodes: list[RawGeode],
    reply: bytes,
    request: bytes,
) -> tuple[bytes, list[bytes], bytes]:
    """One request from a raw client through a proxy whose home geode answers ``reply``."""
    raw = RawGeode(reply)
    raw_geodes.append(raw)
    proxy = await start_with_raw_home(proxy_factory, geode_factory, raw)
    reader, writer = await raw_client(proxy)
    writer.write(request)
    try:
        async with asyncio.timeout(5):
            return await read_response(reader)
    finally:
        writer.close()


def dechunk(body: bytes) -> bytes:
    """A chunked body's payload (no extensions, no trailers)."""
    out = b""
    while True:
        size, _, body = body.partition(b"\r\n")
        if int(size, 16) == 0:
            return out
        out, body = out + body[: int(size, 16)], body[int(size, 16) + 2 :]


@pytest.mark.parametrize(
    ("reply", "chunked"),
    [
        (
            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nabcde",
            False,
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
            True,
        ),
    ],
    ids=["interim-then-final", "chunked-streamed"],
)
async def test_interim_responses_are_passed_on_before_the_final_one_with_its_framing(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    raw_geodes: list[RawGeode],
    reply: bytes,
    chunked: bool,
    lane: str,
) -> None:
    """RFC 9110 15.2: a proxy forwards 1xx responses (a 103's Link lets a browser
    preload while the geode works)."""
    lean_only(lane, "ClientSession drops 1xx answers")
    raw = RawGeode(reply)
    raw_geodes.append(raw)
    proxy = await start_with_raw_home(proxy_factory, geode_factory, raw)
    reader, writer = await raw_client(proxy)
    writer.write(b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    async with asyncio.timeout(5):
        if not chunked:
            early = await reader.readuntil(b"\r\n\r\n")
            assert early == b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
        status, lines, body = await read_response(reader)
    writer.close()
    assert status == b"HTTP/1.1 200 OK"
    assert values(lines, b"link") == []  # the 103's header stays with the 103
    assert values(lines, b"transfer-encoding") == ([b"chunked"] if chunked else [])
    assert values(lines, b"content-length") == ([] if chunked else [b"5"])
    assert (dechunk(body) if chunked else body) == b"abcde"


async def test_a_returning_client_follows_a_reload_that_moves_its_default_region(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    write_config: Callable[[dict[str, Any]], Path],
) -> None:
    """Resolutions of header-less requests are memoised per client address; a new
    topology must not be answered from the old one's memo."""
    geodes = await three_geodes(geode_factory)
    data = base_config([geode_entry(g) for g in geodes])
    proxy = await proxy_factory(data)
    for _ in range(2):
        async with http.get(f"{proxy.url}/whoami") as resp:
            assert resp.headers["X-Geoproxy-Geode"] == "eu-1"
    write_config({**data, "default_region": "us-east"})
    assert await proxy.gateway.reload_from_file("test")
    async with http.get(f"{proxy.url}/whoami") as resp:
        assert resp.headers["X-Geoproxy-Geode"] == "us-1"
    async with http.get(f"{proxy.url}/whoami", headers={"CF-IPCountry": "JP"}) as resp:
        assert resp.headers["X-Geoproxy-Geode"] == "ap-1"  # headers still decide first
