"""geoproxy's server protocol: aiohttp's ``RequestHandler`` with its request parsing set
right, for every request path (the fast lane, ``fastlane.ProxyConnection``, builds on it).

aiohttp's request parser (3.14) gets four things wrong that a proxy cannot pass on:
- failing on a request, it raises before handing back the ones it parsed before it in
  the same read: a bad third request in a pipeline lost the first two. Here what is read
  is parsed in pieces that end after a request head each (``_pieces``);
- it keeps the last trailer field of a chunked body pending and adds it to the headers of
  the next request it parses: one client (or one user of a CDN's shared connection)
  could set headers, ``X-Client-Region`` even, on the next request. A chunked body ends
  with a blank line, a piece boundary: the next request gets a fresh parser
  (``_received``);
- it refuses a chunk extension with whitespace around ``;`` (``3; a=1``, RFC 9112
  7.1.1): a chunked body is walked as it arrives and that whitespace taken out
  (``chunks.py``);
- a parse error in a body leaves the request's body waiting forever (``_fail_body``).
Its own 400s echo the client's bytes and name aiohttp and Python: ``handle_error`` answers
geoproxy's JSON instead.

Private aiohttp names used here are checked at start-up (``compat.py``); in public mode
aiohttp's own protocol serves instead.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from aiohttp.http import HttpRequestParser, RawRequestMessage
from aiohttp.http_exceptions import (
    BadHttpMessage,
    BadHttpMethod,
    BadStatusLine,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
    TransferEncodingError,
)
from aiohttp.web_protocol import RequestHandler, RequestPayloadError, _ErrInfo

from geoproxy.proxy.chunks import ChunkedBody
from geoproxy.proxy.responses import json_error

log = logging.getLogger("geoproxy.protocol")

_MAX_PIECES = 32  # aiohttp queues up to 32 pipelined requests per connection
#: What a request aiohttp could not parse gets told (the exception's own text quotes the
#: client's bytes).
_BAD_REQUEST: dict[type[BaseException], str] = {
    LineTooLong: "a request line or header line is too long",
    InvalidHeader: "an invalid header line",
    BadHttpMethod: "an invalid method",
    BadStatusLine: "an invalid request line",
    InvalidURLError: "an invalid request target",
    TransferEncodingError: "an invalid chunked body or Transfer-Encoding",
    BadHttpMessage: "malformed request",
}


class ServerConnection(RequestHandler):
    """aiohttp's server protocol with its request parsing set right (module docstring)."""

    __slots__ = ("_auto_decompress", "_chunked", "_walk")

    def __init__(self, manager: web.Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._auto_decompress = bool(kwargs.get("auto_decompress", True))
        self._chunked: Any = None  # the body of the last chunked request parsed
        self._walk: ChunkedBody | None = None  # ... while it comes in

    def data_received(self, data: bytes) -> None:
        end = data.find(b"\r\n\r\n") + 4
        if 3 < end < len(data):  # more after a request head: pipelined requests, a body
            self._pieces(data, end)
            return
        self._received(data)
        if self._messages:
            self._fail_body()

    def _pieces(self, data: bytes, end: int) -> None:
        """Parse ``data`` in pieces that end after a request head each (at most
        ``_MAX_PIECES``, the rest in one). aiohttp's parser, failing on a request, raises
        before handing back the ones it parsed before it in the same call: a bad third
        request in a pipeline lost the first two, answered with one 400. Fed piece by
        piece, those before it are queued, answered, and the 400 comes last."""
        start = 0
        for _ in range(_MAX_PIECES):
            self._received(data[start:end])
            start = end
            messages = self._messages
            if (
                (messages and type(messages[-1][0]) is _ErrInfo)
                or self._close
                or (self._force_close or self.transport is None)
            ):
                self._fail_body()
                return  # what follows a bad request is not parsed
            if messages and not messages[-1][1].is_eof():
                last = messages[-1][0]
                if type(last) is RawRequestMessage and not last.chunked:
                    break  # a body of known length follows: the rest in one piece
            end = data.find(b"\r\n\r\n", start) + 4
            if end < 4:
                break
        if start < len(data):
            self._received(data[start:])
        self._fail_body()

    def _fail_body(self) -> None:
        """After a parse error: the body of the request being handled, if unfinished,
        fails. aiohttp drops it without a word (3.14), and the forwarder waited for the
        rest of a body that would never come (a chunk extension aiohttp's parser
        rejects, ``3; a=1``, hung the client and the geode until the idle timeout)."""
        messages = self._messages
        if not messages or type(messages[-1][0]) is not _ErrInfo:
            return
        if len(messages) > 1 and not messages[-2][1].is_eof():
            # Its body broke off before the request was taken up: the 400 answers it,
            # and no geode sees any of it.
            del messages[-2]
            return
        request = self._current_request
        if request is not None and not request.content.is_eof():
            exc = messages[-1][0].exc
            request.content.set_exception(
                RequestPayloadError(_BAD_REQUEST.get(type(exc), "malformed request"))
            )

    def _received(self, data: bytes) -> None:
        """Parse one piece."""
        chunked = self._chunked
        if chunked is not None and chunked.is_eof():
            # The chunked request before ended at the end of what was parsed so far: the
            # next is parsed by a fresh parser (its trailer, pending in the old one, is
            # never anybody's header).
            self._chunked = None
            self._parser = self._new_parser()
        walk = self._walk
        if walk is not None:  # a chunked body: its chunk-size lines as aiohttp takes them
            data = walk.feed(data)
            if walk.done:
                self._walk = None
        self._parse(data)

    def _parse(self, data: bytes) -> None:
        """aiohttp's parsing of what came in; the requests it queues are looked at for a
        chunked one."""
        queued = len(self._messages)
        super().data_received(data)
        if len(self._messages) > queued:
            self._note_chunked(queued)

    def _note_chunked(self, first: int) -> None:
        """Note the last chunked request among those queued from ``first`` on (see
        ``_received``). One that ended in the same piece as a request after it (more
        blank lines in its body than ``_pieces`` splits at) may have handed that request
        its trailer: those after it are dropped, and the connection closes once it is
        answered; the client sends them again (RFC 9112 9.3.2)."""
        messages = self._messages
        for index in range(first, len(messages)):
            message, payload = messages[index]
            if type(message) is RawRequestMessage and message.chunked:
                if payload.is_eof() and index + 1 < len(messages):
                    while len(messages) > index + 1:
                        messages.pop()
                    self.close()
                    return
                self._chunked = payload
                if not payload.total_bytes:  # its body is all to come: walk it (chunks.py)
                    self._walk = ChunkedBody()

    def _new_parser(self) -> HttpRequestParser:
        """A request parser as ``RequestHandler.__init__`` builds one."""
        return HttpRequestParser(
            self,
            self._loop,
            self._read_bufsize,
            max_line_size=self.max_line_size,
            max_field_size=self.max_field_size,
            max_headers=self.max_headers,
            payload_exception=RequestPayloadError,
            auto_decompress=self._auto_decompress,
            max_msg_queue_size=self._max_msg_queue_size,
        )

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """geoproxy's JSON error for a request aiohttp could not parse (or a bug): what
        was wrong in a few words, never the client's bytes echoed back, and one log line
        without a traceback for a client's mistake."""
        if status >= 500:
            return super().handle_error(request, status, exc, message)
        if request.writer.output_size > 0:
            raise ConnectionError("an answer is under way: no error answer can follow")
        what = _BAD_REQUEST.get(type(exc), "malformed request") if exc else "malformed request"
        log.info(
            "rejected malformed request from %s: %s (%s)",
            request.remote,
            what,
            message.splitlines()[0][:120] if message else type(exc).__name__,
        )
        resp = json_error(status, "bad_request", what)
        resp.force_close()
        return resp
