"""What happened to one request: noted by the forwarder, read by metrics and the log."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from geoproxy.config.values import Geode
from geoproxy.health.load import Ticket
from geoproxy.routing.affinity import Home
from geoproxy.routing.resolver import Resolution

#: The status a request is logged and counted with when its client went away before the
#: answer (as nginx does): both request paths note it.
CLIENT_CLOSED = 499


@dataclass(slots=True)
class Trace:
    """What happened to one request; read by the access log and metrics."""

    resolution: Resolution | None = None
    decision: str | None = None
    attempts: list[tuple[str, str]] = field(default_factory=list)  # (geode, outcome)
    geode: Geode | None = None  # the geode whose response was relayed
    trying: Geode | None = None  # the geode of the attempt under way (or the last one)
    cut: bool = False  # still in flight when shutdown.drain_timeout ran out: cut off
    aborted: bool = False  # the geode failed mid-response; the client connection was cut
    body_bytes: int = 0  # response body bytes relayed to the client
    denied: str | None = None  # refused at the edge: the access rule (or refusal) label
    # TLS handshakes that failed: (geode, reason label, message for people), in order.
    tls_failures: list[tuple[str, str, str]] = field(default_factory=list)
    home: Home | None = None  # the home region the request named (home_affinity), or why not
    stamp: str | None = None  # what became of a stamp's Geoproxy-Home (homecookie.py)


TRACE_KEY = web.RequestKey("trace", Trace)
#: The request's claim on the in-flight counts (``health/load.py``), set by the observer.
TICKET_KEY = web.RequestKey("ticket", Ticket)
