"""Reload, passive ejection, WebSockets and streams, limits and security — in process,
over real sockets. (Fault injection with real geode processes: test_faults.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from test_forwarding import three_geodes

from geoproxy.config import loader as config_mod

from conftest import GeodeFactory, Proxy, ProxyFactory, base_config, geode_entry

WriteConfig = Callable[..., Path]


@pytest.fixture(params=["fast", "coroutine", "public"])
def lane(request: pytest.FixtureRequest) -> str:
    """Every test here runs on both request paths (conftest.py's ``lane``)."""
    return str(request.param)


async def served_by(
    http: aiohttp.ClientSession, proxy: Proxy, country: str, path: str = "/whoami"
) -> str:
    async with http.get(f"{proxy.url}{path}", headers={"CF-IPCountry": country}) as resp:
        assert resp.status == 200, await resp.text()
        return resp.headers["X-Geoproxy-Geode"]


async def reload_with(proxy: Proxy, write_config: WriteConfig, data: dict[str, Any]) -> None:
    path = write_config(data)
    assert path == proxy.gateway.config.path  # the same file, rewritten
    assert await proxy.gateway.reload_from_file("test")


# -- hot reload ---------------------------------------------------------------------------


async def test_reload_moves_a_country_and_keeps_health_state(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    write_config: WriteConfig,
) -> None:
    geodes = await three_geodes(geode_factory)
    data = base_config([geode_entry(g) for g in geodes])
    proxy = await proxy_factory(data)
    assert await served_by(http, proxy, "FR") == "eu-1"
    before = proxy.gateway.board.states["eu-1"]
    passes = before.passes
    data["countries"] = {**data["countries"], "FR": "ap-northeast"}
    await reload_with(proxy, write_config, data)
    assert await served_by(http, proxy, "FR") == "ap-1"
    after = proxy.gateway.board.states["eu-1"]
    assert after is before and after.healthy and after.passes == passes  # no flapping
    assert proxy.sample("geoproxy_config_reloads_total", result="success") == 1


async def test_a_reload_logs_what_changed(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    write_config: WriteConfig,
    caplog: pytest.LogCaptureFixture,
    lane: str,
) -> None:
    eu, us, ap = await three_geodes(geode_factory)
    data = base_config([geode_entry(eu), geode_entry(us)])
    data["forwarding"]["fast_lane"] = lane == "fast"  # as the proxy runs: no change
    proxy = await proxy_factory(data)
    caplog.set_level(logging.INFO, logger="geoproxy")
    data["geodes"] = [geode_entry(eu), geode_entry(ap)]
    data["countries"] = {**data["countries"], "GB": "us-east"}
    data["limits"] = {"header_timeout": "5s"}
    await reload_with(proxy, write_config, data)
    path = proxy.gateway.config.path
    assert (
        f"{path}: config reloaded (2 geodes): 1 geode added: ap-1 (ap-northeast); "
        "1 geode removed: us-1 (us-east); countries moved: GB eu-west -> us-east; "
        "settings: limits.header_timeout 10 -> 5"
    ) in caplog.messages
    await reload_with(proxy, write_config, data)
    assert caplog.messages[-1] == (
        f"{path}: config reloaded (2 geodes): nothing that takes effect changed"
    )


async def test_broken_reload_changes_nothing_and_is_counted(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    write_config: WriteConfig,
    caplog: pytest.LogCaptureFixture,
) -> None:
    geodes = await three_geodes(geode_factory)
    data = base_config([geode_entry(g) for g in geodes])
    proxy = await proxy_factory(data)
    path = proxy.gateway.config.path
    stamp = proxy.sample("geoproxy_config_last_reload_success_timestamp_seconds")
    for broken in ("regions: [unclosed\n", "regions: {eu-west: null}\ngeodes: []\n"):
        path.write_text(broken)
        assert not await proxy.gateway.reload_from_file("test")
        assert await served_by(http, proxy, "JP") == "ap-1"  # the old routing still serves
    data["geodes"][0]["region"] = "eu-wst"
    write_config(data)
    assert not await proxy.gateway.reload_from_file("test")
    assert f"{path}: geodes[0].region: unknown region 'eu-wst'" in caplog.text
    assert proxy.sample("geoproxy_config_reloads_total", result="failure") == 3
    assert proxy.sample("geoproxy_config_last_reload_success_timestamp_seconds") == stamp


async def test_reload_logs_the_warnings_of_the_new_config(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    write_config: WriteConfig,
    caplog: pytest.LogCaptureFixture,
) -> None:
    geodes = await three_geodes(geode_factory)
    data = base_config([geode_entry(g) for g in geodes])
    proxy = await proxy_factory(data)
    data["trusted_proxies"] = ["0.0.0.0/0"]
    await reload_with(proxy, write_config, data)
    path = proxy.gateway.config.path
    assert [
        (r.levelname, r.getMessage()) for r in caplog.records if "trusted" in r.getMessage()
    ] == [
        (
            "WARNING",
            f"{path}: trusted_proxies[0]: 0.0.0.0/0 trusts every IPv4 client: "
            "any client can pick its region (X-Client-Region, CF-IPCountry) and its "
            "address (X-Forwarded-For)",
        )
    ]


async def test_new_geode_is_checked_before_it_takes_traffic(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    write_config: WriteConfig,
) -> None:
    eu, us, ap = await three_geodes(geode_factory)
    data = base_config([geode_entry(eu), geode_entry(us)])
    proxy = await proxy_factory(data)
    assert await served_by(http, proxy, "JP") in ("us-1", "eu-1")  # no ap geode yet
    ap.health_status = 500  # the new geode fails its check: it must get no traffic
    data["geodes"].append(geode_entry(ap))
    await reload_with(proxy, write_config, data)
    assert ap.hits["/health"] == 1
    assert "ap-1" not in proxy.gateway.board.healthy
    assert await served_by(http, proxy, "JP") != "ap-1"
    assert proxy.sample("geoproxy_geode_up", geode="ap-1", region="ap-northeast") == 0


async def test_a_reload_moving_a_geode_to_another_region_moves_its_series(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    write_config: WriteConfig,
) -> None:
    """Same name and URL, another region: health carries over, and geode_up and
    geode_ejected follow it to the new region (none left behind under the old one)."""
    eu, us, ap = await three_geodes(geode_factory)
    data = base_config([geode_entry(g) for g in (eu, us, ap)])
    proxy = await proxy_factory(data)
    assert proxy.sample("geoproxy_geode_up", geode="ap-1", region="ap-northeast") == 1
    data["geodes"][2]["region"] = "us-east"
    await reload_with(proxy, write_config, data)
    assert await served_by(http, proxy, "US") in ("us-1", "ap-1")
    for family in ("geoproxy_geode_up", "geoproxy_geode_ejected"):
        assert (
            proxy.registry.get_sample_value(family, {"geode": "ap-1", "region": "ap-northeast"})
            is None
        )
    assert proxy.sample("geoproxy_geode_up", geode="ap-1", region="us-east") == 1
    assert (
        proxy.registry.get_sample_value(
            "geoproxy_geode_ejected", {"geode": "ap-1", "region": "us-east"}
        )
        == 0
    )


async def test_removed_geode_finishes_in_flight_requests_and_takes_no_new_ones(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    write_config: WriteConfig,
) -> None:
    eu, us, ap = await three_geodes(geode_factory)
    data = base_config([geode_entry(g) for g in (eu, us, ap)])
    proxy = await proxy_factory(data)
    slow = asyncio.create_task(
        http.get(f"{proxy.url}/slow?delay=0.5", headers={"CF-IPCountry": "FR"})
    )
    async with asyncio.timeout(5):
        while eu.hits["/slow"] == 0:  # noqa: ASYNC110 -- a bounded poll of a counter
            await asyncio.sleep(0.01)
    data["geodes"] = [geode_entry(us), geode_entry(ap)]
    await reload_with(proxy, write_config, data)
    resp = await slow
    assert resp.status == 200 and resp.headers["X-Geoproxy-Geode"] == "eu-1"
    resp.release()
    assert await served_by(http, proxy, "FR") == "us-1"  # eu-west's fallback
    assert (
        proxy.registry.get_sample_value("geoproxy_geode_up", {"geode": "eu-1", "region": "eu-west"})
        is None
    )


async def test_websocket_survives_a_reload(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    write_config: WriteConfig,
) -> None:
    geodes = await three_geodes(geode_factory)
    data = base_config([geode_entry(g) for g in geodes])
    proxy = await proxy_factory(data)
    async with aiohttp.ClientSession() as http, http.ws_connect(f"{proxy.url}/ws") as ws:
        assert (await ws.receive_json())["geode"] == "eu-1"
        data["countries"] = {**data["countries"], "FR": "us-east"}
        await reload_with(proxy, write_config, data)
        await ws.send_str("still there?")
        assert await ws.receive_str() == "eu-1: still there?"


# -- passive health -----------------------------------------------------------------------


async def test_geode_failing_live_traffic_is_ejected_then_readmitted(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
) -> None:
    eu, us, ap = await three_geodes(geode_factory)
    proxy = await proxy_factory(
        base_config(
            [geode_entry(g) for g in (eu, us, ap)],
            outlier_detection={"consecutive_failures": 3, "base_ejection_time": "300ms"},
        )
    )
    eu.force_status = 503  # /health still passes: only live traffic shows the trouble
    for _ in range(3):
        assert await served_by(http, proxy, "FR") == "us-1"  # each GET moved on
    state = proxy.gateway.board.states["eu-1"]
    assert state.ejected and state.ejections == 1
    assert proxy.sample("geoproxy_geode_ejections_total", geode="eu-1") == 1
    assert proxy.sample("geoproxy_geode_ejected", geode="eu-1", region="eu-west") == 1
    hits = eu.hits["/whoami"]
    assert await served_by(http, proxy, "FR") == "us-1"
    assert eu.hits["/whoami"] == hits  # ejected: not even tried
    async with http.get(f"{proxy.admin_url}/geodes") as resp:
        listed = {g["name"]: g for g in (await resp.json())["geodes"]}
    assert listed["eu-1"]["ejected"] is True and listed["eu-1"]["takes_traffic"] is False
    eu.force_status = None
    async with asyncio.timeout(3):  # the ejection time runs out
        while "eu-1" not in proxy.gateway.board.healthy:  # noqa: ASYNC110 -- bounded poll
            await asyncio.sleep(0.02)
    assert await served_by(http, proxy, "FR") == "eu-1"


async def test_ejection_time_alone_readmits_a_geode_when_no_active_check_comes(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
) -> None:
    """The ejection timer, not an active pass: checks come every hour, the ejection lasts
    300 ms."""
    eu, us, ap = await three_geodes(geode_factory)
    proxy = await proxy_factory(
        base_config(
            [geode_entry(g) for g in (eu, us, ap)],
            health_check={"interval": "1h", "timeout": "500ms", "jitter": "0s"},
            outlier_detection={"consecutive_failures": 2, "base_ejection_time": "300ms"},
        )
    )
    checks = eu.hits["/health"]
    eu.force_status = 503
    for _ in range(2):
        assert await served_by(http, proxy, "FR") == "us-1"
    assert proxy.gateway.board.states["eu-1"].ejected
    eu.force_status = None
    async with asyncio.timeout(3):  # 10 x the ejection time; checks come in 1 h
        while "eu-1" not in proxy.gateway.board.healthy:  # noqa: ASYNC110 -- bounded poll
            await asyncio.sleep(0.02)
    assert eu.hits["/health"] == checks  # no active check ran meanwhile
    assert await served_by(http, proxy, "FR") == "eu-1"


async def test_geode_up_follows_takes_traffic_through_ejection_and_readmission(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
) -> None:
    """geoproxy_geode_up is 1 only for a geode that takes traffic: an ejected geode passes
    its active checks yet reads 0, and 1 again once re-admitted."""
    eu, us, ap = await three_geodes(geode_factory)
    proxy = await proxy_factory(
        base_config(
            [geode_entry(g) for g in (eu, us, ap)],
            outlier_detection={"consecutive_failures": 2, "base_ejection_time": "1h"},
        )
    )

    def up() -> float:
        return proxy.sample("geoproxy_geode_up", geode="eu-1", region="eu-west")

    assert up() == 1
    eu.force_status = 503
    for _ in range(2):
        await served_by(http, proxy, "FR")
    state = proxy.gateway.board.states["eu-1"]
    assert state.ejected and state.healthy  # ejected, though its /health passes
    assert up() == 0
    eu.force_status = None
    checker = proxy.gateway.checker
    assert checker is not None
    await checker.check_once()  # a passing active check re-admits it
    assert not state.ejected
    assert up() == 1


async def test_active_pass_readmits_and_last_geode_is_never_ejected(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
) -> None:
    eu = await geode_factory("eu-1", "eu-west")
    us = await geode_factory("us-1", "us-east")
    proxy = await proxy_factory(
        base_config(
            [geode_entry(eu), geode_entry(us)],
            regions={"eu-west": {"fallback": ["us-east"]}, "us-east": {"fallback": ["eu-west"]}},
            countries={},
            continents={},
            outlier_detection={"consecutive_failures": 2, "base_ejection_time": "1h"},
        )
    )
    eu.force_status = 503
    for _ in range(2):
        await served_by(http, proxy, "FR")
    assert proxy.gateway.board.states["eu-1"].ejected
    # The last geode taking traffic is never ejected, however it fails.
    us.force_status = 503
    for _ in range(4):
        async with http.get(f"{proxy.url}/whoami") as resp:
            assert resp.status == 503
    assert not proxy.gateway.board.states["us-1"].ejected
    eu.force_status = us.force_status = None
    checker = proxy.gateway.checker
    assert checker is not None
    await checker.check_once()  # a passing active check re-admits the ejected geode
    assert proxy.gateway.board.healthy == {"eu-1", "us-1"}


# -- WebSockets and streams -----------------------------------------------------------------


async def test_websocket_frames_flow_both_ways_with_subprotocol(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
) -> None:
    geodes = await three_geodes(geode_factory)
    proxy = await proxy_factory(base_config([geode_entry(g) for g in geodes]))
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(
            f"{proxy.url}/ws", protocols=("chat.v1",), headers={"CF-IPCountry": "JP"}
        ) as ws,
    ):
        assert ws.protocol == "chat.v1"
        assert await ws.receive_json() == {"geode": "ap-1", "protocol": "chat.v1"}
        await ws.send_str("hello")
        assert await ws.receive_str() == "ap-1: hello"
        await ws.send_bytes(b"\x00\x01\x02")
        assert await ws.receive_bytes() == b"\x02\x01\x00"


async def test_websocket_close_codes_pass_through_both_ways(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
) -> None:
    geodes = await three_geodes(geode_factory)
    eu = geodes[0]
    proxy = await proxy_factory(base_config([geode_entry(g) for g in geodes]))
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(f"{proxy.url}/ws") as ws:
            await ws.receive_json()
            await ws.send_str("close 4001 bye")
            msg = await ws.receive()
            assert msg.type == aiohttp.WSMsgType.CLOSE
            assert (msg.data, msg.extra) == (4001, "bye")
        async with http.ws_connect(f"{proxy.url}/ws") as ws:
            await ws.receive_json()
            await ws.close(code=4002, message=b"client done")
        async with asyncio.timeout(5):
            while 4002 not in eu.ws_closed:  # noqa: ASYNC110 -- bounded poll
                await asyncio.sleep(0.01)


async def test_other_upgrades_are_refused_and_forwarded_as_plain_requests(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
) -> None:
    geodes = await three_geodes(geode_factory)
    proxy = await proxy_factory(base_config([geode_entry(g) for g in geodes]))
    headers = {
        "Connection": "Upgrade, HTTP2-Settings",
        "Upgrade": "h2c",
        "HTTP2-Settings": "AAMAAABkAARAAAAAAAIAAAAA",
    }
    async with http.get(f"{proxy.url}/echo", headers=headers) as resp:
        assert resp.status == 200  # not 101
        seen = (await resp.json())["headers"]
    assert "upgrade" not in seen and "http2-settings" not in seen


async def test_server_sent_events_flush_as_they_arrive(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
) -> None:
    geodes = await three_geodes(geode_factory)
    eu = geodes[0]
    proxy = await proxy_factory(base_config([geode_entry(g) for g in geodes]))
    async with http.get(f"{proxy.url}/sse") as resp:
        async with asyncio.timeout(5):  # arrives while the geode still holds the second
            assert await resp.content.readuntil(b"\n\n") == b"data: first\n\n"
        assert not eu.sse_gate.is_set()
        eu.sse_gate.set()
        assert await resp.content.read() == b"data: second\n\n"


# -- limits -----------------------------------------------------------------------------------


async def test_oversized_headers_get_431(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
) -> None:
    geodes = await three_geodes(geode_factory)
    proxy = await proxy_factory(
        base_config([geode_entry(g) for g in geodes], limits={"max_header_bytes": "16KiB"})
    )
    headers = {f"X-Pad-{i}": "p" * 4000 for i in range(5)}  # each line fine, 20 KB in all
    async with http.get(f"{proxy.url}/whoami", headers=headers) as resp:
        assert resp.status == 431
        assert (await resp.json())["error"]["code"] == "headers_too_large"
    assert geodes[0].hits["/whoami"] == 0


def upload(size: int, chunked: bool) -> Any:
    """A request body of ``size`` bytes: with a declared Content-Length, or chunked."""
    payload = b"z" * size
    if not chunked:
        return payload

    async def stream() -> AsyncIterator[bytes]:
        for i in range(0, size, 8192):
            yield payload[i : i + 8192]

    return stream()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_oversized_body_gets_413(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    chunked: bool,
) -> None:
    geodes = await three_geodes(geode_factory)
    proxy = await proxy_factory(
        base_config([geode_entry(g) for g in geodes], limits={"max_body_bytes": "64KiB"})
    )
    async with http.post(f"{proxy.url}/echo", data=upload(200 * 1024, chunked)) as resp:
        assert resp.status == 413
        assert (await resp.json())["error"]["code"] == "body_too_large"
    if not chunked:
        assert geodes[0].hits["/echo"] == 0  # refused before forwarding
    async with http.post(f"{proxy.url}/echo", data=b"small") as resp:
        assert resp.status == 200


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_body_of_exactly_max_body_bytes_passes_and_one_byte_more_gets_413(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    chunked: bool,
) -> None:
    geodes = await three_geodes(geode_factory)
    proxy = await proxy_factory(
        base_config([geode_entry(g) for g in geodes], limits={"max_body_bytes": "64KiB"})
    )
    async with http.post(f"{proxy.url}/echo", data=upload(64 * 1024, chunked)) as resp:
        assert resp.status == 200
        assert (await resp.json())["size"] == 64 * 1024
    async with http.post(f"{proxy.url}/echo", data=upload(64 * 1024 + 1, chunked)) as resp:
        assert resp.status == 413
        assert (await resp.json())["error"]["code"] == "body_too_large"


async def test_slow_request_head_gets_408_and_the_connection_closes(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
) -> None:
    geodes = await three_geodes(geode_factory)
    proxy = await proxy_factory(
        base_config([geode_entry(g) for g in geodes], limits={"header_timeout": "300ms"})
    )
    port = int(proxy.url.rsplit(":", 1)[1])
    # A complete request is served...
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /whoami HTTP/1.1\r\nHost: x\r\n\r\n")
    async with asyncio.timeout(5):
        assert (await reader.readline()).startswith(b"HTTP/1.1 200")
    writer.close()
    # ...a head trickled slower than the header timeout is not.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /whoami HTTP/1.1\r\nHost: x\r\n")
    async with asyncio.timeout(5):
        answer = await reader.read()  # until the proxy closes the connection
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout")
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"


# -- security -----------------------------------------------------------------------------------


async def raw_exchange(proxy: Proxy, request: bytes) -> bytes:
    host, port = proxy.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
    writer.close()
    return head


async def test_absolute_form_and_host_tricks_only_ever_reach_configured_geodes(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
) -> None:
    geodes = await three_geodes(geode_factory)
    eu = geodes[0]
    proxy = await proxy_factory(base_config([geode_entry(g) for g in geodes]))
    head = await raw_exchange(
        proxy,
        b"GET http://169.254.169.254/latest/meta-data HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n",
    )
    assert b" 200 " in head.split(b"\r\n")[0] and b"X-Geoproxy-Geode: eu-1" in head
    assert eu.hits["/latest/meta-data"] == 1  # the configured geode got it, nobody else
    head = await raw_exchange(proxy, b"GET /whoami HTTP/1.1\r\nHost: evil.example:6379\r\n\r\n")
    assert b"X-Geoproxy-Geode: eu-1" in head
    head = await raw_exchange(
        proxy, b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n"
    )
    status = int(head.split(b" ", 2)[1])
    assert status >= 400 and b"200 Connection established" not in head


async def test_a_geode_url_pointing_back_at_the_proxy_is_answered_508(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    write_config: WriteConfig,
) -> None:
    eu, us, ap = await three_geodes(geode_factory)
    data = base_config([geode_entry(eu), geode_entry(us), geode_entry(ap)])
    proxy = await proxy_factory(data)
    # Point eu-west's geode at the proxy itself (health still passes: /health is proxied).
    data["geodes"][0]["url"] = proxy.url
    await reload_with(proxy, write_config, data)
    async with (
        asyncio.timeout(5),
        http.get(f"{proxy.url}/whoami", headers={"CF-IPCountry": "FR"}) as resp,
    ):
        assert resp.status == 508
        assert (await resp.json())["error"]["code"] == "loop_detected"


async def test_readyz_turns_503_when_draining(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
) -> None:
    geodes = await three_geodes(geode_factory)
    proxy = await proxy_factory(base_config([geode_entry(g) for g in geodes]))
    async with http.get(f"{proxy.admin_url}/readyz") as resp:
        assert resp.status == 200
    proxy.gateway.start_draining()
    async with http.get(f"{proxy.admin_url}/readyz") as resp:
        assert resp.status == 503
        assert (await resp.json())["reason"] == "shutting down"
    assert proxy.sample("geoproxy_ready") == 0


async def test_a_change_made_while_starting_up_is_picked_up(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    write_config: WriteConfig,
) -> None:
    from geoproxy.process.server import watch_config

    geodes = await three_geodes(geode_factory)
    data = base_config([geode_entry(g) for g in geodes], reload={"poll_interval": "50ms"})
    proxy = await proxy_factory(data)
    # The file changes after it was loaded but before anyone watches it.
    data["countries"] = {**data["countries"], "FR": "us-east"}
    write_config(data)
    watcher = asyncio.create_task(watch_config(proxy.gateway, asyncio.Event()))
    try:
        async with asyncio.timeout(5):
            while not proxy.sample("geoproxy_config_reloads_total", result="success"):  # noqa: ASYNC110
                await asyncio.sleep(0.02)
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    assert await served_by(http, proxy, "FR") == "us-1"


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"zz\r\nabc\r\n0\r\n\r\n",
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    ],
    ids=["duplicate-content-length", "invalid-chunk-size", "cl-and-te", "te-not-chunked-last"],
)
async def test_ambiguous_framing_is_rejected_before_any_geode_sees_it(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    request_bytes: bytes,
) -> None:
    geodes = await three_geodes(geode_factory)
    proxy = await proxy_factory(base_config([geode_entry(g) for g in geodes]))
    head = await raw_exchange(proxy, request_bytes)
    assert head.split(b" ", 2)[1] == b"400"
    assert all(g.hits["/echo"] == 0 for g in geodes)


async def test_a_geode_that_never_accepts_the_connection_times_out_and_fails_over(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
) -> None:
    import socket

    # A listener whose accept queue is full: further SYNs are dropped, connects hang.
    black = socket.socket()
    black.bind(("127.0.0.1", 0))
    black.listen(0)
    port = black.getsockname()[1]
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(("127.0.0.1", port))
        fillers.append(s)
    await asyncio.sleep(0.1)
    us = await geode_factory("us-1", "us-east")
    try:
        proxy = await proxy_factory(
            base_config(
                [
                    {"name": "eu-1", "region": "eu-west", "url": f"http://127.0.0.1:{port}"},
                    geode_entry(us),
                ],
                regions={"eu-west": {"fallback": ["us-east"]}, "us-east": None},
                countries={},
                continents={},
                forwarding={"connect_timeout": "300ms"},
                health_check={"interval": "1h", "timeout": "200ms"},
            )
        )
        # Start-up health saw the black hole as down; force it in to meet it on a request.
        proxy.gateway.board.healthy.add("eu-1")
        proxy.gateway.board.version += 1
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with http.get(f"{proxy.url}/whoami") as resp:
            assert resp.status == 200 and resp.headers["X-Geoproxy-Geode"] == "us-1"
        assert 0.25 < loop.time() - started < 2.0
        assert (
            proxy.sample("geoproxy_upstream_attempts_total", geode="eu-1", outcome="connect_error")
            == 1
        )
    finally:
        for s in fillers:
            s.close()
        black.close()


async def test_idle_client_connections_are_closed_after_the_keepalive_timeout(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
) -> None:
    geodes = await three_geodes(geode_factory)
    proxy = await proxy_factory(
        base_config([geode_entry(g) for g in geodes], limits={"keepalive_timeout": "300ms"})
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", int(proxy.url.rsplit(":", 1)[1]))
    writer.write(b"GET /whoami HTTP/1.1\r\nHost: x\r\n\r\n")
    async with asyncio.timeout(5):
        await reader.readuntil(b"\r\n\r\n")
        started = asyncio.get_running_loop().time()
        rest = await reader.read()  # the body, then EOF once the idle connection closes
    writer.close()
    assert b"eu-1" in rest
    assert asyncio.get_running_loop().time() - started < 3


async def test_serve_freezes_the_start_up_heap_and_spaces_young_collections_before_serving(
    geode_factory: GeodeFactory, write_config: WriteConfig
) -> None:
    """gc.freeze(): the long-lived objects leave the cyclic collector's full passes (a
    latency tail under load otherwise, see bench/ab.py figures in server.py); and young
    collections run every YOUNG_THRESHOLD net allocations instead of CPython's 700 (the
    requests in flight crossed 700 every ~130 requests, docs/performance.md)."""
    import gc

    from geoproxy.process.server import YOUNG_THRESHOLD, Bound, serve

    geodes = await three_geodes(geode_factory)
    cfg = config_mod.load(write_config(base_config([geode_entry(g) for g in geodes])))
    gc.unfreeze()
    thresholds = gc.get_threshold()
    gc.set_threshold(700, 10, 10)  # CPython's default (another test's serve may have run)
    frozen_when_ready: list[int] = []
    young_when_ready: list[int] = []
    stop = asyncio.Event()

    def ready(_bound: Bound) -> None:
        frozen_when_ready.append(gc.get_freeze_count())
        young_when_ready.append(gc.get_threshold()[0])
        stop.set()

    try:
        async with asyncio.timeout(10):
            await serve(cfg, stop, on_ready=ready)
    finally:
        gc.unfreeze()  # the rest of the test session collects as usual
        gc.set_threshold(*thresholds)
    assert frozen_when_ready and frozen_when_ready[0] > 10_000
    assert young_when_ready == [YOUNG_THRESHOLD]


async def test_a_reload_of_the_limits_takes_effect_on_both_request_paths(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    write_config: WriteConfig,
) -> None:
    """limits.max_header_bytes and max_body_bytes as reloaded, not as at start-up: the
    routing prelude reads them from the config in force."""
    eu, us, ap = await three_geodes(geode_factory)
    data = base_config([geode_entry(g) for g in (eu, us, ap)])
    proxy = await proxy_factory(data)
    big = {"X-Big": "b" * 3000}
    async with http.get(proxy.url + "/whoami", headers=big) as resp:
        assert resp.status == 200
    async with http.post(proxy.url + "/echo", data=b"x" * 5000) as resp:
        assert resp.status == 200
    data["limits"] = {"max_header_bytes": "2KiB", "max_body_bytes": "4KiB"}
    await reload_with(proxy, write_config, data)
    async with http.get(proxy.url + "/whoami", headers=big) as resp:
        assert resp.status == 431
    async with http.post(proxy.url + "/echo", data=b"x" * 5000) as resp:
        assert resp.status == 413
