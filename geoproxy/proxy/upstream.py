"""The lean HTTP/1.1 client every request to a geode goes through (but WebSockets and
public mode, which use aiohttp's ``ClientSession``).

Profiling showed ~40% of a request's time in aiohttp's ``ClientSession`` layer (request
objects, header processing, cookies, tracing) though the work itself is small. Here the
request head goes out as the bytes geoproxy built (``headers.py``), in one write, on a
pooled ``connection.Connection``; a body is streamed after it by a task while the answer
is awaited, re-chunked when it came chunked. ``send`` runs once per request; ``sent=``
takes over an exchange whose head already went out (the fast lane's hand-over).
"""

from __future__ import annotations

import asyncio
import functools
import socket
import ssl
from collections.abc import AsyncIterable, Callable

from aiohttp.client_exceptions import ClientOSError, ServerDisconnectedError
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import RawResponseMessage
from aiohttp.http_writer import StreamWriter
from aiohttp.streams import StreamReader

from geoproxy.config.values import Geode
from geoproxy.errors import BadResponse, ConnectFailed
from geoproxy.health.tls import broken_handshake, describe, handshake_timeout, server_name
from geoproxy.proxy.connection import READ_BUFSIZE, Connection, Pool


class Exchange:
    """One request/response on a pooled connection. ``release()`` returns a cleanly
    finished connection to the pool; ``close()`` discards it."""

    __slots__ = ("geode", "message", "payload", "pool", "proto")

    def __init__(
        self,
        pool: Pool,
        geode: Geode,
        proto: Connection,
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


def write(
    proto: Connection, head: bytes, head_request: bool, response_timeout: float, timed: bool = True
) -> None:
    """Send a request head on an open connection; the read timer starts (unless not
    ``timed``: a body follows, and the timer starts once it is sent)."""
    proto.expect_response(head_request, response_timeout)
    proto.received = 0
    proto.transport.write(head)  # type: ignore[union-attr]  # open: the caller checked
    if timed:
        proto.start_timeout()


class Body:
    """A request body to stream after the head, as the client framed it: with its
    Content-Length (passed on in the head), or chunked (re-chunked here; the client's
    chunk boundaries, extensions and trailers are not kept)."""

    __slots__ = ("chunked", "chunks")

    def __init__(self, chunks: AsyncIterable[bytes], chunked: bool) -> None:
        self.chunks, self.chunked = chunks, chunked


async def _stream_body(proto: Connection, body: Body, write_timeout: float) -> None:
    """Send ``body`` on the connection its head went out on, waiting for the geode to
    take it (no more than ``write_timeout`` per wait); then the read timer starts. Any
    failure (the client's body too large or malformed, the client gone, a geode that
    stops reading) aborts the connection: the geode never sees a short body as whole,
    and the reader of the answer wakes up."""
    writer = StreamWriter(proto, proto._loop)
    if body.chunked:
        writer.enable_chunking()
    try:
        async for chunk in body.chunks:
            await writer.write(chunk, drain=False)
            if proto.transport is not None and (
                proto.transport.get_write_buffer_size() > READ_BUFSIZE
            ):
                async with asyncio.timeout(write_timeout):
                    await writer.drain()
        await writer.write_eof()
    except asyncio.CancelledError:
        proto.force_close()  # the body is incomplete on the wire
        raise
    except BaseException:
        if proto.transport is not None:
            proto.transport.abort()
        raise
    proto.start_timeout()


@functools.cache
def _system_tls() -> ssl.SSLContext:
    """For an https geode without a context of its own (one built outside a gateway):
    the system's trust store and host name checks, as aiohttp's client uses by default."""
    return ssl.create_default_context()


async def connect(geode: Geode, within: float, tls: ssl.SSLContext | None = None) -> Connection:
    """A new connection to a geode (DNS included in ``within`` seconds), over ``tls``
    (its context from ``GeodeContexts``) for an https geode. A failed TLS handshake
    raises ``ConnectFailed`` with its reason (``tls_reason``), in OpenSSL's words."""
    loop = asyncio.get_running_loop()
    url = geode.url
    host, port = url.host or "", url.port or 80
    if url.scheme == "https" and tls is None:
        tls = _system_tls()
    handshaking = False
    try:
        async with asyncio.timeout(within):
            if tls is None:
                _, proto = await loop.create_connection(lambda: Connection(loop), host, port)
            else:
                # TCP first, on its own: a timeout after it is the TLS handshake's.
                sock = await _open_socket(loop, host, port)
                handshaking = True
                _, proto = await loop.create_connection(
                    lambda: Connection(loop), sock=sock, ssl=tls, server_hostname=server_name(geode)
                )
    except TimeoutError:
        if handshaking:
            failure = handshake_timeout(within)
            raise ConnectFailed(failure.message(geode.name), failure.reason) from None
        raise ConnectFailed(f"connect timeout ({within:g}s) to {geode.url}") from None
    except ssl.SSLError as exc:
        failure = describe(exc)
        raise ConnectFailed(failure.message(geode.name), failure.reason) from None
    except OSError as exc:
        if handshaking:
            failure = broken_handshake(exc)
            raise ConnectFailed(failure.message(geode.name), failure.reason) from None
        raise ConnectFailed(f"cannot connect to {geode.url}: {exc.strerror or exc}") from None
    except ValueError as exc:  # a host name the resolver rejects (a label over 63 bytes)
        raise ConnectFailed(f"cannot connect to {geode.url}: {exc}") from None
    return proto


async def _open_socket(loop: asyncio.AbstractEventLoop, host: str, port: int) -> socket.socket:
    """A connected TCP socket to the first address of ``host`` that accepts."""
    error: OSError | None = None
    for family, kind, proto, _, address in await loop.getaddrinfo(
        host, port, type=socket.SOCK_STREAM
    ):
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    raise error or OSError(f"no address for {host}")


async def send(
    pool: Pool,
    geode: Geode,
    head: bytes,
    method: str,
    connect_timeout: float,
    response_timeout: float,
    idempotent: bool,
    sent: Connection | None = None,
    sent_pooled: bool = True,
    body: Body | None = None,
    interim: Callable[[RawResponseMessage], None] | None = None,
    tls: ssl.SSLContext | None = None,
) -> Exchange:
    """Send a request head (and ``body``, streamed) and wait for the final response
    head; ``interim`` gets each 1xx response before it. ``sent``: a connection the head
    went out on already (by the fast lane; ``sent_pooled``: one taken from the pool),
    whose answer is awaited. ``tls``: the geode's context (``GeodeContexts``).

    Raises ``ConnectFailed`` while connecting (nothing was sent), ``SocketTimeoutError``
    when the geode stays silent, ``ServerDisconnectedError``/``ClientOSError`` when the
    connection drops, ``BadResponse`` for a head that cannot be parsed, and whatever
    ended the body (``_stream_body``). For an idempotent bodiless request, a pooled
    connection found closed by the geode before any response byte (the keep-alive race,
    RFC 9112 9.3.1) is replaced once by a fresh one; a body cannot be sent twice. One
    coroutine for the whole exchange: this runs once per request.
    """
    idempotent = idempotent and body is None
    if sent is not None:
        proto, may_resend = sent, idempotent and sent_pooled
    else:
        pooled = pool.get(geode)
        may_resend = idempotent and pooled is not None
        proto = pooled if pooled is not None else await connect(geode, connect_timeout, tls)
    streaming: asyncio.Task[None] | None = None
    while True:
        transport = proto.transport
        if sent is not None:
            sent = None  # written already: its answer, or what ended it, is in the queue
        elif transport is not None and not transport.is_closing():
            write(proto, head, method == "HEAD", response_timeout, timed=body is None)
            if body is not None:
                streaming = asyncio.create_task(_stream_body(proto, body, response_timeout))
                streaming.add_done_callback(_retrieve)
        else:
            proto.close()
            if not may_resend:
                raise ServerDisconnectedError()
            may_resend = False
            proto = await connect(geode, connect_timeout, tls)
            continue
        try:
            while True:
                message, payload = await proto.read()
                if message.code == 101:
                    raise BadResponse("101 Switching Protocols to a request that asked for none")
                if not 100 <= message.code < 200:
                    if message.chunked:
                        proto.forget_parser()
                        proto.watch_trailers()
                    if streaming is not None and not streaming.done():
                        # Answered before the whole body went out (RFC 9112 9.3 lets a
                        # server): stop sending; the connection cannot carry another
                        # request.
                        proto.force_close()
                        streaming.cancel()
                    return Exchange(pool, geode, proto, message, payload)
                if interim is not None:
                    interim(message)
                # An interim response (100, 103): aiohttp stops the read timer on it;
                # the final response must still come within response_timeout.
                if streaming is None or streaming.done():
                    proto.start_timeout()
        except HttpProcessingError as exc:
            _stop(streaming)
            proto.close()
            raise BadResponse(f"malformed response: {exc.message}") from None
        except (ServerDisconnectedError, ClientOSError):
            proto.close()
            if streaming is not None:
                failed = _stop(streaming)
                if failed is not None:
                    raise failed from None  # what ended the body ended the exchange
            if not (may_resend and proto.received == 0):
                raise
            # The pooled connection was closed or reset by the geode before any byte of
            # an answer: the keep-alive race (RFC 9112 9.3.1). Safe to send again, once,
            # on a new connection, for an idempotent request.
        except BaseException:
            _stop(streaming)
            proto.close()
            raise
        may_resend = False
        proto = await connect(geode, connect_timeout, tls)


def _retrieve(task: asyncio.Task[None]) -> None:
    """A body task's failure is the exchange's (``_stop``), or of no use once the
    geode answered: never "exception was never retrieved"."""
    if not task.cancelled():
        task.exception()


def _stop(streaming: asyncio.Task[None] | None) -> BaseException | None:
    """Cancel a body still streaming; what ended one that is done."""
    if streaming is None:
        return None
    if not streaming.done():
        streaming.cancel()
        return None
    return None if streaming.cancelled() else streaming.exception()
