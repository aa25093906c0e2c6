"""A connection to a geode, and the pool of idle ones.

``Connection`` is aiohttp's own client protocol (``ResponseHandler``, what
``ClientSession`` uses underneath) with aiohttp's C response parser, made cheaper per
request (the parser kept between clean messages, one lazily re-armed read timer) and set
right where aiohttp 3.14 is wrong (a 204/304 followed by stray bytes, trailers carried into
the next answer); it reads a chunked answer's trailers. ``watcher``, when set, is called
after every event on the connection: the fast lane waits for answers that way, from
callbacks; ``whole``, when set, is offered an answer's first bytes before the parser
sees them, and may take the answer whole (``fastexchange.KNOWN``). ``Pool`` keeps idle
keep-alive connections per geode.

``ResponseHandler.set_response_params`` is semi-private aiohttp API (stable across 3.x),
and ``Connection`` overrides the handler's private read-timer hooks (``_reschedule_timeout``,
``_drop_timeout``) and keeps its ``_parser``: proxy/compat.py probes them at start-up, and
tests/test_upstream.py and tests/test_forwarding.py exercise every path through them.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import deque
from collections.abc import Callable, Iterable

from aiohttp.client_proto import ResponseHandler
from aiohttp.http_parser import RawResponseMessage
from aiohttp.streams import StreamReader

from geoproxy.config.values import Geode

READ_BUFSIZE = 2**16
_NO_BODY_STATUSES = (b"204", b"304")  # as they stand in a status line, at [9:12]
#: How many of a chunked answer's last bytes are kept for its trailers (RFC 9112 7.1.2).
_TRAILER_ROOM = 8192
_LAST_CHUNK = re.compile(rb"0+[ \t]*(?:;.*)?").fullmatch


class Connection(ResponseHandler):
    """aiohttp's response protocol, counting the bytes received since the last request
    went out (a failure before the first one means the geode never answered it), with two
    per-request costs taken off the hot path:

    - the response parser is kept for the next request when it stands clean between two
      messages (aiohttp builds a new one per request);
    - the read timeout is one lazily re-armed timer per connection: activity moves a
      deadline, and the timer, when it fires, either times out or re-arms for the deadline
      (aiohttp cancels and schedules a timer per request and per chunk received). The
      semantics are aiohttp's: ``read_timeout`` seconds of silence from the last byte (or
      the last ``start_timeout()``), none once the body is complete.
    """

    __slots__ = (
        "_deadline",
        "_last",
        "_parser_reusable",
        "_tail_of_chunked",
        "_timer_at",
        "_timer_handle",
        "received",
        "watcher",
        "whole",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.received = 0
        self._deadline: float | None = None  # when silence becomes a timeout; None: off
        self._timer_at = 0.0  # when the armed timer fires
        self._timer_handle: asyncio.TimerHandle | None = None
        self._parser_reusable = False  # the parser reads bodies (was not built for a HEAD)
        self._last = b""  # the last bytes read
        # The last bytes of a chunked answer being read (its trailers are in them).
        self._tail_of_chunked: bytes | None = None
        # Called after every event (bytes, the read timeout, the connection lost) while the
        # fast lane waits for an answer from callbacks instead of a coroutine.
        self.watcher: Callable[[], None] | None = None
        # Offered the first bytes of an answer: True when it took the answer whole from
        # them (a head it knows, and the whole body), so the parser never sees them.
        self.whole: Callable[[bytes], bool] | None = None

    def data_received(self, data: bytes) -> None:
        if self.whole is not None and not self.received and self.whole(data):
            return
        self._last = data
        if self._tail_of_chunked is not None:
            self._tail_of_chunked = (self._tail_of_chunked + data)[-_TRAILER_ROOM:]
        if not self.received and (self._skip_payload or data[9:12] in _NO_BODY_STATUSES):
            # The first bytes of an answer that has no body (to a HEAD, a 204 or 304):
            # its head alone first. aiohttp's parser takes bytes after it as the start of
            # another response and, failing on them, raises before handing back the
            # answer it parsed: the client got a 502 for a geode's 204. This way the
            # answer is queued, and what follows only ends the connection.
            end = data.find(b"\r\n\r\n") + 4
            if 3 < end < len(data):
                self.received = end
                super().data_received(data[:end])
                data = data[end:]
        self.received += len(data)
        super().data_received(data)
        if self.watcher is not None:
            self.watcher()

    def resume_reading(self, resume_parser: bool = True) -> None:
        # aiohttp's StreamReader calls this after every read below its low-water mark,
        # paused or not, and each call feeds the parser an empty chunk (measured: a
        # second data_received per request). Nothing is held back unless paused.
        if self._reading_paused or self._buffer_paused:
            super().resume_reading(resume_parser)

    def took_whole(self, data: bytes) -> None:
        """``whole`` took an answer from ``data`` without the parser: note what reading
        it would have (the bytes received, the read timer stopped: the body is
        complete). The parser stands clean between two messages, as it stood before the
        answer came."""
        self.received = len(data)
        self._last = data
        self._drop_timeout()

    @property
    def last(self) -> bytes:
        """The last bytes read."""
        return self._last

    def watch(self, watcher: Callable[[], None], whole: Callable[[bytes], bool]) -> None:
        self.watcher, self.whole = watcher, whole

    def unwatch(self) -> None:
        self.watcher = self.whole = None

    def answer(self) -> tuple[RawResponseMessage, StreamReader] | None:
        """The response (head parsed) to the request sent, without waiting: None while
        its head is incomplete or when an error (see ``failed``) ended the exchange."""
        return self._buffer[0][0] if self._buffer else None

    @property
    def failed(self) -> bool:
        """The exchange ended in an error (timeout, lost connection, malformed answer)
        that ``read()`` raises."""
        return self._exception is not None

    def take_answer(self) -> None:
        """Drop the answer ``answer()`` returned: the fast lane finished it."""
        self._buffer.popleft()

    def expect_response(self, head_request: bool, read_timeout: float) -> None:
        """Make ready for the response to a request about to be sent."""
        if not head_request and self._parser_reusable and self._parser_is_clean():
            self._skip_payload = False
            self._read_timeout = read_timeout
            return
        self.set_response_params(
            skip_payload=head_request,
            read_until_eof=True,
            auto_decompress=False,
            read_timeout=read_timeout,
            read_bufsize=READ_BUFSIZE,
        )
        self._parser_reusable = not head_request

    def watch_trailers(self) -> None:
        """A chunked answer's head was parsed: keep its last bytes, to read its trailers
        from when it ends (``trailers``)."""
        self._tail_of_chunked = self._last[-_TRAILER_ROOM:]

    def trailers(self) -> bytes:
        """The trailer lines of the chunked answer just read whole ("Name: value\r\n"
        each), as the geode sent them; b"" when it had none, or more than fit in what
        was kept. aiohttp's parser reads trailers but hands them to nobody (3.14), so
        they are read here from the raw bytes: after the last chunk ("0", maybe with an
        extension), up to the blank line."""
        tail, self._tail_of_chunked = self._tail_of_chunked, None
        if not tail or not tail.endswith(b"\r\n\r\n"):
            return b""
        lines = tail[:-4].split(b"\r\n")
        for index in range(len(lines) - 1, -1, -1):
            if _LAST_CHUNK(lines[index]):  # no trailer line can look like one (no ":")
                found = lines[index + 1 :]
                return b"".join(line + b"\r\n" for line in found)
        return b""

    def forget_parser(self) -> None:
        """The next response gets a fresh parser. Called after a chunked response:
        aiohttp's C parser (3.14) keeps the last trailer field of a chunked message
        pending and adds it to the headers of the next message it parses, so a geode's
        trailer (``X-Checksum: 1`` after the last chunk) would become a header of the next
        answer on this connection, to another client. Trailers are dropped, as RFC 9112
        7.1.2 allows a recipient that removes the chunked coding to."""
        self._parser_reusable = False

    def _parser_is_clean(self) -> bool:
        # Between two messages the parser holds no payload and has not started a message:
        # then feed_eof() is a no-op returning None. Bytes the geode sent after the last
        # response make it return (or raise): the parser is left for a fresh one, as
        # aiohttp always does.
        parser = self._parser
        if parser is None:
            return False
        try:
            return parser.feed_eof() is None
        except Exception:
            return False

    def _reschedule_timeout(self) -> None:
        timeout = self._read_timeout
        if not timeout:
            self._deadline = None
            return
        deadline = self._loop.time() + timeout
        self._deadline = deadline
        handle = self._timer_handle
        if handle is None or self._timer_at > deadline:  # none armed, or armed too late
            if handle is not None:
                handle.cancel()
            self._timer_at = deadline
            self._timer_handle = self._loop.call_at(deadline, self._on_timer)

    def _drop_timeout(self) -> None:
        self._deadline = None  # the armed timer, if any, finds nothing to do

    def _on_timer(self) -> None:
        self._timer_handle = None
        deadline = self._deadline
        if deadline is None:
            return
        if self._loop.time() >= deadline:
            self._deadline = None
            self._on_read_timeout()
            if self.watcher is not None:
                self.watcher()
        else:  # activity since it was armed: wait for the deadline it moved to
            self._timer_at = deadline
            self._timer_handle = self._loop.call_at(deadline, self._on_timer)

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        if self._timer_handle is not None:
            self._timer_handle.cancel()
            self._timer_handle = None
        if self.watcher is not None:
            self.watcher()


class Pool:
    """Idle keep-alive connections per geode, closed after ``keepalive_timeout`` (by
    ``sweep``, which the app runs periodically, or when next looked at)."""

    def __init__(self, keepalive_timeout: float) -> None:
        self.keepalive_timeout = keepalive_timeout
        self._idle: dict[str, deque[tuple[Connection, float]]] = {}

    def get(self, geode: Geode) -> Connection | None:
        idle = self._idle.get(geode.pool_key)
        now = time.monotonic()
        while idle:
            proto, since = idle.pop()  # most recently used first: the warmest
            if (
                proto.is_connected()
                and not proto.should_close
                and now - since < (self.keepalive_timeout)
            ):
                return proto
            proto.close()
        return None

    def put(self, geode: Geode, proto: Connection) -> None:
        if not proto.is_connected() or proto.should_close:
            proto.close()
            return
        self.put_clean(geode, proto)

    def put_clean(self, geode: Geode, proto: Connection) -> None:
        """``put`` for a connection known to be open and clean: its answer was read whole
        and the geode did not ask to close."""
        idle = self._idle.setdefault(geode.pool_key, deque())
        now = time.monotonic()
        while idle and now - idle[0][1] >= self.keepalive_timeout:
            idle.popleft()[0].close()  # the oldest have idled too long
        idle.append((proto, now))

    def sweep(self, live: Iterable[Geode]) -> None:
        """Close idle connections that idled too long, or that belong to geodes no longer
        configured (a reload can return one to the pool after it dropped that geode)."""
        keep = {g.pool_key for g in live}
        now = time.monotonic()
        for key in list(self._idle):
            idle = self._idle[key]
            if key not in keep:
                for proto, _ in self._idle.pop(key):
                    proto.close()
                continue
            while idle and now - idle[0][1] >= self.keepalive_timeout:
                idle.popleft()[0].close()
            if not idle:
                del self._idle[key]

    def close(self, geodes: Iterable[Geode] | None = None) -> None:
        """Close idle connections (of the given geodes, or all)."""
        keys = [g.pool_key for g in geodes] if geodes is not None else list(self._idle)
        for key in keys:
            for proto, _ in self._idle.pop(key, ()):
                proto.close()
