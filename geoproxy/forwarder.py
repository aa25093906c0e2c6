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
# Answered by this hop (aiohttp sends 100 Continue itself) and never passed on.
_DROP_REQUEST = HOP_BY_HOP | {istr("Expect")}
_REGION_HEADERS = frozenset({istr(X_CLIENT_REGION), istr(CF_IPCOUNTRY)})
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
RETRY_STATUSES = frozenset({502, 503, 504})
VIA = "1.1 geoproxy"
GEODE_HEADER = "X-Geoproxy-Geode"
REGION_HEADER = "X-Geoproxy-Region"
_INTERNAL_PREFIX = "x-geoproxy-"

# Attempt outcomes (also the values of the `outcome` metric label).
CONNECT_ERROR, TIMEOUT, RESET, RETRY_STATUS, RESPONSE = (
    "connect_error", "timeout", "reset", "retry_status", "response",
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


def upstream_headers(
    request: web.Request, trusted: bool, peer: IPAddress | None
) -> CIMultiDict[str]:
    """The headers sent to a geode: hop-by-hop removed, X-Forwarded-* and Via set."""
    incoming = request.headers
    named = _connection_tokens(incoming)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        low = name.lower()
        if (
            name in _DROP_REQUEST
            or low in named
            or low.startswith(_INTERNAL_PREFIX)
            or (not trusted and name in _REGION_HEADERS)
            or low in ("x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "via")
        ):
            continue
        out.add(name, value)
    peer_text = str(peer) if peer is not None else (request.remote or "")
    prior = ", ".join(incoming.getall("X-Forwarded-For", ())) if trusted else ""
    out["X-Forwarded-For"] = f"{prior}, {peer_text}" if prior else peer_text
    proto = incoming.get("X-Forwarded-Proto") if trusted else None
    out["X-Forwarded-Proto"] = proto or request.scheme
    host = incoming.get("X-Forwarded-Host") if trusted else None
    if host or request.host:
        out["X-Forwarded-Host"] = host or request.host
    via = incoming.get("Via")
    out["Via"] = f"{via}, {VIA}" if via else VIA
    return out


def downstream_headers(resp: aiohttp.ClientResponse, geode: Geode) -> CIMultiDict[str]:
    named = _connection_tokens(resp.headers)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in resp.headers.items():
        if name in HOP_BY_HOP or name.lower() in named:
            continue
        out.add(name, value)
    via = resp.headers.get("Via")
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
        timeout = aiohttp.ClientTimeout(
            total=None, connect=None, sock_connect=fwd.connect_timeout,
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
        return json_error(502, "bad_gateway", "no geode could be reached",
                          attempts=len(trace.attempts))  # fmt: skip

    async def _relay(
        self, request: web.Request, resp: aiohttp.ClientResponse, geode: Geode
    ) -> web.StreamResponse:
        """Stream the geode's response to the client. A geode that fails mid-body aborts
        the client connection, so a truncated response never looks complete. Returning
        the prepared response lets aiohttp finish (or notice the closed connection)
        without logging a 500 for what is not a server error."""
        out = web.StreamResponse(status=resp.status, reason=resp.reason,
                                 headers=downstream_headers(resp, geode))  # fmt: skip
        complete = False
        trace = request[TRACE_KEY]
        try:
            await out.prepare(request)
            while True:
                try:
                    chunk = await resp.content.readany()
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
            if complete:
                resp.release()
            else:
                resp.close()  # never return a half-read connection to the pool
        return out
