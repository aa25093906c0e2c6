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

from geoproxy.config import Limits
from geoproxy.headers import GEODE_HEADER, REGION_HEADER
from geoproxy.responses import json_error
from geoproxy.router import Candidate
from geoproxy.runtime import Runtime
from geoproxy.trace import Trace

log = logging.getLogger("geoproxy.websocket")

# aiohttp's client makes its own handshake headers.
_HANDSHAKE = ("Sec-WebSocket-Key", "Sec-WebSocket-Version", "Sec-WebSocket-Extensions",
              "Sec-WebSocket-Protocol")  # fmt: skip
_GOING_AWAY, _INTERNAL_ERROR = 1001, 1011
WebSocket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


def is_websocket(request: web.BaseRequest) -> bool:
    upgrade = request.headers.get("Upgrade", "").strip().lower()
    connection = {t.strip().lower() for v in request.headers.getall("Connection", ())
                  for t in v.split(",")}  # fmt: skip
    return request.method == "GET" and upgrade == "websocket" and "upgrade" in connection


async def proxy_websocket(
    request: web.BaseRequest,
    rt: Runtime,
    cands: list[Candidate],
    headers: CIMultiDict[str],
    trace: Trace,
    limits: Limits,
) -> web.StreamResponse:
    fwd = rt.topology.config.forwarding
    for name in _HANDSHAKE:
        headers.popall(name, None)
    protocols = tuple(p.strip() for v in request.headers.getall("Sec-WebSocket-Protocol", ())
                      for p in v.split(",") if p.strip())  # fmt: skip
    path_qs = request.rel_url.raw_path + (
        "?" + request.rel_url.raw_query_string if request.rel_url.raw_query_string else ""
    )
    upstream = None
    for cand in cands:
        geode = cand.geode
        if not fwd.preserve_host:
            headers["Host"] = geode.url.raw_authority
        try:
            async with asyncio.timeout(fwd.connect_timeout + fwd.response_timeout):
                upstream = await rt.session.ws_connect(
                    URL(geode.base + path_qs, encoded=True), headers=headers,
                    protocols=protocols, autoclose=False, max_msg_size=limits.max_body_bytes,
                )  # fmt: skip
        except aiohttp.WSServerHandshakeError as exc:
            trace.attempts.append((geode.name, "response"))
            trace.geode, trace.decision = geode, cand.decision
            status = exc.status if 400 <= exc.status < 500 else 502
            why = f"the geode answered the WebSocket handshake with {exc.status}"
            return json_error(status, "websocket_refused", why)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            trace.attempts.append((geode.name, "connect_error"))
            rt.board.observe(geode.name, False)
            log.info("geode %s: WebSocket handshake failed: %r", geode.name, exc)
            continue
        trace.attempts.append((geode.name, "response"))
        trace.geode, trace.decision = geode, cand.decision
        rt.board.observe(geode.name, True)
        break
    if upstream is None:
        return json_error(502, "bad_gateway", "no geode could be reached",
                          attempts=len(trace.attempts))  # fmt: skip
    assert trace.geode is not None
    downstream = web.WebSocketResponse(
        protocols=(upstream.protocol,) if upstream.protocol else (), autoclose=False,
        max_msg_size=limits.max_body_bytes,
    )  # fmt: skip
    downstream.headers[GEODE_HEADER] = trace.geode.name
    downstream.headers[REGION_HEADER] = trace.geode.region
    try:
        await downstream.prepare(request)
        pumps = [asyncio.create_task(_pump(upstream, downstream)),
                 asyncio.create_task(_pump(downstream, upstream))]  # fmt: skip
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
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


async def _pump(source: WebSocket, sink: WebSocket) -> None:
    """Relay frames from one side to the other; pass a close (code and reason) on."""
    while True:
        msg = await source.receive()
        if msg.type == WSMsgType.TEXT:
            await sink.send_str(msg.data)
        elif msg.type == WSMsgType.BINARY:
            await sink.send_bytes(msg.data)
        elif msg.type == WSMsgType.CLOSE:
            code = msg.data if isinstance(msg.data, int) else _GOING_AWAY
            reason = (msg.extra or "").encode()
            await sink.close(code=code, message=reason)
            await source.close(code=code)  # answer the close (autoclose is off)
            return
        elif msg.type in (WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
            await sink.close(code=_INTERNAL_ERROR if msg.type == WSMsgType.ERROR else _GOING_AWAY)
            return
