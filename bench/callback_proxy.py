#!/usr/bin/env python3
"""A sketch, for measurement only: the least a Python proxy on uvloop and aiohttp's C
parsers can cost per request. Callbacks instead of coroutines and tasks: the client's
request head goes out on a pooled upstream connection from ``data_received``, the
response goes back from the upstream's ``data_received``. No routing, no metrics, no
failover, no timeouts, no streaming (bodies up to 64 KiB, one request at a time per
connection): not a proxy to run, a bound on what a callback-style engine could reach.

    python bench/callback_proxy.py PORT UPSTREAM_PORT"""

from __future__ import annotations

import asyncio
import gc
import sys

import uvloop
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_parser import HttpRequestParser, HttpResponseParser

UPSTREAM = ("127.0.0.1", 0)


class Upstream(BaseProtocol):
    def __init__(self, loop: asyncio.AbstractEventLoop, pool: list[Upstream]) -> None:
        super().__init__(loop)
        self.pool = pool
        self.client: Client | None = None
        self.parser = HttpResponseParser(self, loop, 2**16, auto_decompress=False)

    def data_received(self, data: bytes) -> None:
        messages, _, _ = self.parser.feed_data(data)
        for message, payload in messages:
            body = b"".join(payload._buffer)  # a fixed-length body, whole in this read
            client, self.client = self.client, None
            self.pool.append(self)
            if client is not None and client.transport is not None:
                client.transport.write(b"HTTP/1.1 %d %s\r\nContent-Length: %d\r\n\r\n%s" % (
                    message.code, message.reason.encode(), len(body), body))  # fmt: skip

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        if self in self.pool:
            self.pool.remove(self)


class Client(BaseProtocol):
    def __init__(self, loop: asyncio.AbstractEventLoop, pool: list[Upstream]) -> None:
        super().__init__(loop)
        self.loop = loop
        self.pool = pool
        self.parser = HttpRequestParser(self, loop, 2**16)

    def data_received(self, data: bytes) -> None:
        messages, _, _ = self.parser.feed_data(data)
        for message, _payload in messages:
            head = f"{message.method} {message.path} HTTP/1.1\r\nHost: geode\r\n\r\n".encode()
            while self.pool:
                upstream = self.pool.pop()
                if upstream.transport is not None and not upstream.transport.is_closing():
                    upstream.client = self
                    upstream.transport.write(head)
                    break
            else:
                self.loop.create_task(self.connect(head))

    async def connect(self, head: bytes) -> None:
        _, upstream = await self.loop.create_connection(
            lambda: Upstream(self.loop, self.pool), *UPSTREAM)  # fmt: skip
        upstream.client = self
        assert upstream.transport is not None
        upstream.transport.write(head)


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    pool: list[Upstream] = []
    await loop.create_server(lambda: Client(loop, pool), "127.0.0.1", port, backlog=1024)
    gc.collect()
    gc.freeze()
    await asyncio.Event().wait()


if __name__ == "__main__":
    UPSTREAM = ("127.0.0.1", int(sys.argv[2]))
    uvloop.run(serve(int(sys.argv[1])))
