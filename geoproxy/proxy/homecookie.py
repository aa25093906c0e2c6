"""The edge's side of home-stamp affinity on the wire: the home cookie taken out of the
head a geode gets (unless ``home_affinity.cookie.forward``), a tenant header from an
untrusted peer taken out of it too (it was not believed here, so a geode must not believe
it either), and the ``Set-Cookie`` line
for a stamp's ``Geoproxy-Home`` answer header (which never reaches the client: see
``headers.ResponseHead``). Both request paths ask here (``policy.answer_lines``).
"""

from __future__ import annotations

import time

from geoproxy.config.model import Topology
from geoproxy.config.values import HomeCookie
from geoproxy.proxy.trace import Trace
from geoproxy.routing.affinity import make_cookie

# What became of a stamp's Geoproxy-Home (the `result` label of geoproxy_home_stamps_total).
SET, CLEARED, UNKNOWN_REGION, IGNORED = "set", "cleared", "unknown_region", "ignored"
#: The value a stamp sends to forget the user's home (a logout): the cookie is removed.
CLEAR = "none"


def without_cookie(kept: bytes, name: str) -> bytes:
    """Header lines ("Name: value\\r\\n" each) with cookie ``name`` taken out of every
    Cookie line; a line left empty goes. Only the lines that name it are rewritten."""
    wanted = name.encode("ascii")
    at = kept.find(wanted)
    while at >= 0:
        begin = kept.rfind(b"\r\n", 0, at) + 2 if at else 0
        begin = 0 if begin == 1 else begin  # no CRLF before it: the first line
        end = kept.find(b"\r\n", at)
        line = kept[begin:end]
        field, colon, value = line.partition(b":")
        if colon and field.strip().lower() == b"cookie":
            pairs = (p.strip() for p in value.split(b";"))
            rest = [p for p in pairs if p and p.partition(b"=")[0].strip() != wanted]
            if len(rest) != value.count(b";") + 1 or not rest:  # it was there: rewrite
                new = field + b": " + b"; ".join(rest) + b"\r\n" if rest else b""
                kept = kept[:begin] + new + kept[end + 2 :]
                end = begin + len(new) - 2
        at = kept.find(wanted, max(end, begin) + 2)
    return kept


def without_header(kept: bytes, name: str) -> bytes:
    """Header lines ("Name: value\\r\\n" each) without those of header ``name``."""
    wanted = name.lower().encode("ascii")
    if wanted not in kept.lower():
        return kept
    return b"".join(
        line + b"\r\n"
        for line in kept.split(b"\r\n")[:-1]
        if line.partition(b":")[0].strip().lower() != wanted
    )


def set_cookie_line(cookie: HomeCookie, value: str, max_age: int, https: bool) -> bytes:
    """A ``Set-Cookie`` header line for the home cookie: HttpOnly, SameSite=Lax, Secure
    as ``cookie.secure`` says for this client's scheme."""
    attrs = [f"Set-Cookie: {cookie.name}={value}", f"Max-Age={max_age}", "Path=/"]
    if cookie.domain:
        attrs.append(f"Domain={cookie.domain}")
    if cookie.secure == "always" or (cookie.secure == "auto" and https):
        attrs.append("Secure")
    attrs += ("HttpOnly", "SameSite=Lax")
    return ("; ".join(attrs) + "\r\n").encode("ascii")


def stamped(topology: Topology, trace: Trace, https: bool, said: bytes) -> bytes:
    """The line that answers a stamp's ``Geoproxy-Home: said`` (a region, or ``none``),
    noted in the trace: a signed cookie naming the region, one that removes it, or
    nothing (no cookie configured, an unknown region). ``https``: the client's scheme."""
    affinity = topology.config.home_affinity
    cookie = affinity.cookie if affinity is not None else None
    if cookie is None:
        trace.stamp = IGNORED
        return b""
    region = said.decode("latin-1").strip().lower()
    if region == CLEAR:
        trace.stamp = CLEARED
        return set_cookie_line(cookie, "", 0, https)
    if region not in topology.region_names:
        trace.stamp = UNKNOWN_REGION
        return b""
    trace.stamp = SET
    value = make_cookie(cookie, region, time.time())
    return set_cookie_line(cookie, value, int(cookie.max_age), https)
