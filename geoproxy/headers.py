"""Header rules for forwarding: hop-by-hop removal, X-Forwarded-*, Via, and what an
untrusted client may not claim. Pure functions over header maps."""

from __future__ import annotations

import secrets

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy, istr

from geoproxy.clientip import IPAddress
from geoproxy.config import Geode
from geoproxy.resolver import CF_IPCOUNTRY, X_CLIENT_REGION

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
GEODE_HEADER = "X-Geoproxy-Geode"
REGION_HEADER = "X-Geoproxy-Region"
_INTERNAL_PREFIX = "x-geoproxy-"


def _connection_tokens(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> set[str]:
    """Header names listed in Connection: they are hop-by-hop too."""
    tokens: set[str] = set()
    for value in headers.getall("Connection", ()):
        tokens.update(t.strip().lower() for t in value.split(",") if t.strip())
    return tokens


def _joined(headers: CIMultiDictProxy[str], name: str) -> str:
    """Every value of a list-valued header, as one comma-separated value."""
    return ", ".join(headers.getall(name, ()))


def via_name() -> str:
    """This proxy instance's name in ``Via`` (``1.1 geoproxy-5f3a9c1e``): unique, so a
    request that comes back through the same proxy (a loop) can be recognised."""
    return f"geoproxy-{secrets.token_hex(4)}"


def has_looped(headers: CIMultiDictProxy[str], name: str) -> bool:
    """True when this instance already forwarded the request (its name is in ``Via``)."""
    return any(
        hop.split()[-1] == name
        for value in headers.getall("Via", ())
        for hop in value.split(",")
        if hop.strip()
    )


def upstream_headers(
    request: web.Request, trusted: bool, peer: IPAddress | None, via: str
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
    prior_via = _joined(incoming, "Via")
    out["Via"] = f"{prior_via}, 1.1 {via}" if prior_via else f"1.1 {via}"
    return out


def downstream_headers(
    headers: CIMultiDictProxy[str], geode: Geode, via: str
) -> CIMultiDict[str]:
    named = _connection_tokens(headers)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name in HOP_BY_HOP or name.lower() in named:
            continue
        out.add(name, value)
    prior_via = ", ".join(headers.getall("Via", ()))
    out["Via"] = f"{prior_via}, 1.1 {via}" if prior_via else f"1.1 {via}"
    out[GEODE_HEADER] = geode.name
    out[REGION_HEADER] = geode.region
    return out
