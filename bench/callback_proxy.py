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
from collections.abc import Callable

import uvloop
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_parser import HttpRequestParser, HttpResponseParser, RawResponseMessage

UPSTREAM = ("127.0.0.1", 0)


class Upstream(BaseProtocol):
    """A pooled connection to the upstream; ``on_reply(message, body)`` gets the answer
    to the request just written, and the connection goes back to the pool first."""

    def __init__(self, loop: asyncio.AbstractEventLoop, pool: list[Upstream]) -> None:
        super().__init__(loop)
        self.pool = pool
        self.on_reply: Callable[[RawResponseMessage, bytes], None] | None = None
        self.parser = HttpResponseParser(self, loop, 2**16, auto_decompress=False)

    def data_received(self, data: bytes) -> None:
        messages, _, _ = self.parser.feed_data(data)
        for message, payload in messages:
            body = b"".join(payload._buffer)  # a fixed-length body, whole in this read
            on_reply, self.on_reply = self.on_reply, None
            self.pool.append(self)
            if on_reply is not None:
                on_reply(message, body)

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        if self in self.pool:
            self.pool.remove(self)

    @classmethod
    def send(cls, loop: asyncio.AbstractEventLoop, pool: list[Upstream], wire: bytes,
             on_reply: Callable[[RawResponseMessage, bytes], None],
             address: tuple[str, int]) -> None:  # fmt: skip
        """Write ``wire`` on a pooled connection, or on a new one."""
        while pool:
            upstream = pool.pop()
            if upstream.transport is not None and not upstream.transport.is_closing():
                upstream.on_reply = on_reply
                upstream.transport.write(wire)
                return

        async def connect() -> None:
            transport, upstream = await loop.create_connection(lambda: cls(loop, pool),
                                                               *address)  # fmt: skip
            upstream.on_reply = on_reply
            transport.write(wire)

        loop.create_task(connect())


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
            Upstream.send(self.loop, self.pool, head, self.reply, UPSTREAM)

    def reply(self, message: RawResponseMessage, body: bytes) -> None:
        if self.transport is not None:
            self.transport.write(b"HTTP/1.1 %d %s\r\nContent-Length: %d\r\n\r\n%s" % (
                message.code, message.reason.encode(), len(body), body))  # fmt: skip


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
