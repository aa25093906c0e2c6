"""A lean HTTP/1.1 client for the hot path: bodiless requests to plain-HTTP geodes.

Profiling showed ~40% of a request's time in aiohttp's ``ClientSession`` layer (request
objects, header processing, cookies, tracing) though the work itself is small. This path
keeps aiohttp's own connection protocol and C response parser (``ResponseHandler``, the
same objects ``ClientSession`` uses underneath), writes the request head in one call, and
pools keep-alive connections per geode. Requests with a body, TLS geodes and WebSockets
stay on ``ClientSession``.

``ResponseHandler.set_response_params`` is semi-private aiohttp API (stable across 3.x),
and ``Connection`` overrides the handler's private read-timer hooks (``_reschedule_timeout``,
``_drop_timeout``) and keeps its ``_parser``; tests/test_forwarding.py and
tests/test_upstream.py exercise every path through them.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterable

from aiohttp.client_exceptions import ClientOSError, ServerDisconnectedError
from aiohttp.client_proto import ResponseHandler
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import RawResponseMessage
from aiohttp.streams import StreamReader

from geoproxy.config import Geode

_READ_BUFSIZE = 2**16


class ConnectFailed(OSError):
    """No connection could be opened to the geode (nothing was sent)."""


class BadResponse(Exception):
    """The geode's response head could not be parsed (or was a 101 nobody asked for)."""


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

    __slots__ = ("_deadline", "_parser_reusable", "_timer_at", "_timer_handle", "received",
                 "watcher")  # fmt: skip

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.received = 0
        self._deadline: float | None = None  # when silence becomes a timeout; None: off
        self._timer_at = 0.0  # when the armed timer fires
        self._timer_handle: asyncio.TimerHandle | None = None
        self._parser_reusable = False  # the parser reads bodies (was not built for a HEAD)
        # Called after every event (bytes, the read timeout, the connection lost) while the
        # fast lane waits for an answer from callbacks instead of a coroutine.
        self.watcher: Callable[[], None] | None = None

    def data_received(self, data: bytes) -> None:
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
            skip_payload=head_request, read_until_eof=True, auto_decompress=False,
            read_timeout=read_timeout, read_bufsize=_READ_BUFSIZE,
        )  # fmt: skip
        self._parser_reusable = not head_request

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
        idle = self._idle.get(geode.base)
        now = time.monotonic()
        while idle:
            proto, since = idle.pop()  # most recently used first: the warmest
            if proto.is_connected() and not proto.should_close and now - since < (
                self.keepalive_timeout
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
        idle = self._idle.setdefault(geode.base, deque())
        now = time.monotonic()
        while idle and now - idle[0][1] >= self.keepalive_timeout:
            idle.popleft()[0].close()  # the oldest have idled too long
        idle.append((proto, now))

    def sweep(self, live: Iterable[Geode]) -> None:
        """Close idle connections that idled too long, or that belong to geodes no longer
        configured (a reload can return one to the pool after it dropped that geode)."""
        keep = {g.base for g in live}
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
        keys = [g.base for g in geodes] if geodes is not None else list(self._idle)
        for key in keys:
            for proto, _ in self._idle.pop(key, ()):
                proto.close()


class Exchange:
    """One request/response on a pooled connection. ``release()`` returns a cleanly
    finished connection to the pool; ``close()`` discards it."""

    __slots__ = ("geode", "message", "payload", "pool", "proto")

    def __init__(
        self,
        pool: Pool,
        geode: Geode,
        proto: Connection,
        message: RawResponseMessage,
        payload: StreamReader,
    ) -> None:
        self.pool = pool
        self.geode = geode
        self.proto = proto
        self.message = message
        self.payload = payload

    def release(self) -> None:
        if self.payload.is_eof() and not self.message.should_close:
            self.pool.put(self.geode, self.proto)
        else:
            self.proto.close()

    def close(self) -> None:
        self.proto.close()


def write(proto: Connection, head: bytes, head_request: bool, response_timeout: float) -> None:
    """Send a request head on an open connection; the read timer starts."""
    proto.expect_response(head_request, response_timeout)
    proto.received = 0
    proto.transport.write(head)  # type: ignore[union-attr]  # open: the caller checked
    proto.start_timeout()


async def connect(geode: Geode, within: float) -> Connection:
    """A new connection to a geode (DNS included in ``within`` seconds)."""
    loop = asyncio.get_running_loop()
    host, port = geode.url.host or "", geode.url.port or 80
    try:
        async with asyncio.timeout(within):
            _, proto = await loop.create_connection(lambda: Connection(loop), host, port)
    except TimeoutError:
        raise ConnectFailed(f"connect timeout ({within:g}s) to {geode.url}") from None
    except OSError as exc:
        raise ConnectFailed(f"cannot connect to {geode.url}: {exc.strerror or exc}") from None
    except ValueError as exc:  # a host name the resolver rejects (a label over 63 bytes)
        raise ConnectFailed(f"cannot connect to {geode.url}: {exc}") from None
    return proto


async def send(
    pool: Pool,
    geode: Geode,
    head: bytes,
    method: str,
    connect_timeout: float,
    response_timeout: float,
    idempotent: bool,
    sent: Connection | None = None,
    sent_pooled: bool = True,
) -> Exchange:
    """Send a bodiless request head and wait for the response head. ``sent``: a
    connection the head went out on already (by the fast lane; ``sent_pooled``: one taken
    from the pool), whose answer is awaited.

    Raises ``ConnectFailed`` while connecting (nothing was sent), ``SocketTimeoutError``
    when the geode stays silent, ``ServerDisconnectedError``/``ClientOSError`` when the
    connection drops, ``BadResponse`` for a head that cannot be parsed. For an idempotent
    request, a pooled connection found closed by the geode before any response byte (the
    keep-alive race, RFC 9112 9.3.1) is replaced once by a fresh one. One coroutine for
    the whole exchange: this runs once per request.
    """
    if sent is not None:
        proto, may_resend = sent, idempotent and sent_pooled
    else:
        pooled = pool.get(geode)
        may_resend = idempotent and pooled is not None
        proto = pooled if pooled is not None else await connect(geode, connect_timeout)
    while True:
        transport = proto.transport
        if sent is not None:
            sent = None  # written already: its answer, or what ended it, is in the queue
        elif transport is not None and not transport.is_closing():
            write(proto, head, method == "HEAD", response_timeout)
        else:
            proto.close()
            if not may_resend:
                raise ServerDisconnectedError()
            may_resend = False
            proto = await connect(geode, connect_timeout)
            continue
        try:
            while True:
                message, payload = await proto.read()
                if message.code == 101:
                    raise BadResponse("101 Switching Protocols to a request that asked "
                                      "for none")  # fmt: skip
                if not 100 <= message.code < 200:
                    return Exchange(pool, geode, proto, message, payload)
                # An interim response (100, 103): aiohttp stops the read timer on it;
                # the final response must still come within response_timeout.
                proto.start_timeout()
        except HttpProcessingError as exc:
            proto.close()
            raise BadResponse(f"malformed response: {exc.message}") from None
        except (ServerDisconnectedError, ClientOSError):
            proto.close()
            if not (may_resend and proto.received == 0):
                raise
            # The pooled connection was closed or reset by the geode before any byte of
            # an answer: the keep-alive race (RFC 9112 9.3.1). Safe to send again, once,
            # on a new connection, for an idempotent request.
        except BaseException:
            proto.close()
            raise
        may_resend = False
        proto = await connect(geode, connect_timeout)
