"""Streaming forwarding to the chosen geode, with failover that is safe by construction.

Per request: real client IP -> region -> ordered candidates -> try them in order. Bodies
stream both ways and are never buffered. Whether another geode may be tried is decided in
one place, ``may_try_next``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
from collections.abc import AsyncIterator, Callable

import aiohttp
from aiohttp import web
from aiohttp.client_proto import ResponseHandler
from aiohttp.hdrs import CONTENT_LENGTH, CONTENT_TYPE, SERVER, TRANSFER_ENCODING
from aiohttp.http_writer import _serialize_headers  # C; also validates header values
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from geoproxy import upstream
from geoproxy.clientip import client_ip, parse_ip
from geoproxy.config import Forwarding, Geode, Limits
from geoproxy.headers import downstream_headers, has_looped, upstream_headers
from geoproxy.resolver import resolve
from geoproxy.responses import json_error
from geoproxy.router import ALL_FAILED, CandidateCache
from geoproxy.runtime import Runtime
from geoproxy.trace import TRACE_KEY, Trace
from geoproxy.websocket import is_websocket, proxy_websocket

log = logging.getLogger("geoproxy.forwarder")

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
RETRY_STATUSES = frozenset({502, 503, 504})

# Attempt outcomes (also the values of the `outcome` metric label).
CONNECT_ERROR, TIMEOUT, RESET, RETRY_STATUS, RESPONSE, BAD_RESPONSE = (
    "connect_error", "timeout", "reset", "retry_status", "response", "bad_response",
)  # fmt: skip
CLIENT_BODY_TOO_LARGE = "client_body_too_large"
#: Responses up to this size with a Content-Length are read whole and sent in one write.
SMALL_BODY = 64 * 1024
_NO_BODY = frozenset({204, 304})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})




def may_try_next(outcome: str, method: str, body_started: bool) -> bool:
    """The one retry rule. A connect failure is always safe: no byte reached the geode.
    Anything after the request went out (a timeout, a reset, a 502/503/504) is retried only
    for an idempotent method whose body has not started to stream; a body cannot be
    replayed, and a POST must never reach two geodes."""
    if outcome == CONNECT_ERROR:
        return True
    return method in IDEMPOTENT and not body_started


class BodyTooLarge(Exception):
    """A chunked request body grew past ``limits.max_body_bytes`` while streaming."""


class _Body:
    """The client's request body as an async iterable that notes when it starts flowing
    and stops it when it grows past the limit."""

    __slots__ = ("content", "limit", "size", "started", "too_large")

    def __init__(self, content: aiohttp.StreamReader, limit: int) -> None:
        self.content = content
        self.limit = limit
        self.size = 0
        self.started = False
        self.too_large = False

    async def chunks(self) -> AsyncIterator[bytes]:
        async for chunk in self.content.iter_any():
            self.started = True
            self.size += len(chunk)
            if self.size > self.limit:
                self.too_large = True
                raise BodyTooLarge
            yield chunk


class Reply:
    """A geode's response as the relay needs it, from either client path."""

    __slots__ = ("close", "content", "content_length", "headers", "protocol", "reason",
                 "release", "status")  # fmt: skip

    def __init__(
        self,
        status: int,
        reason: str | None,
        headers: CIMultiDictProxy[str],
        content: aiohttp.StreamReader,
        protocol: ResponseHandler | None,
        release: Callable[[], None],
        close: Callable[[], None],
    ) -> None:
        self.status, self.reason, self.headers, self.content = status, reason, headers, content
        self.protocol, self.release, self.close = protocol, release, close
        length = headers.get(CONTENT_LENGTH)
        self.content_length = int(length) if length is not None and length.isdigit() else None

    @classmethod
    def of_response(cls, resp: aiohttp.ClientResponse) -> Reply:
        protocol = resp.connection.protocol if resp.connection is not None else None
        return cls(resp.status, resp.reason, resp.headers, resp.content, protocol,
                   resp.release, resp.close)  # fmt: skip

    @classmethod
    def of_exchange(cls, ex: upstream.Exchange) -> Reply:
        msg = ex.message
        return cls(msg.code, msg.reason, msg.headers, ex.payload, ex.proto, ex.release,
                   ex.close)  # fmt: skip


def _body_too_large(limits: Limits) -> web.Response:
    return json_error(413, "body_too_large",
                      f"request body exceeds {limits.max_body_bytes} bytes")  # fmt: skip


def _head_size(request: web.Request) -> int:
    """The request head's header bytes as sent (name, ': ', value, CRLF per line)."""
    return sum(len(k) + len(v) + 4 for k, v in request.raw_headers)


class Forwarder:
    def __init__(self, runtime: Runtime, limits: Limits, pool: upstream.Pool) -> None:
        self.runtime = runtime  # replaced whole by a reload
        self.limits = limits
        self.pool = pool
        self.routes = CandidateCache()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        rt = self.runtime  # read once: a reload swaps it whole
        topology = rt.topology
        fwd = topology.config.forwarding
        limits = self.limits
        trace = Trace()
        request[TRACE_KEY] = trace
        if has_looped(request.headers, rt.via):
            return json_error(508, "loop_detected", "the request came back to this proxy: "
                              "a geode URL points at the proxy itself")  # fmt: skip
        if _head_size(request) > limits.max_header_bytes:
            too_big = f"request headers exceed {limits.max_header_bytes} bytes"
            return json_error(431, "headers_too_large", too_big)
        length = request.content_length
        if length is not None and length > limits.max_body_bytes:
            return _body_too_large(limits)

        peer = parse_ip(request.remote) if request.remote else None
        trusted = peer is not None and rt.trusted.contains(peer)
        cip = client_ip(peer, request.headers.getall("X-Forwarded-For", ()), rt.trusted)
        resolution = resolve(topology, request.headers, trusted, cip, rt.geoip)
        trace.resolution = resolution
        board = rt.board
        cands, decision = self.routes.candidates(
            topology, resolution.region, board.healthy, board.version, fwd.max_attempts
        )
        trace.decision = decision
        if not cands:
            retry_after = str(math.ceil(topology.config.health_check.interval))
            return json_error(
                503, "no_healthy_geode",
                f"no healthy geode can serve region {resolution.region!r}",
                headers={"Retry-After": retry_after}, region=resolution.region,
            )  # fmt: skip

        headers = upstream_headers(request, trusted, peer, rt.via)
        if "Upgrade" in request.headers and is_websocket(request):
            return await proxy_websocket(request, rt, cands, headers, trace, limits)
        rel = request.rel_url  # origin-form, even for an absolute-form request target
        path_qs = rel.raw_path + ("?" + rel.raw_query_string if rel.raw_query_string else "")
        body = _Body(request.content, limits.max_body_bytes) if request.body_exists else None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + fwd.failover_timeout
        # Bodiless requests to plain-HTTP geodes take the lean path (upstream.py).
        lean = body is None
        idempotent = request.method in IDEMPOTENT
        last = CONNECT_ERROR
        client_host = headers.get("Host")
        if body is None and "Content-Length" not in headers and request.method in _BODY_METHODS:
            headers["Content-Length"] = "0"  # some servers answer 411 without it
        for index, cand in enumerate(cands):
            geode = cand.geode
            if not fwd.preserve_host or client_host is None:  # (an HTTP/1.0 client may
                headers["Host"] = geode.url.raw_authority  # send no Host: each geode's own)
            try:
                if lean and geode.url.scheme == "http":
                    line = f"{request.method} {geode.prefix}{path_qs} HTTP/1.1"
                    try:
                        head = _serialize_headers(line, headers)
                    except ValueError:  # a control character: never passed on
                        return json_error(400, "bad_request", "invalid request head")
                    exchange = await upstream.send(
                        self.pool, geode, head, request.method, fwd.connect_timeout,
                        fwd.response_timeout, idempotent,
                    )  # fmt: skip
                    reply = Reply.of_exchange(exchange)
                else:
                    resp = await rt.session.request(
                        request.method, URL(geode.base + path_qs, encoded=True),
                        headers=headers, data=body.chunks() if body is not None else None,
                        allow_redirects=False, timeout=_client_timeout(fwd),
                    )  # fmt: skip
                    reply = Reply.of_response(resp)
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError,
                    upstream.ConnectFailed) as exc:  # fmt: skip
                last = CONNECT_ERROR
                log.info("geode %s: connect failed: %s", geode.name, exc)
            except upstream.BadResponse as exc:
                last = BAD_RESPONSE
                log.warning("geode %s: %s", geode.name, exc)
            except (aiohttp.ServerTimeoutError, TimeoutError):
                last = TIMEOUT
                log.info("geode %s: no response within %gs", geode.name, fwd.response_timeout)
            except (aiohttp.ClientError, OSError, BodyTooLarge) as exc:
                if body is not None and body.too_large:
                    trace.attempts.append((geode.name, CLIENT_BODY_TOO_LARGE))
                    return _body_too_large(limits)
                last = RESET
                log.info("geode %s: request failed: %r", geode.name, exc)
            else:
                rt.board.observe(geode.name, reply.status not in RETRY_STATUSES)
                more = index + 1 < len(cands) and loop.time() < deadline
                if (
                    reply.status in RETRY_STATUSES
                    and more
                    and may_try_next(RETRY_STATUS, request.method, bool(body and body.started))
                ):
                    trace.attempts.append((geode.name, RETRY_STATUS))
                    reply.close()
                    continue
                if not _framing_ok(reply):
                    reply.close()
                    trace.attempts.append((geode.name, BAD_RESPONSE))
                    log.warning("geode %s: unsupported Transfer-Encoding %r", geode.name,
                                reply.headers.get("Transfer-Encoding"))  # fmt: skip
                    last = BAD_RESPONSE
                    break
                trace.attempts.append((geode.name, RESPONSE))
                trace.geode = geode
                trace.decision = cand.decision
                length = reply.content_length
                if (length is not None and length <= SMALL_BODY and request.method != "HEAD"
                        and reply.status not in _NO_BODY and reply.status >= 200):  # fmt: skip
                    # Read it whole and let aiohttp send head and body in one write; if the
                    # geode breaks off, nothing reached the client yet: a clean 502.
                    try:
                        small = await reply.content.readexactly(length)
                    except (aiohttp.ClientError, TimeoutError, OSError,
                            asyncio.IncompleteReadError) as exc:  # fmt: skip
                        reply.close()
                        log.warning("geode %s failed mid-response: %r", geode.name, exc)
                        trace.attempts[-1] = (geode.name, RESET)
                        trace.geode = None
                        return json_error(502, "bad_gateway", "the geode's response broke off",
                                          attempts=len(trace.attempts))  # fmt: skip
                    reply.release()
                    trace.body_bytes = length
                    headers = downstream_headers(reply.headers, geode, rt.via)
                    return _BodyRelayResponse(reply.status, reply.reason, headers, small)
                return await self._relay(request, reply, geode)
            trace.attempts.append((geode.name, last))
            rt.board.observe(geode.name, False)
            if not may_try_next(last, request.method, bool(body and body.started)):
                break
            if loop.time() >= deadline:
                break
        trace.decision = ALL_FAILED
        if last == TIMEOUT:
            return json_error(504, "gateway_timeout", "the geode did not answer in time",
                              attempts=len(trace.attempts))  # fmt: skip
        if last == BAD_RESPONSE:
            return json_error(502, "bad_response", "the geode's response could not be relayed",
                              attempts=len(trace.attempts))  # fmt: skip
        return json_error(502, "bad_gateway", "no geode could be reached",
                          attempts=len(trace.attempts))  # fmt: skip

    async def _relay(
        self, request: web.Request, reply: Reply, geode: Geode
    ) -> web.StreamResponse:
        """Stream the geode's response to the client. A geode that fails mid-body aborts
        the client connection, so a truncated response never looks complete. Returning
        the prepared response lets aiohttp finish (or notice the closed connection)
        without logging a 500 for what is not a server error."""
        headers = downstream_headers(reply.headers, geode, self.runtime.via)
        out = _RelayResponse(status=reply.status, reason=reply.reason, headers=headers)
        trace = request[TRACE_KEY]
        # A body that ends when the connection closes cannot tell a reset from its end by
        # itself (aiohttp reads a reset as EOF): the connection's `closed` future can.
        closed = None
        delimited = CONTENT_LENGTH in reply.headers or "chunked" in reply.headers.get(
            TRANSFER_ENCODING, ""
        ).lower()
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
                    log.warning("geode %s failed mid-response: %r; aborting the client "
                                "connection", geode.name, exc)  # fmt: skip
                    trace.aborted = True
                    if request.transport is not None:
                        request.transport.abort()
                    return out
                if not chunk:
                    break
                await out.write(chunk)
                trace.body_bytes += len(chunk)
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


@functools.lru_cache(maxsize=8)
def _client_timeout(fwd: Forwarding) -> aiohttp.ClientTimeout:
    """For the ClientSession path; one object per forwarding config."""
    return aiohttp.ClientTimeout(  # connect covers DNS too, sock_connect only TCP/TLS
        total=None, connect=fwd.connect_timeout, sock_connect=fwd.connect_timeout,
        sock_read=fwd.response_timeout,
    )  # fmt: skip


def _settled(future: asyncio.Future[None]) -> bool:
    return future.done() and not future.cancelled()


def _framing_ok(reply: Reply) -> bool:
    """Only ``chunked`` is a transfer-coding we can relay: any other (``gzip, chunked``)
    would reach the client as undeclared encoded bytes once the hop-by-hop header goes."""
    te = reply.headers.get(TRANSFER_ENCODING)
    return te is None or te.strip().lower() == "chunked"


class _RelayResponse(web.StreamResponse):
    """A StreamResponse that adds no headers of its own: aiohttp would invent a
    ``Content-Type: application/octet-stream`` and a ``Server`` header when the geode sent
    none (a made-up type changes how browsers treat the body). ``_prepare_headers`` is
    private aiohttp API; tests/test_forwarding.py pins this behaviour."""

    async def _prepare_headers(self) -> None:
        had_type = CONTENT_TYPE in self.headers
        had_server = SERVER in self.headers
        await super()._prepare_headers()
        if not had_type:
            self.headers.popall(CONTENT_TYPE, None)
        if not had_server:
            self.headers.popall(SERVER, None)


class _BodyRelayResponse(web.Response):
    """A whole small response, sent by aiohttp in one write after the handler returns,
    with no Content-Type or Server header the geode did not send (as _RelayResponse)."""

    def __init__(
        self, status: int, reason: str | None, headers: CIMultiDict[str], body: bytes
    ) -> None:
        self._geode_typed = CONTENT_TYPE in headers
        self._geode_server = SERVER in headers
        super().__init__(status=status, reason=reason, headers=headers, body=body)

    async def _prepare_headers(self) -> None:
        await super()._prepare_headers()
        if not self._geode_typed:
            self.headers.popall(CONTENT_TYPE, None)
        if not self._geode_server:
            self.headers.popall(SERVER, None)
