"""The lean client path (bodiless requests): pooled keep-alive connections to geodes, and
the keep-alive race handled by RFC 9112's rule (idempotent only, once, anew)."""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp

from conftest import GeodeFactory, ProxyFactory, base_config, geode_entry


class OneShotGeode:
    """Answers the first request on each connection and keeps it open; a second request
    on the same connection is read and met with a close (as when a geode's idle timeout
    fires just as the request arrives)."""

    def __init__(self) -> None:
        self.connections = 0
        self.requests: list[str] = []
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            first = True
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                line = head.split(b"\r\n", 1)[0].decode()
                if " /health " not in line:
                    self.requests.append(line)
                if not first and " /health " not in line:
                    return  # close without answering
                first = False
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def test_keep_alive_connections_to_a_geode_are_reused(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory
) -> None:
    eu = await geode_factory("eu-1", "eu-west")
    proxy = await proxy_factory(base_config([geode_entry(eu)], regions={"eu-west": None},
                                            countries={}, continents={}))  # fmt: skip
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
    geode = OneShotGeode()
    url = await geode.start()
    us = await geode_factory("us-1", "us-east")
    try:
        proxy = await proxy_factory(base_config(
            [{"name": "eu-1", "region": "eu-west", "url": url}, geode_entry(us)],
            regions={"eu-west": {"fallback": ["us-east"]}, "us-east": None},
            countries={}, continents={},
        ))  # fmt: skip
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
