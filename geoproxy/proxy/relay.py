"""Passing a geode's answer on: the answer as either client gives it (``Reply``), its 1xx
answers before it, and streaming its body to the client (the whole small ones go in one
write, ``responses.WholeResponse``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import aiohttp
from aiohttp import web
from aiohttp.client_proto import ResponseHandler
from aiohttp.hdrs import CONTENT_LENGTH, TRANSFER_ENCODING
from aiohttp.http import HttpVersion11
from aiohttp.http_parser import RawResponseMessage
from multidict import CIMultiDictProxy

from geoproxy.config.values import Geode
from geoproxy.proxy import upstream
from geoproxy.proxy.headers import RawHeaders, ResponseHead, trailer_lines
from geoproxy.proxy.responses import RelayResponse, status_line
from geoproxy.proxy.trace import TRACE_KEY

log = logging.getLogger("geoproxy.forwarder")


class Reply:
    """A geode's response as the relay needs it, from either client path."""

    __slots__ = (
        "close",
        "content",
        "headers",
        "protocol",
        "raw_headers",
        "reason",
        "release",
        "status",
        "trailers",
    )

    def __init__(
        self,
        status: int,
        reason: str | None,
        headers: CIMultiDictProxy[str],
        raw_headers: RawHeaders,
        content: aiohttp.StreamReader,
        protocol: ResponseHandler | None,
        release: Callable[[], None],
        close: Callable[[], None],
    ) -> None:
        self.status, self.reason, self.headers, self.content = status, reason, headers, content
        self.raw_headers = raw_headers
        self.protocol, self.release, self.close = protocol, release, close
        #: The trailer lines of a chunked body read whole (the lean client only).
        self.trailers: Callable[[], bytes] = _no_trailers

    @classmethod
    def of_response(cls, resp: aiohttp.ClientResponse) -> Reply:
        protocol = resp.connection.protocol if resp.connection is not None else None
        return cls(
            resp.status,
            resp.reason,
            resp.headers,
            resp.raw_headers,
            resp.content,
            protocol,
            resp.release,
            resp.close,
        )

    @classmethod
    def of_exchange(cls, ex: upstream.Exchange) -> Reply:
        msg = ex.message
        reply = cls(
            msg.code,
            msg.reason,
            msg.headers,
            msg.raw_headers,
            ex.payload,
            ex.proto,
            ex.release,
            ex.close,
        )
        if msg.chunked:
            reply.trailers = ex.proto.trailers
        return reply


async def stream(
    request: web.BaseRequest, reply: Reply, geode: Geode, out: web.StreamResponse
) -> web.StreamResponse:
    """Stream the geode's response to the client. A geode that fails mid-body aborts
    the client connection, so a truncated response never looks complete. Returning
    the prepared response lets aiohttp finish (or notice the closed connection)
    without logging a 500 for what is not a server error."""
    trace = request[TRACE_KEY]
    # A body that ends when the connection closes cannot tell a reset from its end by
    # itself (aiohttp reads a reset as EOF): the connection's `closed` future can.
    closed = None
    delimited = (
        CONTENT_LENGTH in reply.headers
        or "chunked" in reply.headers.get(TRANSFER_ENCODING, "").lower()
    )
    if not delimited and reply.protocol is not None:
        closed = reply.protocol.closed
    complete = False
    try:
        await out.prepare(request)
        while True:
            try:
                chunk = await reply.content.readany()
                lost = closed.exception() if closed is not None and _settled(closed) else None
                if not chunk and lost is not None:
                    raise lost
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                log.warning(
                    "geode %s failed mid-response: %r; aborting the client connection",
                    geode.name,
                    exc,
                )
                trace.aborted = True
                if request.transport is not None:
                    request.transport.abort()
                return out
            if not chunk:
                break
            await out.write(chunk)
            trace.body_bytes += len(chunk)
        if isinstance(out, RelayResponse):
            out.trailers = trailer_lines(reply.trailers())
        await out.write_eof()
        complete = True
    except ConnectionError:
        pass  # the client went away; aiohttp notes it when it finishes the response
    finally:
        if closed is not None and _settled(closed):
            closed.exception()  # retrieved: no "exception was never retrieved" noise
        if complete:
            reply.release()
        else:
            reply.close()  # never return a half-read connection to the pool
    return out


def interim_writer(request: web.BaseRequest) -> Callable[[RawResponseMessage], None] | None:
    """What passes a geode's 1xx responses (100, 102, 103 Early Hints) on to the client,
    as RFC 9110 15.2 requires of a proxy: hop-by-hop headers dropped, never to an
    HTTP/1.0 client (which cannot read them)."""
    if request.version < HttpVersion11:
        return None
    transport = request.transport

    def interim(message: RawResponseMessage) -> None:
        out = ResponseHead(message.raw_headers, message.reason)
        if out.ok and transport is not None and not transport.is_closing():
            line = status_line(HttpVersion11, message.code, message.reason or "")
            transport.write(line + out.kept + b"\r\n")

    return interim


def _no_trailers() -> bytes:
    return b""


def _settled(future: asyncio.Future[None]) -> bool:
    return future.done() and not future.cancelled()
