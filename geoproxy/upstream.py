"""A lean HTTP/1.1 client for the hot path: bodiless requests to plain-HTTP geodes.

Profiling showed ~40% of a request's time in aiohttp's ``ClientSession`` layer (request
objects, header processing, cookies, tracing) though the work itself is small. This path
keeps aiohttp's own connection protocol and C response parser (``ResponseHandler``, the
same objects ``ClientSession`` uses underneath), writes the request head in one call, and
pools keep-alive connections per geode. Requests with a body, TLS geodes and WebSockets
stay on ``ClientSession``.

``ResponseHandler.set_response_params`` is semi-private aiohttp API (stable across 3.x);
tests/test_forwarding.py and tests/test_upstream.py exercise every path through it.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Iterable

from aiohttp.client_exceptions import ServerDisconnectedError
from aiohttp.client_proto import ResponseHandler
from aiohttp.http_parser import RawResponseMessage
from aiohttp.streams import StreamReader

from geoproxy.config import Geode

_READ_BUFSIZE = 2**16


class ConnectFailed(OSError):
    """No connection could be opened to the geode (nothing was sent)."""


class StaleConnection(Exception):
    """A pooled connection turned out closed before any response byte: the geode never
    saw the request, so it may go again on a fresh connection."""


class Pool:
    """Idle keep-alive connections per geode, each closed after ``keepalive_timeout``."""

    def __init__(self, keepalive_timeout: float) -> None:
        self.keepalive_timeout = keepalive_timeout
        self._idle: dict[str, deque[tuple[ResponseHandler, float]]] = {}

    def get(self, geode: Geode) -> ResponseHandler | None:
        idle = self._idle.get(geode.base)
        now = time.monotonic()
        while idle:
            proto, since = idle.pop()  # most recently used first: the warmest
            if proto.is_connected() and not proto.should_close and now - since < (
                self.keepalive_timeout
            ):
                return proto
            proto.close()
        return None

    def put(self, geode: Geode, proto: ResponseHandler) -> None:
        if not proto.is_connected() or proto.should_close:
            proto.close()
            return
        idle = self._idle.setdefault(geode.base, deque())
        now = time.monotonic()
        while idle and now - idle[0][1] >= self.keepalive_timeout:
            idle.popleft()[0].close()  # the oldest have idled too long
        idle.append((proto, now))

    def close(self, geodes: Iterable[Geode] | None = None) -> None:
        """Close idle connections (of the given geodes, or all)."""
        keys = [g.base for g in geodes] if geodes is not None else list(self._idle)
        for key in keys:
            for proto, _ in self._idle.pop(key, ()):
                proto.close()


class Exchange:
    """One request/response on a pooled connection. ``release()`` returns a cleanly
    finished connection to the pool; ``close()`` discards it."""

    __slots__ = ("geode", "message", "payload", "pool", "proto")

    def __init__(
        self,
        pool: Pool,
        geode: Geode,
        proto: ResponseHandler,
        message: RawResponseMessage,
        payload: StreamReader,
    ) -> None:
        self.pool = pool
        self.geode = geode
        self.proto = proto
        self.message = message
        self.payload = payload

    def release(self) -> None:
        if self.payload.is_eof() and not self.message.should_close:
            self.pool.put(self.geode, self.proto)
        else:
            self.proto.close()

    def close(self) -> None:
        self.proto.close()


async def connect(geode: Geode, within: float) -> ResponseHandler:
    """A new connection to a geode (DNS included in ``within`` seconds)."""
    loop = asyncio.get_running_loop()
    host, port = geode.url.host or "", geode.url.port or 80
    try:
        async with asyncio.timeout(within):
            _, proto = await loop.create_connection(lambda: ResponseHandler(loop), host, port)
    except TimeoutError:
        raise ConnectFailed(f"connect timeout ({within:g}s) to {geode.url}") from None
    except OSError as exc:
        raise ConnectFailed(f"cannot connect to {geode.url}: {exc.strerror or exc}") from None
    return proto


async def send(
    pool: Pool,
    geode: Geode,
    head: bytes,
    method: str,
    connect_timeout: float,
    response_timeout: float,
    idempotent: bool,
) -> Exchange:
    """Send a bodiless request head and wait for the response head.

    Raises ``ConnectFailed`` while connecting (nothing was sent), ``SocketTimeoutError``
    when the geode stays silent, ``ServerDisconnectedError``/``ClientOSError`` when the
    connection drops. For an
    idempotent request, a pooled connection found closed by the geode before any response
    byte (the keep-alive race, RFC 9112 9.3.1) is replaced once by a fresh one.
    """
    proto = pool.get(geode)
    if proto is not None:
        try:
            return await _exchange(pool, geode, proto, head, method, response_timeout,
                                   idempotent)  # fmt: skip
        except StaleConnection:
            pass
    proto = await connect(geode, connect_timeout)
    return await _exchange(pool, geode, proto, head, method, response_timeout, False)


async def _exchange(
    pool: Pool,
    geode: Geode,
    proto: ResponseHandler,
    head: bytes,
    method: str,
    response_timeout: float,
    may_resend: bool,
) -> Exchange:
    transport = proto.transport
    if transport is None or transport.is_closing():
        proto.close()
        if may_resend:
            raise StaleConnection
        raise ServerDisconnectedError()
    proto.set_response_params(
        skip_payload=method == "HEAD", read_until_eof=True, auto_decompress=False,
        read_timeout=response_timeout, read_bufsize=_READ_BUFSIZE,
    )  # fmt: skip
    transport.write(head)
    proto.start_timeout()
    try:
        while True:
            message, payload = await proto.read()
            if not 100 <= message.code < 200:  # interim responses are skipped
                break
    except ServerDisconnectedError:
        proto.close()
        if may_resend:
            # Closed by the geode while idle in our pool, before it read this request:
            # the keep-alive race (RFC 9112 9.3.1). Safe to send again, once, anew.
            raise StaleConnection from None
        raise
    except BaseException:
        proto.close()
        raise
    return Exchange(pool, geode, proto, message, payload)
