"""Differential test (issue 11): the same generated requests sent straight to a recording
geode and through geoproxy, on both request paths; what the geode received and what the
client got must be the same but for the differences geoproxy makes by design, all
listed in one place (``BY_DESIGN`` and the two ``*_view`` functions that apply it).

The requests come from a seeded RNG, by family (bodies, pipelines, HTTP/1.0, trailers,
h2c upgrades, bad requests mid-pipeline, ...): a few hundred in all, the same every run.
Each family is one test; it stops at the first case that differs and shows both sides.
Every family but plain, bodies and pipelines differed on the code before issue 11's
fixes (each carried an ``xfail(strict=True)`` naming its items until they landed).
"""

from __future__ import annotations

import random
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest

from conftest import ProxyFactory
from wire import (
    RawClient,
    Received,
    RecordingGeode,
    Response,
    chunked,
    fields,
    proxy_to,
    sha,
    values,
)

SEED = 20261205
WAIT = 3.0  # seconds for the answers to one case

BY_DESIGN = """What geoproxy changes on purpose (geoproxy/proxy/headers.py, README):
- hop-by-hop headers (Connection, Keep-Alive, Proxy-Connection, Proxy-Authenticate,
  Proxy-Authorization, TE, Trailer, Transfer-Encoding, Upgrade) and every header named
  in Connection are not passed on, either way; Expect is answered by geoproxy itself;
- requests gain X-Forwarded-For, X-Forwarded-Proto, X-Forwarded-Host and Via (this hop
  appended); answers gain Via and X-Geoproxy-Geode/-Region, and Date when they had none;
- Host goes first (the client's, with forwarding.preserve_host as by default); a request
  without one gets the geode's own authority;
- requests reach the geode as HTTP/1.1; answers go back in the client's version;
- framing is this hop's: chunk sizes and extensions may differ, a bodiless POST/PUT/PATCH
  gains Content-Length: 0, an answer read whole may gain a Content-Length; payloads
  and every other header line are the same, in order, byte for byte;
- a request's trailers may be dropped (never turned into header lines of anything); an
  answer's trailers are compared like the rest;
- a request geoproxy refuses (a 400) is answered by geoproxy, where the geode refuses it
  too: only the status is compared.
"""

HOP_BY_HOP = {
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"proxy-authenticate",
    b"proxy-authorization",
    b"te",
    b"trailer",
    b"transfer-encoding",
    b"upgrade",
}
SET_ON_REQUESTS = {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"via"}
SET_ON_ANSWERS = {b"via", b"x-geoproxy-geode", b"x-geoproxy-region"}
_BODY_METHODS = {b"POST", b"PUT", b"PATCH"}


def _named_in_connection(pairs: list[tuple[bytes, bytes]]) -> set[bytes]:
    return {
        t.strip().lower()
        for n, v in pairs
        if n.lower() == b"connection"
        for t in v.split(b",")
        if t.strip()
    }


def request_view(req: Received, direct: Received | None) -> tuple[object, ...]:
    """A request as the geode received it, less what geoproxy changes by design
    (``direct``: the same request as received straight, when this is the proxied one)."""
    pairs = fields(req.lines)
    drop = HOP_BY_HOP | _named_in_connection(pairs) | {b"expect", b"host"}
    if direct is not None:
        drop |= SET_ON_REQUESTS
        if not values(direct.lines, b"content-length"):
            drop.add(b"content-length")  # a length this hop framed the body with
    kept = tuple((n, v) for n, v in pairs if n.lower() not in drop)
    hosts = values(req.lines, b"host")
    host = hosts[0] if hosts else None
    if direct is not None:
        assert names_of(req)[0] == b"host", "Host comes first"
        if not values(direct.lines, b"host"):
            host = None  # the geode's own authority
    return (req.method, req.target, host, kept, len(req.payload), sha(req.payload))


def names_of(req: Received) -> list[bytes]:
    return [n.lower() for n, _ in fields(req.lines)]


def _head_view(head_lines: list[bytes], drop: set[bytes]) -> tuple[tuple[bytes, bytes], ...]:
    pairs = fields(head_lines)
    drop = drop | HOP_BY_HOP | _named_in_connection(pairs)
    return tuple((n, v) for n, v in pairs if n.lower() not in drop)


def response_view(resp: Response, direct: Response | None) -> tuple[object, ...]:
    """An answer as the client got it, less what geoproxy changes by design."""
    drop: set[bytes] = set()
    if direct is not None:
        drop |= SET_ON_ANSWERS
        if not direct.values(b"date"):
            drop.add(b"date")
        if not direct.values(b"content-length"):
            drop.add(b"content-length")
        if not resp.values(b"x-geoproxy-geode"):  # geoproxy's own answer
            return ("geoproxy's own", resp.status)
    interim = tuple(
        (h.split(b"\r\n", 1)[0][9:], _head_view(h.split(b"\r\n")[1:-2], drop)) for h in resp.interim
    )
    return (
        resp.status,
        resp.reason,
        _head_view(resp.lines, drop),
        interim,
        len(resp.payload),
        sha(resp.payload),
        tuple(resp.trailers),
    )


def own_view(resp: Response) -> tuple[object, ...]:
    """What a geode's refusal is compared with geoproxy's by."""
    return ("geoproxy's own", resp.status)


# -- the geode's answers --------------------------------------------------------------------


def _body(kind: bytes, n: int, size: int) -> bytes:
    unit = b"%s-%d|" % (kind, n)
    return (unit * (size // len(unit) + 1))[:size]


def answer(req: Received) -> bytes | None:
    """The geode's answer, decided by the target (``/d/KIND/N...``) alone, so that the
    same request gets the same answer straight and through the proxy."""
    parts = req.target.split(b"/")
    kind, n = (parts[2], int(parts[3].split(b"?")[0])) if len(parts) > 3 else (b"len", 0)
    head_only = req.method == b"HEAD"
    http10 = req.version == b"HTTP/1.0"
    status = b"200 OK"
    lines = [b"Content-Type: text/plain", b"X-Answer: %s-%d" % (kind, n)]
    cookies = [b"Set-Cookie: s%d=%d; Path=/" % (i, n) for i in range(n % 3)]
    lines += cookies
    if n % 2:
        lines += [b"X-Dup: 1", b"x-dup: 2"]
    interim = b""
    body = _body(kind, n, (n * 37) % 3000)
    framing = b"length"
    trailers = b""
    if kind == b"chunked":
        framing = b"chunked"
    elif kind == b"trailer":
        framing, trailers = b"chunked", b"X-Checksum: %d\r\n" % zlib.crc32(body)
    elif kind == b"big":
        body = _body(kind, n, 100 * 1024 + n)
    elif kind == b"empty":
        body = b""
    elif kind in (b"204", b"304", b"304-length"):
        status = b"204 No Content" if kind == b"204" else b"304 Not Modified"
        lines.append(b'ETag: "v%d"' % n)
        if kind == b"304-length":
            lines.append(b"Content-Length: %d" % len(body))
        body, framing = b"", b"none"
    elif kind == b"close":
        framing = b"close"
    elif kind == b"interim":
        interim = (b"HTTP/1.1 102 Processing\r\n\r\n" if n % 2 else b"") + (
            b"HTTP/1.1 103 Early Hints\r\nLink: </s%d.css>; rel=preload\r\n\r\n" % n
        )
    elif kind == b"latin1":
        status = b"200 Tr\xe8s bien"
        lines.append(b"X-Obs: caf\xe9 \xff%d" % n)
        framing = b"chunked" if n % 2 else b"length"
    if http10:
        interim = b""
        if framing == b"chunked":  # not for an HTTP/1.0 client: the end is the close
            framing, trailers = b"close", b""
    if framing == b"length":
        lines.append(b"Content-Length: %d" % len(body))
    elif framing == b"chunked":
        lines.append(b"Transfer-Encoding: chunked")
        body = chunked(body, size=700, trailers=trailers)
    elif framing == b"close":
        lines.append(b"Connection: close")
    head = b"HTTP/1.1 " + status + b"\r\n" + b"".join(line + b"\r\n" for line in lines)
    return interim + head + b"\r\n" + (b"" if head_only else body)


# -- the generated requests -----------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """Requests on one connection: sent one by one (each after the previous answer), or
    ``pipelined`` in one write."""

    family: str
    requests: tuple[bytes, ...]
    methods: tuple[bytes, ...]  # for reading the answers (a HEAD's has no body)
    pipelined: bool = False


HEADER_POOL = [
    b"Accept: */*",
    b"Accept-Language: fr-CH, fr;q=0.9, en;q=0.8",
    b"User-Agent: differential/1.0",
    b"Cache-Control: no-cache",
    b"Authorization: Bearer t0k3n",
    b"X-Request-Id: %d",
    b'If-None-Match: "v%d"',
    b"Cookie: a=%d",
    b"Cookie: b=2",
    b"X-Empty:",
    b"X-Tab: a\tb",
    b"x-lower: %d",
    b"X-UPPER: %d",
    b"Accept-Encoding: gzip, br",
]
KINDS = [b"len", b"len", b"chunked", b"big", b"empty", b"204", b"304", b"close"]
TARGET_TAILS = [b"", b"?q=1", b"?a=%2F&b=%20", b"/x;p=1", b"/~u/a.b", b"?" + b"z" * 40]


class Gen:
    """The generator of one family's cases (its own seeded RNG)."""

    def __init__(self, family: str) -> None:
        self.family = family
        self.rng = random.Random(f"{SEED}-{family}")
        self.n = 0

    def target(self, kind: bytes) -> bytes:
        self.n += 1
        return b"/d/%s/%d%s" % (kind, self.n, self.rng.choice(TARGET_TAILS))

    def headers(self, count: int | None = None) -> list[bytes]:
        picked = self.rng.sample(
            HEADER_POOL, count if count is not None else self.rng.randint(0, 6)
        )
        return [h % self.n if b"%d" in h else h for h in picked]

    def body(
        self, chunked_body: bool, ext: bytes = b"", trailers: bytes = b""
    ) -> tuple[list[bytes], bytes]:
        payload = self.rng.randbytes(self.rng.choice([0, 1, 86, 700, 5000, 70000]))
        if chunked_body:
            size = self.rng.choice([1, 100, 4096])
            return [b"Transfer-Encoding: chunked"], chunked(payload, size, ext, trailers)
        return [b"Content-Length: %d" % len(payload)], payload

    def request(
        self,
        method: bytes,
        target: bytes,
        lines: list[bytes],
        body: bytes = b"",
        version: bytes = b"HTTP/1.1",
        host: bool = True,
    ) -> bytes:
        host_line = [b"Host: shop.example:8080"] if host else []
        lines = host_line + lines
        if lines and self.rng.random() < 0.3:  # Host is not always first
            self.rng.shuffle(lines)
        head = b"%s %s %s\r\n" % (method, target, version)
        return head + b"".join(line + b"\r\n" for line in lines) + b"\r\n" + body

    def case(self, requests: list[bytes], methods: list[bytes], pipelined: bool = False) -> Case:
        return Case(self.family, tuple(requests), tuple(methods), pipelined)


def family_plain(g: Gen) -> list[Case]:
    """Bodiless requests of every method, one by one on a kept-alive connection."""
    out = []
    for _ in range(14):
        reqs, methods = [], []
        for _ in range(g.rng.randint(1, 4)):
            method = g.rng.choice([b"GET", b"GET", b"HEAD", b"DELETE", b"OPTIONS", b"POST"])
            kind = g.rng.choice([k for k in KINDS if k != b"close"])
            reqs.append(g.request(method, g.target(kind), g.headers()))
            methods.append(method)
        out.append(g.case(reqs, methods))
    return out


def family_bodies(g: Gen) -> list[Case]:
    """Bodies by Content-Length and chunked (chunk sizes of 1 to 4096 bytes)."""
    out = []
    for _ in range(20):
        method = g.rng.choice(sorted(_BODY_METHODS))
        framing, body = g.body(g.rng.random() < 0.5)
        kind = g.rng.choice([b"len", b"chunked", b"big", b"empty"])
        lines = g.headers() + framing + [b"Content-Type: application/octet-stream"]
        out.append(g.case([g.request(method, g.target(kind), lines, body)], [method]))
    return out


def _alone(g: Gen, i: int, lines: list[bytes], kind: bytes, method: bytes) -> Case:
    """One request with ``lines``: every other one a GET, the rest ``method`` with a
    body (by Content-Length, or chunked)."""
    if i % 2:
        framing, body = g.body(i % 4 == 1)
    else:
        framing, body, method = [], b"", b"GET"
    return g.case([g.request(method, g.target(kind), lines + framing, body)], [method])


def family_case_varied(g: Gen) -> list[Case]:
    """Repeated header names that differ only in case, with and without a body."""
    return [
        _alone(
            g,
            i,
            [b"Cookie: a=%d" % i, b"X-Dup: 1", b"cookie: b=2", b"X-DUP: 2", b"x-dup: 3"],
            b"len",
            b"POST",
        )
        for i in range(10)
    ]


def family_latin1(g: Gen) -> list[Case]:
    """Header values and reason phrases with bytes that are not UTF-8, both ways."""
    return [
        _alone(g, i, [b"X-Obs: caf\xe9", b"X-Name: J\xfcrgen \xff%d" % i], b"latin1", b"PUT")
        for i in range(8)
    ]


def family_chunk_extensions(g: Gen) -> list[Case]:
    """Chunk extensions, with and without blanks around ';' and '=' (RFC 9112 7.1.1)."""
    exts = [b";a=1", b";x", b';q="quoted; value"', b"; sp=1", b" ;a=b", b";a = b"]
    out = []
    for i in range(len(exts) * 2):
        _, body = g.body(True, ext=exts[i % len(exts)])
        lines = [b"Transfer-Encoding: chunked", *g.headers(2)]
        out.append(g.case([g.request(b"POST", g.target(b"len"), lines, body)], [b"POST"]))
    return out


def family_trailers(g: Gen) -> list[Case]:
    """Request trailers followed by a pipelined request; answers with trailers followed
    by other answers (on the pooled geode connection, to other clients)."""
    out = []
    for i in range(8):
        _, body = g.body(True, trailers=b"X-Last-Trailer: t%d\r\nX-Client-Region: us-east\r\n" % i)
        up = g.request(b"POST", g.target(b"len"), [b"Transfer-Encoding: chunked"], body)
        nxt = g.request(b"GET", g.target(b"len"), g.headers(1))
        out.append(g.case([up, nxt], [b"POST", b"GET"], pipelined=True))
        out.append(g.case([g.request(b"GET", g.target(b"trailer"), [b"TE: trailers"])], [b"GET"]))
        out.append(g.case([g.request(b"GET", g.target(b"len"), [])], [b"GET"]))
    return out


def family_pipelines(g: Gen) -> list[Case]:
    """Up to six requests in one write: bodies, HEAD, every kind of answer."""
    out = []
    for _ in range(10):
        reqs, methods = [], []
        for _ in range(g.rng.randint(2, 6)):
            method = g.rng.choice([b"GET", b"GET", b"HEAD", b"POST", b"PUT"])
            kind = g.rng.choice([k for k in KINDS if k != b"close"])
            framing, body = g.body(g.rng.random() < 0.5) if method in _BODY_METHODS else ([], b"")
            reqs.append(g.request(method, g.target(kind), g.headers() + framing, body))
            methods.append(method)
        out.append(g.case(reqs, methods, pipelined=True))
    return out


def family_http10(g: Gen) -> list[Case]:
    """HTTP/1.0 clients, with and without keep-alive and Host; answers of known and
    unknown length."""
    out = []
    for i in range(12):
        keep = i % 2 == 0
        kind = [b"len", b"chunked", b"close", b"big"][i % 4]
        lines = g.headers(2) + ([b"Connection: keep-alive"] if keep else [])
        req = g.request(b"GET", g.target(kind), lines, version=b"HTTP/1.0", host=i % 3 != 0)
        if keep:
            again = g.request(
                b"GET", g.target(b"len"), [b"Connection: keep-alive"], version=b"HTTP/1.0"
            )
            out.append(g.case([req, again], [b"GET", b"GET"]))
        else:
            out.append(g.case([req], [b"GET"]))
    return out


def family_h2c(g: Gen) -> list[Case]:
    """``Upgrade: h2c`` (refused: hop-by-hop) with requests pipelined after it."""
    out = []
    for _ in range(6):
        up = g.request(
            b"GET",
            g.target(b"len"),
            [
                b"Connection: Upgrade, HTTP2-Settings",
                b"Upgrade: h2c",
                b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA",
                *g.headers(2),
            ],
        )
        rest = [
            g.request(b"GET", g.target(b"len"), g.headers(1)) for _ in range(g.rng.randint(1, 3))
        ]
        out.append(g.case([up, *rest], [b"GET"] * (1 + len(rest)), pipelined=True))
    return out


def family_bad_mid_pipeline(g: Gen) -> list[Case]:
    """Valid requests, then one with a 9,000-byte header line (both sides refuse it)."""
    out = []
    for _ in range(6):
        valid = [
            g.request(b"GET", g.target(b"len"), g.headers(2)) for _ in range(g.rng.randint(1, 3))
        ]
        bad = g.request(b"GET", g.target(b"len"), [b"X-Big: " + b"a" * 9000])
        out.append(g.case([*valid, bad], [b"GET"] * (len(valid) + 1), pipelined=True))
    return out


def family_close_then_bytes(g: Gen) -> list[Case]:
    """A request asking to close, with bytes after it (another request, or junk)."""
    out = []
    for i in range(6):
        first = g.request(b"GET", g.target(b"len"), [b"Connection: close", *g.headers(1)])
        after = g.request(b"GET", g.target(b"len"), []) if i % 2 else b"\x00junk\r\n"
        out.append(g.case([first, after], [b"GET"], pipelined=True))
    return out


def family_interim(g: Gen) -> list[Case]:
    """Answers that 102 Processing and 103 Early Hints come before."""
    return [
        g.case([g.request(b"GET", g.target(b"interim"), g.headers(1))], [b"GET"]) for _ in range(6)
    ]


def family_bodiless_answers(g: Gen) -> list[Case]:
    """HEAD, 204 and 304 (with and without a Content-Length), then another request."""
    out = []
    for kind in [b"204", b"304", b"304-length", b"len", b"big", b"chunked"] * 2:
        method = b"GET" if kind.startswith((b"204", b"304")) else b"HEAD"
        first = g.request(method, g.target(kind), g.headers(1))
        out.append(g.case([first, g.request(b"GET", g.target(b"len"), [])], [method, b"GET"]))
    return out


def family_compressed(g: Gen) -> list[Case]:
    """Request bodies with a Content-Encoding: bytes on the wire, never inflated."""
    import gzip

    out = []
    for i in range(8):
        payload = g.rng.randbytes(200).hex().encode() * (1 + i * 40)
        coding, body = [
            (b"gzip", gzip.compress(payload, mtime=0)),
            (b"deflate", zlib.compress(payload)),
        ][i % 2]
        lines = [b"Content-Encoding: " + coding]
        if i % 4 < 2:
            lines.append(b"Content-Length: %d" % len(body))
        else:
            lines.append(b"Transfer-Encoding: chunked")
            body = chunked(body, 1000)
        out.append(g.case([g.request(b"POST", g.target(b"len"), lines, body)], [b"POST"]))
    return out


FAMILIES: dict[str, tuple[Callable[[Gen], list[Case]], list[pytest.MarkDecorator]]] = {
    "plain": (family_plain, []),
    "bodies": (family_bodies, []),
    "pipelines": (family_pipelines, []),
    "case-varied": (family_case_varied, []),
    "latin1": (family_latin1, []),
    "chunk-extensions": (family_chunk_extensions, []),
    "trailers": (family_trailers, []),
    "http10": (family_http10, []),
    "h2c": (family_h2c, []),
    "bad-mid-pipeline": (family_bad_mid_pipeline, []),
    "close-then-bytes": (family_close_then_bytes, []),
    "interim": (family_interim, []),
    "bodiless-answers": (family_bodiless_answers, []),
    "compressed": (family_compressed, []),
}


def generated() -> list[Case]:
    return [case for name, (make, _) in FAMILIES.items() for case in make(Gen(name))]


# -- running a case both ways ---------------------------------------------------------------


@dataclass
class Seen:
    received: list[Received]  # by the geode, in order
    responses: list[Response]  # by the client, in order


async def play(url: str, case: Case, geode: RecordingGeode) -> Seen:
    """Send a case's requests on one connection to ``url``; what each side saw."""
    before = len(geode.requests)
    client = await RawClient.open(url)
    responses: list[Response] = []
    try:
        if case.pipelined:
            client.send(b"".join(case.requests))
            responses = await client.responses(list(case.methods), WAIT)
        else:
            for request, method in zip(case.requests, case.methods, strict=True):
                client.send(request)
                got = await client.responses([method], WAIT)
                responses += got
                if not got:
                    break
    finally:
        await client.close()
    return Seen(geode.requests[before:], responses)


def _first_difference(what: str, case: Case, got: list[object], want: list[object]) -> str:
    """Where two lists of views part, both sides shown, with the case's requests."""
    sent = "\n".join(f"  {r[:240]!r}" for r in case.requests)
    at = next(
        (i for i, (g, w) in enumerate(zip(got, want, strict=False)) if g != w),
        min(len(got), len(want)),
    )
    mine = got[at] if at < len(got) else "(nothing)"
    theirs = want[at] if at < len(want) else "(nothing)"
    return (
        f"{what} differs at #{at} (family {case.family}; the differences by design, "
        f"which are left out, are BY_DESIGN in this file)\n"
        f"through geoproxy: {mine!r}\nstraight:         {theirs!r}\nrequests:\n{sent}"
    )


def compare(case: Case, direct: Seen, proxied: Seen) -> None:
    """What the geode received, then what the client got, through geoproxy and
    straight, as seen once the differences by design are left out."""
    want: list[object] = [request_view(r, None) for r in direct.received]
    got: list[object] = [
        request_view(p, d) for p, d in zip(proxied.received, direct.received, strict=False)
    ]
    got += ["(an extra request)"] * (len(proxied.received) - len(direct.received))
    assert got == want, _first_difference("what the geode received", case, got, want)
    want, got = [], []
    for p, d in zip(proxied.responses, direct.responses, strict=False):
        view = response_view(p, d)
        got.append(view)
        want.append(own_view(d) if view[0] == "geoproxy's own" else response_view(d, None))
    want += [response_view(d, None) for d in direct.responses[len(got) :]]
    got += ["(an extra answer)"] * (len(proxied.responses) - len(direct.responses))
    assert got == want, _first_difference("what the client got", case, got, want)


@pytest.fixture(params=["fast", "coroutine"])
def lane(request: pytest.FixtureRequest) -> str:
    """Every test here runs on both request paths (conftest.py's ``lane``)."""
    return str(request.param)


@pytest.fixture
async def recording_geode() -> AsyncIterator[RecordingGeode]:
    geode = RecordingGeode(answer)
    await geode.start()
    yield geode
    await geode.close()


@pytest.mark.parametrize(
    "family", [pytest.param(name, marks=marks) for name, (_, marks) in FAMILIES.items()]
)
async def test_the_geode_and_the_client_see_what_they_would_see_without_geoproxy(
    proxy_factory: ProxyFactory, recording_geode: RecordingGeode, family: str, lane: str
) -> None:
    proxy = await proxy_to(proxy_factory, recording_geode.url)
    make = FAMILIES[family][0]
    for case in make(Gen(family)):
        direct = await play(recording_geode.url, case, recording_geode)
        proxied = await play(proxy.url, case, recording_geode)
        compare(case, direct, proxied)
    if lane == "fast" and family == "plain":  # the fast lane did serve (plain GETs)
        assert proxy.sample("geoproxy_fast_lane_requests_total", outcome="answered") > 0


def test_the_generated_requests_are_the_same_every_run_and_bounded() -> None:
    first, again = generated(), generated()
    assert first == again
    assert 200 <= sum(len(c.requests) for c in first) <= 400
