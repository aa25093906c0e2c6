"""What the stamp's two listeners share: the state handlers reach, the JSON error shape,
and reading bounded request bodies and queries."""

from __future__ import annotations

import logging
import sqlite3
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from geoproxy.proxy.responses import HeadDeadline, json_error
from geoproxy.stamp import values
from geoproxy.stamp.config import StampConfig
from geoproxy.stamp.metrics import StampMetrics
from geoproxy.stamp.replication import Replicator
from geoproxy.stamp.store import Store

log = logging.getLogger("geoproxy.stamp")


class StampState:
    """What the handlers share; filled in at start-up."""

    def __init__(self, config: StampConfig, registry: CollectorRegistry | None) -> None:
        self.config = config
        self.registry = registry if registry is not None else CollectorRegistry()
        self.store: Store | None = None
        self.metrics: StampMetrics | None = None
        self.replicator: Replicator | None = None
        self.heads = HeadDeadline(config.header_timeout)  # both listeners' connections
        self.peer_address: tuple[str, int] | None = None  # where the peer listener is


STATE = web.AppKey("state", StampState)


class BadRequest(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@web.middleware
async def errors_as_json(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every error is a JSON body naming what was wrong, never internal details (those go
    to the log)."""
    request.app[STATE].heads.note_request(request.protocol)
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except BadRequest as exc:
        return json_error(exc.status, exc.code, exc.message)
    except values.BadValue as exc:
        return json_error(400, exc.code, exc.message)
    except web.HTTPException as exc:  # aiohttp's own 404/405/413: same JSON shape
        if exc.status < 400:
            raise
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return json_error(
            exc.status, exc.reason.lower().replace(" ", "_"), exc.reason, headers=allow
        )
    except sqlite3.Error as exc:  # the store is unusable: nothing was changed
        log.error("store error on %s %s: %s", request.method, request.path, exc)
        return json_error(503, "store_unavailable", "the local store is unusable")
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return json_error(
            500, "internal_error", "the stamp failed to handle this request (its log says why)"
        )


def parts(request: web.Request) -> tuple[Store, StampMetrics, Replicator]:
    st = request.app[STATE]
    assert st.store is not None and st.metrics is not None and st.replicator is not None
    return st.store, st.metrics, st.replicator


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole body; 413 past ``limit`` bytes (before reading it when it says so)."""
    if request.content_length is not None and request.content_length > limit:
        raise BadRequest(413, "too_large", f"body over {limit} bytes")
    raw = bytearray()  # read to the end: one read() returns only what has arrived so far
    async for chunk in request.content.iter_any():
        raw += chunk
        if len(raw) > limit:
            raise BadRequest(413, "too_large", f"body over {limit} bytes")
    return bytes(raw)


def int_query(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    text = request.query.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise BadRequest(400, "bad_query", f"{name}: not a whole number: {text[:40]!r}") from None
    if not low <= value <= high:
        raise BadRequest(400, "bad_query", f"{name}: must be from {low} to {high}")
    return value
