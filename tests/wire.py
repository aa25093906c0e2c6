"""HTTP/1.1 as bytes on the wire, for tests that must see exactly what was sent and what
arrived, with nothing in between that normalises: a recording geode and a client, both
on plain asyncio streams over loopback.

``RecordingGeode`` parses requests just enough to find where each ends (Content-Length,
or chunked with extensions and trailers) and records each one as it came: the head and
the body byte for byte. A ``reply`` function answers each request with raw bytes.
``RawClient`` sends bytes as given and reads responses (1xx interim ones kept apart)
by their framing. Every read is bounded: a hang fails in seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from conftest import Proxy, ProxyFactory, base_config

#: How long a test waits for one response (or for a geode to see a request).
WAIT = 5.0


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def header_lines(head: bytes) -> list[bytes]:
    """The header lines of a head (start line and the blank line left out)."""
    return head.split(b"\r\n")[1:-2] if head.endswith(b"\r\n\r\n") else head.split(b"\r\n")[1:]


def fields(lines: list[bytes]) -> list[tuple[bytes, bytes]]:
    """(name, value) per header line, as written (value without surrounding blanks)."""
    out = []
    for line in lines:
        name, _, value = line.partition(b":")
        out.append((name, value.strip(b" \t")))
    return out


def values(lines: list[bytes], name: bytes) -> list[bytes]:
    """Every value of a header, in order, matching the name case-insensitively."""
    low = name.lower()
    return [v for n, v in fields(lines) if n.lower() == low]


def names(lines: list[bytes]) -> list[bytes]:
    return [n.lower() for n, _ in fields(lines)]


def chunked(payload: bytes, size: int = 8192, ext: bytes = b"", trailers: bytes = b"") -> bytes:
    """``payload`` in the chunked coding: chunks of ``size`` bytes (each with ``ext`` after
    its size), the last chunk, ``trailers`` ("Name: value\\r\\n" lines) and the blank line."""
    out = [
        b"%x%s\r\n%s\r\n" % (len(payload[i : i + size]), ext, payload[i : i + size])
        for i in range(0, len(payload), size)
    ]
    return b"".join(out) + b"0\r\n" + trailers + b"\r\n"


async def _read_chunked(reader: asyncio.StreamReader) -> tuple[bytes, bytes, list[bytes]]:
    """A chunked body off the stream: as on the wire, its payload, its trailer lines."""
    wire: list[bytes] = []
    payload: list[bytes] = []
    while True:
        line = await reader.readuntil(b"\r\n")
        wire.append(line)
        size = int(line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            break
        data = await reader.readexactly(size + 2)
        wire.append(data)
        payload.append(data[:-2])
    trailers: list[bytes] = []
    while True:
        line = await reader.readuntil(b"\r\n")
        wire.append(line)
        if line == b"\r\n":
            return b"".join(wire), b"".join(payload), trailers
        trailers.append(line[:-2])


def _is_chunked(lines: list[bytes]) -> bool:
    codings = b",".join(values(lines, b"transfer-encoding")).lower()
    return codings.rsplit(b",", 1)[-1].strip() == b"chunked"


def _length(lines: list[bytes]) -> int | None:
    found = values(lines, b"content-length")
    return int(found[0]) if found else None


@dataclass
class Received:
    """One request as a geode received it."""

    conn: int  # the geode connection it came on, numbered from 0 in accept order
    head: bytes  # request line and header lines, blank line included, as received
    body: bytes  # as on the wire (chunk sizes, extensions and trailers included)
    payload: bytes  # the body without the chunked coding
    trailers: list[bytes]

    @property
    def line(self) -> bytes:
        return self.head.split(b"\r\n", 1)[0]

    @property
    def method(self) -> bytes:
        return self.line.split(b" ")[0]

    @property
    def target(self) -> bytes:
        return self.line.split(b" ")[1]

    @property
    def version(self) -> bytes:
        return self.line.rsplit(b" ", 1)[-1]

    @property
    def lines(self) -> list[bytes]:
        return header_lines(self.head)


Reply = Callable[[Received], bytes | None]


def ok(body: bytes = b"ok", extra: bytes = b"") -> bytes:
    """A 200 with a Content-Length (``extra``: header lines to add)."""
    return b"HTTP/1.1 200 OK\r\n%sContent-Length: %d\r\n\r\n%s" % (extra, len(body), body)


def _closes_after(request: Received, reply: bytes) -> bool:
    final = reply
    while final[9:10] == b"1" and b"\r\n\r\n" in final:  # skip interim 1xx heads
        final = final.split(b"\r\n\r\n", 1)[1]
    answer = [
        v.lower()
        for v in values(header_lines(final.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"), b"connection")
    ]
    asked = b",".join(values(request.lines, b"connection")).lower()
    if b"close" in answer or b"close" in asked:
        return True
    return request.version == b"HTTP/1.0" and b"keep-alive" not in asked


class RecordingGeode:
    """A geode on 127.0.0.1:0 that records every request byte for byte and answers each
    with ``reply(request)`` (raw bytes; None: close without answering). ``/health``
    answers 200 and is not recorded. It closes after an answer when the request or the
    answer asks for it (``Connection: close``; HTTP/1.0 without keep-alive), and answers
    a header line over ``max_line`` bytes with a 400 and a close, as servers do."""

    def __init__(self, reply: Reply, max_line: int = 8190) -> None:
        self.reply = reply
        self.max_line = max_line
        self.requests: list[Received] = []
        self.heads: list[bytes] = []  # request heads as they arrive, before their bodies
        self.server: asyncio.Server | None = None
        self.conns = 0
        self._writers: list[asyncio.StreamWriter] = []
        self._arrived = asyncio.Event()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, limit=2**20)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def seen(self, count: int, within: float = WAIT) -> list[Received]:
        """The first ``count`` requests once they arrived (fails after ``within`` s)."""
        async with asyncio.timeout(within):
            while len(self.requests) < count:
                self._arrived.clear()
                await self._arrived.wait()
        return self.requests[:count]

    async def began(self, count: int, within: float = WAIT) -> None:
        """Wait until ``count`` request heads arrived (their bodies may still come)."""
        async with asyncio.timeout(within):
            while len(self.heads) < count:
                self._arrived.clear()
                await self._arrived.wait()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        conn = self.conns
        self.conns += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if any(len(line) > self.max_line for line in head.split(b"\r\n")):
                    writer.write(
                        b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n"
                        b"Connection: close\r\n\r\n"
                    )
                    return
                lines = header_lines(head)
                if not head.startswith(b"GET /health "):
                    self.heads.append(head)
                    self._arrived.set()
                if _is_chunked(lines):
                    body, payload, trailers = await _read_chunked(reader)
                else:
                    body = await reader.readexactly(_length(lines) or 0)
                    payload, trailers = body, []
                request = Received(conn, head, body, payload, trailers)
                if request.target == b"/health":
                    writer.write(ok())
                    await writer.drain()
                    continue
                self.requests.append(request)
                self._arrived.set()
                answer = self.reply(request)
                if answer is None:
                    return
                writer.write(answer)
                await writer.drain()
                if _closes_after(request, answer):
                    return
        except (
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ConnectionError,
            ValueError,
        ):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for writer in self._writers:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


@dataclass
class Response:
    """One response as a client received it."""

    head: bytes  # status line and header lines, blank line included
    body: bytes  # as on the wire
    payload: bytes  # without the chunked coding
    trailers: list[bytes]
    interim: list[bytes] = field(default_factory=list)  # heads of 1xx answers before it

    @property
    def status_line(self) -> bytes:
        return self.head.split(b"\r\n", 1)[0]

    @property
    def status(self) -> int:
        return int(self.status_line.split(b" ")[1])

    @property
    def reason(self) -> bytes:
        parts = self.status_line.split(b" ", 2)
        return parts[2] if len(parts) > 2 else b""

    @property
    def lines(self) -> list[bytes]:
        return header_lines(self.head)

    def values(self, name: bytes) -> list[bytes]:
        return values(self.lines, name)


async def read_response(reader: asyncio.StreamReader, method: bytes = b"GET") -> Response:
    """One response off a stream, framed as RFC 9112 6.3 says (unbounded: the caller
    bounds it). A body with no length ends when the connection does."""
    interim: list[bytes] = []
    while True:
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        if 100 <= status < 200 and status != 101:
            interim.append(head)
            continue
        break
    lines = header_lines(head)
    if method == b"HEAD" or status in (101, 204, 304):
        return Response(head, b"", b"", [], interim)
    if _is_chunked(lines):
        body, payload, trailers = await _read_chunked(reader)
        return Response(head, body, payload, trailers, interim)
    length = _length(lines)
    body = await reader.readexactly(length) if length is not None else await reader.read()
    return Response(head, body, body, [], interim)


class RawClient:
    """A client connection that writes bytes as given and reads whole responses."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, url: str) -> RawClient:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        return cls(*await asyncio.open_connection(host, int(port), limit=2**20))

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def response(self, method: bytes = b"GET", within: float = WAIT) -> Response:
        async with asyncio.timeout(within):
            return await read_response(self.reader, method)

    async def responses(self, methods: list[bytes], within: float = WAIT) -> list[Response]:
        """As many responses as ``methods`` has entries, or fewer when the connection
        ends first or ``within`` seconds pass (the rest never came)."""
        out: list[Response] = []
        with contextlib.suppress(TimeoutError, asyncio.IncompleteReadError):
            async with asyncio.timeout(within):
                for method in methods:
                    out.append(await read_response(self.reader, method))
        return out

    async def closed(self, within: float = WAIT) -> bool:
        """True when the other side closes the connection (with nothing more sent)
        within ``within`` seconds; False when bytes arrive or it stays open."""
        try:
            async with asyncio.timeout(within):
                return await self.reader.read(1) == b""
        except TimeoutError:
            return False

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


async def exchange(
    url: str, data: bytes, methods: list[bytes], within: float = WAIT
) -> list[Response]:
    """Open a connection, send ``data``, read the responses, close."""
    return (await _exchange(url, data, methods, within, False))[0]


async def exchange_to_the_end(
    url: str, data: bytes, methods: list[bytes], within: float = WAIT
) -> tuple[list[Response], bool]:
    """``exchange``, and whether the other side then closed the connection."""
    return await _exchange(url, data, methods, within, True)


async def _exchange(
    url: str, data: bytes, methods: list[bytes], within: float, wait_close: bool
) -> tuple[list[Response], bool]:
    client = await RawClient.open(url)
    try:
        client.send(data)
        responses = await client.responses(methods, within)
        return responses, wait_close and await client.closed(within)
    finally:
        await client.close()


async def proxy_to(proxy_factory: ProxyFactory, url: str, **overrides: Any) -> Proxy:
    """A proxy with one geode, ``rec-1`` in eu-west, at ``url``: every request goes there
    and nowhere else (no fallback)."""
    return await proxy_factory(
        base_config(
            [{"name": "rec-1", "region": "eu-west", "url": url}],
            regions={"eu-west": None},
            countries={},
            continents={},
            **overrides,
        )
    )
