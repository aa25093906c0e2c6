"""The stamp's HTTP API.

    GET  /health                      name, region, store state, backlog per peer (503 if
                                      the store is unusable): what the proxy checks
    PUT  /items/{id}                  JSON value; ?consistency=sync (or X-Consistency: sync)
    GET  /items/{id}, DELETE /items/{id}, GET /items?prefix=&limit=&after=
    POST /counters/{id}  {"delta": n} PN-counter; GET /counters/{id}
    GET  /events?since=&limit=        the ordered change log (local order)
    POST /replication/changes         a peer pushes a batch
    GET  /replication/changes?since=&limit=&origin=   pull changes after a cursor
    GET  /metrics

Bad input gets a 4xx JSON error and changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import sqlite3
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from geoproxy.responses import json_error
from geoproxy.stamp.config import StampConfig
from geoproxy.stamp.hlc import Version
from geoproxy.stamp.metrics import StampMetrics
from geoproxy.stamp.replication import Replicator
from geoproxy.stamp.store import COUNTER, ITEM, Change, Store

log = logging.getLogger("geoproxy.stamp")

MAX_VALUE_BYTES = 1024 * 1024  # one item's JSON value
MAX_BATCH_BYTES = 64 * 1024 * 1024  # one replication push
MAX_BATCH = 10_000
MAX_DELTA = 10**12
_ID = re.compile(r"^[A-Za-z0-9._~:@!$'()*+,;=-]{1,200}$")
ID_RULE = "1 to 200 characters: letters, digits and ._~:@!$'()*+,;=-"


class StampState:
    """What the handlers share; filled in at start-up."""

    def __init__(self, config: StampConfig, registry: CollectorRegistry | None) -> None:
        self.config = config
        self.registry = registry if registry is not None else CollectorRegistry()
        self.store: Store | None = None
        self.metrics: StampMetrics | None = None
        self.replicator: Replicator | None = None


STATE = web.AppKey("state", StampState)


class BadRequest(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@web.middleware
async def errors_as_json(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except BadRequest as exc:
        return json_error(exc.status, exc.code, exc.message)
    except web.HTTPException as exc:  # aiohttp's own 404/405/413: same JSON shape
        if exc.status < 400:
            raise
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return json_error(exc.status, exc.reason.lower().replace(" ", "_"), exc.reason,
                          headers=allow)  # fmt: skip
    except sqlite3.Error as exc:  # the store is unusable: nothing was changed
        log.error("store error on %s %s: %s", request.method, request.path, exc)
        return json_error(503, "store_unavailable", f"the local store is unusable: {exc}")


def _parts(request: web.Request) -> tuple[Store, StampMetrics, Replicator]:
    st = request.app[STATE]
    assert st.store is not None and st.metrics is not None and st.replicator is not None
    return st.store, st.metrics, st.replicator


def _item_id(request: web.Request) -> str:
    id = request.match_info["id"]
    if not _ID.match(id):
        raise BadRequest(400, "bad_id", f"invalid item id {id[:60]!r}: {ID_RULE}")
    return id


async def _json_body(request: web.Request, limit: int) -> Any:
    if request.content_length is not None and request.content_length > limit:
        raise BadRequest(413, "too_large", f"body over {limit} bytes")
    raw = bytearray()  # read to the end: one read() returns only what has arrived so far
    async for chunk in request.content.iter_any():
        raw += chunk
        if len(raw) > limit:
            raise BadRequest(413, "too_large", f"body over {limit} bytes")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(400, "bad_json", f"body is not valid JSON: {exc}") from None


def _int_query(request: web.Request, name: str, default: int, low: int, high: int) -> int:
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


def _with_etag(body: dict[str, Any], version: Version, status: int = 200) -> web.Response:
    return web.json_response(body, status=status, headers={"ETag": f'"{version.encode()}"'})


async def health(request: web.Request) -> web.Response:
    st = request.app[STATE]
    body: dict[str, Any] = {"name": st.config.name, "region": st.config.region}
    try:
        assert st.store is not None
        st.store.ping()
        backlog = {p.name: st.store.backlog(p.name) for p in st.config.peers}
    except Exception as exc:  # the store is unusable: the proxy must stop sending here
        return web.json_response({**body, "status": "unavailable", "store": str(exc)},
                                 status=503)  # fmt: skip
    body.update(status="ok", store="ok", replication={
        name: {"backlog": count, "lag_seconds": age or 0.0}
        for name, (count, age) in backlog.items()
    })  # fmt: skip
    return web.json_response(body)


async def put_item(request: web.Request) -> web.Response:
    store, metrics, replicator = _parts(request)
    id = _item_id(request)
    sync = _consistency(request)
    value = await _json_body(request, MAX_VALUE_BYTES)
    existed = (item := store.get(id)) is not None and not item.deleted
    change = store.put(id, json.dumps(value, separators=(",", ":")))
    metrics.writes.labels("put").inc()
    replicator.notify()
    current = store.get(id)
    assert current is not None
    if sync:
        await _confirm(request, change)
    return _with_etag(current.as_dict(), change.version, 200 if existed else 201)


async def get_item(request: web.Request) -> web.Response:
    store, _, _ = _parts(request)
    id = _item_id(request)
    item = store.get(id)
    if item is None or item.deleted:
        raise BadRequest(404, "not_found", f"no item {id!r}")
    etag = f'"{item.version.encode()}"'
    if _none_match(request.headers.get("If-None-Match"), etag):
        return web.Response(status=304, headers={"ETag": etag})
    return _with_etag(item.as_dict(), item.version)


def _none_match(header: str | None, etag: str) -> bool:
    """``If-None-Match`` names ``etag``: a list of tags, weak or strong, or ``*`` (RFC 9110
    13.1.2 compares weakly). A cache holding several versions sends them all."""
    if header is None:
        return False
    tags = {tag.strip().removeprefix("W/") for tag in header.split(",")}
    return "*" in tags or etag in tags


async def delete_item(request: web.Request) -> web.Response:
    store, metrics, replicator = _parts(request)
    id = _item_id(request)
    sync = _consistency(request)
    item = store.get(id)
    if item is None or item.deleted:
        raise BadRequest(404, "not_found", f"no item {id!r}")
    change = store.put(id, None)
    metrics.writes.labels("delete").inc()
    replicator.notify()
    if sync:
        await _confirm(request, change)
    return _with_etag({"id": id, "deleted": True, "version": change.version.encode()},
                      change.version)  # fmt: skip


async def list_items(request: web.Request) -> web.Response:
    store, _, _ = _parts(request)
    prefix = request.query.get("prefix", "")
    after = request.query.get("after", "")
    if len(prefix) > 200 or len(after) > 200:
        raise BadRequest(400, "bad_query", "prefix and after: at most 200 characters")
    limit = _int_query(request, "limit", 100, 1, 1000)
    items = store.items(prefix, limit, after)
    next_after = items[-1].id if len(items) == limit else None
    return web.json_response({"items": [i.as_dict() for i in items], "next_after": next_after})


async def post_counter(request: web.Request) -> web.Response:
    store, metrics, replicator = _parts(request)
    id = _item_id(request)
    body = await _json_body(request, 4096)
    delta = body.get("delta") if isinstance(body, dict) else None
    if isinstance(delta, bool) or not isinstance(delta, int) or abs(delta) > MAX_DELTA:
        rule = f'body must be {{"delta": n}} with a whole n, |n| <= {MAX_DELTA}'
        raise BadRequest(400, "bad_delta", rule)
    store.increment(id, delta)
    metrics.writes.labels("counter").inc()
    replicator.notify()
    result = store.counter(id)
    assert result is not None
    return web.json_response(result)


async def get_counter(request: web.Request) -> web.Response:
    store, _, _ = _parts(request)
    id = _item_id(request)
    result = store.counter(id)
    if result is None:
        raise BadRequest(404, "not_found", f"no counter {id!r}")
    return web.json_response(result)


async def events(request: web.Request) -> web.Response:
    store, _, _ = _parts(request)
    since = _int_query(request, "since", 0, 0, 2**62)
    limit = _int_query(request, "limit", 100, 1, 1000)
    batch = store.changes_since(since, limit)
    return web.json_response({
        "events": [{"seq": seq, **c.as_dict()} for seq, c in batch],
        "next_since": batch[-1][0] if batch else since,
    })  # fmt: skip


async def pull_changes(request: web.Request) -> web.Response:
    store, _, _ = _parts(request)
    since = _int_query(request, "since", 0, 0, 2**62)
    limit = _int_query(request, "limit", 500, 1, MAX_BATCH)
    origin = request.query.get("origin") or None
    batch = store.changes_since(since, limit, origin=origin)
    return web.json_response({
        "changes": [c.as_dict() for _, c in batch],
        "next_since": batch[-1][0] if batch else since,
    })  # fmt: skip


async def push_changes(request: web.Request) -> web.Response:
    store, metrics, _ = _parts(request)
    try:
        body = await _json_body(request, MAX_BATCH_BYTES)
        changes = _parse_batch(body)
    except BadRequest:
        metrics.apply_errors.inc()
        raise
    try:
        result = store.apply(changes)
    except Exception as exc:
        metrics.apply_errors.inc()
        log.exception("applying a batch from %s failed", body.get("from"))
        return json_error(500, "apply_failed", f"batch not applied: {exc}")
    metrics.applied.labels("applied").inc(result.applied)
    metrics.applied.labels("ignored").inc(result.ignored)
    metrics.conflicts.inc(result.conflicts)
    return web.json_response(
        {"applied": result.applied, "ignored": result.ignored, "conflicts": result.conflicts}
    )


def _parse_batch(body: Any) -> list[Change]:
    """Validate a whole batch before any of it applies."""
    if not isinstance(body, dict) or not isinstance(body.get("changes"), list):
        raise BadRequest(400, "bad_batch", 'body must be {"from": ..., "changes": [...]}')
    raw = body["changes"]
    if len(raw) > MAX_BATCH:
        raise BadRequest(400, "bad_batch", f"at most {MAX_BATCH} changes per batch")
    out = []
    for i, c in enumerate(raw):
        try:
            kind, id, deleted = c["kind"], c["id"], c["deleted"]
            version = Version.decode(c["version"])
            region = c["region"]
            value = c["value"]
            if kind not in (ITEM, COUNTER) or not isinstance(id, str) or not _ID.match(id):
                raise ValueError("kind or id")
            if not isinstance(deleted, bool) or not isinstance(region, str) or not region:
                raise ValueError("deleted or region")
            if kind == COUNTER:
                ok = isinstance(value, dict) and all(
                    isinstance(value.get(k), int) and not isinstance(value.get(k), bool)
                    and value[k] >= 0 for k in ("p", "n")
                )  # fmt: skip
                if not ok or deleted:
                    raise ValueError("counter value")
            if deleted and value is not None:  # a live item's value may be JSON null
                raise ValueError("a delete carries a value")
        except (KeyError, TypeError, ValueError) as exc:
            raise BadRequest(400, "bad_batch", f"changes[{i}]: invalid change ({exc})") from None
        text = None if deleted else json.dumps(value, separators=(",", ":"))
        out.append(Change(kind, id, text, deleted, version, region))
    return out


def _consistency(request: web.Request) -> bool:
    mode = request.query.get("consistency") or request.headers.get("X-Consistency") or "async"
    if mode not in ("sync", "async"):
        raise BadRequest(400, "bad_consistency", "consistency: sync or async")
    return mode == "sync"


async def _confirm(request: web.Request, change: Change) -> None:
    """A sync write: the peers (or ``sync_quorum`` of them) must apply it before we answer.
    When they cannot, the answer is 503 — and the write stays committed here and keeps
    replicating asynchronously (it cannot be taken back without losing it elsewhere)."""
    st = request.app[STATE]
    _, metrics, replicator = _parts(request)
    need = st.config.replication.sync_quorum
    need = len(st.config.peers) if need is None else need
    acked, failed = await replicator.push_to_all(change)
    if len(acked) >= need:
        metrics.sync_writes.labels("confirmed").inc()
        return
    metrics.sync_writes.labels("unconfirmed").inc()
    raise BadRequest(503, "sync_not_confirmed", (
        f"written locally (version {change.version.encode()}) but confirmed by "
        f"{len(acked)} of the {need} peers required ({', '.join(sorted(failed))} failed); "
        "the write is kept and will replicate asynchronously"
    ))  # fmt: skip


async def metrics_handler(request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(request.app[STATE].registry),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})  # fmt: skip


def build_stamp_app(
    config: StampConfig, registry: CollectorRegistry | None = None
) -> web.Application:
    state = StampState(config, registry)

    async def lifespan(app: web.Application) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            store = Store(config.database, config.name, config.region, durable=config.durable)
            stack.callback(store.close)
            session = await stack.enter_async_context(aiohttp.ClientSession())
            state.store = store
            state.metrics = StampMetrics(state.registry, store, config)
            metrics = state.metrics
            state.replicator = Replicator(
                store, config, session, on_push=lambda p, r: metrics.pushes.labels(p, r).inc()
            )
            task = asyncio.create_task(state.replicator.run(), name=f"replication:{config.name}")

            async def stop() -> None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

            stack.push_async_callback(stop)
            log.info("stamp %s (%s) serving from %s, %d peers", config.name, config.region,
                     config.database, len(config.peers))  # fmt: skip
            yield

    app = web.Application(middlewares=[errors_as_json], client_max_size=MAX_BATCH_BYTES)
    app[STATE] = state
    app.cleanup_ctx.append(lifespan)
    app.router.add_get("/health", health)
    app.router.add_put("/items/{id}", put_item)
    app.router.add_get("/items/{id}", get_item)
    app.router.add_delete("/items/{id}", delete_item)
    app.router.add_get("/items", list_items)
    app.router.add_post("/counters/{id}", post_counter)
    app.router.add_get("/counters/{id}", get_counter)
    app.router.add_get("/events", events)
    app.router.add_post("/replication/changes", push_changes)
    app.router.add_get("/replication/changes", pull_changes)
    app.router.add_get("/metrics", metrics_handler)
    return app

