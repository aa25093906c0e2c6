"""After each proxied request: metrics and one access-log line, from the request's Trace.

The forwarder only notes what happened (``Trace``); turning that into counters and log
fields happens here, once, after the response is done.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from aiohttp import web
from yarl import URL

from geoproxy.health.load import GeodeLoad, Ticket
from geoproxy.proxy.trace import CLIENT_CLOSED, TICKET_KEY, TRACE_KEY, Trace
from geoproxy.routing.resolver import ABSENT
from geoproxy.routing.router import FENCED
from geoproxy.surfaces.metrics import NO_GEODE, Metrics, code_class

access_log = logging.getLogger("geoproxy.access")

#: nginx's status for a request the client abandoned before the answer.
#: The status logged and counted for a request the drain cut off at shutdown: geoproxy
#: failed it (the client saw its connection closed, no answer).
DRAIN_CUT = 503
#: The attempt outcome of the geode a cut request was on.
CUT = "cut_by_drain"


class Observer:
    def __init__(self, metrics: Metrics, load: GeodeLoad, access_format: str = "json") -> None:
        self.metrics = metrics
        self.load = load  # counts requests in flight: read by the gauge only when scraped
        self.access_format = access_format
        metrics.inflight.set_function(lambda: load.total)
        # From the start of a shutdown's drain: requests finished, and cut off.
        self.draining = False
        self.cutting = False  # the drain time is over: what ends now was cut off
        self.drained = 0
        self.cut = 0

    def use_format(self, access_format: str) -> None:
        """The access-log format of a reloaded config (json, plain or off)."""
        self.access_format = access_format

    def wrap(
        self,
        handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
        before: Callable[[], Callable[[object], None] | None],
    ) -> Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]:
        """``handler`` as the listener's request handler that first calls ``before()``'s
        hook (if any) with the request's connection, then records the request. No
        coroutine level of its own: an aiohttp middleware would build a wrapper per
        request."""
        observe = self.observe
        clock = time.perf_counter

        def observed(request: web.BaseRequest) -> Awaitable[web.StreamResponse]:
            hook = before()
            if hook is not None:
                hook(request.protocol)
            return observe(request, handler(request), clock())

        return observed

    @property
    def inflight(self) -> int:
        """Requests being handled now, on every request path."""
        return self.load.total

    async def observe(
        self,
        request: web.BaseRequest,
        work: Awaitable[web.StreamResponse],
        start: float,
        ticket: Ticket | None = None,
    ) -> web.StreamResponse:
        """Await the handler's ``work`` for ``request`` and record it, timed from
        ``start`` (``time.perf_counter``). The request is counted in flight by
        ``ticket`` (the fast lane's, when it hands a request over; else a new one),
        which the request paths find as ``request[TICKET_KEY]``."""
        if ticket is None:
            ticket = self.load.ticket()
        request[TICKET_KEY] = ticket
        response: web.StreamResponse | None = None
        status = 500
        try:
            response = await work
            status = response.status
            return response
        except web.HTTPException as exc:
            response = exc
            status = exc.status
            raise
        except asyncio.CancelledError:
            status = CLIENT_CLOSED  # the client went away before the answer
            raise
        finally:
            ticket.release()
            self.record(request, response, status, time.perf_counter() - start)

    def record(
        self,
        request: web.BaseRequest,
        response: web.StreamResponse | None,
        status: int,
        duration: float,
    ) -> None:
        try:
            trace = request[TRACE_KEY]
        except KeyError:  # answered before the forwarder ran
            trace = Trace()
        if trace.geode is not None:
            size = trace.body_bytes
        else:  # geoproxy's own small answers
            size = response.content_length or 0 if response is not None else 0
        self.note(trace, status, duration, request.method, request.rel_url, request.remote, size)

    def note(
        self,
        trace: Trace,
        status: int,
        duration: float,
        method: str,
        url: URL,
        remote: str | None,
        size: int,
    ) -> None:
        """Count one finished request and write its access-log line (``url``: the
        request target, whose path is logged)."""
        if self.draining:
            if self.cutting and status == CLIENT_CLOSED:
                status = self._cut(trace)
            else:
                self.drained += 1
        geode = trace.geode.name if trace.geode else NO_GEODE
        m = self.metrics
        m.requests.inc(geode, _code_class(status))
        m.request_duration.observe(duration, geode)
        resolution = trace.resolution
        if resolution is not None:
            for source, result in resolution.steps:
                if result != ABSENT:
                    m.resolutions.inc(source, result)
            if resolution.source == "default":
                m.resolutions.inc("default", "ok")
            if trace.decision is not None:
                m.decisions.inc(resolution.region, geode, trace.decision)
                if trace.decision == FENCED and resolution.fence is not None:
                    m.fence_refusals.inc(resolution.fence.name, resolution.region)
        if trace.denied is not None:
            m.denied.inc(trace.denied)
        for name, reason, _ in trace.tls_failures:
            m.tls_errors.labels(name, reason, "traffic").inc()
        if trace.home is not None:
            m.home_affinity.inc(trace.home.source, trace.home.result)
        if trace.stamp is not None:
            m.home_stamps.inc(trace.stamp)
        previous = None
        for name, outcome in trace.attempts:
            m.attempts.inc(name, outcome)
            if previous is not None:
                m.failovers.inc(previous, name)
            previous = name
        if self.access_format != "off" and access_log.isEnabledFor(logging.INFO):
            access_log.info(
                self.format_line(trace, status, duration, method, url.path, remote, size)
            )

    def _cut(self, trace: Trace) -> int:
        """A request the drain cut off: counted on the geode it was on, if any."""
        self.cut += 1
        trace.cut = True
        if trace.geode is None and trace.trying is not None:
            trace.geode = trace.trying
            trace.attempts.append((trace.trying.name, CUT))
        return DRAIN_CUT

    def format_line(
        self,
        trace: Trace,
        status: int,
        duration: float,
        method: str,
        path: str,
        remote: str | None,
        size: int,
    ) -> str:
        res = trace.resolution
        fields = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "method": method,
            "path": path,  # without the query string, which may carry secrets
            "status": status,
            "duration_ms": round(duration * 1000, 3),
            "bytes": size,
            "client_ip": str(res.client_ip) if res and res.client_ip else remote,
            "client_region": res.region if res else None,
            "region_source": res.source if res else None,
            "geode": trace.geode.name if trace.geode else None,
            "decision": trace.decision,
            "attempts": len(trace.attempts),
        }
        if res is not None and res.fence is not None:
            fields["fence"] = res.fence.name
        home = trace.home
        if home is not None:  # the home region a request named, or why it was ignored
            fields["home"] = home.region
            fields["home_source"] = home.source
            fields["home_result"] = home.result
        if trace.stamp is not None:
            fields["home_stamp"] = trace.stamp
        if trace.aborted:
            fields["aborted"] = True
        if trace.denied is not None:
            fields["denied"] = trace.denied
        if trace.cut:
            fields["cut"] = "drain_timeout"
        if trace.tls_failures:  # the last one: why the request failed over (or failed)
            fields["tls_error"] = trace.tls_failures[-1][2]
        if self.access_format == "json":
            return json.dumps(fields, separators=(",", ":"))
        return " ".join(f"{k}={_plain(v)}" for k, v in fields.items())


_CODE_CLASSES: dict[int, str] = {}


def _code_class(status: int) -> str:
    cls = _CODE_CLASSES.get(status)
    if cls is None:
        cls = _CODE_CLASSES[status] = code_class(status)  # a bounded set of ints
    return cls


def _plain(value: object) -> str:
    """A ``key=value`` value; quoted and escaped (JSON string rules) when it holds
    whitespace, quotes, backslashes or control characters — a decoded path may, and must
    neither split the field nor forge a second log line."""
    if value is None:
        return ""  # logfmt's empty value
    text = str(value)
    if text and not any(c.isspace() or c in '"\\' or not c.isprintable() for c in text):
        return text
    return json.dumps(text)
