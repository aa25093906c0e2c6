"""Streaming forwarding to the chosen geode, with failover that is safe by construction.

Per request: real client IP -> region -> ordered candidates -> try them in order. Bodies
stream both ways and are never buffered. Whether another geode may be tried is decided in
one place, ``may_try_next``.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from aiohttp.hdrs import CONTENT_LENGTH, CONTENT_TYPE, SERVER, TRANSFER_ENCODING
from multidict import CIMultiDict, CIMultiDictProxy, istr
from yarl import URL

from geoproxy.clientip import IPAddress, client_ip, parse_ip
from geoproxy.config import Geode
from geoproxy.resolver import CF_IPCOUNTRY, X_CLIENT_REGION, Resolution, resolve
from geoproxy.responses import json_error
from geoproxy.router import ALL_FAILED, candidates
from geoproxy.runtime import Runtime

log = logging.getLogger("geoproxy.forwarder")

#: RFC 9110 7.6.1 hop-by-hop headers, plus the legacy Proxy-Connection.
HOP_BY_HOP = frozenset(
    istr(h)
    for h in ("Connection", "Keep-Alive", "Proxy-Connection", "Proxy-Authenticate",
              "Proxy-Authorization", "TE", "Trailer", "Transfer-Encoding", "Upgrade")
)  # fmt: skip
# Request headers never passed on as they came: hop-by-hop ones, Expect (aiohttp answers
# 100 Continue itself) and the ones this hop rewrites.
_DROP_ALWAYS = frozenset(
    h.lower() for h in (*HOP_BY_HOP, "Expect", "X-Forwarded-For", "X-Forwarded-Proto",
                        "X-Forwarded-Host", "Via")
)  # fmt: skip
# From an untrusted peer, also every header that claims a client identity or region: a
# geode that believes one of them could be spoofed.
_DROP_UNTRUSTED = _DROP_ALWAYS | frozenset(
    h.lower() for h in (X_CLIENT_REGION, CF_IPCOUNTRY, "Forwarded", "X-Real-IP",
                        "True-Client-IP", "CF-Connecting-IP", "X-Client-IP",
                        "X-Cluster-Client-IP", "Fastly-Client-IP", "X-Forwarded-Port",
                        "X-Forwarded-Prefix", "X-Forwarded-Server")
)  # fmt: skip
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
RETRY_STATUSES = frozenset({502, 503, 504})
VIA = "1.1 geoproxy"
GEODE_HEADER = "X-Geoproxy-Geode"
REGION_HEADER = "X-Geoproxy-Region"
_INTERNAL_PREFIX = "x-geoproxy-"

# Attempt outcomes (also the values of the `outcome` metric label).
CONNECT_ERROR, TIMEOUT, RESET, RETRY_STATUS, RESPONSE, BAD_RESPONSE = (
    "connect_error", "timeout", "reset", "retry_status", "response", "bad_response",
)  # fmt: skip


@dataclass(slots=True)
class Trace:
    """What happened to one request; read by the access log and metrics."""

    resolution: Resolution | None = None
    decision: str | None = None
    attempts: list[tuple[str, str]] = field(default_factory=list)  # (geode, outcome)
    geode: Geode | None = None  # the geode whose response was relayed
    aborted: bool = False  # the geode failed mid-response; the client connection was cut
    body_bytes: int = 0  # response body bytes relayed to the client


TRACE_KEY = web.RequestKey("trace", Trace)


def may_try_next(outcome: str, method: str, body_started: bool) -> bool:
    """The one retry rule. A connect failure is always safe: no byte reached the geode.
    Anything after the request went out (a timeout, a reset, a 502/503/504) is retried only
    for an idempotent method whose body has not started to stream; a body cannot be
    replayed, and a POST must never reach two geodes."""
    if outcome == CONNECT_ERROR:
        return True
    return method in IDEMPOTENT and not body_started


class _Body:
    """The client's request body as an async iterable that notes when it starts flowing."""

    __slots__ = ("content", "started")

    def __init__(self, content: aiohttp.StreamReader) -> None:
        self.content = content
        self.started = False

    async def chunks(self) -> AsyncIterator[bytes]:
        async for chunk in self.content.iter_any():
            self.started = True
            yield chunk


def _connection_tokens(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> set[str]:
    """Header names listed in Connection: they are hop-by-hop too."""
    tokens: set[str] = set()
    for value in headers.getall("Connection", ()):
        tokens.update(t.strip().lower() for t in value.split(",") if t.strip())
    return tokens


def _joined(headers: CIMultiDictProxy[str], name: str) -> str:
    """Every value of a list-valued header, as one comma-separated value."""
    return ", ".join(headers.getall(name, ()))


def upstream_headers(
    request: web.Request, trusted: bool, peer: IPAddress | None
) -> CIMultiDict[str]:
    """The headers sent to a geode: hop-by-hop removed, X-Forwarded-* and Via set. From an
    untrusted peer, every header that claims a client identity or region is dropped."""
    incoming = request.headers
    named = _connection_tokens(incoming)
    drop = _DROP_ALWAYS if trusted else _DROP_UNTRUSTED
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        low = name.lower()
        if low in drop or low in named or low.startswith(_INTERNAL_PREFIX):
            continue
        out.add(name, value)
    peer_text = str(peer) if peer is not None else (request.remote or "")
    prior = _joined(incoming, "X-Forwarded-For") if trusted else ""
    out["X-Forwarded-For"] = f"{prior}, {peer_text}" if prior else peer_text
    proto = _joined(incoming, "X-Forwarded-Proto") if trusted else ""
    out["X-Forwarded-Proto"] = proto or request.scheme
    # The Host header as sent (for an absolute-form target aiohttp's request.host is the
    # target's authority, which is not what the geode receives as Host).
    host = (_joined(incoming, "X-Forwarded-Host") if trusted else "") or incoming.get("Host")
    if host:
        out["X-Forwarded-Host"] = host
    via = _joined(incoming, "Via")
    out["Via"] = f"{via}, {VIA}" if via else VIA
    return out


def downstream_headers(resp: aiohttp.ClientResponse, geode: Geode) -> CIMultiDict[str]:
    named = _connection_tokens(resp.headers)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in resp.headers.items():
        if name in HOP_BY_HOP or name.lower() in named:
            continue
        out.add(name, value)
    via = ", ".join(resp.headers.getall("Via", ()))
    out["Via"] = f"{via}, {VIA}" if via else VIA
    out[GEODE_HEADER] = geode.name
    out[REGION_HEADER] = geode.region
    return out


class Forwarder:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    async def handle(self, request: web.Request) -> web.StreamResponse:
        rt = self.runtime
        topology = rt.topology  # read once: a reload swaps it whole
        fwd = topology.config.forwarding
        trace = Trace()
        request[TRACE_KEY] = trace

        peer = parse_ip(request.remote) if request.remote else None
        trusted = peer is not None and rt.trusted.contains(peer)
        cip = client_ip(peer, request.headers.getall("X-Forwarded-For", ()), rt.trusted)
        resolution = resolve(topology, request.headers, trusted, cip, rt.geoip)
        trace.resolution = resolution
        cands, decision = candidates(
            topology, resolution.region, rt.board.healthy, fwd.max_attempts
        )
        trace.decision = decision
        if not cands:
            retry_after = str(math.ceil(topology.config.health_check.interval))
            return json_error(
                503, "no_healthy_geode",
                f"no healthy geode can serve region {resolution.region!r}",
                headers={"Retry-After": retry_after}, region=resolution.region,
            )  # fmt: skip

        headers = upstream_headers(request, trusted, peer)
        rel = request.rel_url  # origin-form, even for an absolute-form request target
        path_qs = rel.raw_path + ("?" + rel.raw_query_string if rel.raw_query_string else "")
        body = _Body(request.content) if request.body_exists else None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + fwd.failover_timeout
        timeout = aiohttp.ClientTimeout(  # connect covers DNS too, sock_connect only TCP/TLS
            total=None, connect=fwd.connect_timeout, sock_connect=fwd.connect_timeout,
            sock_read=fwd.response_timeout,
        )  # fmt: skip
        last = CONNECT_ERROR
        for index, cand in enumerate(cands):
            geode = cand.geode
            if not fwd.preserve_host:
                headers["Host"] = geode.url.raw_authority
            url = URL(geode.base + path_qs, encoded=True)
            try:
                resp = await rt.session.request(
                    request.method, url, headers=headers,
                    data=body.chunks() if body is not None else None,
                    allow_redirects=False, timeout=timeout,
                )  # fmt: skip
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
                last = CONNECT_ERROR
                log.info("geode %s: connect failed: %s", geode.name, exc)
            except (aiohttp.ServerTimeoutError, TimeoutError):
                last = TIMEOUT
                log.info("geode %s: no response within %gs", geode.name, fwd.response_timeout)
            except (aiohttp.ClientError, OSError) as exc:
                last = RESET
                log.info("geode %s: request failed: %r", geode.name, exc)
            else:
                more = index + 1 < len(cands) and loop.time() < deadline
                if (
                    resp.status in RETRY_STATUSES
                    and more
                    and may_try_next(RETRY_STATUS, request.method, bool(body and body.started))
                ):
                    trace.attempts.append((geode.name, RETRY_STATUS))
                    resp.close()
                    continue
                if not _framing_ok(resp):
                    resp.close()
                    trace.attempts.append((geode.name, BAD_RESPONSE))
                    log.warning("geode %s: unsupported Transfer-Encoding %r", geode.name,
                                resp.headers.get("Transfer-Encoding"))  # fmt: skip
                    last = BAD_RESPONSE
                    break
                trace.attempts.append((geode.name, RESPONSE))
                trace.geode = geode
                trace.decision = cand.decision
                return await self._relay(request, resp, geode)
            trace.attempts.append((geode.name, last))
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
        self, request: web.Request, resp: aiohttp.ClientResponse, geode: Geode
    ) -> web.StreamResponse:
        """Stream the geode's response to the client. A geode that fails mid-body aborts
        the client connection, so a truncated response never looks complete. Returning
        the prepared response lets aiohttp finish (or notice the closed connection)
        without logging a 500 for what is not a server error."""
        out = _RelayResponse(status=resp.status, reason=resp.reason,
                             headers=downstream_headers(resp, geode))  # fmt: skip
        trace = request[TRACE_KEY]
        # A body that ends when the connection closes cannot tell a reset from its end by
        # itself (aiohttp reads a reset as EOF): the connection's `closed` future can.
        closed = None
        delimited = CONTENT_LENGTH in resp.headers or "chunked" in resp.headers.get(
            TRANSFER_ENCODING, ""
        ).lower()
        protocol = resp.connection.protocol if resp.connection is not None else None
        if not delimited and protocol is not None:
            closed = protocol.closed
        complete = False
        try:
            await out.prepare(request)
            while True:
                try:
                    chunk = await resp.content.readany()
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
                resp.release()
            else:
                resp.close()  # never return a half-read connection to the pool
        return out


def _settled(future: asyncio.Future[None]) -> bool:
    return future.done() and not future.cancelled()


def _framing_ok(resp: aiohttp.ClientResponse) -> bool:
    """Only ``chunked`` is a transfer-coding we can relay: any other (``gzip, chunked``)
    would reach the client as undeclared encoded bytes once the hop-by-hop header goes."""
    te = resp.headers.get(TRANSFER_ENCODING)
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
