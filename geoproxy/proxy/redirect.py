"""The plain-HTTP listener that sends clients to HTTPS (``listen.redirect``): every
request is answered with a 308 to the same host, path and query over HTTPS (308 keeps the
method and body, unlike 301). Nothing is forwarded to a geode from here.

The host comes from the request's ``Host``: a client is only ever sent to the name it
asked for, on the proxy's HTTPS port. A missing or malformed ``Host`` is a 400.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable

from aiohttp import web

from geoproxy.proxy import compat
from geoproxy.proxy.policy import path_qs
from geoproxy.proxy.responses import ErrorResponse, json_error

#: A DNS name or an IPv4 literal, or an IPv6 literal in brackets; then an optional port.
_HOST = re.compile(
    r"^(?P<host>[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?$"
)


def location(host_header: str | None, target: str, https_port: int) -> str | None:
    """Where a request for ``target`` (origin-form) on ``host_header`` is sent, or None
    when the Host is missing or malformed."""
    match = _HOST.match(host_header or "")
    if match is None:
        return None
    port = "" if https_port == 443 else f":{https_port}"
    return f"https://{match.group('host').lower()}{port}{target}"


def handler(https_port: int) -> Callable[[web.BaseRequest], Awaitable[web.Response]]:
    """The redirect listener's one handler; ``https_port``: the port to send clients to."""

    async def redirect(request: web.BaseRequest) -> web.Response:
        to = location(request.headers.get("Host"), path_qs(request), https_port)
        if to is None:
            return json_error(400, "bad_request", "a Host header naming a host is required")
        kind = ErrorResponse if compat.lean() else web.Response  # as json_error: no Server
        answer = kind(status=308, headers={"Location": to})
        if request.body_exists:  # unread: not worth reading
            answer.force_close()
        return answer

    return redirect
