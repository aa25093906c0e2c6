"""What both request paths work out before any geode is asked: the edge's own refusals
(methods, access rules), the routing prelude (the trusted-peer check, the header rules,
the client's region) and the candidates as health stands. The fast lane and the
coroutine path (``forwarder.py``) ask the same ``Routing``.
"""

from __future__ import annotations

import functools
import math
import time

from aiohttp import web
from multidict import CIMultiDictProxy

from geoproxy.config.access import ALLOWED_METHODS, CONNECT_REFUSED, refused_method
from geoproxy.config.values import Forwarding, Geode, Hsts, Limits
from geoproxy.proxy.headers import RawHeaders, RequestHead, plan_for
from geoproxy.proxy.homecookie import without_cookie, without_header
from geoproxy.proxy.responses import json_error
from geoproxy.proxy.trace import Trace
from geoproxy.routing.affinity import Home, current, fenced_in, home_of
from geoproxy.routing.clientip import IPAddress, client_ip, parse_ip
from geoproxy.routing.resolver import Resolution, ResolutionCache
from geoproxy.routing.router import (
    AFFINITY,
    AFFINITY_REJECTED,
    FENCED,
    OVER_CAPACITY,
    Candidate,
    CandidateCache,
)
from geoproxy.routing.runtime import Runtime


def body_too_large(limits: Limits) -> web.Response:
    return json_error(413, "body_too_large", f"request body exceeds {limits.max_body_bytes} bytes")


def refusal(rt: Runtime, method: str, target: str) -> tuple[str, web.Response] | None:
    """The edge's own answer to a request that must not reach a geode (access.py), with
    its ``geoproxy_requests_denied_total`` label: a 405 for CONNECT (and TRACE unless
    forwarded), a 400 for a path no rule can judge, the denying rule's 404 or 403. None
    lets it through. ``target``: the request target as forwarded (``policy.path_qs``)."""
    fwd = rt.topology.config.forwarding
    label = refused_method(method, fwd.forward_trace)
    if label is not None:
        allow = ALLOWED_METHODS + (", TRACE" if fwd.forward_trace else "")
        why = (
            "a reverse proxy does not tunnel"
            if label == CONNECT_REFUSED
            else "not forwarded (forwarding.forward_trace)"
        )
        return label, json_error(
            405, "method_not_allowed", f"{method}: {why}", headers={"Allow": allow}
        )
    decision = rt.topology.access.decide(target)
    rule = decision.rule
    if decision.allowed or rule is None:
        return None
    if rule.status == 400:
        return rule.name, json_error(
            400,
            "bad_path",
            "the request path cannot be read "
            "safely: an encoded '/' or '\\', a '\\', a NUL or "
            "bytes that are not UTF-8",
        )
    if rule.status == 403:
        return rule.name, json_error(403, "forbidden", "access to this path is denied")
    return rule.name, json_error(404, "not_found", "no such path")


class Prelude:
    """What a request's headers and its peer decide, before health is consulted: the
    head as passed on, its X-Forwarded-*/Via lines, and the client's region. The same
    for the same header lines from the same peer under the same ``Runtime`` (the fast
    lane keeps the last one per connection)."""

    __slots__ = ("forwarded", "head", "home", "hsts", "https", "resolution", "via")

    def __init__(
        self,
        head: RequestHead,
        forwarded: bytes,
        via: bytes,
        resolution: Resolution,
        hsts: bytes = b"",
        home: Home | None = None,
        https: bool = False,
    ) -> None:
        self.head, self.forwarded, self.via, self.resolution = head, forwarded, via, resolution
        self.hsts = hsts  # the Strict-Transport-Security line of every answer, or b""
        # The home region the headers name (home_affinity; checked again per request for
        # the time and a path prefix), and whether the client came over HTTPS.
        self.home, self.https = home, https


class Route:
    """Where one request goes and how its head is passed on: what both lanes work out
    first (the trusted-peer check, the header rules, region resolution, candidates)."""

    __slots__ = ("cands", "forwarded", "head", "hsts", "https", "rt", "trace", "via")

    def __init__(
        self,
        rt: Runtime,
        trace: Trace,
        head: RequestHead,
        cands: list[Candidate],
        forwarded: bytes,
        via: bytes,
        hsts: bytes = b"",
        https: bool = False,
    ) -> None:
        self.rt, self.trace, self.head, self.cands = rt, trace, head, cands
        self.forwarded = forwarded  # X-Forwarded-* and Via lines, as sent
        self.via = via
        self.hsts = hsts  # as Prelude.hsts
        self.https = https  # the client came over HTTPS (the home cookie is Secure then)


def request_wire(
    method: str, geode: Geode, path_qs: str, host: bytes, head: RequestHead, forwarded: bytes
) -> bytes:
    """A bodiless request head as it goes to a geode on the lean path."""
    target = _text_bytes(f"{method} {geode.prefix}{path_qs} HTTP/1.1")
    return b"".join((target, b"\r\nHost: ", host, b"\r\n", head.kept, forwarded, b"\r\n"))


def host_for(fwd: Forwarding, head: RequestHead, geode: Geode) -> bytes:
    """The Host a geode gets: the client's (an HTTP/1.0 client may send none), or the
    geode's own."""
    host = head.host
    if not fwd.preserve_host or host is None:
        host = _cached_bytes(geode.url.raw_authority)
    return host


#: Preludes kept for their requests' next of kin (``Routing.prelude``).
PRELUDES_KEPT = 1024


class Routing:
    """The prelude and the candidates, with the memos that make them cheap: a prelude
    per peer, header names and deciding values, a resolution per client and region
    header values, a try order per region and health version."""

    def __init__(self) -> None:
        self.routes = CandidateCache()
        self.regions = ResolutionCache()
        # Preludes by peer, scheme, header names (their plan) and the values of the
        # lines that decide more than what is passed on (headers._DECIDING), under
        # ``_for``: a browser's next request differs only in cookies and request ids.
        self._for: Runtime | None = None
        self._preludes: dict[tuple[object, ...], Prelude] = {}

    def prelude(
        self,
        rt: Runtime,
        raw_headers: RawHeaders,
        headers_in: CIMultiDictProxy[str],
        remote: str | None,
        length: int | None,
        scheme: str,
    ) -> Prelude | web.Response:
        """What the headers and the peer decide (see ``Prelude``), or geoproxy's own
        answer: a loop, headers or a declared body too large."""
        topology = rt.topology
        limits = topology.config.limits  # as the config in force says (a reload swaps rt)
        peer, trusted = rt.trusted.peer(remote) if remote else (None, False)
        affinity = topology.config.home_affinity
        key: tuple[object, ...] | None = None
        plan = None
        # Not under home_affinity: a cookie may name the home region there.
        if affinity is None and (plan := plan_for(raw_headers, trusted)) is not None:
            if self._for is not rt:
                self._for, self._preludes = rt, {}
            key = (plan, plan.decide(raw_headers), remote, scheme)
            kept = self._preludes.get(key)
            if kept is not None:  # only values passed on as they came differ
                head = kept.head.renewed(raw_headers)
                if head.size <= limits.max_header_bytes and (
                    length is None or length <= limits.max_body_bytes
                ):
                    return Prelude(head, kept.forwarded, kept.via, kept.resolution, kept.hsts)
        head = RequestHead(raw_headers, trusted, plan)
        via = _cached_bytes(rt.via)
        if head.looped(via):
            return json_error(
                508,
                "loop_detected",
                "the request came back to this proxy: a geode URL points at the proxy itself",
            )
        if head.size > limits.max_header_bytes:
            too_big = f"request headers exceed {limits.max_header_bytes} bytes"
            return json_error(431, "headers_too_large", too_big)
        if length is not None and length > limits.max_body_bytes:
            return body_too_large(limits)
        forwarded_for = headers_in.getall("X-Forwarded-For", None) if trusted else None
        client_key: tuple[str | None, tuple[str, ...] | None]
        if forwarded_for:  # the client is named by the trusted peer's X-Forwarded-For
            client_key = (remote, tuple(forwarded_for))

            def client() -> IPAddress | None:
                return client_ip(peer, forwarded_for, rt.trusted)
        else:  # the client is the peer
            client_key = (remote, None)

            def client() -> IPAddress | None:
                return peer

        resolution = self.regions.resolve(
            topology, headers_in, trusted, client, rt.geoip, client_key, rt.trusted
        )
        forwarded = head.forwarded(
            _peer_text(remote) if remote else b"", _cached_bytes(scheme), via
        )
        hsts = topology.config.proxy.hsts
        own = hsts_line(hsts) if hsts is not None and scheme == "https" else b""
        if affinity is None:
            prelude = Prelude(head, forwarded, via, resolution, own)
            if key is not None and head.plan is not None:  # (None: Connection named lines)
                if len(self._preludes) >= PRELUDES_KEPT:
                    self._preludes.clear()  # bounded: many clients just work it out afresh
                self._preludes[key] = prelude
            return prelude
        home = home_of(affinity, headers_in, trusted, topology.region_names, time.time())
        cookie = affinity.cookie
        if cookie is not None and not cookie.forward:
            head.kept = without_cookie(head.kept, cookie.name)  # the edge's, not the geode's
        tenants = affinity.tenants
        if tenants is not None and tenants.source == "header" and not trusted:
            head.kept = without_header(head.kept, tenants.name)  # as X-Client-Region is
        proto = head.read.get(b"x-forwarded-proto") if trusted else None
        # Secure if any hop names https (a chain adds one value per hop): a cookie without
        # it would go out in clear text to a plain-HTTP listener of the same host.
        https = scheme == "https" or (
            proto is not None
            and any(v.strip().lower() == b"https" for line in proto for v in line.split(b","))
        )
        return Prelude(head, forwarded, via, resolution, own, home, https)

    def routed(
        self, rt: Runtime, prelude: Prelude, trace: Trace, path: str = "/"
    ) -> Route | web.Response:
        """The candidates for a prelude's region, or its home region, as health stands
        now, or a 503. ``path``: the request target (a tenant key may lead it)."""
        topology = rt.topology
        resolution = prelude.resolution
        trace.resolution = resolution
        fence = resolution.fence
        region = resolution.region
        own = resolution.own
        affinity = topology.config.home_affinity
        if affinity is not None:
            found = current(affinity, prelude.home, path, time.time())
            found = trace.home = fenced_in(found, fence)  # never out of its fence
            if found is not None and found.region is not None:
                region, own = found.region, AFFINITY
        board = rt.board
        load = rt.load
        cands, decision = self.routes.candidates(
            topology,
            region,
            board.healthy,
            board.version,
            topology.config.forwarding.max_attempts,
            fence=fence,
            own=own,
            full=load.full,
            full_version=load.version,
            cost=load.cost_of,
        )
        trace.decision = decision
        if not cands and decision == OVER_CAPACITY:
            return json_error(
                503,
                "over_capacity",
                f"every healthy geode that can serve region {region!r} is at capacity",
                headers={"Retry-After": "1"},
                region=region,
            )
        if not cands:
            retry_after = str(math.ceil(topology.config.health_check.interval))
            if decision == FENCED and (fence := resolution.fence) is not None:
                return json_error(
                    fence.status,
                    "fenced",
                    f"no healthy geode inside residency fence {fence.name!r} "
                    f"({', '.join(fence.regions)}) can serve this client, and it is never "
                    "sent outside the fence",
                    headers={"Retry-After": retry_after} if fence.status == 503 else None,
                    fence=fence.name,
                    region=resolution.region,
                )
            if decision == AFFINITY_REJECTED:
                return json_error(
                    503,
                    "home_unavailable",
                    f"no healthy geode in the home region {region!r} "
                    "(home_affinity.on_unavailable: reject)",
                    headers={"Retry-After": retry_after},
                    region=region,
                )
            return json_error(
                503,
                "no_healthy_geode",
                f"no healthy geode can serve region {region!r}",
                headers={"Retry-After": retry_after},
                region=region,
            )
        return Route(
            rt,
            trace,
            prelude.head,
            cands,
            prelude.forwarded,
            prelude.via,
            prelude.hsts,
            prelude.https,
        )


@functools.lru_cache(maxsize=16)
def hsts_line(hsts: Hsts) -> bytes:
    """The Strict-Transport-Security header line HTTPS answers carry (RFC 6797: never
    over plain HTTP, where an attacker could forge or strip it)."""
    return f"Strict-Transport-Security: {hsts.header()}\r\n".encode()


def _text_bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")  # what the parser decoded, as it came


_cached_bytes = functools.lru_cache(maxsize=256)(_text_bytes)  # this hop's name, schemes, hosts


@functools.lru_cache(maxsize=4096)
def _peer_text(remote: str) -> bytes:
    """The TCP peer as X-Forwarded-For names it (an IPv4-mapped address unmapped)."""
    peer = parse_ip(remote)
    return _text_bytes(str(peer) if peer is not None else remote)
