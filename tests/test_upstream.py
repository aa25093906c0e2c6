"""The lean client path (bodiless requests): pooled keep-alive connections to geodes, and
the keep-alive race handled by RFC 9112's rule (idempotent only, once, anew)."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from conftest import GeodeFactory, ProxyFactory, base_config, geode_entry


def one_shot(n: int, line: str) -> bytes | None:
    """Answer the first request on each connection and keep it open; meet a second one
    on the same connection with a close (as when a geode's idle timeout fires just as the
    request arrives)."""
    return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" if n == 0 else None


async def test_keep_alive_connections_to_a_geode_are_reused(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory
) -> None:
    eu = await geode_factory("eu-1", "eu-west")
    proxy = await proxy_factory(
        base_config([geode_entry(eu)], regions={"eu-west": None}, countries={}, continents={})
    )
    async with aiohttp.ClientSession() as http:
        for _ in range(50):
            async with http.get(f"{proxy.url}/whoami") as resp:
                assert resp.status == 200
    assert proxy.gateway.forwarder is not None
    pool = proxy.gateway.forwarder.pool
    assert len(pool._idle[eu.url]) == 1  # one connection served all 50, one at a time


async def test_keep_alive_race_resends_an_idempotent_request_once_on_a_fresh_connection(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory
) -> None:
    geode = ScriptedGeode(one_shot)
    url = await geode.start()
    us = await geode_factory("us-1", "us-east")
    try:
        proxy = await proxy_factory(
            base_config(
                [{"name": "eu-1", "region": "eu-west", "url": url}, geode_entry(us)],
                regions={"eu-west": {"fallback": ["us-east"]}, "us-east": None},
                countries={},
                continents={},
            )
        )
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{proxy.url}/a") as resp:  # opens and pools a connection
                assert resp.headers["X-Geoproxy-Geode"] == "eu-1"
            async with http.get(f"{proxy.url}/b") as resp:  # meets the race, resent anew
                assert resp.status == 200
                assert resp.headers["X-Geoproxy-Geode"] == "eu-1"
            assert [r.split()[1] for r in geode.requests] == ["/a", "/b", "/b"]
            # A POST (even without a body) is never resent: it moves on by the failover
            # rules, which do not retry a non-idempotent request after it was sent.
            async with http.post(f"{proxy.url}/c") as resp:
                assert resp.status == 502
            assert [r.split()[1] for r in geode.requests].count("/c") == 1
            assert us.hits["/c"] == 0
    finally:
        await geode.close()


class ScriptedGeode:
    """Answers /health; the n-th other request on a connection gets ``reply(n, line)``
    (bytes, or None: close without answering), then, if ``hang``, silence."""

    def __init__(
        self, reply: Callable[[int, str], bytes | None], hang: bool = False, reset: bool = False
    ) -> None:
        self.reply = reply
        self.hang = hang
        self.reset = reset  # saying nothing ends with an RST instead of a FIN
        self.requests: list[str] = []
        self.heads: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        n = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                line = head.split(b"\r\n", 1)[0].decode()
                if " /health " in line:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    await writer.drain()
                    continue
                self.requests.append(line)
                self.heads.append(head)
                answer = self.reply(n, line)
                n += 1
                if answer is not None:
                    await self._write(writer, answer)
                if self.hang:
                    await asyncio.sleep(30)
                if answer is None and self.reset:
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                if answer is None or b"Connection: close" in answer:
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _write(self, writer: asyncio.StreamWriter, answer: bytes) -> None:
        writer.write(answer)
        await writer.drain()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.close()


async def two_geode_proxy(
    proxy_factory: ProxyFactory, geode_factory: GeodeFactory, url: str, **overrides: Any
) -> Any:
    us = await geode_factory("us-1", "us-east")
    proxy = await proxy_factory(
        base_config(
            [{"name": "eu-1", "region": "eu-west", "url": url}, geode_entry(us)],
            regions={"eu-west": {"fallback": ["us-east"]}, "us-east": None},
            countries={},
            continents={},
            **overrides,
        )
    )
    return proxy, us


async def quick_timeout_proxy(
    proxy_factory: ProxyFactory, geode_factory: GeodeFactory, url: str
) -> Any:
    """A proxy whose geodes may stay silent 300 ms, trying one geode per request."""
    proxy, _ = await two_geode_proxy(
        proxy_factory,
        geode_factory,
        url,
        forwarding={"response_timeout": "300ms", "max_attempts": 1},
    )
    return proxy


@pytest.mark.parametrize(
    "answer",
    [
        b"FOO BAR\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n",
    ],
    ids=["garbage-status-line", "bad-content-length", "unasked-101"],
)
async def test_a_malformed_geode_response_is_a_failover_not_a_500(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    caplog: pytest.LogCaptureFixture,
    answer: bytes,
) -> None:
    geode = ScriptedGeode(lambda n, line: answer)
    proxy, _ = await two_geode_proxy(proxy_factory, geode_factory, await geode.start())
    try:
        async with aiohttp.ClientSession() as http, http.get(f"{proxy.url}/x") as resp:
            assert resp.status == 200 and resp.headers["X-Geoproxy-Geode"] == "us-1"
        async with aiohttp.ClientSession() as http, http.post(f"{proxy.url}/x") as resp:
            assert resp.status == 502  # a POST does not move on
            assert (await resp.json())["error"]["code"] == "bad_response"
        assert "Traceback" not in caplog.text
        assert (
            proxy.sample("geoproxy_upstream_attempts_total", geode="eu-1", outcome="bad_response")
            == 2
        )
    finally:
        await geode.close()


async def test_an_interim_response_does_not_switch_the_response_timeout_off(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
) -> None:
    geode = ScriptedGeode(
        lambda n, line: b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n", hang=True
    )
    proxy = await quick_timeout_proxy(proxy_factory, geode_factory, await geode.start())
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with aiohttp.ClientSession() as http, http.get(f"{proxy.url}/x") as resp:
            assert resp.status == 504
        assert loop.time() - started < 3
    finally:
        await geode.close()


async def test_a_client_without_host_gets_each_geodes_own_host_on_failover(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
) -> None:
    geode = ScriptedGeode(lambda n, line: b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n")
    url = await geode.start()
    proxy, us = await two_geode_proxy(proxy_factory, geode_factory, url)
    try:
        host, port = proxy.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /echo HTTP/1.0\r\n\r\n")  # HTTP/1.0: no Host header
        async with asyncio.timeout(5):
            answer = await reader.read()
        writer.close()
        assert b"X-Geoproxy-Geode: us-1" in answer
        assert f"host: {url.removeprefix('http://')}".encode() in geode.heads[0].lower()
        assert us.last_headers["host"] == [us.url.removeprefix("http://")]
    finally:
        await geode.close()


async def test_a_reset_pooled_connection_is_resent_once_on_a_fresh_one(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
) -> None:
    geode = ScriptedGeode(one_shot, reset=True)  # an RST, not a FIN, on the second request
    url = await geode.start()
    proxy, _ = await two_geode_proxy(proxy_factory, geode_factory, url)
    try:
        async with aiohttp.ClientSession() as http:
            for path in ("/a", "/b"):
                async with http.get(f"{proxy.url}{path}") as resp:
                    assert resp.status == 200 and resp.headers["X-Geoproxy-Geode"] == "eu-1"
        assert [r.split()[1] for r in geode.requests] == ["/a", "/b", "/b"]
    finally:
        await geode.close()


async def test_idle_pooled_connections_are_swept_after_the_keepalive_timeout(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory
) -> None:
    eu = await geode_factory("eu-1", "eu-west")
    proxy = await proxy_factory(
        base_config(
            [geode_entry(eu)],
            regions={"eu-west": None},
            countries={},
            continents={},
            forwarding={"keepalive_timeout": "300ms"},
        )
    )
    async with aiohttp.ClientSession() as http:
        await asyncio.gather(*(http.get(f"{proxy.url}/slow?delay=0.1") for _ in range(5)))
    assert proxy.gateway.forwarder is not None
    pool = proxy.gateway.forwarder.pool
    assert len(pool._idle.get(eu.url, ())) == 5
    async with asyncio.timeout(5):
        while pool._idle.get(eu.url):  # noqa: ASYNC110 -- a bounded poll
            await asyncio.sleep(0.05)


async def test_a_bodiless_post_carries_content_length_zero(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory
) -> None:
    eu = await geode_factory("eu-1", "eu-west")
    proxy = await proxy_factory(
        base_config([geode_entry(eu)], regions={"eu-west": None}, countries={}, continents={})
    )
    host, port = proxy.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    async with asyncio.timeout(5):
        answer = await reader.read()
    writer.close()
    assert b" 200 " in answer.split(b"\r\n", 1)[0]
    assert eu.last_headers["content-length"] == ["0"]


SEQUENCE = [  # (method, the geode's answer, status and body the client gets)
    ("GET", b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\none", 200, b"one"),
    (
        "GET",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\ntwo\r\n0\r\n\r\n",
        200,
        b"two",
    ),
    ("GET", b"HTTP/1.1 204 No Content\r\n\r\n", 204, b""),
    ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", 200, b""),
    (
        "GET",
        b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nfour",
        200,
        b"four",
    ),
    ("GET", b'HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\nETag: "x"\r\n\r\n', 304, b""),
    (
        "GET",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 500 Oops\r\nX-Leftover: ",
        200,
        b"ok",
    ),
    ("GET", b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlast", 200, b"last"),
]


async def test_a_reused_connection_parses_each_following_response_right(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
) -> None:
    """One connection carries every kind of response in turn, including a HEAD's and bytes
    the geode sent unasked after a response (left behind, not read as the next one's);
    ``n`` counts per connection, so a new connection would get the wrong answers."""
    geode = ScriptedGeode(lambda n, line: SEQUENCE[n][1])
    proxy, _ = await two_geode_proxy(proxy_factory, geode_factory, await geode.start())
    try:
        async with aiohttp.ClientSession() as http:
            for method, _, status, body in SEQUENCE:
                async with http.request(method, f"{proxy.url}/x") as resp:
                    assert (resp.status, await resp.read()) == (status, body)
                    assert resp.headers["X-Geoproxy-Geode"] == "eu-1"
        assert len(geode.requests) == len(SEQUENCE)
    finally:
        await geode.close()


class TricklingGeode(ScriptedGeode):
    """Answers every request with a chunked body of ``chunks`` chunks, ``gap`` seconds apart
    (and, if ``stall_after`` is set, silence after that many)."""

    def __init__(self, chunks: int, gap: float, stall_after: int | None = None) -> None:
        super().__init__(lambda n, line: b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        self.chunks, self.gap, self.stall_after = chunks, gap, stall_after

    async def _write(self, writer: asyncio.StreamWriter, answer: bytes) -> None:
        writer.write(answer)
        for i in range(self.chunks):
            if i == self.stall_after:
                await asyncio.sleep(30)
            await asyncio.sleep(self.gap)
            writer.write(b"1\r\nx\r\n")
        writer.write(b"0\r\n\r\n")
        await writer.drain()


async def test_a_body_trickling_within_the_response_timeout_is_not_cut_off(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
) -> None:
    """The response timeout is the longest silence, not a bound on the whole response:
    each chunk moves it on, twice over (the second time on a pooled connection)."""
    geode = TricklingGeode(chunks=6, gap=0.1)
    proxy = await quick_timeout_proxy(proxy_factory, geode_factory, await geode.start())
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(2):
                async with http.get(f"{proxy.url}/x") as resp:
                    assert (resp.status, await resp.read()) == (200, b"x" * 6)
    finally:
        await geode.close()


async def test_a_geode_falling_silent_mid_body_is_cut_off_after_the_response_timeout(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
) -> None:
    geode = TricklingGeode(chunks=6, gap=0.05, stall_after=2)
    proxy = await quick_timeout_proxy(proxy_factory, geode_factory, await geode.start())
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with aiohttp.ClientSession() as http, http.get(f"{proxy.url}/x") as resp:
            assert resp.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()
        assert 0.3 < loop.time() - started < 3
    finally:
        await geode.close()


async def test_the_response_timeout_fires_on_a_pooled_connection_after_a_1xx(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
) -> None:
    """A connection that served a response before (with the timer armed for that one)
    still times out the next one, silence after a 103 included."""
    first = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    # After the 103 the geode only waits for another request: silence.
    geode = ScriptedGeode(lambda n, line: first if n == 0 else b"HTTP/1.1 103 Early Hints\r\n\r\n")
    proxy = await quick_timeout_proxy(proxy_factory, geode_factory, await geode.start())
    try:
        loop = asyncio.get_running_loop()
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{proxy.url}/a") as resp:
                assert (resp.status, await resp.read()) == (200, b"ok")
            started = loop.time()
            async with http.get(f"{proxy.url}/b") as resp:
                assert resp.status == 504
            assert 0.3 <= loop.time() - started < 3
        assert [r.split()[1] for r in geode.requests] == ["/a", "/b"]
    finally:
        await geode.close()
