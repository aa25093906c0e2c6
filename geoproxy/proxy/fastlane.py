"""The fast lane: the common request served from callbacks, without a task.

On the coroutine path aiohttp wakes the connection's task, starts a handler task, and
the handler suspends on the geode and resumes through its frames: about six loop
callbacks per request where a callback proxy needs two (bench/callback_proxy.py). Here
the client connection's ``data_received`` sends the request head on a geode
connection, and that connection's events (``connection.Connection.watcher``) write the
answer to the client.

A request takes the fast lane when ``forwarding.fast_lane`` is on and it is a GET over
HTTP/1.1 with no body, ``Upgrade`` or ``Expect``, on an idle connection (nothing queued,
not paused for writing; a new connection's first request too, which under uvloop arrives
before the connection task's first step), whose route is not one of geoproxy's own
answers and whose first candidate is a plain-HTTP geode (on a pooled connection, or a new
one). A connection that repeats its header lines reuses what they decided
(``Forwarder.prelude``) until they or the config change; one whose lines differ only in
values passed on as they came (cookies, request ids) gets a kept prelude renewed
(``prelude.Routing``). The fast lane finishes the
exchange itself only when the answer is final, not 502/503/504, not 204/304, with a
``Content-Length`` of at most 64 KiB that arrived whole, and a head that can be relayed.
Anything else (a timeout, a lost connection, a retry status, a body to stream, a malformed
answer) is handed to the coroutine path before any byte reached the client:
``Forwarder.resume`` awaits the same exchange, so failover, timeouts, streaming and error
answers have one implementation, and a geode never gets the request twice (but for the
keep-alive-race resend both paths allow).

Bytes that arrive while an exchange is in flight are held and parsed after it, so
pipelined answers stay in order. Metrics and the access log come from the same
``Observer.note``.

This leans on aiohttp's ``RequestHandler`` internals (aiohttp 3.14): the connection task's
``_waiter`` and ``_messages`` queue, ``_parser.message_consumed``, the keep-alive timer
(``_process_keepalive``, ``_next_keepalive_close_time``), ``_request_in_progress`` and
``_handler_waiter`` (what ``shutdown()`` drains), ``_request_factory`` and
``_handle_request``. tests/test_fastlane.py pins each.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiohttp import web
from aiohttp.http import HttpVersion11, RawRequestMessage, StreamWriter
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import EMPTY_PAYLOAD
from aiohttp.web_protocol import RequestHandler, _ErrInfo
from yarl import URL

from geoproxy.health.load import Ticket
from geoproxy.proxy.fastexchange import FastExchange
from geoproxy.proxy.forwarder import Begun, Forwarder
from geoproxy.proxy.headers import RawHeaders
from geoproxy.proxy.policy import origin_form
from geoproxy.proxy.prelude import Prelude, Route, host_for, refusal, request_wire
from geoproxy.proxy.protocol import ServerConnection
from geoproxy.proxy.trace import CLIENT_CLOSED, Trace
from geoproxy.routing.runtime import Runtime

log = logging.getLogger("geoproxy.fastlane")

#: Bytes held while an exchange is in flight before reading from the client pauses.
HOLD_LIMIT = 64 * 1024


class _Counter(Protocol):
    def inc(self, *labels: str, amount: float = 1.0) -> None: ...


class _Metrics(Protocol):
    @property
    def fast_lane(self) -> _Counter: ...


class _Observer(Protocol):
    def observe(
        self,
        request: web.BaseRequest,
        work: Awaitable[web.StreamResponse],
        start: float,
        ticket: Ticket | None = None,
    ) -> Awaitable[web.StreamResponse]: ...

    def note(
        self,
        trace: Trace,
        status: int,
        duration: float,
        method: str,
        url: URL,
        remote: str | None,
        size: int,
    ) -> None: ...


class Host(Protocol):
    """What the fast lane needs of the process that serves it (``app.Gateway``): the
    forwarder, the head-timeout hook, the observer (metrics and the access log) and the
    fast lane's own counter. A protocol, so that the proxy stage imports nothing of the
    surfaces or the process."""

    @property
    def forwarder(self) -> Forwarder | None: ...

    @property
    def on_request(self) -> Callable[[object], None] | None: ...

    @property
    def observer(self) -> _Observer: ...

    @property
    def metrics(self) -> _Metrics: ...

    def proxy_handler(self) -> Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]: ...


class ProxyServer(web.Server):
    """aiohttp's low-level server, whose connections take the fast lane."""

    def __init__(self, gateway: Host, **kwargs: Any) -> None:
        super().__init__(gateway.proxy_handler(), **kwargs)
        self.gateway = gateway

    def __call__(self) -> RequestHandler:
        return ProxyConnection(self, loop=self._loop, **self._kwargs)


class ProxyConnection(ServerConnection):
    """geoproxy's server protocol (``protocol.py``), serving eligible requests on the
    fast lane."""

    __slots__ = (
        "_began",
        "_fast",
        "_gateway",
        "_held",
        "_memo",
        "_noted",
        "_remote",
        "_scheme",
    )

    def __init__(self, manager: ProxyServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._gateway = manager.gateway
        self._fast: FastExchange | None = None
        self._held = b""
        self._began = False  # the connection task has taken its first step (start())
        self._noted = False  # the head-timeout hook was told
        self._remote: str | None = None  # the peer's address, as request.remote gives it
        self._scheme = "http"  # "https" over TLS, as request.scheme gives it
        # The last request's header lines and what they decided (Forwarder.prelude).
        self._memo: tuple[Runtime, RawHeaders, Prelude] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = self.peername
        self._remote = str(peer[0]) if isinstance(peer, (list, tuple)) else None
        if transport.get_extra_info("sslcontext") is not None:
            self._scheme = "https"

    async def start(self) -> None:
        self._began = True
        await super().start()

    # -- the client side ------------------------------------------------------------------

    def _received(self, data: bytes) -> None:
        if self._fast is not None:  # answers go out in order: parse after this exchange
            self._held += data
            if len(self._held) >= HOLD_LIMIT and not self._buffer_paused:
                self._pause_reading_for_buffer()
            return
        super()._received(data)

    def _parse(self, data: bytes) -> None:
        waiter = self._waiter
        parser = self._parser
        if (
            # Idle: the connection task waits for a request, or has not run yet (under
            # uvloop a new connection's first request arrives before the task's first
            # step: every request of a client without keep-alive). Else it is busy:
            # aiohttp's path.
            (waiter.done() if waiter is not None else self._began)
            or self._messages
            or not data
            or parser is None
            or self._upgraded
            or self._payload_parser is not None
            or self._close
            or self._force_close
        ):
            super()._parse(data)
            return
        # The connection is idle: parse here as RequestHandler.data_received does, so that
        # a lone eligible request takes the fast lane without waking the connection task.
        try:
            messages, upgraded, tail = parser.feed_data(data)
        except HttpProcessingError as exc:
            messages = [(_ErrInfo(status=400, exc=exc, message=exc.message), EMPTY_PAYLOAD)]
            upgraded, tail = False, b""
        self._request_count += len(messages)
        if len(messages) == 1 and not upgraded and self._try_begin(*messages[0]):
            parser.message_consumed()
            return
        self._messages.extend(messages)
        if messages:
            self._note_chunked(len(self._messages) - len(messages))
            if waiter is not None:  # else the task finds them when it starts
                waiter.set_result(None)
        if not self._buffer_paused and len(self._messages) >= self._max_msg_queue_size:
            self._pause_reading_for_buffer()  # as aiohttp: start() resumes as it drains
        self._upgraded = upgraded
        if upgraded and tail:
            self._message_tail = tail

    def _try_begin(self, message: Any, payload: Any) -> bool:
        try:
            return self._begin(message, payload)
        except Exception:  # a bug: the coroutine path answers (a 500 at worst)
            log.exception("fast lane: unexpected error; the coroutine path takes over")
            fast = self._fast
            if fast is None:
                return False  # nothing began: the connection task gets the request
            if fast.written:  # the geode has it: the coroutine path awaits the answer
                self.hand_over(fast)
                return True
            fast.abandon()  # undo what began; its geode connection is closed
            self._fast = None
            self._request_in_progress = False
            fast.ticket.release()
            return False

    def _begin(self, message: Any, payload: Any) -> bool:
        """Send ``message`` on the fast lane if it is eligible; False leaves it to the
        connection task."""
        if (
            type(message) is not RawRequestMessage  # a parse error to answer
            or message.method != "GET"
            or payload is not EMPTY_PAYLOAD
            or message.version != HttpVersion11
            or message.upgrade
            or self._paused
            or self._close
            or self._force_close
        ):
            return False
        headers = message.headers
        path = message.path
        if "Upgrade" in headers or "Expect" in headers or not origin_form(path):
            return False
        gateway = self._gateway
        forwarder = gateway.forwarder
        if forwarder is None:
            return False
        rt = forwarder.runtime
        fwd = rt.topology.config.forwarding
        if not fwd.fast_lane:
            return False
        if refusal(rt, "GET", path) is not None:
            return False  # geoproxy's own answer: the coroutine path writes it
        start = time.perf_counter()
        raw = message.raw_headers
        memo = self._memo
        if memo is not None and memo[0] is rt and memo[1] == raw:
            prelude = memo[2]  # a client repeating its headers on a kept-alive connection
        else:
            found = forwarder.prelude(rt, raw, headers, self._remote, None, self._scheme)
            if not isinstance(found, Prelude):
                return False  # geoproxy's own answer: the coroutine path writes it
            prelude = found
            self._memo = (rt, raw, prelude)
        route = forwarder.routed(rt, prelude, Trace(), path)
        if not isinstance(route, Route):
            return False  # geoproxy's own answer: the coroutine path writes it
        geode = route.trace.trying = route.cands[0].geode
        if geode.url.scheme != "http":
            return False
        if not self._noted:  # the head timeout: this connection sent a request head
            self._noted = True
            hook = gateway.on_request
            if hook is not None:
                hook(self)
        wire = request_wire(
            "GET", geode, path, host_for(fwd, route.head, geode), route.head, route.forwarded
        )
        pool = forwarder.pool
        fast = FastExchange(
            self,
            message,
            route,
            wire,
            pool,
            start,
            time.monotonic() + fwd.failover_timeout,
            fwd.response_timeout,
            rt.load.ticket(),
        )
        self._fast = fast
        self._request_in_progress = True  # shutdown() waits for it
        proto = pool.get(geode)
        if proto is not None:
            fast.proto = proto  # first: an undo closes it
            fast.send(proto, pooled=True)
        else:  # a new connection: one task, for this request only
            fast.connecting = self._loop.create_task(fast.connect(fwd.connect_timeout))
        return True

    def serving(self, fast: FastExchange) -> bool:
        return self._fast is fast

    def keeps_alive(self, message: RawRequestMessage) -> bool:
        """The connection stays open after this request's answer."""
        return not (message.should_close or self._close or self._force_close)

    def answer(
        self, fast: FastExchange, status: int, head: bytes, body: bytes, keep_alive: bool
    ) -> None:
        """Write the geode's answer (``head``: with the blank line that ends it), note the
        request, and go on with the connection."""
        transport = self.transport
        if transport is None:  # closed by a shutdown a moment ago; connection_lost is due
            self._gateway.metrics.fast_lane.inc("client_closed")
            self._done(fast, CLIENT_CLOSED)
            self._next(False)
            return
        if len(body) > 4096:  # one vectored write, without copying the body once more
            transport.writelines((head, body))
        else:
            transport.write(head + body)
        self._gateway.metrics.fast_lane.inc("answered")
        self._done(fast, status)
        self._next(keep_alive)

    def _done(self, fast: FastExchange, status: int) -> None:
        self._fast = None
        self._request_in_progress = False
        if self._handler_waiter is not None and not self._handler_waiter.done():
            self._handler_waiter.set_result(None)  # a shutdown() waits for this request
        fast.ticket.release()
        observer = self._gateway.observer
        trace = fast.route.trace
        observer.note(
            trace,
            status,
            time.perf_counter() - fast.start,
            "GET",
            fast.message.url,
            self._remote,
            trace.body_bytes,
        )

    def _next(self, keep_alive: bool) -> None:
        """After an exchange: close, or re-arm the keep-alive timer and parse what came
        in meanwhile (as the connection task does after each request)."""
        if not keep_alive or self._close or self._force_close:
            self._held = b""
            self.force_close()
            return
        if self._keepalive_timeout > 0:
            self._arm_keepalive()
        held, self._held = self._held, b""
        if self._buffer_paused and not self._messages:
            self._resume_reading_for_buffer()
        if held:
            self.data_received(held)

    def _arm_keepalive(self) -> None:
        """An idle connection closes ``keepalive_timeout`` from now (as the connection
        task arms it after each request)."""
        self._next_keepalive_close_time = self._loop.time() + self._keepalive_timeout
        if self._keepalive_handle is None:
            self._keepalive_handle = self._loop.call_at(
                self._next_keepalive_close_time, self._process_keepalive
            )

    def _process_keepalive(self) -> None:
        if self._fast is not None:  # not idle: an exchange is in flight
            self._keepalive_handle = None
            self._arm_keepalive()
            return
        super()._process_keepalive()

    def connection_lost(self, exc: BaseException | None) -> None:
        fast = self._fast
        cancel = self._manager is not None and self._manager.handler_cancellation
        super().connection_lost(exc)
        self._held = b""
        if fast is None:
            return
        if fast.resumed:
            if cancel:  # as aiohttp cancels its handler task: the exchange with it
                fast.task.cancel()  # type: ignore[union-attr]  # resumed: it has a task
            return
        if fast.task is not None:  # handed over, but its task has not run yet
            fast.task.cancel()
        else:
            self._gateway.metrics.fast_lane.inc("client_closed")
        fast.abandon()
        self._done(fast, CLIENT_CLOSED)

    # -- the hand-over --------------------------------------------------------------------

    def hand_over(self, fast: FastExchange) -> None:
        """The coroutine path takes the exchange over: ``Forwarder.resume``, run as the
        connection task runs a request (``_handle_request``), in a task of its own."""
        if fast.proto is not None:
            fast.proto.unwatch()
        self._gateway.metrics.fast_lane.inc("handed_over")
        fast.task = self._loop.create_task(self._resume(fast))

    async def _resume(self, fast: FastExchange) -> None:
        forwarder = self._gateway.forwarder
        factory = self._request_factory
        assert factory is not None and forwarder is not None  # else connection_lost ran
        fast.resumed = True  # connection_lost would not let this task start otherwise
        loop = self._loop
        task = asyncio.current_task()
        assert task is not None
        request = factory(fast.message, EMPTY_PAYLOAD, self, StreamWriter(self, loop), task)
        begun = Begun(fast.proto if fast.failure is None else None, fast.pooled, fast.failure)
        work = self._gateway.observer.observe(
            request,
            forwarder.resume(request, fast.route, begun, fast.deadline),
            fast.start,
            fast.ticket,  # the request stays counted as it was
        )
        keep_alive = False
        try:
            resp, reset = await self._handle_request(request, None, lambda _: work)
            keep_alive = not reset and bool(resp.keep_alive)
        except asyncio.CancelledError:
            self.force_close()
            raise
        except Exception as exc:
            self.log_exception("Unhandled exception", exc_info=exc)
            self.force_close()
        finally:
            request._task = None  # type: ignore[assignment]  # no cycle through the task
            self._fast = None
            fast.ticket.release()  # done by the observer, unless cancelled before it ran
        self._next(keep_alive)
