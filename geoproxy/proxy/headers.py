"""Header rules for forwarding: hop-by-hop removal, X-Forwarded-*, Via, and what an
untrusted client may not claim. Pure functions over the raw header lines.

Both directions work on the parsed header lines as they arrived (aiohttp's
``raw_headers``: bytes, in order, duplicates kept) and produce the head that goes on as
bytes; a header map is made from the same result only for aiohttp's client (request
bodies, TLS geodes, WebSockets) and for streamed responses. One pass per message, one
set of rules for every path.
"""

from __future__ import annotations

import functools
import re
import secrets
from collections.abc import Callable, Iterable, Sequence
from operator import itemgetter

from multidict import CIMultiDict

from geoproxy.health.load import LOAD_HEADER
from geoproxy.proxy.responses import lines_to_map
from geoproxy.routing.resolver import CF_IPCOUNTRY, X_CLIENT_REGION

RawHeaders = Sequence[tuple[bytes, bytes]]


def _low(names: Iterable[str]) -> frozenset[bytes]:
    return frozenset(n.lower().encode("ascii") for n in names)


#: RFC 9110 7.6.1 hop-by-hop headers, plus the legacy Proxy-Connection.
HOP_BY_HOP = _low(
    (
        "Connection",
        "Keep-Alive",
        "Proxy-Connection",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
    )
)
# Request headers never passed on as they came: hop-by-hop ones, Expect (the forwarder
# answers 100 Continue itself) and the ones this hop rewrites.
_DROP_ALWAYS = HOP_BY_HOP | _low(
    ("Expect", "X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host", "Via")
)
# From an untrusted peer, also every header that claims a client identity or region: a
# geode that believes one of them could be spoofed.
_DROP_UNTRUSTED = _DROP_ALWAYS | _low(
    (
        X_CLIENT_REGION,
        CF_IPCOUNTRY,
        "Forwarded",
        "X-Real-IP",
        "True-Client-IP",
        "CF-Connecting-IP",
        "X-Client-IP",
        "X-Cluster-Client-IP",
        "Fastly-Client-IP",
        "X-Forwarded-Port",
        "X-Forwarded-Prefix",
        "X-Forwarded-Server",
    )
)
GEODE_HEADER = "X-Geoproxy-Geode"
REGION_HEADER = "X-Geoproxy-Region"
_LOAD = LOAD_HEADER.lower().encode("ascii")
#: A stamp names its user's home region with this answer header; the edge keeps it.
HOME_HEADER = "Geoproxy-Home"
_HOME = HOME_HEADER.lower().encode("ascii")
_INTERNAL_PREFIX = b"x-geoproxy-"
_HOST, _VIA, _XFF, _XFP, _XFH, _CONNECTION, _CONTENT_LENGTH, _DATE = (
    b"host",
    b"via",
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"connection",
    b"content-length",
    b"date",
)
_TRANSFER_ENCODING = b"transfer-encoding"
_STS = b"strict-transport-security"
# Request headers whose values this hop reads (all but Content-Length are then dropped
# or set anew).
_READ_REQUEST = frozenset({_HOST, _VIA, _XFF, _XFP, _XFH, _CONNECTION, _CONTENT_LENGTH})
# Request headers whose values decide anything but the lines passed on: those read here
# (X-Forwarded-For among them: the client's address) and the region headers region
# resolution reads. Two requests from one peer with the same names whose values differ
# only outside these have the same prelude but for the lines passed on
# (``prelude.Routing``, ``RequestHead.renewed``).
_DECIDING = _READ_REQUEST | _low((X_CLIENT_REGION, CF_IPCOUNTRY))
# Response headers this hop sets itself or drops from the geode's answer.
_NOTED_DOWNSTREAM = _low((GEODE_HEADER, REGION_HEADER)) | {
    _VIA,
    _CONTENT_LENGTH,
    _DATE,
    _STS,
    _LOAD,
    _HOME,
}
#: A control character other than HTAB (RFC 9110 5.5). aiohttp's request parser rejects
#: them; its response parser is lenient and lets some through in values and the reason.
CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]").search
_NONE: frozenset[bytes] = frozenset()
_CONTROLS_BUT_CRLF = bytes([*range(0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F])


@functools.lru_cache(maxsize=1024)
def _named(values: tuple[bytes, ...], known: frozenset[bytes]) -> frozenset[bytes]:
    """The lower-cased names listed in Connection values (they are hop-by-hop too) that
    are not in ``known`` already."""
    tokens = (t.strip().lower() for v in values for t in v.split(b","))
    return frozenset(t for t in tokens if t and t not in known)


@functools.lru_cache(maxsize=256)
def clean_reason(reason: str | None) -> bool:
    """False when a reason phrase holds a control character (never passed on)."""
    return not (reason and CONTROL(reason.encode("utf-8", "surrogateescape")))


def _scan_request(
    raw: RawHeaders, drop: frozenset[bytes], named: frozenset[bytes]
) -> tuple[bytes, dict[bytes, list[bytes]], int]:
    """The lines passed on as they came, the values of the headers this hop reads, and
    the size of the header block as sent."""
    kept: list[bytes] = []
    read: dict[bytes, list[bytes]] = {}
    size = 0
    for name, value in raw:
        size += len(name) + len(value) + 4  # name, ": ", value, CRLF
        low = name.lower()
        if low in _READ_REQUEST:
            got = read.get(low)
            if got is None:
                read[low] = [value]
            else:
                got.append(value)
            if low != _CONTENT_LENGTH or low in named:
                continue
        elif low in drop or low in named or low.startswith(_INTERNAL_PREFIX):
            continue
        kept += (name, b": ", value, b"\r\n")
    return b"".join(kept), read, size


class _Plan:
    """What ``_scan_request`` does to a request whose header names are ``names``, worked
    out once for those names: which lines are passed on, which values are read. A
    browser sends the same names in the same order on every request while the values
    (cookies, request ids) change; the lines passed on are then picked and written by C
    code (``itemgetter``, ``bytes.join``) instead of a Python loop per line."""

    __slots__ = ("decide", "names", "pick", "reads", "rest")

    def __init__(self, names: tuple[bytes, ...], drop: frozenset[bytes]) -> None:
        keep: list[int] = []
        reads: list[tuple[bytes, int]] = []
        rest: list[int] = []  # the lines not passed on as they came
        self.names = names
        # The lines whose values decide more than what is passed on (_DECIDING).
        self.decide = _picker([i for i, n in enumerate(names) if n.lower() in _DECIDING])
        for index, name in enumerate(names):
            low = name.lower()
            if low in _READ_REQUEST:
                reads.append((low, index))
                if low != _CONTENT_LENGTH:
                    rest.append(index)
                    continue
            elif low in drop or low.startswith(_INTERNAL_PREFIX):
                rest.append(index)
                continue
            keep.append(index)
        self.reads, self.rest = tuple(reads), tuple(rest)
        self.pick = _picker(keep) if keep else None

    def lines(self, raw: RawHeaders) -> tuple[bytes, int]:
        """The lines passed on ("Name: value\r\n" each) and the size of the header
        block as sent, for a request with this plan's names."""
        pick = self.pick
        kept = _CRLF.join(map(_COLON_SP.join, pick(raw))) + _CRLF if pick is not None else b""
        size = len(kept)  # the lines passed on, as sent; then the others
        for index in self.rest:
            name, value = raw[index]
            size += len(name) + len(value) + 4
        return kept, size

    def apply(self, raw: RawHeaders) -> tuple[bytes, dict[bytes, list[bytes]], int]:
        """``_scan_request(raw, drop, _NONE)`` for a request with this plan's names."""
        kept, size = self.lines(raw)
        read: dict[bytes, list[bytes]] = {}
        for low, index in self.reads:
            value = raw[index][1]
            got = read.get(low)
            if got is None:
                read[low] = [value]
            else:
                got.append(value)
        return kept, read, size


def _picker(indices: list[int]) -> Callable[[RawHeaders], tuple[tuple[bytes, bytes], ...]]:
    """The lines at ``indices``, as a tuple (``itemgetter`` of one index hands back the
    item, not a 1-tuple)."""
    if not indices:
        return lambda raw: ()
    if len(indices) == 1:
        only = indices[0]
        return lambda raw: (raw[only],)
    return itemgetter(*indices)


_CRLF, _COLON_SP = b"\r\n", b": "
_PLANS: dict[tuple[tuple[bytes, ...], bool], _Plan] = {}
_NAME = itemgetter(0)


def plan_for(raw: RawHeaders, trusted: bool) -> _Plan | None:
    """The plan for the request's header names from a peer trusted or not: one object
    for the same names (while kept), so a plan also stands for its names."""
    return _plan(raw, trusted, _DROP_ALWAYS if trusted else _DROP_UNTRUSTED)


def _plan(raw: RawHeaders, trusted: bool, drop: frozenset[bytes]) -> _Plan | None:
    """The plan for the request's header names (bounded: a client whose names differ
    every time only rebuilds plans); None for lines a plan cannot key on."""
    if type(raw) is not tuple:
        return None
    key = (tuple(map(_NAME, raw)), trusted)
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= 256:
            _PLANS.clear()
        plan = _PLANS[key] = _Plan(key[0], drop)
    return plan


def _joined(values: list[bytes] | None) -> bytes:
    """Every value of a list-valued header, as one comma-separated value."""
    return b", ".join(values) if values else b""


def via_name() -> str:
    """This proxy instance's name in ``Via`` (``1.1 geoproxy-5f3a9c1e``): unique, so a
    request that comes back through the same proxy (a loop) can be recognised."""
    return f"geoproxy-{secrets.token_hex(4)}"


class RequestHead:
    """A client's request headers as this hop passes them on, from one pass over the
    raw lines: hop-by-hop ones (and those named in Connection) dropped, X-Forwarded-* and
    Via set, and from an untrusted peer every header claiming a client identity or region
    dropped. ``Host`` is kept apart: each geode may get its own."""

    __slots__ = ("has_length", "host", "kept", "plan", "read", "size", "trusted")

    def __init__(self, raw: RawHeaders, trusted: bool, plan: _Plan | None = None) -> None:
        """``plan``: ``plan_for(raw, trusted)`` when the caller has it already."""
        drop = _DROP_ALWAYS if trusted else _DROP_UNTRUSTED
        if plan is None:
            plan = _plan(raw, trusted, drop)
        kept, read, size = _scan_request(raw, drop, _NONE) if plan is None else plan.apply(raw)
        named = _named(tuple(read[_CONNECTION]), drop) if _CONNECTION in read else None
        if named:  # headers the client named hop-by-hop: one more pass without them
            kept, read, size = _scan_request(raw, drop, named)
            plan = None
        self.plan = plan  # None: the head cannot be renewed (``renewed``)
        hosts = read.get(_HOST)  # (the parser rejects a second Host)
        self.host = hosts[0] if hosts and not (named and _HOST in named) else None
        # Content-Length passed on (the parser rejects two that differ).
        self.has_length = _CONTENT_LENGTH in read and not (named and _CONTENT_LENGTH in named)
        self.kept = kept
        self.read = read
        self.size = size  # the header bytes as the client sent them
        self.trusted = trusted

    def renewed(self, raw: RawHeaders) -> RequestHead:
        """This head for ``raw``: another request from the same peer whose lines have
        this head's plan (the same names in the same order) and the same values of
        every deciding line (``_Plan.decide``), so the same reads, Host and
        X-Forwarded-*. Only ``kept`` and ``size`` are worked out, from ``raw``. The
        caller made sure of all that (``prelude.Routing`` keys on the plan and the
        deciding lines)."""
        plan = self.plan
        assert plan is not None  # only a head built through a plan is renewed
        head = RequestHead.__new__(RequestHead)
        head.kept, head.size = plan.lines(raw)
        head.plan, head.read, head.host = plan, self.read, self.host
        head.has_length, head.trusted = self.has_length, self.trusted
        return head

    def looped(self, via: bytes) -> bool:
        """True when this instance already forwarded the request (its name is in Via)."""
        vias = self.read.get(_VIA)
        return vias is not None and any(
            hop.split()[-1] == via for value in vias for hop in value.split(b",") if hop.strip()
        )

    def forwarded(self, peer: bytes, scheme: bytes, via: bytes) -> bytes:
        """The header lines after the kept ones: X-Forwarded-For (the trusted peer's
        list with ``peer`` appended, else ``peer`` alone), -Proto, -Host (as the client
        sent Host), and Via with this hop appended."""
        read, trusted = self.read, self.trusted
        prior = _joined(read.get(_XFF)) if trusted else b""
        out = b"X-Forwarded-For: " + (prior + b", " + peer if prior else peer) + b"\r\n"
        proto = _joined(read.get(_XFP)) if trusted else b""
        out += b"X-Forwarded-Proto: " + (proto or scheme) + b"\r\n"
        host = (_joined(read.get(_XFH)) if trusted else b"") or read.get(_HOST, (b"",))[0]
        if host:
            out += b"X-Forwarded-Host: " + host + b"\r\n"
        prior_via = _joined(read.get(_VIA))
        hop = b"1.1 " + via
        return out + b"Via: " + (prior_via + b", " + hop if prior_via else hop) + b"\r\n"

    def as_map(self, forwarded: bytes, host: bytes | None) -> CIMultiDict[str]:
        """The same headers as a map, for aiohttp's client."""
        out: CIMultiDict[str] = CIMultiDict()
        if host is not None:
            out["Host"] = host.decode("utf-8", "surrogateescape")
        return lines_to_map(forwarded, lines_to_map(self.kept, out))


class ResponseHead:
    """A geode's response headers as this hop passes them on, from one pass over the
    raw lines: hop-by-hop ones (and those named in Connection) dropped; Via, Date,
    Content-Length and the X-Geoproxy-* pair kept apart, to be set by ``tail``; the
    geode's ``Geoproxy-Load`` report read and dropped; ``Geoproxy-Home`` kept apart for
    the edge (``homecookie.stamped``). ``ok`` is False when a value or the reason phrase
    holds a control character (never passed on)."""

    __slots__ = (
        "date",
        "framed",
        "home",
        "kept",
        "length",
        "lengths",
        "load",
        "ok",
        "sts",
        "vias",
    )
    date: bool  # the geode sent a Date
    framed: bool  # no Transfer-Encoding, or only chunked
    home: bytes | None  # the first Geoproxy-Home value: the user's home region
    kept: bytes  # the lines passed on as they came ("Name: value\r\n" each)
    length: int | None  # the Content-Length
    load: bytes | None  # the last Geoproxy-Load value (health/load.py), if any
    lengths: list[bytes]  # Content-Length values
    ok: bool
    sts: bytes  # the geode's Strict-Transport-Security lines: kept unless this hop sets one
    vias: list[bytes]

    def __init__(self, raw: RawHeaders, reason: str | None) -> None:
        named = self._scan(raw, _NONE)
        if named:  # headers the geode named hop-by-hop: one more pass without them
            self._scan(raw, named)
        self.ok = self.ok and clean_reason(reason)

    def _scan(self, raw: RawHeaders, named: frozenset[bytes]) -> frozenset[bytes]:
        """One pass; returns the names listed in Connection that are not hop-by-hop
        already (for a second pass)."""
        kept: list[bytes] = []
        connection: list[bytes] = []
        vias: list[bytes] = []
        lengths: list[bytes] = []
        codings: list[bytes] = []
        sts: list[bytes] = []
        self.date = False
        self.load = None
        self.home = None
        for name, value in raw:
            low = name.lower()
            if low in HOP_BY_HOP:
                if low == _CONNECTION:
                    connection.append(value)
                elif low == _TRANSFER_ENCODING:
                    codings += (c.strip().lower() for c in value.split(b","))
            elif low in named:
                pass
            elif low in _NOTED_DOWNSTREAM:
                if low == _VIA:
                    vias.append(value)
                elif low == _CONTENT_LENGTH:
                    lengths.append(value)
                elif low == _DATE:
                    kept += (name, b": ", value, b"\r\n")
                    self.date = True
                elif low == _STS:
                    sts += (name, b": ", value, b"\r\n")
                elif low == _LOAD:
                    self.load = value
                elif low == _HOME and self.home is None:
                    self.home = value
            else:
                kept += (name, b": ", value, b"\r\n")
        self.kept = b"".join(kept)
        self.vias, self.lengths = vias, lengths
        self.sts = b"".join(sts)
        # Only chunked can be relayed: any other coding (gzip, chunked) would reach the
        # client as undeclared encoded bytes once the hop-by-hop header is gone.
        self.framed = not codings or codings == [b"chunked"]
        self.length = int(lengths[0]) if len(lengths) == 1 and lengths[0].isdigit() else None
        # The parser ends a line at any CR or LF, so one search over the block finds a
        # control character in any value passed on.
        block = self.kept + self.sts
        self.ok = len(block.translate(None, _CONTROLS_BUT_CRLF)) == len(block) and not (
            vias and CONTROL(b"".join(vias))
        )
        if not connection:
            return _NONE
        return _named(tuple(connection), HOP_BY_HOP | named if named else HOP_BY_HOP)

    def tail(self, via: bytes, geode_lines: bytes, hsts: bytes = b"") -> bytes:
        """Via with this hop appended, the X-Geoproxy-* lines of the geode, then
        ``hsts`` (this hop's Strict-Transport-Security line), which replaces the geode's:
        browsers heed only the first of two."""
        hop = b"1.1 " + via
        prior = _joined(self.vias)
        via_line = b"Via: " + (prior + b", " + hop if prior else hop) + b"\r\n"
        return via_line + geode_lines + (hsts or self.sts)


_RESPONSE_HEADS: dict[tuple[RawHeaders, str | None], ResponseHead] = {}


def response_head(raw: RawHeaders, reason: str | None) -> ResponseHead:
    """``ResponseHead(raw, reason)``, one for every answer with the same header lines
    and reason: a geode sends the same lines answer after answer (its Date moves once a
    second), and a ResponseHead is never changed once built. Bounded: a geode whose
    lines differ every time (a request id echoed back) builds one per answer."""
    if type(raw) is not tuple:  # a parser that hands back a list: nothing to key on
        return ResponseHead(raw, reason)
    key = (raw, reason)
    head = _RESPONSE_HEADS.get(key)
    if head is None:
        head = ResponseHead(raw, reason)
        if len(_RESPONSE_HEADS) >= 256:
            _RESPONSE_HEADS.clear()
        _RESPONSE_HEADS[key] = head
    return head


@functools.lru_cache(maxsize=256)
def geode_lines(name: str, region: str) -> bytes:
    """The response header lines naming the geode that answered."""
    return f"{GEODE_HEADER}: {name}\r\n{REGION_HEADER}: {region}\r\n".encode()


#: Fields a trailer section must not carry on (RFC 9110 6.5.1: framing and routing),
#: besides the hop-by-hop ones and those this hop sets or keeps from the client in a head
#: (Geoproxy-Home, Geoproxy-Load, the X-Geoproxy-* pair: see ``trailer_lines``).
_NOT_TRAILERS = (
    HOP_BY_HOP
    | _NOTED_DOWNSTREAM
    | _low(("Content-Length", "Host", "Content-Encoding", "Content-Type", "Content-Range"))
)


def trailer_lines(block: bytes) -> bytes:
    """A geode's trailer lines ("Name: value\r\n" each) as this hop passes them on:
    as they came, less framing and hop-by-hop fields, the ones this hop keeps from the
    client (``_NOT_TRAILERS``, ``X-Geoproxy-*``) and any line with a control character or
    no name."""
    kept = []
    for line in block.split(b"\r\n")[:-1]:
        name, colon, _ = line.partition(b":")
        if (
            colon
            and name
            and name == name.strip()
            and name.lower() not in _NOT_TRAILERS
            and not name.lower().startswith(_INTERNAL_PREFIX)
            and len(line.translate(None, _CONTROLS_BUT_CRLF)) == len(line)
        ):
            kept.append(line + b"\r\n")
    return b"".join(kept)
