"""Streaming forwarding to the chosen geode, with failover that is safe by construction.

Per request: real client IP -> region -> ordered candidates -> try them in order. Bodies
stream both ways and are never buffered. Whether another geode may be tried is decided in
one place, ``may_try_next``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from aiohttp.hdrs import TRANSFER_ENCODING
from aiohttp.web_protocol import RequestPayloadError
from yarl import URL

from geoproxy.config.values import Forwarding, Geode, Limits
from geoproxy.errors import BadResponse, BodyTimeout, BodyTooLarge, ConnectFailed
from geoproxy.health.load import LOAD_HEADER
from geoproxy.health.tls import server_name
from geoproxy.proxy import compat, upstream
from geoproxy.proxy.connection import Connection, Pool
from geoproxy.proxy.headers import response_head
from geoproxy.proxy.policy import (
    CONNECT_ERROR,
    RETRY_STATUSES,
    TLS_ERROR,
    answer_lines,
    answered,
    connect_failed,
    path_qs,
    read_whole,
)
from geoproxy.proxy.prelude import (
    Prelude,
    Route,
    Routing,
    body_too_large,
    host_for,
    refusal,
    request_wire,
)
from geoproxy.proxy.relay import Reply, interim_writer, stream
from geoproxy.proxy.responses import json_error, relay_response, whole_response
from geoproxy.proxy.trace import TICKET_KEY, TRACE_KEY, Trace
from geoproxy.proxy.websocket import is_websocket, proxy_websocket
from geoproxy.routing.router import ALL_FAILED
from geoproxy.routing.runtime import Runtime

log = logging.getLogger("geoproxy.forwarder")

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})

# Attempt outcomes (also the values of the `outcome` metric label); CONNECT_ERROR and
# TLS_ERROR are policy.py's.
TIMEOUT, RESET, RETRY_STATUS, BAD_RESPONSE = (
    "timeout",
    "reset",
    "retry_status",
    "bad_response",
)
CLIENT_BODY_TOO_LARGE = "client_body_too_large"
CLIENT_BODY_TIMEOUT = "client_body_timeout"
CLIENT_BODY_ERROR = "client_body_error"
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def may_try_next(outcome: str, method: str, body_started: bool) -> bool:
    """The one retry rule. A connect failure (TLS included) is always safe: no byte
    reached the geode.
    Anything after the request went out (a timeout, a reset, a 502/503/504) is retried only
    for an idempotent method whose body has not started to stream; a body cannot be
    replayed, and a POST must never reach two geodes."""
    if outcome in (CONNECT_ERROR, TLS_ERROR):
        return True
    return method in IDEMPOTENT and not body_started


class _Body:
    """The client's request body as an async iterable that notes when it starts flowing
    and stops it when it grows past the limit or comes too slowly."""

    __slots__ = ("content", "limits", "size", "started", "timed_out", "too_large")

    def __init__(self, content: aiohttp.StreamReader, limits: Limits) -> None:
        self.content = content
        self.limits = limits
        self.size = 0
        self.started = False
        self.too_large = False
        self.timed_out = False

    async def chunks(self) -> AsyncIterator[bytes]:
        limits = self.limits
        content = self.content
        clock = time.monotonic
        waited = 0.0  # on the client only: a geode slow to take the body does not count
        while True:
            began = clock()
            try:
                async with asyncio.timeout(limits.body_timeout):
                    chunk = await content.readany()
            except TimeoutError:
                self.timed_out = True
                raise BodyTimeout from None
            if not chunk:
                return
            waited += clock() - began
            self.started = True
            self.size += len(chunk)
            if self.size > limits.max_body_bytes:
                self.too_large = True
                raise BodyTooLarge
            if waited > limits.body_timeout and self.size < limits.body_min_rate * waited:
                self.timed_out = True
                raise BodyTimeout
            yield chunk


def _body_timed_out(request: web.BaseRequest, limits: Limits) -> web.Response:
    """The 408 for a body that came too slowly; the connection closes once it is sent
    (aiohttp would otherwise wait up to 10 s for the rest of the body to discard it)."""
    answer = json_error(
        408,
        "request_timeout",
        "request body not received in time (a "
        f"pause over {limits.body_timeout:g}s, or under "
        f"{limits.body_min_rate} bytes/s)",
    )
    answer.force_close()
    task = asyncio.current_task()  # aiohttp's, which writes the answer before it ends
    if task is not None:
        task.add_done_callback(lambda _: request.protocol.force_close())
    return answer


@dataclass(frozen=True, slots=True)
class Begun:
    """How far the fast lane got with a request before it handed it over: sent on
    ``proto`` (taken from the pool when ``pooled``: a keep-alive race may send it again,
    once, on a new connection), no connection could be opened (``failure``: the first
    attempt's outcome), or neither (nothing was sent)."""

    proto: Connection | None = None
    pooled: bool = True
    failure: ConnectFailed | None = None


class Forwarder:
    """The coroutine path, from a ``Runtime`` (the config, health and GeoIP in force:
    limits and timeouts are read from it per request, so a reload is one swap)."""

    def __init__(self, runtime: Runtime, pool: Pool) -> None:
        self.runtime = runtime  # replaced whole by a reload (adopt)
        self.pool = pool
        self.routing = Routing()
        # What both lanes ask first (prelude.py), as the forwarder's own.
        self.prelude = self.routing.prelude
        self.routed = self.routing.routed

    def adopt(self, runtime: Runtime, removed: Iterable[Geode]) -> None:
        """A reload's runtime; the pool follows its keep-alive and lets the connections
        to removed geodes go."""
        self.runtime = runtime
        self.pool.keepalive_timeout = runtime.topology.config.forwarding.keepalive_timeout
        self.pool.close(removed)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        rt = self.runtime  # read once: a reload swaps it whole
        trace = Trace()
        request[TRACE_KEY] = trace
        target = path_qs(request)
        refused = refusal(rt, request.method, target)
        if refused is not None:  # before anything else: it never reaches a geode
            trace.denied, answer = refused
            if request.body_exists:  # unread (or a CONNECT tunnel): not worth reading
                answer.force_close()
            return answer
        prelude = self.prelude(
            rt,
            request.raw_headers,
            request.headers,
            request.remote,
            request.content_length,
            request.scheme,
        )
        if not isinstance(prelude, Prelude):
            return prelude
        route = self.routed(rt, prelude, trace, target)
        if not isinstance(route, Route):
            return route
        head = route.head
        headers_in = request.headers
        if "Upgrade" in headers_in and is_websocket(request):
            if request.body_exists:  # RFC 6455 4.1: a handshake is a GET without a body
                answer = json_error(400, "bad_request", "a WebSocket handshake carries no body")
                answer.force_close()  # its body is not read
                return answer
            headers = head.as_map(route.forwarded, head.host)
            return await proxy_websocket(
                request, rt, route.cands, headers, trace, request[TICKET_KEY]
            )
        if "Expect" in headers_in:
            # RFC 9110 10.1.1: the client waits for this before it sends the body; only
            # now, with a geode to send it to (a 503 or 413 goes out without it).
            if headers_in["Expect"].lower() != "100-continue" or request.version < (1, 1):
                only = "only 'Expect: 100-continue' is supported (HTTP/1.1)"
                return json_error(417, "expectation_failed", only)
            if request.body_exists:
                await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                request.writer.output_size = 0
        body = _Body(request.content, rt.topology.config.limits) if request.body_exists else None
        forwarded = route.forwarded
        if body is None and request.method in _BODY_METHODS and not head.has_length:
            forwarded += b"Content-Length: 0\r\n"  # some servers answer 411 without it
        deadline = time.monotonic() + rt.topology.config.forwarding.failover_timeout
        return await self._attempts(request, route, forwarded, body, deadline, None)

    async def resume(
        self, request: web.BaseRequest, route: Route, begun: Begun, deadline: float
    ) -> web.StreamResponse:
        """Go on with a request the fast lane began with ``route.cands[0]`` and could not
        finish itself (``begun``: how far it got). Whatever it is (a failure, a
        502/503/504, a body to stream) is handled as on this path."""
        request[TRACE_KEY] = route.trace
        return await self._attempts(request, route, route.forwarded, None, deadline, begun)

    async def _attempts(
        self,
        request: web.BaseRequest,
        route: Route,
        forwarded: bytes,
        body: _Body | None,
        deadline: float,
        begun: Begun | None,
    ) -> web.StreamResponse:
        """Try the candidates in order, as ``may_try_next`` allows; relay the first
        answer that can be relayed."""
        rt, trace, head = route.rt, route.trace, route.head
        fwd = rt.topology.config.forwarding
        board = rt.board
        limits = rt.topology.config.limits
        cands = route.cands
        load = rt.load
        ticket = request[TICKET_KEY]
        method = request.method
        target = path_qs(request)
        idempotent = method in IDEMPOTENT
        lean = compat.lean()
        # A body without Content-Length came chunked: it goes on chunked.
        chunked = body is not None and not head.has_length
        if chunked and lean:
            forwarded += b"Transfer-Encoding: chunked\r\n"
        interim = interim_writer(request)
        last = CONNECT_ERROR
        for index, cand in enumerate(cands):
            geode = trace.trying = cand.geode
            ticket.at(geode.name)
            host = host_for(fwd, head, geode)
            first, begun = begun, None  # only the first attempt can have begun already
            sent = time.perf_counter()
            try:
                if first is not None and first.failure is not None:
                    raise first.failure
                if lean:
                    wire = request_wire(method, geode, target, host, head, forwarded)
                    exchange = await upstream.send(
                        self.pool,
                        geode,
                        wire,
                        method,
                        fwd.connect_timeout,
                        fwd.response_timeout,
                        idempotent,
                        first.proto if first is not None else None,
                        first is None or first.pooled,
                        upstream.Body(body.chunks(), chunked) if body is not None else None,
                        interim,
                        rt.tls.get(geode),
                    )
                    reply = Reply.of_exchange(exchange)
                else:  # aiohttp's public API only (compat)
                    tls = rt.tls.get(geode)
                    resp = await rt.session.request(
                        method,
                        URL(geode.base + target, encoded=True),
                        headers=head.as_map(forwarded, host),
                        data=body.chunks() if body is not None else None,
                        allow_redirects=False,
                        timeout=_client_timeout(fwd),
                        ssl=tls if tls is not None else True,
                        server_hostname=server_name(geode) if tls is not None else None,
                    )
                    reply = Reply.of_response(resp)
            except (
                ConnectFailed,
                aiohttp.ClientConnectorError,
                aiohttp.ConnectionTimeoutError,
            ) as exc:
                last = connect_failed(trace, geode, exc)
            except BadResponse as exc:
                last = BAD_RESPONSE
                log.warning("geode %s: %s", geode.name, exc)
            except (aiohttp.ServerTimeoutError, TimeoutError):
                if body is not None and body.timed_out:  # the client's, not the geode's
                    trace.attempts.append((geode.name, CLIENT_BODY_TIMEOUT))
                    return _body_timed_out(request, limits)
                last = TIMEOUT
                if geode.name in load.timed:  # a peak the choice must see
                    load.latency(geode.name, time.perf_counter() - sent)
                log.info("geode %s: no response within %gs", geode.name, fwd.response_timeout)
            except RequestPayloadError as exc:  # the client's body broke off or is malformed
                trace.attempts.append((geode.name, CLIENT_BODY_ERROR))
                return json_error(
                    400, "bad_request_body", f"the request body could not be read: {exc}"
                )
            except (aiohttp.ClientError, OSError, BodyTooLarge, BodyTimeout) as exc:
                if body is not None and body.too_large:
                    trace.attempts.append((geode.name, CLIENT_BODY_TOO_LARGE))
                    return body_too_large(limits)
                if body is not None and body.timed_out:  # aiohttp closed the geode's
                    trace.attempts.append((geode.name, CLIENT_BODY_TIMEOUT))  # connection
                    return _body_timed_out(request, limits)
                last = RESET
                log.info("geode %s: request failed: %r", geode.name, exc)
            else:
                status = reply.status
                if geode.name in load.timed and first is None:  # else sent by the fast lane
                    load.latency(geode.name, time.perf_counter() - sent)
                board.observe(geode.name, status not in RETRY_STATUSES)
                if (
                    status in RETRY_STATUSES
                    and index + 1 < len(cands)
                    and time.monotonic() < deadline
                    and may_try_next(RETRY_STATUS, method, bool(body and body.started))
                ):
                    trace.attempts.append((geode.name, RETRY_STATUS))
                    if (reported := reply.headers.get(LOAD_HEADER)) is not None:
                        load.report(geode.name, reported)
                    reply.close()
                    continue
                out = response_head(reply.raw_headers, reply.reason)
                if out.load is not None:
                    load.report(geode.name, out.load)
                if not (out.ok and out.framed):
                    reply.close()
                    trace.attempts.append((geode.name, BAD_RESPONSE))
                    log.warning(
                        "geode %s: a response head that cannot be relayed: "
                        "Transfer-Encoding %r or a control character",
                        geode.name,
                        reply.headers.get(TRANSFER_ENCODING),
                    )
                    last = BAD_RESPONSE
                    break
                answered(trace, geode, cand.decision)
                lines = answer_lines(route, out, geode)
                length = out.length
                if read_whole(status, method, out) and length is not None:
                    # Read it whole and send head and body in one write; if the geode
                    # breaks off, nothing reached the client yet: a clean 502.
                    try:
                        small = await reply.content.readexactly(length)
                    except (
                        aiohttp.ClientError,
                        TimeoutError,
                        OSError,
                        asyncio.IncompleteReadError,
                    ) as exc:
                        reply.close()
                        log.warning("geode %s failed mid-response: %r", geode.name, exc)
                        trace.attempts[-1] = (geode.name, RESET)
                        trace.geode = None
                        return json_error(
                            502,
                            "bad_gateway",
                            "the geode's response broke off",
                            attempts=len(trace.attempts),
                        )
                    reply.release()
                    trace.body_bytes = length
                    return whole_response(status, reply.reason, lines, out.date, small)
                relay = relay_response(status, reply.reason, lines, out.date, length)
                return await stream(request, reply, geode, relay)
            trace.attempts.append((geode.name, last))
            board.observe(geode.name, False)
            if not may_try_next(last, method, bool(body and body.started)):
                break
            if time.monotonic() >= deadline:
                break
        trace.decision = ALL_FAILED
        if last == TIMEOUT:
            return json_error(
                504,
                "gateway_timeout",
                "the geode did not answer in time",
                attempts=len(trace.attempts),
            )
        if last == BAD_RESPONSE:
            return json_error(
                502,
                "bad_response",
                "the geode's response could not be relayed",
                attempts=len(trace.attempts),
            )
        return json_error(
            502, "bad_gateway", "no geode could be reached", attempts=len(trace.attempts)
        )


@functools.lru_cache(maxsize=8)
def _client_timeout(fwd: Forwarding) -> aiohttp.ClientTimeout:
    """For the public-API path (compat); one object per forwarding config."""
    return aiohttp.ClientTimeout(  # connect covers DNS too, sock_connect only TCP/TLS
        total=None,
        connect=fwd.connect_timeout,
        sock_connect=fwd.connect_timeout,
        sock_read=fwd.response_timeout,
    )
