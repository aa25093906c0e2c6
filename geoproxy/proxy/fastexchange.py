"""The geode side of a fast-lane request: the head sent on a pooled (or new)
connection, and the answer taken from that connection's callbacks (``Connection.watcher``)
when the fast lane may finish it, or the exchange handed to the coroutine path as it
stands. The client side is ``fastlane.ProxyConnection``; this module knows it only as a
``Client``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

from aiohttp.http import HttpVersion11, RawRequestMessage

from geoproxy.config.values import Geode
from geoproxy.errors import ConnectFailed
from geoproxy.health.load import Ticket
from geoproxy.proxy import upstream
from geoproxy.proxy.connection import Connection, Pool
from geoproxy.proxy.headers import ResponseHead, response_head
from geoproxy.proxy.policy import answer_lines, answered, fast_lane_finishes
from geoproxy.proxy.prelude import Route
from geoproxy.proxy.responses import whole_head
from geoproxy.routing.router import Candidate

log = logging.getLogger("geoproxy.fastlane")


class Client(Protocol):
    """What a fast exchange needs of the client connection it serves."""

    def serving(self, fast: FastExchange) -> bool:
        """``fast`` is still the connection's exchange (the client did not go away)."""
        ...

    def keeps_alive(self, message: RawRequestMessage) -> bool: ...

    def answer(
        self, fast: FastExchange, status: int, head: bytes, body: bytes, keep_alive: bool
    ) -> None: ...

    def hand_over(self, fast: FastExchange) -> None: ...


_ANSWER_HEADS: dict[tuple[object, ...], bytes] = {}


def answer_head(
    route: Route, out: ResponseHead, status: int, reason: str, geode: Geode, keep_alive: bool
) -> bytes:
    """The head of a whole answer as it goes to the client, blank line included
    (``policy.answer_lines``, then the framing). The same bytes for the same ``out``
    (``response_head`` hands back one per set of header lines), Via, HSTS line and geode,
    so kept for the next answer; but not when the geode sent no Date (this second's is
    added) or named its user's home region (the Set-Cookie is the request's own)."""
    key = (out, status, reason, route.via, route.hsts, geode.name, geode.region, keep_alive)
    head = _ANSWER_HEADS.get(key)
    if head is None:
        lines = answer_lines(route, out, geode)
        length = out.length or 0  # fast_lane_finishes: a Content-Length was given
        parts = whole_head(HttpVersion11, status, reason, lines, out.date, length, keep_alive)
        parts.append(b"\r\n")
        head = b"".join(parts)
        if out.date and out.home is None:
            if len(_ANSWER_HEADS) >= 256:  # bounded: old heads (their Date) go in a lump
                _ANSWER_HEADS.clear()
            _ANSWER_HEADS[key] = head
    return head


#: Answer heads aiohttp's parser read and the fast lane finished, as the geode sent them
#: (Date line and all), with what the parser made of them: (status, reason, should_close,
#: ResponseHead). The same bytes parse the same way, and a geode sends the same head
#: answer after answer but for its Date, which moves once a second: an answer whose head
#: is here, with its whole body in the same read, is taken without the parser
#: (``FastExchange.on_whole``). A geode whose heads differ every time (a request id echoed
#: back, a fresh cookie) is parsed every time. Bounded, cleared in a lump when full.
KNOWN: dict[bytes, tuple[int, str, bool, ResponseHead]] = {}
KNOWN_HEAD_MAX = 2048  # longer heads are not kept
_KNOWN_ENTRIES = 256


def know(data: bytes, status: int, reason: str, should_close: bool, out: ResponseHead) -> None:
    """Keep the head of an answer the parser read whole from ``data`` (one read: the head
    and the ``out.length`` bytes of its body, nothing after them)."""
    end = data.find(b"\r\n\r\n") + 4
    if 3 < end <= KNOWN_HEAD_MAX and len(data) - end == out.length:
        if len(KNOWN) >= _KNOWN_ENTRIES:
            KNOWN.clear()
        KNOWN[data[:end]] = (status, reason, should_close, out)


class FastExchange:
    """One request on the fast lane, from its head to the answer (or the hand-over)."""

    __slots__ = (
        "cand",
        "conn",
        "connecting",
        "deadline",
        "failure",
        "message",
        "out",
        "pool",
        "pooled",
        "proto",
        "response_timeout",
        "resumed",
        "route",
        "start",
        "task",
        "ticket",
        "wire",
        "written",
    )

    def __init__(
        self,
        conn: Client,
        message: RawRequestMessage,
        route: Route,
        wire: bytes,
        pool: Pool,
        start: float,
        deadline: float,
        response_timeout: float,
        ticket: Ticket,
    ) -> None:
        self.conn, self.message, self.route, self.wire = conn, message, route, wire
        self.pool = pool
        self.cand: Candidate = route.cands[0]
        # Counted in flight, at the geode, until the request ends on whichever path.
        self.ticket = ticket
        ticket.at(self.cand.geode.name)
        self.start = start  # time.perf_counter(), for the duration metric
        self.deadline = deadline  # time.monotonic(): no new attempt after it
        self.response_timeout = response_timeout
        self.proto: Connection | None = None  # the request goes out on it
        self.written = False  # ... and went out
        self.pooled = True  # proto came from the pool (a resend on the keep-alive race)
        self.failure: ConnectFailed | None = None  # no connection could be opened
        self.connecting: asyncio.Task[None] | None = None
        self.out: ResponseHead | None = None
        self.task: asyncio.Task[None] | None = None  # the coroutine path, once handed over
        self.resumed = False  # ... and once that task made the request its own

    def send(self, proto: Connection, pooled: bool) -> None:
        self.proto, self.pooled = proto, pooled
        upstream.write(proto, self.wire, False, self.response_timeout)
        self.written = True
        proto.watch(self.on_geode, self.on_whole)

    async def connect(self, connect_timeout: float) -> None:
        """Open a connection to the geode (no idle one in the pool), then send."""
        try:
            geode = self.cand.geode
            proto = await upstream.connect(geode, connect_timeout, self.route.rt.tls.get(geode))
        except ConnectFailed as exc:
            self.failure = exc
            self.conn.hand_over(self)
            return
        except Exception:  # a bug: the coroutine path connects and answers itself
            log.exception("fast lane: unexpected error; the coroutine path takes over")
            self.conn.hand_over(self)
            return
        finally:
            self.connecting = None
        if not self.conn.serving(self):  # the client went away meanwhile
            proto.close()
            return
        try:
            self.send(proto, pooled=False)
        except Exception:  # a bug: the coroutine path goes on (sends, or awaits the answer)
            log.exception("fast lane: unexpected error; the coroutine path takes over")
            if not self.written:  # it sends the request itself, on a connection of its own
                proto.close()
                self.proto = None
            self.conn.hand_over(self)

    def on_geode(self) -> None:
        """An event on the geode connection: finish, hand over, or wait for more.
        Everything that could fail runs before the answer is taken from the connection:
        until then the coroutine path can take over the exchange as it stands."""
        try:
            self._on_geode()
        except Exception:  # a bug: never leave the client waiting for nothing
            log.exception("fast lane: unexpected error; the coroutine path takes over")
            if self.conn.serving(self) and self.task is None:
                self.conn.hand_over(self)

    def on_whole(self, data: bytes) -> bool:
        """The first bytes of the answer, before the parser sees them: True when they
        are a head this process has seen aiohttp's parser read (``KNOWN``) and the whole
        body it announces, and the answer went to the client from them."""
        end = data.find(b"\r\n\r\n") + 4
        if end < 4 or end > KNOWN_HEAD_MAX:
            return False
        known = KNOWN.get(data[:end])
        if known is None or len(data) - end != known[3].length:
            return False
        try:
            status, reason, should_close, out = known
            self.out = out
            self._arrived(out)
            proto = self.proto
            assert proto is not None  # offered only once sent
            keep_alive = self.conn.keeps_alive(self.message)
            head = answer_head(self.route, out, status, reason, self.cand.geode, keep_alive)
        except Exception:  # a bug: the parser reads the answer, as it would have
            log.exception("fast lane: unexpected error; the parser reads the answer")
            return False
        proto.unwatch()
        proto.took_whole(data)
        body = data[end:] if out.length else b""
        self._finish(proto, status, head, body, should_close, keep_alive)
        return True

    def _arrived(self, out: ResponseHead) -> None:
        """The answer's head arrived: the geode's latency and load report are noted."""
        load = self.route.rt.load
        name = self.cand.geode.name
        if name in load.timed:
            load.latency(name, time.perf_counter() - self.start)
        if out.load is not None:
            load.report(name, out.load)

    def _on_geode(self) -> None:
        proto = self.proto
        assert proto is not None  # watched only once sent
        answer = proto.answer()
        if answer is None:
            if proto.failed or proto.transport is None:
                self.conn.hand_over(self)
            return
        message, payload = answer
        status = message.code
        out = self.out
        if out is None:
            out = self.out = response_head(message.raw_headers, message.reason)
            self._arrived(out)
            if not fast_lane_finishes(status, out):
                self.conn.hand_over(self)
                return
        if not payload.is_eof():
            if proto.failed:
                self.conn.hand_over(self)
            return
        if payload.exception() is not None or payload.total_bytes != out.length:
            self.conn.hand_over(self)
            return
        keep_alive = self.conn.keeps_alive(self.message)
        head = answer_head(self.route, out, status, message.reason, self.cand.geode, keep_alive)
        if len(proto.last) == proto.received:  # the answer came in one read
            know(proto.last, status, message.reason, message.should_close, out)
        # The answer is taken: from here on, nothing that can fail.
        proto.unwatch()
        proto.take_answer()
        # The whole body, as read_nowait() would join it, without its per-read work (a
        # timer check, resuming a transport that is not paused).
        body = b"".join(payload._buffer) if out.length else b""
        self._finish(proto, status, head, body, message.should_close, keep_alive)

    def _finish(
        self,
        proto: Connection,
        status: int,
        head: bytes,
        body: bytes,
        should_close: bool,
        keep_alive: bool,
    ) -> None:
        """The answer, taken from the geode connection, goes to the client."""
        geode = self.cand.geode
        route = self.route
        if should_close:
            proto.close()
        else:  # the body is complete: the connection stands clean between two messages
            self.pool.put_clean(geode, proto)
        route.rt.board.observe(geode.name, True)
        trace = route.trace
        answered(trace, geode, self.cand.decision)
        trace.body_bytes = len(body)
        self.conn.answer(self, status, head, body, keep_alive)

    def abandon(self) -> None:
        """The client went away first: the geode's answer is of no use to anybody."""
        if self.connecting is not None:
            self.connecting.cancel()
        if self.proto is not None:
            self.proto.unwatch()
            self.proto.close()  # never back to the pool: an answer may be on its way
