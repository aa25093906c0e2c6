"""Responses geoproxy sends: its own errors (small JSON bodies with one stable shape,
``{"error": {"status": 503, "code": "no_healthy_geode", "message": "...", ...}}``), and
the two shapes a geode's response is relayed in (streamed, or whole in one write).

Neither relay shape adds a header the geode did not send beyond what HTTP framing needs:
aiohttp would invent ``Content-Type: application/octet-stream`` and a ``Server`` header
(a made-up type changes how browsers treat the body), and both write the geode's header
lines as bytes, as they came. Both lean on private aiohttp API (``_prepare_headers``,
``_write_headers``, ``_must_be_empty_body``; ``_payload_writer``, ``_prepare_hook``);
tests/test_forwarding.py and tests/test_integrity.py pin what reaches the client.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.hdrs import SERVER
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import HttpVersion, HttpVersion10, HttpVersion11
from aiohttp.http_writer import _serialize_headers  # C; also rejects control characters
from multidict import CIMultiDict

from geoproxy.proxy import compat


def lines_to_map(block: bytes, out: CIMultiDict[str]) -> CIMultiDict[str]:
    for line in block.split(b"\r\n")[:-1]:
        name, _, value = line.partition(b": ")
        out.add(name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
    return out


def json_error(
    status: int,
    code: str,
    message: str,
    headers: Mapping[str, str] | None = None,
    **details: object,
) -> web.Response:
    body = {"error": {"status": status, "code": code, "message": message, **details}}
    return (ErrorResponse if compat.lean() else web.Response)(
        status=status,
        text=json.dumps(body, separators=(",", ":")) + "\n",
        content_type="application/json",
        headers=headers,
    )


class ErrorResponse(web.Response):
    """geoproxy's own answer: no ``Server`` header (aiohttp's names its own and Python's
    versions), and HTTP/1.1 in the status line whatever the request's version (RFC 9110
    6.2; aiohttp echoes the request's, and answers a request it could not parse as
    HTTP/1.0)."""

    async def _prepare_headers(self) -> None:
        had_server = SERVER in self.headers
        await super()._prepare_headers()
        if not had_server:
            self.headers.popall(SERVER, None)

    async def _write_headers(self) -> None:
        writer = self._payload_writer
        assert writer is not None  # set by _start
        await writer.write_headers(f"HTTP/1.1 {self._status} {self._reason}", self._headers)


_STATUS_LINES: dict[tuple[HttpVersion, int, str], bytes] = {}
_KEEP_ALIVE_10 = b"Connection: keep-alive\r\n"
_CLOSE_11 = b"Connection: close\r\n"


def status_line(version: HttpVersion, status: int, reason: str) -> bytes:
    key = (version, status, reason)
    line = _STATUS_LINES.get(key)
    if line is None:
        line = f"HTTP/{version[0]}.{version[1]} {status} {reason}\r\n".encode(
            "utf-8", "surrogateescape"
        )
        if len(_STATUS_LINES) < 1024:  # bounded: reason phrases come from geodes
            _STATUS_LINES[key] = line
    return line


def relay_head(
    version: HttpVersion,
    status: int,
    reason: str,
    lines: bytes,
    dated: bool,
    framing: bytes,
    keep_alive: bool,
) -> list[bytes]:
    """The head of a relayed response, from header lines already written and checked
    ("Name: value\r\n" each, as the geode sent them), without the blank line that ends
    it: what this hop adds is only what aiohttp's own responses carry for framing:
    ``framing`` (Content-Length or Transfer-Encoding), ``Date`` when the geode sent none,
    and ``Connection`` as keep-alive and the version require."""
    head = [status_line(version, status, reason), lines, framing]
    if not dated:
        head.append(b"Date: " + rfc822_formatted_time().encode() + b"\r\n")
    if keep_alive:
        if version == HttpVersion10:
            head.append(_KEEP_ALIVE_10)
    elif version == HttpVersion11:
        head.append(_CLOSE_11)
    return head


def whole_head(
    version: HttpVersion,
    status: int,
    reason: str,
    lines: bytes,
    dated: bool,
    length: int,
    keep_alive: bool,
) -> list[bytes]:
    """``relay_head`` for a whole response of ``length`` bytes."""
    return relay_head(
        version,
        status,
        reason,
        lines,
        dated,
        b"Content-Length: " + str(length).encode() + b"\r\n",
        keep_alive,
    )


class RelayResponse(web.StreamResponse):
    """A streamed geode response. Its head is written from header lines the caller
    wrote and checked, as the geode sent them (no header map: bytes that are not UTF-8
    pass as they came); aiohttp would also invent ``Content-Type:
    application/octet-stream`` and a ``Server`` header. The body is framed by the geode's
    Content-Length when it sent one; else chunked to an HTTP/1.1 client, and to an
    HTTP/1.0 one by closing the connection after it (aiohttp 3.14 left such a keep-alive
    connection open, the client waiting for an end that never came). A HEAD's or a 304's
    Content-Length describes the representation (RFC 9110 8.6) and is passed on; a 204
    has none. A chunked body ends with the geode's ``trailers``, when it had any."""

    def __init__(
        self, status: int, reason: str | None, lines: bytes, dated: bool, length: int | None
    ) -> None:
        super().__init__(status=status, reason=reason)
        self._lines = lines  # "Name: value\r\n" each
        self._dated = dated
        self._relay_length = length
        self._head: list[bytes] = []
        self.trailers = b""  # trailer lines to end a chunked body with ("Name: value\r\n")

    async def _prepare_headers(self) -> None:
        request = self._req
        writer = self._payload_writer
        assert request is not None and writer is not None  # set by _start
        keep_alive = self._keep_alive
        if keep_alive is None:
            keep_alive = request.keep_alive
        version = request.version
        length = self._relay_length
        framing = b""
        if self._must_be_empty_body:
            if length is not None and self.status != 204:
                framing = b"Content-Length: " + str(length).encode() + b"\r\n"
        elif length is not None:
            writer.length = length
            framing = b"Content-Length: " + str(length).encode() + b"\r\n"
        elif version >= HttpVersion11:
            writer.enable_chunking()
            framing = b"Transfer-Encoding: chunked\r\n"
        else:
            keep_alive = False  # the body ends when the connection closes
        self._keep_alive = keep_alive
        self._head = relay_head(
            version, self._status, self._reason, self._lines, self._dated, framing, keep_alive
        )

    async def _write_headers(self) -> None:
        request = self._req
        assert request is not None  # set by _start
        head = self._head
        if self._headers:  # set by a signal handler
            head.append(_serialize_headers("", self._headers)[2:-2])
        head.append(b"\r\n")
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client connection closed")
        transport.write(b"".join(head))

    async def write_eof(self, data: bytes = b"") -> None:
        writer = self._payload_writer
        if self.trailers and writer is not None and getattr(writer, "chunked", False):
            if data:
                await self.write(data)
            # The last chunk and the trailer section, written as they are.
            writer.chunked = False  # type: ignore[attr-defined]
            data = b"0\r\n" + self.trailers + b"\r\n"
        await super().write_eof(data)


class WholeResponse(web.StreamResponse):
    """A geode's whole (small) response, head and body sent in one write once the
    handler returns, from header lines the caller already wrote and checked (no header
    map is built; ``whole_head``). Never for HEAD, 1xx, 204 or 304."""

    def __init__(
        self, status: int, reason: str | None, lines: bytes, dated: bool, body: bytes
    ) -> None:
        super().__init__(status=status, reason=reason)
        self._lines = lines  # "Name: value\r\n" each
        self._dated = dated
        self._whole = body

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self._eof_sent:
            return None
        if self._payload_writer is not None:
            return self._payload_writer
        self._req = request
        writer = self._payload_writer = request._payload_writer
        keep_alive = self._keep_alive
        if keep_alive is None:
            keep_alive = self._keep_alive = request.keep_alive
        await request._prepare_hook(self)  # on_response_prepare signals, if any
        body = self._whole
        head = whole_head(
            request.version,
            self._status,
            self._reason,
            self._lines,
            self._dated,
            len(body),
            keep_alive,
        )
        if self._headers:  # set by a signal handler
            head.append(_serialize_headers("", self._headers)[2:-2])
        head.append(b"\r\n")
        head.append(body)
        await writer.write_eof(b"".join(head))
        self._eof_sent = True
        self._req = None
        self._body_length = writer.output_size
        self._payload_writer = None
        return writer


_TIMEOUT_BODY = (
    b'{"error":{"status":408,"code":"request_timeout",'
    b'"message":"request head not received in time"}}\n'
)
_REQUEST_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
    b"Connection: close\r\nContent-Length: "
    + str(len(_TIMEOUT_BODY)).encode()
    + b"\r\n\r\n"
    + _TIMEOUT_BODY
)


#: Seconds asyncio gives a TLS handshake (its ssl_handshake_timeout default), plus a margin.
_HANDSHAKE_LIMIT = 61.0


class HeadDeadline:
    """Connections must send a complete first request head within ``header_timeout``, or
    get a 408 and are closed (slowloris: aiohttp alone keeps such a connection for about
    an hour). Later requests on a kept-alive connection are bounded by aiohttp's
    ``keepalive_timeout``, which closes a connection idling mid-head.

    aiohttp has no switch for this: a runner hands its sites ``wrap(protocol factory)``,
    and the handler calls ``note_request`` for every request head that arrived."""

    def __init__(self, header_timeout: float) -> None:
        self.header_timeout = header_timeout
        # Connections whose first request head has not arrived yet, and their timers.
        # Held strongly (aiohttp's protocol objects take no weak references), each for
        # header_timeout at most: the timer is cancelled when the head arrives, else a
        # closed connection stayed alive until it fired (at 8,000 new connections a
        # second, 80,000 of them, and the collector's pauses grew with them).
        self._waiting: dict[Any, asyncio.TimerHandle] = {}

    def note_request(self, protocol: object) -> None:
        """A request head arrived on this connection."""
        timer = self._waiting.pop(protocol, None)
        if timer is not None:
            timer.cancel()

    def wrap(self, factory: Callable[[], Any]) -> Callable[[], Any]:
        return partial(self._connection, factory)

    def _connection(self, factory: Callable[[], Any]) -> Any:
        protocol = factory()
        loop = asyncio.get_running_loop()
        self._waiting[protocol] = loop.call_later(
            self.header_timeout, self._check_head, protocol, loop.time()
        )
        return protocol

    def _check_head(self, protocol: Any, accepted: float) -> None:
        if protocol not in self._waiting:
            return
        if protocol.transport is None and getattr(protocol, "_manager", None) is not None:
            # Not connected yet: a TLS handshake under way. The deadline still counts
            # from the accept: the connection gets its 408 once the handshake is done.
            # (A handshake that fails drops the protocol unconnected: watched no longer
            # than asyncio waits for a handshake.)
            loop = asyncio.get_running_loop()
            if loop.time() - accepted < _HANDSHAKE_LIMIT:
                wait = min(self.header_timeout, 1.0)
                self._waiting[protocol] = loop.call_later(
                    wait, self._check_head, protocol, accepted
                )
                return
        del self._waiting[protocol]
        transport = protocol.transport
        if transport is None or transport.is_closing():
            return
        transport.write(_REQUEST_TIMEOUT)
        transport.close()


def whole_response(
    status: int, reason: str | None, lines: bytes, dated: bool, body: bytes
) -> web.StreamResponse:
    """A geode's whole answer: ``WholeResponse``, or in public mode (``compat``) a plain
    ``web.Response`` (aiohttp then adds its own Content-Type and Server headers)."""
    if compat.lean():
        return WholeResponse(status, reason, lines, dated, body)
    return web.Response(
        status=status, reason=reason, body=body, headers=lines_to_map(lines, CIMultiDict())
    )


def relay_response(
    status: int, reason: str | None, lines: bytes, dated: bool, length: int | None
) -> web.StreamResponse:
    """A geode's streamed answer: ``RelayResponse``, or in public mode a plain
    ``web.StreamResponse`` (framed by aiohttp)."""
    if compat.lean():
        return RelayResponse(status, reason, lines, dated, length)
    headers = lines_to_map(lines, CIMultiDict())
    if length is not None:
        headers["Content-Length"] = str(length)
    return web.StreamResponse(status=status, reason=reason, headers=headers)
