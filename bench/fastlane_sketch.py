#!/usr/bin/env python3
"""A sketch, for measurement only: bench/callback_proxy.py's callback style with
geoproxy's own per-request work on top: geoproxy's fast lane (geoproxy/proxy/fastlane.py)
without its bookkeeping, a bound on what it could reach.

Per request, as geoproxy does it: trusted-peer check, region resolution (memoised),
candidates from the health board, loop detection, the request head built by the same
header rules (hop-by-hop removal, X-Forwarded-*, Via), the response head filtered the
same way plus X-Geoproxy-*, Date and Content-Length, and the same metrics
(Observer.note). Not there: failover, timeouts, streaming, bodies, error answers, the
keep-alive and head timers, draining: a bound, not a proxy to run.

    python bench/fastlane_sketch.py CONFIG   (listens on the config's proxy port)"""

from __future__ import annotations

import asyncio
import gc
import sys
import time

import uvloop
from aiohttp.base_protocol import BaseProtocol
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http_parser import HttpRequestParser, RawResponseMessage
from callback_proxy import Upstream  # bench/, beside this script

from geoproxy.config import loader as config_mod
from geoproxy.process.app import Gateway
from geoproxy.proxy.headers import RequestHead, ResponseHead, geode_lines
from geoproxy.proxy.prelude import _cached_bytes, _peer_text, _text_bytes
from geoproxy.proxy.trace import Trace
from geoproxy.routing.router import HOME


class Client(BaseProtocol):
    def __init__(self, loop: asyncio.AbstractEventLoop, gateway: Gateway,
                 pool: list[Upstream]) -> None:  # fmt: skip
        super().__init__(loop)
        self.loop, self.gateway, self.pool = loop, gateway, pool
        self.parser = HttpRequestParser(self, loop, 2**16)
        self.remote = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.remote = transport.get_extra_info("peername")[0]

    def data_received(self, data: bytes) -> None:
        messages, _, _ = self.parser.feed_data(data)
        for message, _payload in messages:
            self.forward(message)

    def forward(self, message: object) -> None:
        start = time.perf_counter()
        gateway = self.gateway
        rt = gateway.runtime
        fwd = gateway.forwarder
        assert rt is not None and fwd is not None
        topology = rt.topology
        trace = Trace()
        remote = self.remote
        peer, trusted = rt.trusted.peer(remote)
        head = RequestHead(message.raw_headers, trusted)  # type: ignore[attr-defined]
        via = _cached_bytes(rt.via)
        if head.looped(via):
            raise RuntimeError("loop")
        resolution = fwd.routing.regions.resolve(topology, message.headers, trusted, peer,  # type: ignore[attr-defined]
                                         rt.geoip, remote)  # fmt: skip
        trace.resolution = resolution
        board = rt.board
        cands, trace.decision = fwd.routing.routes.candidates(
            topology, resolution.region, board.healthy, board.version,
            topology.config.forwarding.max_attempts,
        )  # fmt: skip
        geode = cands[0].geode
        forwarded = head.forwarded(_peer_text(remote), b"http", via)
        target = _text_bytes(f"{message.method} {geode.prefix}{message.path} HTTP/1.1")  # type: ignore[attr-defined]
        host = head.host or _cached_bytes(geode.url.raw_authority)
        wire = b"".join((target, b"\r\nHost: ", host, b"\r\n", head.kept, forwarded, b"\r\n"))

        def reply(response: RawResponseMessage, body: bytes) -> None:
            status = response.code
            board.observe(geode.name, status < 500)
            out = ResponseHead(response.raw_headers, response.reason)
            lines = out.tail(via, geode_lines(geode.name, geode.region))
            parts = [b"HTTP/1.1 %d %s\r\n" % (status, response.reason.encode()),
                     out.kept, lines, b"Content-Length: %d\r\n" % len(body)]  # fmt: skip
            if not out.date:
                parts.append(b"Date: " + rfc822_formatted_time().encode() + b"\r\n")
            parts += (b"\r\n", body)
            if self.transport is not None:
                self.transport.write(b"".join(parts))
            trace.attempts.append((geode.name, "response"))
            trace.geode = geode
            trace.decision = HOME
            trace.body_bytes = len(body)
            gateway.observer.note(
                trace, status, time.perf_counter() - start, "GET", message.url, remote, len(body)
            )  # type: ignore[attr-defined]

        Upstream.send(self.loop, self.pool, wire, reply,
                      (geode.url.host or "", geode.url.port or 80))  # fmt: skip


async def serve(path: str) -> None:
    cfg = config_mod.load(path)
    gateway = Gateway(cfg)
    loop = asyncio.get_running_loop()
    pool: list[Upstream] = []
    async with gateway.lifespan():
        await loop.create_server(lambda: Client(loop, gateway, pool), cfg.proxy.host,
                                 cfg.proxy.port, backlog=1024)  # fmt: skip
        gc.collect()
        gc.freeze()
        await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(serve(sys.argv[1]))
