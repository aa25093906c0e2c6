"""WebSocket proxying: the one upgrade geoproxy passes on (any other ``Upgrade`` is a
hop-by-hop header: dropped, and the request forwarded as a plain one).

The handshake goes to the candidates in order, like any GET (nothing is upgraded until a
geode answers 101, so moving on is safe); then frames are relayed both ways until either
side closes, and its close code and reason are passed on to the other.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp
from aiohttp import WSMsgType, web
from multidict import CIMultiDict
from yarl import URL

from geoproxy.health.load import Ticket
from geoproxy.health.tls import server_name
from geoproxy.proxy.headers import GEODE_HEADER, REGION_HEADER, ResponseHead
from geoproxy.proxy.policy import CONNECT_ERROR, answered, connect_failed, path_qs
from geoproxy.proxy.responses import json_error, lines_to_map
from geoproxy.proxy.trace import Trace
from geoproxy.routing.router import Candidate
from geoproxy.routing.runtime import Runtime

log = logging.getLogger("geoproxy.websocket")

# aiohttp's client makes its own handshake headers.
_HANDSHAKE = (
    "Sec-WebSocket-Key",
    "Sec-WebSocket-Version",
    "Sec-WebSocket-Extensions",
    "Sec-WebSocket-Protocol",
)
_HANDSHAKE_ANSWER = frozenset(
    ("sec-websocket-accept", "sec-websocket-protocol", "sec-websocket-extensions", "content-length")
)
_GOING_AWAY, _INTERNAL_ERROR = 1001, 1011
_CLOSE_WAIT = 15.0
WebSocket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


def is_websocket(request: web.BaseRequest) -> bool:
    upgrade = request.headers.get("Upgrade", "").strip().lower()
    connection = {
        t.strip().lower() for v in request.headers.getall("Connection", ()) for t in v.split(",")
    }
    return request.method == "GET" and upgrade == "websocket" and "upgrade" in connection


async def proxy_websocket(
    request: web.BaseRequest,
    rt: Runtime,
    cands: list[Candidate],
    headers: CIMultiDict[str],
    trace: Trace,
    ticket: Ticket,
) -> web.StreamResponse:
    """Hand the handshake to the candidates in order, then relay frames; the session
    counts in flight at its geode (``ticket``) until it ends."""
    fwd = rt.topology.config.forwarding
    limits = rt.topology.config.limits
    for name in _HANDSHAKE:
        headers.popall(name, None)
    protocols = tuple(
        p.strip()
        for v in request.headers.getall("Sec-WebSocket-Protocol", ())
        for p in v.split(",")
        if p.strip()
    )
    target = path_qs(request)
    upstream = None
    for cand in cands:
        geode = cand.geode
        ticket.at(geode.name)
        if not fwd.preserve_host:
            headers["Host"] = geode.url.raw_authority
        tls = rt.tls.get(geode)
        try:
            async with asyncio.timeout(fwd.connect_timeout + fwd.response_timeout):
                upstream = await rt.session.ws_connect(
                    URL(geode.base + target, encoded=True),
                    headers=headers,
                    protocols=protocols,
                    autoclose=False,
                    max_msg_size=limits.max_body_bytes,
                    ssl=tls if tls is not None else True,
                    server_hostname=server_name(geode) if tls is not None else None,
                )
        except aiohttp.WSServerHandshakeError as exc:
            answered(trace, geode, cand.decision)  # its refusal goes to the client
            status = exc.status if 400 <= exc.status < 500 else 502
            why = f"the geode answered the WebSocket handshake with {exc.status}"
            return json_error(status, "websocket_refused", why)
        except aiohttp.ClientConnectorError as exc:
            trace.attempts.append((geode.name, connect_failed(trace, geode, exc)))
            rt.board.observe(geode.name, False)
            continue
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            trace.attempts.append((geode.name, CONNECT_ERROR))
            rt.board.observe(geode.name, False)
            log.info("geode %s: WebSocket handshake failed: %r", geode.name, exc)
            continue
        answered(trace, geode, cand.decision)
        rt.board.observe(geode.name, True)
        break
    if upstream is None:
        return json_error(
            502, "bad_gateway", "no geode could be reached", attempts=len(trace.attempts)
        )
    assert trace.geode is not None
    downstream = web.WebSocketResponse(
        protocols=(upstream.protocol,) if upstream.protocol else (),
        autoclose=False,
        max_msg_size=limits.max_body_bytes,
    )
    _pass_on_101_headers(upstream, downstream)
    downstream.headers[GEODE_HEADER] = trace.geode.name
    downstream.headers[REGION_HEADER] = trace.geode.region
    try:
        await downstream.prepare(request)
        pumps = [
            asyncio.create_task(_pump(upstream, downstream)),
            asyncio.create_task(_pump(downstream, upstream)),
        ]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            # The other pump may be passing a close on and waiting for its answer: each
            # close waits at most aiohttp's close timeout (10 s).
            await asyncio.wait(pumps, timeout=_CLOSE_WAIT)
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
    finally:
        if not upstream.closed:
            await upstream.close(code=_GOING_AWAY)
        if not downstream.closed:
            await downstream.close(code=_GOING_AWAY)
    return downstream


def _pass_on_101_headers(
    upstream: aiohttp.ClientWebSocketResponse, downstream: web.WebSocketResponse
) -> None:
    """The header lines of the geode's 101 (its Set-Cookie, its own headers) go to the
    client too, less the hop-by-hop ones and the handshake's, which each side makes for
    its own connection. The 101 is only reachable as ``_response`` (aiohttp 3.14): without
    it, none are passed on."""
    response = getattr(upstream, "_response", None)
    raw = getattr(response, "raw_headers", None)
    if not raw:
        return
    lines = lines_to_map(ResponseHead(raw, None).kept, CIMultiDict())
    for name in _HANDSHAKE_ANSWER:
        lines.popall(name, None)
    downstream.headers.extend(lines)


async def _pump(source: WebSocket, sink: WebSocket) -> None:
    """Relay frames from one side to the other. A close is passed on, its answer awaited
    and given back, as RFC 6455 5.5.1 has the two ends do: a client's close code and
    reason reach the geode, and the geode's answering code reaches the client."""
    while True:
        msg = await source.receive()
        if msg.type == WSMsgType.TEXT:
            await sink.send_str(msg.data)
        elif msg.type == WSMsgType.BINARY:
            await sink.send_bytes(msg.data)
        elif msg.type == WSMsgType.CLOSE:
            code = msg.data if isinstance(msg.data, int) else _GOING_AWAY
            await sink.close(code=code, message=(msg.extra or "").encode())
            await source.close(code=sink.close_code or code)  # autoclose is off
            return
        elif msg.type == WSMsgType.CLOSING:
            return  # the other pump is closing this side, and answers it
        elif msg.type in (WSMsgType.CLOSED, WSMsgType.ERROR):
            await sink.close(code=_INTERNAL_ERROR if msg.type == WSMsgType.ERROR else _GOING_AWAY)
            return
