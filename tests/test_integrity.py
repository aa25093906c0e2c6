"""Edge integrity (issue 11): every byte passes unaltered, on both request paths.

Byte for byte through a real proxy to a recording raw-socket geode (tests/wire.py), with a
raw-socket client: SHA-256 of what the client sent against what the geode received, and
of what the geode sent against what the client got. Request bodies of every
Content-Encoding (the edge never inflates), framed by Content-Length or chunked; repeated
headers in order; header bytes that are not UTF-8; trailers; HEAD, 204, 304; 1xx interim
answers; WebSocket handshakes and close codes. Then one regression test per difference
the issue's differential test found (its section 2, items 1-10).
Every test here failed on the code before issue 11's fixes (each carried an
``xfail(strict=True)`` naming its item until its fix landed), but for the ones that pin
behaviour that was already right.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import gzip
import hashlib
import importlib.util
import random
import zlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from geoproxy.proxy.chunks import ChunkedBody

from conftest import FakeGeode, GeodeFactory, Proxy, ProxyFactory, base_config
from wire import (
    WAIT,
    RawClient,
    Received,
    RecordingGeode,
    Reply,
    Response,
    chunked,
    exchange,
    exchange_to_the_end,
    names,
    ok,
    proxy_to,
    sha,
    values,
)


@pytest.fixture(params=["fast", "coroutine"])
def lane(request: pytest.FixtureRequest) -> str:
    """Every test here runs on both request paths (conftest.py's ``lane``)."""
    return str(request.param)


class Through:
    """Makes a recording geode answering with a ``reply`` function, and a proxy whose
    only geode it is; closes the geodes at the end."""

    def __init__(self, proxy_factory: ProxyFactory) -> None:
        self.proxy_factory = proxy_factory
        self.geodes: list[RecordingGeode] = []

    async def __call__(self, reply: Reply, **overrides: Any) -> tuple[Proxy, RecordingGeode]:
        geode = RecordingGeode(reply)
        self.geodes.append(geode)
        url = await geode.start()
        return await proxy_to(self.proxy_factory, url, **overrides), geode


@pytest.fixture
async def through(proxy_factory: ProxyFactory) -> AsyncIterator[Through]:
    made = Through(proxy_factory)
    yield made
    for geode in made.geodes:
        await geode.close()


# -- request bodies of every Content-Encoding, both ways ------------------------------------

KiB, MiB = 1024, 1024 * 1024
SIZES = {"0B": 0, "86B": 86, "64KiB": 64 * KiB, "5MiB": 5 * MiB}


def _brotli(data: bytes) -> bytes:
    import brotli  # type: ignore[import-not-found]  # optional: the case skips without it

    return bytes(brotli.compress(data))


def _zstd(data: bytes) -> bytes:
    import zstandard  # type: ignore[import-not-found]  # optional: the case skips without it

    return bytes(zstandard.ZstdCompressor().compress(data))


CODINGS = {
    "plain": (None, lambda data: data),
    "gzip": (b"gzip", lambda data: gzip.compress(data, mtime=0)),
    "deflate": (b"deflate", zlib.compress),  # RFC 9110 8.4.1.2: the zlib format
    "br": (b"br", _brotli),
    "zstd": (b"zstd", _zstd),
    # Not a coding anybody knows: the bytes pass as opaque, like any other.
    "unknown": (b"x-geoproxy-test", lambda data: b"\x93OPAQUE\x00" + data[::-1]),
}
_NEEDS = {"br": ("brotli", "Brotli"), "zstd": ("zstandard", "zstandard")}


@functools.lru_cache(maxsize=1)
def _hex() -> bytes:
    return random.Random(11).randbytes(5 * MiB).hex().encode()


def text(size: int) -> bytes:
    """``size`` bytes (at most 10 MiB) that compress about 7:4 (hex of seeded random
    bytes), the same on every run."""
    return _hex()[:size]


@functools.lru_cache(maxsize=64)
def wire_body(coding: str, size: int) -> bytes:
    """A body as it goes on the wire: ``size`` bytes of it. A compressed body of 0 B is
    an empty body that still says its coding; small compressed ones are made exactly
    ``size`` bytes long (the 86 B gzip upload of the issue), large ones about that."""
    encode = CODINGS[coding][1]
    if size == 0:
        return b""
    if coding == "plain":
        return text(size)
    if coding == "unknown":
        return encode(text(size - 8))
    for n in range(1, size * 2) if size <= 4096 else ():
        body = encode(text(n))
        if len(body) == size:
            return body
    return encode(text(size * 7 // 4))


def need_coding(coding: str) -> None:
    if coding in _NEEDS:
        module, package = _NEEDS[coding]
        if importlib.util.find_spec(module) is None:
            pytest.skip(
                f"{coding}: the {package} package is not installed (nothing to "
                f"make a real {coding} body with)"
            )


def body_cases() -> list[object]:
    cases: list[object] = []
    for coding in CODINGS:
        for size_id, size in SIZES.items():
            for framing in ("length", "chunked"):
                cases.append(
                    pytest.param(coding, size, framing, id=f"{coding}-{size_id}-{framing}")
                )
    return cases


def frame(body: bytes, framing: str) -> bytes:
    """Framing header line(s), the blank line, and the body so framed."""
    if framing == "length":
        return b"Content-Length: %d\r\n\r\n" % len(body) + body
    return b"Transfer-Encoding: chunked\r\n\r\n" + chunked(body, size=16 * KiB)


def echo_same_way(request: Received) -> bytes:
    """Answer with the request's payload, its Content-Encoding and its framing."""
    coding = values(request.lines, b"content-encoding")
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
    head += b"".join(b"Content-Encoding: %s\r\n" % c for c in coding)
    head += b"X-Geode-Saw: %s\r\n" % sha(request.payload).encode()
    framing = "chunked" if values(request.lines, b"transfer-encoding") else "length"
    return head + frame(request.payload, framing)


@pytest.mark.parametrize(("coding", "size", "framing"), body_cases())
async def test_request_and_response_bodies_pass_byte_for_byte_whatever_their_coding(
    through: Through, coding: str, size: int, framing: str
) -> None:
    need_coding(coding)
    content_encoding = CODINGS[coding][0]
    body = wire_body(coding, size)
    proxy, geode = await through(echo_same_way)
    sent_lines = [
        b"Content-Type: application/octet-stream",
        b"X-Order: 1",
        *([b"Content-Encoding: " + content_encoding] if content_encoding else []),
        b"X-Order: 2",
    ]
    head = b"POST /upload?n=1 HTTP/1.1\r\nHost: shop.example\r\n" + b"".join(
        line + b"\r\n" for line in sent_lines
    )
    client = await RawClient.open(proxy.url)
    try:
        client.send(head + frame(body, framing))
        resp = await client.response(within=20)
    finally:
        await client.close()
    (got,) = await geode.seen(1)
    assert got.line == b"POST /upload?n=1 HTTP/1.1"
    # What the client sent arrived, header lines in order, body byte for byte.
    kept = [
        line
        for line in got.lines
        if line.split(b":")[0].lower() in {b"content-type", b"x-order", b"content-encoding"}
    ]
    assert kept == sent_lines
    assert (len(got.payload), sha(got.payload)) == (len(body), sha(body))
    if framing == "length" and body:
        assert values(got.lines, b"content-length") == [b"%d" % len(body)]
        assert sha(got.body) == sha(body)  # no chunked coding added on the way either
    # What the geode sent arrived, byte for byte, with its coding.
    assert resp.status == 200
    assert resp.values(b"x-geode-saw") == [sha(body).encode()]
    assert (len(resp.payload), sha(resp.payload)) == (len(body), sha(body))
    assert resp.values(b"content-encoding") == ([content_encoding] if content_encoding else [])


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_a_compressed_body_moved_on_to_a_fallback_geode_arrives_byte_for_byte(
    proxy_factory: ProxyFactory, framing: str
) -> None:
    """The failover path: the home geode refuses the connection (nothing was sent), the
    body goes to the fallback region's geode as it came."""
    home, fallback = RecordingGeode(echo_same_way), RecordingGeode(echo_same_way)
    try:
        proxy = await proxy_factory(
            base_config(
                [
                    {"name": "home-1", "region": "eu-west", "url": await home.start()},
                    {"name": "fallback-1", "region": "us-east", "url": await fallback.start()},
                ],
                regions={"eu-west": {"fallback": ["us-east"]}, "us-east": None},
                countries={},
                continents={},
            )
        )
        await home.close()  # still healthy on the board: the forwarder meets the refusal
        body = wire_body("gzip", 64 * KiB)
        resp = await one_request(
            proxy,
            b"POST /upload HTTP/1.1\r\nHost: x\r\n"
            b"Content-Encoding: gzip\r\n" + frame(body, framing),
            b"POST",
        )
        (got,) = await fallback.seen(1)
    finally:
        await fallback.close()
    assert resp.values(b"x-geoproxy-geode") == [b"fallback-1"]
    assert sha(got.payload) == sha(body)
    assert sha(resp.payload) == sha(body)


# -- header lines: repeated, case-varied, not UTF-8 -----------------------------------------

BODIES = {
    "no-body": b"\r\n",
    "length": b"Content-Length: 5\r\n\r\nhello",
    "chunked": b"Transfer-Encoding: chunked\r\n\r\n" + chunked(b"hello"),
}


def method_for(shape: str) -> bytes:
    return b"GET" if shape == "no-body" else b"POST"


async def one_request(proxy: Proxy, data: bytes, method: bytes = b"GET") -> Response:
    (resp,) = await exchange(proxy.url, data, [method]) or [None]
    assert resp is not None, "no answer"
    return resp


@pytest.mark.parametrize("shape", list(BODIES))
async def test_repeated_request_headers_arrive_in_order_with_their_case(
    through: Through, shape: str
) -> None:
    proxy, geode = await through(lambda r: ok())
    sent = [b"Cookie: a=1", b"X-Dup: 1", b"cookie: b=2", b"Accept: */*", b"X-DUP: 2", b"x-dup: 3"]
    head = b"%s /x HTTP/1.1\r\nHost: shop.example\r\n" % method_for(shape)
    resp = await one_request(
        proxy, head + b"".join(s + b"\r\n" for s in sent) + BODIES[shape], method_for(shape)
    )
    assert resp.status == 200
    (got,) = await geode.seen(1)
    assert [
        line for line in got.lines if line.lower().startswith((b"cookie", b"x-dup", b"accept"))
    ] == sent
    assert got.payload == (b"" if shape == "no-body" else b"hello")


RESPONSE_SHAPES = {
    "whole": lambda lines: b"HTTP/1.1 200 OK\r\n%sContent-Length: 5\r\n\r\nhello" % lines,
    "chunked": lambda lines: (
        b"HTTP/1.1 200 OK\r\n%sTransfer-Encoding: chunked\r\n\r\n%s" % (lines, chunked(b"hello"))
    ),
    "streamed-length": lambda lines: (
        b"HTTP/1.1 200 OK\r\n%sContent-Length: %d\r\n\r\n%s" % (lines, 100 * KiB, b"h" * 100 * KiB)
    ),
}


@pytest.mark.parametrize("shape", list(RESPONSE_SHAPES))
async def test_set_cookie_lines_and_repeated_response_headers_pass_in_order(
    through: Through, shape: str
) -> None:
    sent = [
        b"Set-Cookie: a=1; Path=/",
        b"X-Dup: 1",
        b"set-cookie: b=2; HttpOnly",
        b"Set-Cookie: c=3",
        b"x-dup: 2",
        b"X-DUP: 3",
    ]
    reply = RESPONSE_SHAPES[shape](b"".join(s + b"\r\n" for s in sent))
    proxy, _ = await through(lambda r: reply)
    resp = await one_request(proxy, b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
    assert resp.status == 200
    assert [
        line for line in resp.lines if line.lower().startswith((b"set-cookie", b"x-dup"))
    ] == sent
    assert resp.payload == (b"hello" if shape == "chunked" else reply.split(b"\r\n\r\n", 1)[1])


@pytest.mark.parametrize("shape", list(BODIES))
async def test_request_header_bytes_that_are_not_utf8_pass_as_they_came(
    through: Through, shape: str
) -> None:
    proxy, geode = await through(lambda r: ok())
    head = b"%s /x HTTP/1.1\r\nHost: x\r\nX-Obs: caf\xe9\r\nX-Mix: \xc3\xa9t\xe9 \xff\r\n" % (
        method_for(shape)
    )
    resp = await one_request(proxy, head + BODIES[shape], method_for(shape))
    assert resp.status == 200
    (got,) = await geode.seen(1)
    assert values(got.lines, b"x-obs") == [b"caf\xe9"]
    assert values(got.lines, b"x-mix") == [b"\xc3\xa9t\xe9 \xff"]


@pytest.mark.parametrize("shape", list(RESPONSE_SHAPES))
async def test_response_header_bytes_that_are_not_utf8_pass_as_they_came(
    through: Through, shape: str
) -> None:
    proxy, _ = await through(lambda r: RESPONSE_SHAPES[shape](b"X-Obs: caf\xe9\r\n"))
    resp = await one_request(proxy, b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
    assert resp.status == 200
    assert resp.values(b"x-obs") == [b"caf\xe9"]


@pytest.mark.parametrize("shape", list(RESPONSE_SHAPES))
async def test_reason_phrase_bytes_that_are_not_utf8_pass_as_they_came(
    through: Through, shape: str
) -> None:
    reply = RESPONSE_SHAPES[shape](b"").replace(b" 200 OK", b" 200 Tr\xe8s bien", 1)
    proxy, _ = await through(lambda r: reply)
    resp = await one_request(proxy, b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
    assert resp.status_line == b"HTTP/1.1 200 Tr\xe8s bien"


# -- trailers, HEAD, 204, 304, 1xx ----------------------------------------------------------


async def test_chunked_response_trailers_reach_the_client_as_trailers(through: Through) -> None:
    reply = b"HTTP/1.1 200 OK\r\nTrailer: X-Checksum\r\nTransfer-Encoding: chunked\r\n\r\n"
    reply += chunked(b"abc", trailers=b"X-Checksum: 2955903335\r\n")
    proxy, _ = await through(lambda r: reply)
    resp = await one_request(proxy, b"GET /a HTTP/1.1\r\nHost: x\r\nTE: trailers\r\n\r\n")
    assert resp.payload == b"abc"
    assert b"x-checksum" not in names(resp.lines)
    assert resp.trailers == [b"X-Checksum: 2955903335"]


async def test_trailers_never_carry_what_this_hop_keeps_from_the_client(through: Through) -> None:
    """A stamp's Geoproxy-Home and Geoproxy-Load, and the X-Geoproxy-* lines this hop
    sets, are dropped from trailers as they are from the head."""
    reply = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    secret = b"Geoproxy-Home: eu-west\r\nGeoproxy-Load: 90\r\nX-Geoproxy-Geode: forged\r\n"
    reply += chunked(b"abc", trailers=secret + b"X-Checksum: 1\r\n")
    proxy, _ = await through(lambda r: reply)
    resp = await one_request(proxy, b"GET /a HTTP/1.1\r\nHost: x\r\nTE: trailers\r\n\r\n")
    assert resp.payload == b"abc"
    assert resp.trailers == [b"X-Checksum: 1"]


async def test_head_answer_keeps_its_content_length_and_the_connection_stays_in_step(
    through: Through,
) -> None:
    def reply(request: Received) -> bytes:
        if request.method == b"HEAD":
            return b'HTTP/1.1 200 OK\r\nContent-Length: 1234\r\nETag: "v1"\r\n\r\n'
        return ok(b"after")

    proxy, _ = await through(reply)
    client = await RawClient.open(proxy.url)
    try:
        client.send(b"HEAD /file HTTP/1.1\r\nHost: x\r\n\r\nGET /next HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await client.response(b"HEAD")
        after = await client.response()
    finally:
        await client.close()
    assert head.status == 200
    assert head.values(b"content-length") == [b"1234"]
    assert head.values(b"etag") == [b'"v1"']
    assert (after.status, after.payload) == (200, b"after")  # no stray bytes in between


@pytest.mark.parametrize(
    ("answer", "length"),
    [
        pytest.param(
            b'HTTP/1.1 304 Not Modified\r\nContent-Length: 1234\r\nETag: "v1"\r\n\r\n',
            [b"1234"],
            id="304-length",
        ),
        pytest.param(b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\n\r\n', [], id="304"),
        pytest.param(b'HTTP/1.1 204 No Content\r\nETag: "v1"\r\n\r\n', [], id="204"),
    ],
)
async def test_204_and_304_pass_with_their_headers_and_no_body(
    through: Through, answer: bytes, length: list[bytes]
) -> None:
    proxy, _ = await through(lambda r: answer if r.target == b"/x" else ok(b"after"))
    client = await RawClient.open(proxy.url)
    try:
        client.send(
            b'GET /x HTTP/1.1\r\nHost: x\r\nIf-None-Match: "v1"\r\n\r\n'
            b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        first = await client.response()
        after = await client.response()
    finally:
        await client.close()
    assert first.status_line == answer.split(b"\r\n", 1)[0]
    assert first.values(b"content-length") == length
    assert first.values(b"etag") == [b'"v1"']
    assert (after.status, after.payload) == (200, b"after")  # no body bytes in between


INTERIM = {
    "100": b"HTTP/1.1 100 Continue\r\n\r\n",
    "102": b"HTTP/1.1 102 Processing\r\n\r\n",
    "103": b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n",
    "102-103-103": b"HTTP/1.1 102 Processing\r\n\r\n"
    b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
    b"HTTP/1.1 103 Early Hints\r\nLink: </b.js>; rel=preload\r\n\r\n",
}


@pytest.mark.parametrize("final", ["whole", "chunked"])
@pytest.mark.parametrize("interim", list(INTERIM))
async def test_interim_answers_are_forwarded_before_the_final_one(
    through: Through, interim: str, final: str
) -> None:
    reply = INTERIM[interim] + RESPONSE_SHAPES[final](b"Link: </a.css>; rel=preload\r\n")
    proxy, _ = await through(lambda r: reply)
    resp = await one_request(proxy, b"GET /page HTTP/1.1\r\nHost: x\r\n\r\n")
    sent = INTERIM[interim].split(b"\r\n\r\n")[:-1]
    # (this hop may add its Via and X-Geoproxy-* lines to an interim answer too)
    assert [
        b"\r\n".join(
            line
            for line in h.removesuffix(b"\r\n\r\n").split(b"\r\n")
            if not line.lower().startswith((b"via:", b"x-geoproxy-"))
        )
        for h in resp.interim
    ] == sent
    assert resp.status == 200 and resp.payload == b"hello"


async def test_an_http10_client_gets_no_interim_answer(through: Through) -> None:
    """RFC 9110 15.2: no 1xx to an HTTP/1.0 client (what forwarding them must keep)."""
    proxy, _ = await through(lambda r: INTERIM["102-103-103"] + ok(b"hello"))
    resp = await one_request(proxy, b"GET /page HTTP/1.0\r\nHost: x\r\n\r\n")
    assert resp.interim == []
    assert resp.status == 200 and resp.payload == b"hello"


# -- WebSocket handshakes and close codes ---------------------------------------------------

WS_KEY = b"dGhlIHNhbXBsZSBub25jZQ=="


def ws_accept(key: bytes) -> bytes:
    digest = hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
    return base64.b64encode(digest)


def ws_handshake(request: Received) -> bytes:
    """A geode's 101 with headers of its own, hop-by-hop ones among them."""
    (key,) = values(request.lines, b"sec-websocket-key")
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + ws_accept(key) + b"\r\n"
        b"Set-Cookie: ws-session=abc; Path=/\r\nSet-Cookie: ws-pref=dark\r\n"
        b"X-Stamp-Build: 2026.12\r\nKeep-Alive: timeout=5\r\n\r\n"
    )


async def test_websocket_handshake_passes_the_geodes_101_headers(through: Through) -> None:
    proxy, geode = await through(ws_handshake)
    client = await RawClient.open(proxy.url)
    try:
        client.send(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: " + WS_KEY + b"\r\n"
            b"Sec-WebSocket-Version: 13\r\nCookie: c=1\r\n\r\n"
        )
        resp = await client.response()
    finally:
        await client.close()
    assert resp.status == 101
    assert resp.values(b"sec-websocket-accept") == [ws_accept(WS_KEY)]
    assert resp.values(b"set-cookie") == [b"ws-session=abc; Path=/", b"ws-pref=dark"]
    assert resp.values(b"x-stamp-build") == [b"2026.12"]
    assert resp.values(b"keep-alive") == []  # hop-by-hop: this hop's own
    (got,) = await geode.seen(1)
    assert values(got.lines, b"cookie") == [b"c=1"]


@pytest.mark.parametrize(
    "framing",
    [
        b"Content-Length: 5\r\n\r\nhello",
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ],
    ids=["length", "chunked"],
)
async def test_a_websocket_handshake_with_a_body_is_refused_at_the_edge(
    through: Through, framing: bytes
) -> None:
    """RFC 6455 4.1: a handshake is a GET without a body. A 400 naming it, the geode
    never asked (it used to be a 502 "no geode could be reached", counted against the
    geode's health)."""
    proxy, geode = await through(ws_handshake)
    resp = await one_request(
        proxy,
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: " + WS_KEY + b"\r\n"
        b"Sec-WebSocket-Version: 13\r\n" + framing,
    )
    assert resp.status == 400
    assert b"a WebSocket handshake carries no body" in resp.payload
    assert geode.requests == []


@pytest.fixture
async def ws_geode(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory
) -> tuple[FakeGeode, Proxy]:
    geode = await geode_factory("rec-1", "eu-west")
    return geode, await proxy_to(proxy_factory, geode.url)


@pytest.mark.parametrize("code", [1000, 4002])
async def test_a_clients_close_code_reaches_the_geode_and_comes_back_unchanged(
    ws_geode: tuple[FakeGeode, Proxy], code: int
) -> None:
    geode, proxy = ws_geode
    async with (
        asyncio.timeout(WAIT),
        aiohttp.ClientSession() as http,
        http.ws_connect(f"{proxy.url}/ws") as ws,
    ):
        await ws.receive_json()
        await ws.close(code=code, message=b"done")
        while not geode.ws_closed:  # noqa: ASYNC110 -- bounded poll
            await asyncio.sleep(0.01)
        assert geode.ws_closed == [code]
        # The geode's answering close passed back: aiohttp's geode answers every close
        # with 1000 (a proxy that echoed the client's own code would give 4002 back).
        assert ws.close_code == 1000


@pytest.mark.parametrize("code", [1000, 4001])
async def test_a_geodes_close_code_reaches_the_client_unchanged(
    ws_geode: tuple[FakeGeode, Proxy], code: int
) -> None:
    _, proxy = ws_geode
    async with (
        asyncio.timeout(WAIT),
        aiohttp.ClientSession() as http,
        http.ws_connect(f"{proxy.url}/ws") as ws,
    ):
        await ws.receive_json()
        await ws.send_str(f"close {code} bye")
        msg = await ws.receive()
        assert msg.type == aiohttp.WSMsgType.CLOSE
        assert (msg.data, msg.extra) == (code, "bye")


# -- regressions: the differences the differential test found (its section 2) -------


async def back_in_the_pool(proxy: Proxy, within: float = 1.0) -> None:
    """Wait (``within`` seconds at most) until the proxy's only geode has an idle pooled
    connection, so that the next request goes on it; a proxy that closes the connection
    instead is no failure: the wait just ends."""
    forwarder = proxy.gateway.forwarder
    assert forwarder is not None
    base = proxy.gateway.config.geodes[0].base
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(within):
            while not forwarder.pool._idle.get(base):  # noqa: ASYNC110 -- bounded poll
                await asyncio.sleep(0.01)


async def test_a_response_trailer_never_becomes_a_header_of_another_clients_answer(
    through: Through,
) -> None:
    def reply(request: Received) -> bytes:
        if request.target == b"/a":
            return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(
                b"hello", trailers=b"X-Checksum: 2955903335\r\n"
            )
        return ok(b"plain")

    proxy, geode = await through(reply)
    first = await one_request(proxy, b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")  # client A
    assert first.payload == b"hello"
    await back_in_the_pool(proxy)
    second = await one_request(proxy, b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")  # client B
    await geode.seen(2)  # (today B's request goes on A's pooled geode connection)
    assert (second.status, second.payload) == (200, b"plain")
    assert second.values(b"x-checksum") == []


async def test_a_request_trailer_never_becomes_a_header_of_the_next_pipelined_request(
    through: Through,
) -> None:
    proxy, geode = await through(lambda r: ok())
    resps = await exchange(
        proxy.url,
        (
            b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + chunked(b"data", trailers=b"X-Last-Trailer: leaked\r\nX-Client-Region: us-east\r\n")
            + b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n"
        ),
        [b"POST", b"GET"],
    )
    assert [r.status for r in resps] == [200, 200]
    up, nxt = await geode.seen(2)
    assert up.payload == b"data"
    assert nxt.target == b"/next"
    assert b"x-last-trailer" not in names(nxt.lines)
    assert b"x-client-region" not in names(nxt.lines)


# §2.3 and §2.4: test_repeated_request_headers_arrive_in_order_with_their_case and the
# *_not_utf8_pass_as_they_came tests above.

BIG_HEADER = b"X-Big: " + b"a" * 9000 + b"\r\n"


async def test_a_bad_request_in_a_pipeline_answers_the_ones_before_it_then_a_400(
    through: Through,
) -> None:
    proxy, geode = await through(lambda r: ok(r.target))
    resps, closed = await exchange_to_the_end(
        proxy.url,
        (
            b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /3 HTTP/1.1\r\nHost: x\r\n" + BIG_HEADER + b"\r\n"
        ),
        [b"GET"] * 3,
    )
    assert closed
    assert [r.payload for r in resps[:2]] == [b"/1", b"/2"]
    assert [r.status_line[:12] for r in resps] == [
        b"HTTP/1.1 200",
        b"HTTP/1.1 200",
        b"HTTP/1.1 400",
    ]
    assert [r.target for r in geode.requests] == [b"/1", b"/2"]


async def test_a_request_asking_to_close_is_answered_though_bytes_follow_it(
    through: Through,
) -> None:
    proxy, geode = await through(lambda r: ok(r.target))
    (resp,), closed = await exchange_to_the_end(
        proxy.url,
        (
            b"GET /1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            b"GET /2 HTTP/1.1\r\nHost: x\r\n\r\n"
        ),
        [b"GET"],
    )
    assert closed
    assert (resp.status, resp.payload) == (200, b"/1")
    assert resp.values(b"connection") == [b"close"]
    assert [r.target for r in geode.requests] == [b"/1"]


@pytest.mark.parametrize(
    ("first", "rest"),
    [
        pytest.param(b"3\r\nabc\r\n", b"3; sp=1\r\ndef\r\n0\r\n\r\n", id="later-chunk"),
        pytest.param(b"", b"3\r\nabc\r\n3; sp=1\r\ndef\r\n0\r\n\r\n", id="later-chunk-at-once"),
        pytest.param(b"", b"3; sp=1\r\nabc\r\n3\r\ndef\r\n0\r\n\r\n", id="first-chunk"),
        pytest.param(b"", b'3;a=1;b="q s"\r\nabc\r\n3;x\r\ndef\r\n0\r\n\r\n', id="no-space"),
    ],
)
async def test_chunk_extensions_are_accepted_and_the_body_forwarded(
    through: Through, first: bytes, rest: bytes
) -> None:
    """RFC 9112 7.1.1 allows blanks around ';'. ``first``: chunks sent before the rest,
    once the geode has the request head (the body is streaming)."""
    proxy, geode = await through(lambda r: ok(r.payload))
    client = await RawClient.open(proxy.url)
    try:
        client.send(b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        if first:
            client.send(first)
            await geode.began(1)
        client.send(rest)
        resp = await client.response(b"POST", within=3)
    finally:
        await client.close()
    assert (resp.status, resp.payload) == (200, b"abcdef")
    (got,) = await geode.seen(1)
    assert got.payload == b"abcdef"


UNKNOWN_LENGTH = {
    "chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(b"x" * 3000),
    "close-delimited": b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"x" * 3000,
}


@pytest.mark.parametrize("answer", list(UNKNOWN_LENGTH))
async def test_an_http10_keep_alive_client_can_tell_where_a_body_of_unknown_length_ends(
    through: Through, answer: str
) -> None:
    proxy, _ = await through(lambda r: UNKNOWN_LENGTH[answer])
    client = await RawClient.open(proxy.url)
    try:
        client.send(b"GET /x HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n")
        resp = await client.response(within=3)  # a body without a length: to the close
        if not resp.values(b"content-length"):
            assert b"keep-alive" not in b",".join(resp.values(b"connection")).lower()
            assert resp.status_line.startswith(b"HTTP/1.0 ") or resp.values(b"connection")
    finally:
        await client.close()
    assert resp.status == 200
    assert resp.payload == b"x" * 3000


async def test_a_request_pipelined_after_an_h2c_upgrade_request_is_answered(
    through: Through,
) -> None:
    proxy, geode = await through(lambda r: ok(r.target))
    resps = await exchange(
        proxy.url,
        (
            b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
            b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
            b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n"
        ),
        [b"GET", b"GET"],
        within=3,
    )
    assert [(r.status, r.payload) for r in resps] == [(200, b"/a"), (200, b"/b")]
    assert [r.target for r in geode.requests] == [b"/a", b"/b"]
    assert b"upgrade" not in names(geode.requests[0].lines)


# §2.9: test_interim_answers_are_forwarded_before_the_final_one above.
# §2.10, a 304's Content-Length: test_204_and_304_pass_with_their_headers_and_no_body.


async def test_options_asterisk_with_a_body_is_forwarded(through: Through) -> None:
    proxy, geode = await through(lambda r: ok(b"opts"))
    resp = await one_request(
        proxy, b"OPTIONS * HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello", b"OPTIONS"
    )
    assert (resp.status, resp.payload) == (200, b"opts")
    (got,) = await geode.seen(1)
    assert (got.line, got.payload) == (b"OPTIONS * HTTP/1.1", b"hello")


@pytest.mark.parametrize("status", [b"204 No Content", b"304 Not Modified"], ids=["204", "304"])
async def test_a_204_or_304_with_stray_body_bytes_is_relayed_without_them(
    through: Through, status: bytes
) -> None:
    proxy, _ = await through(
        lambda r: (
            b'HTTP/1.1 %s\r\nETag: "v1"\r\n\r\nstray bytes' % status
            if r.target == b"/x"
            else ok(b"after")
        )
    )
    first = await one_request(proxy, b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
    assert first.status_line == b"HTTP/1.1 " + status
    assert first.values(b"etag") == [b'"v1"']
    after = await one_request(proxy, b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (after.status, after.payload) == (200, b"after")  # the stray bytes went nowhere


BAD_REQUESTS = {
    "header-too-long": b"GET /x HTTP/1.1\r\nHost: x\r\n" + BIG_HEADER + b"\r\n",
    "control-character": b"GET /x HTTP/1.1\r\nHost: x\r\nX-Secret-Token: s3cr\x01t\r\n\r\n",
    "bad-chunk-size": b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"zz-secret\r\n",
}


@pytest.mark.parametrize("request_bytes", list(BAD_REQUESTS.values()), ids=list(BAD_REQUESTS))
async def test_geoproxys_own_400_names_no_software_and_echoes_nothing(
    through: Through, request_bytes: bytes
) -> None:
    proxy, geode = await through(lambda r: ok())
    resp = await one_request(proxy, request_bytes)
    assert resp.status == 400  # (that it says HTTP/1.1: §2.5's test)
    assert not any(
        b"python" in v.lower() or b"aiohttp" in v.lower() for v in resp.values(b"server")
    )
    for secret in (b"aaaaaaaaaa", b"s3cr", b"X-Secret-Token", b"zz-secret"):
        assert secret not in resp.body
    assert geode.requests == []


# -- the chunked-body walk (geoproxy/proxy/chunks.py) ----------------------------------------------

WALKED = (
    b'3\r\nabc\r\n3; sp=1\r\ndef\r\n3 ;\ta = "q s"\r\nghi\r\n10\r\n0123456789\r\n\r\n\r\n'
    b"0\r\nX-T: 1\r\n\r\nGET /next HTTP/1.1\r\n"
)
TIDIED = (
    b'3\r\nabc\r\n3;sp=1\r\ndef\r\n3;a="q s"\r\nghi\r\n10\r\n0123456789\r\n\r\n\r\n'
    b"0\r\nX-T: 1\r\n\r\nGET /next HTTP/1.1\r\n"
)


@pytest.mark.parametrize("step", [1, 2, 3, 5, 8, 13, len(WALKED)])
def test_the_walk_tidies_only_chunk_size_lines_however_the_body_is_cut(step: int) -> None:
    """Chunk data that looks like a size line (``0123456789\\r\\n\\r\\n``), a quoted
    extension value with a space, the trailer section and what follows the body pass
    as they came; only whitespace around ';' and '=' goes."""
    walk = ChunkedBody()
    out = b"".join(walk.feed(WALKED[at : at + step]) for at in range(0, len(WALKED), step))
    assert out == TIDIED
    assert walk.done


@pytest.mark.parametrize(
    "body",
    [b"zz\r\nabc\r\n", b"+3\r\nabc\r\n", b"0x3\r\nabc\r\n", b"3" + b" " * 5000],
    ids=["not-hex", "sign", "0x", "endless-line"],
)
def test_the_walk_leaves_a_malformed_body_to_the_parser(body: bytes) -> None:
    walk = ChunkedBody()
    out = walk.feed(body)
    assert walk.done
    assert out.replace(b" ", b"") == body.replace(b" ", b"")  # passed on, for the 400
