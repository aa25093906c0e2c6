"""The decisions every request path shares, each written once: the fast lane
(``fastlane.py``), the coroutine path (``forwarder.py``) and the WebSocket path
(``websocket.py``) ask here.

- which request targets pass on as they came (origin-form), and the target a geode gets;
- how a geode's answer goes to the client: read whole and sent in one write, or
  streamed; and so which answers the fast lane may finish itself;
- what a successful attempt notes in the trace, and what a failed connection does
  (``connect_failed``: a TLS failure, with its reason, or any other);
- the header lines of a relayed answer (with the home cookie a stamp asked for).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from geoproxy.errors import ConnectFailed
from geoproxy.health.tls import failure_of
from geoproxy.proxy.headers import ResponseHead, geode_lines
from geoproxy.proxy.homecookie import stamped

if TYPE_CHECKING:
    from aiohttp import web

    from geoproxy.config.values import Geode
    from geoproxy.proxy.prelude import Route
    from geoproxy.proxy.trace import Trace

#: Answers a geode gives when it cannot serve: another geode may be tried.
RETRY_STATUSES = frozenset({502, 503, 504})
#: Answers with a Content-Length up to this are read whole and sent in one write.
SMALL_BODY = 64 * 1024
#: Statuses that never have a body, whatever their framing headers say.
NO_BODY = frozenset({204, 304})
#: The outcome label of an attempt that got an answer to relay.
RESPONSE = "response"
#: Outcome labels of an attempt that opened no connection (nothing was sent: always safe
#: to try the next geode): TCP (refused, unreachable, DNS, timeout), or the TLS handshake.
CONNECT_ERROR, TLS_ERROR = "connect_error", "tls_error"

log = logging.getLogger("geoproxy.forwarder")


def origin_form(target: str) -> bool:
    """The request target can go to a geode as it came: origin-form (``/path?query``),
    no fragment, no empty query."""
    return target.startswith("/") and "#" not in target and not target.endswith("?")


def path_qs(request: web.BaseRequest) -> str:
    """The target a geode gets: the request's as it came when ``origin_form``, else
    rebuilt in origin-form (absolute-form, a fragment, an empty query)."""
    target = request.raw_path
    if origin_form(target):
        return target
    rel = request.rel_url
    return (rel.raw_path or "/") + ("?" + rel.raw_query_string if rel.raw_query_string else "")


def read_whole(status: int, method: str, out: ResponseHead) -> bool:
    """The answer is read whole and sent in one write (else it streams): a final
    answer with a body of known length up to ``SMALL_BODY``."""
    length = out.length
    return (
        length is not None
        and length <= SMALL_BODY
        and status >= 200
        and status not in NO_BODY
        and method != "HEAD"
    )


def fast_lane_finishes(status: int, out: ResponseHead) -> bool:
    """The fast lane (a GET) may finish this answer itself: one it can relay, read
    whole, and no reason to try another geode. Anything else goes to the coroutine
    path before any byte reached the client."""
    return status not in RETRY_STATUSES and out.ok and out.framed and read_whole(status, "GET", out)


def answered(trace: Trace, geode: Geode, decision: str) -> None:
    """A geode answered, and its answer goes to the client: the trace names the geode
    and the routing decision (what the access log and the metrics read)."""
    trace.attempts.append((geode.name, RESPONSE))
    trace.geode = geode
    trace.decision = decision


def connect_failed(trace: Trace, geode: Geode, exc: BaseException) -> str:
    """No connection to ``geode`` could be opened (``exc``, from the lean client or
    aiohttp's): its outcome label; a TLS failure is noted in the trace with its reason
    and the words for people (``certificate verify failed: ... (geode X)``)."""
    if isinstance(exc, ConnectFailed) and exc.tls_reason is not None:
        reason, message = exc.tls_reason, str(exc)
    elif (failure := failure_of(exc)) is not None:
        reason, message = failure.reason, failure.message(geode.name)
    else:
        log.info("geode %s: connect failed: %s", geode.name, exc)
        return CONNECT_ERROR
    trace.tls_failures.append((geode.name, reason, message))
    log.info("geode %s: %s", geode.name, message)
    return TLS_ERROR


def answer_lines(route: Route, out: ResponseHead, geode: Geode) -> bytes:
    """The header lines of a geode's answer as the client gets them: the geode's own as
    passed on, Via and the X-Geoproxy-* pair, and the Set-Cookie of the home cookie when
    the geode named its user's home region (``Geoproxy-Home``, never passed on)."""
    lines = out.kept + out.tail(route.via, geode_lines(geode.name, geode.region), route.hsts)
    if out.home is not None:
        lines += stamped(route.rt.topology, route.trace, route.https, out.home)
    return lines
