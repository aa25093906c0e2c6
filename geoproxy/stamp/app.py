"""The stamp's public HTTP API (``listen``: what the edge proxy forwards to).

    GET  /health                      name, region, store state, backlog per peer (503 if
                                      the store is unusable, or replication lags past
                                      ``health.max_replication_lag``): what the proxy checks
    PUT  /items/{id}                  JSON value; ?consistency=sync (or X-Consistency: sync)
    GET  /items/{id}, DELETE /items/{id}, GET /items?prefix=&limit=&after=
    POST /counters/{id}  {"delta": n} PN-counter; GET /counters/{id}

With ``home_header: true`` every successful write answers ``Geoproxy-Home: <region>``: a
geoproxy in front turns it into the writer's home cookie (home-stamp affinity).
Replication, the change log and /metrics are on the peer listener only (``peer``).
Bad input gets a 4xx JSON error naming the limit and changes nothing: a value is JSON of at
most 1 MiB, nesting at most 32 deep, with finite numbers; counter slots stay within int64.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from geoproxy.errors import GeoproxyError
from geoproxy.stamp import peer, values
from geoproxy.stamp.config import StampConfig
from geoproxy.stamp.hlc import Version, VersionOverflow
from geoproxy.stamp.metrics import StampMetrics
from geoproxy.stamp.replication import Replicator
from geoproxy.stamp.state import (
    STATE,
    BadRequest,
    StampState,
    errors_as_json,
    int_query,
    parts,
    read_body,
)
from geoproxy.stamp.store import Change, ClockAhead, CounterOverflow, Store

log = logging.getLogger("geoproxy.stamp")

__all__ = ["STATE", "build_stamp_app", "stamp_runner"]

MAX_VALUE_BYTES = 1024 * 1024  # one item's JSON value
MAX_DELTA = 10**12
#: One page of /items holds about this much at most, whatever its limit.
PAGE_BYTES = peer.PAGE_BYTES


class StartError(GeoproxyError):
    """The stamp cannot start (its clock, its peer listener)."""


def _item_id(request: web.Request) -> str:
    id = request.match_info["id"]
    if not values.ID.match(id):
        raise BadRequest(400, "bad_id", f"invalid item id {id[:60]!r}: {values.ID_RULE}")
    return id


async def _json_body(request: web.Request, limit: int) -> Any:
    """The body's JSON, within the value bounds (``values``); 4xx naming the limit."""
    value = values.loads(await read_body(request, limit))
    values.check(value, "the body")
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
        log.error("health: the store is unusable: %s", exc)
        return web.json_response({**body, "status": "unavailable", "store": "unusable"}, status=503)
    replication = {
        name: {"backlog": count, "lag_seconds": age or 0.0}
        for name, (count, age) in backlog.items()
    }
    body.update(status="ok", store="ok", replication=replication)
    bound = st.config.max_replication_lag
    lagging = sorted(n for n, r in replication.items() if bound and r["lag_seconds"] > bound)
    if lagging:  # steer clients elsewhere: what they write here is not reaching the others
        body.update(status="lagging", lagging=lagging, max_replication_lag=bound)
        return web.json_response(body, status=503)
    return web.json_response(body)


async def put_item(request: web.Request) -> web.Response:
    store, metrics, replicator = parts(request)
    id = _item_id(request)
    sync = _consistency(request)
    value = await _json_body(request, MAX_VALUE_BYTES)
    existed = (item := store.get(id)) is not None and not item.deleted
    change = _put(store, id, json.dumps(value, separators=(",", ":")))
    metrics.writes.labels("put").inc()
    replicator.notify()
    current = store.get(id)
    assert current is not None
    if sync:
        await _confirm(request, change)
    return _with_etag(current.as_dict(), change.version, 200 if existed else 201)


async def get_item(request: web.Request) -> web.Response:
    store, _, _ = parts(request)
    id = _item_id(request)
    item = store.get(id)
    if item is None or item.deleted:
        raise BadRequest(404, "not_found", f"no item {id!r}")
    etag = f'"{item.version.encode()}"'
    if _none_match(request.headers.get("If-None-Match"), etag):
        return web.Response(status=304, headers={"ETag": etag})
    return _with_etag(item.as_dict(), item.version)


def _put(store: Store, id: str, value: str | None) -> Change:
    try:
        return store.put(id, value)
    except VersionOverflow:  # only a version at the very end of time is ahead of this one
        raise BadRequest(
            409,
            "version_exhausted",
            f"item {id!r} holds the largest version there is: no write can follow it",
        ) from None


def _none_match(header: str | None, etag: str) -> bool:
    """``If-None-Match`` names ``etag``: a list of tags, weak or strong, or ``*`` (RFC 9110
    13.1.2 compares weakly). A cache holding several versions sends them all."""
    if header is None:
        return False
    tags = {tag.strip().removeprefix("W/") for tag in header.split(",")}
    return "*" in tags or etag in tags


async def delete_item(request: web.Request) -> web.Response:
    store, metrics, replicator = parts(request)
    id = _item_id(request)
    sync = _consistency(request)
    item = store.get(id)
    if item is None or item.deleted:
        raise BadRequest(404, "not_found", f"no item {id!r}")
    change = _put(store, id, None)
    metrics.writes.labels("delete").inc()
    replicator.notify()
    if sync:
        await _confirm(request, change)
    return _with_etag(
        {"id": id, "deleted": True, "version": change.version.encode()}, change.version
    )


async def list_items(request: web.Request) -> web.Response:
    store, _, _ = parts(request)
    prefix = request.query.get("prefix", "")
    after = request.query.get("after", "")
    if len(prefix) > 200 or len(after) > 200:
        raise BadRequest(400, "bad_query", "prefix and after: at most 200 characters")
    limit = int_query(request, "limit", 100, 1, 1000)
    items, more = store.items_page(prefix, limit, after, max_bytes=PAGE_BYTES)
    next_after = items[-1].id if more else None
    return web.json_response({"items": [i.as_dict() for i in items], "next_after": next_after})


async def post_counter(request: web.Request) -> web.Response:
    store, metrics, replicator = parts(request)
    id = _item_id(request)
    body = await _json_body(request, 4096)
    delta = body.get("delta") if isinstance(body, dict) else None
    if isinstance(delta, bool) or not isinstance(delta, int) or abs(delta) > MAX_DELTA:
        rule = f'body must be {{"delta": n}} with a whole n, |n| <= {MAX_DELTA}'
        raise BadRequest(400, "bad_delta", rule)
    try:
        store.increment(id, delta)
    except CounterOverflow as exc:
        raise BadRequest(400, "counter_overflow", str(exc)) from None
    metrics.writes.labels("counter").inc()
    replicator.notify()
    result = store.counter(id)
    assert result is not None
    return web.json_response(result)


async def get_counter(request: web.Request) -> web.Response:
    store, _, _ = parts(request)
    id = _item_id(request)
    result = store.counter(id)
    if result is None:
        raise BadRequest(404, "not_found", f"no counter {id!r}")
    return web.json_response(result)


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
    _, metrics, replicator = parts(request)
    need = st.config.replication.sync_quorum
    need = len(st.config.peers) if need is None else need
    acked, failed = await replicator.push_to_all(change)
    if len(acked) >= need:
        metrics.sync_writes.labels("confirmed").inc()
        return
    metrics.sync_writes.labels("unconfirmed").inc()
    raise BadRequest(
        503,
        "sync_not_confirmed",
        (
            f"written locally (version {change.version.encode()}) but confirmed by "
            f"{len(acked)} of the {need} peers required ({', '.join(sorted(failed))} failed); "
            "the write is kept and will replicate asynchronously"
        ),
    )


def stamp_runner(app: web.Application, shutdown_timeout: float = 10.0) -> web.AppRunner:
    """A runner for one of the stamp's apps, with its listener limits: a connection's
    first request head must arrive within ``header_timeout`` (else 408, closed), an idle
    connection closes after ``keepalive_timeout``."""
    return _LimitedRunner(
        app,
        access_log=None,
        handle_signals=False,
        keepalive_timeout=app[STATE].config.keepalive_timeout,
        shutdown_timeout=shutdown_timeout,
    )


class _LimitedRunner(web.AppRunner):
    @property
    def server(self) -> Any:
        inner = super().server
        return None if inner is None else self.app[STATE].heads.wrap(inner)


def build_stamp_app(
    config: StampConfig,
    registry: CollectorRegistry | None = None,
    peer_sock: socket.socket | None = None,
) -> web.Application:
    """The public app. Starting it opens the store and the peer listener (on
    ``peer_sock`` if given, else on ``config.peer_host:peer_port``) and starts
    replication; cleaning it up undoes all that."""
    state = StampState(config, registry)
    peer_app = web.Application(middlewares=[errors_as_json], client_max_size=peer.MAX_BATCH_BYTES)
    peer_app[STATE] = state
    peer_app.router.add_get("/health", health)
    peer.add_routes(peer_app)

    async def lifespan(app: web.Application) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            if config.peers and not config.secret and not (config.tls and config.tls.mutual):
                raise StartError(
                    f"stamp {config.name}: peers need the fleet's shared secret "
                    "(peer_auth) to sign replication, or mutual TLS (tls.ca)"
                )
            try:
                store = Store(
                    config.database,
                    config.name,
                    config.region,
                    durable=config.durable,
                    max_clock_skew=config.max_clock_skew,
                    allow_clock_ahead=config.allow_clock_ahead,
                )
            except ClockAhead as exc:
                raise StartError(str(exc)) from None
            stack.callback(store.close)
            tls = config.tls
            connector = aiohttp.TCPConnector(ssl=tls.client_context() if tls else True)
            session = await stack.enter_async_context(aiohttp.ClientSession(connector=connector))
            state.store = store
            state.metrics = StampMetrics(state.registry, store, config)
            metrics = state.metrics
            state.replicator = Replicator(
                store,
                config,
                session,
                on_push=lambda p, r: metrics.pushes.labels(p, r).inc(),
                on_park=lambda p: metrics.quarantined.labels("sent", "refused").inc(),
            )
            runner = stamp_runner(peer_app)
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
            state.peer_address = await _start_peer_site(runner, config, peer_sock)
            task = asyncio.create_task(state.replicator.run(), name=f"replication:{config.name}")

            async def stop() -> None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

            stack.push_async_callback(stop)
            log.info(
                "stamp %s (%s) serving from %s, %d peers; peer listener on %s://%s:%d%s",
                config.name,
                config.region,
                config.database,
                len(config.peers),
                "https" if tls else "http",
                *state.peer_address,
                " (mutual TLS)" if tls and tls.mutual else "",
            )
            yield

    app = web.Application(middlewares=[errors_as_json], client_max_size=MAX_VALUE_BYTES)
    app[STATE] = state
    app.cleanup_ctx.append(lifespan)
    if config.home_header:
        app.on_response_prepare.append(_name_home)
    app.router.add_get("/health", health)
    app.router.add_put("/items/{id}", put_item)
    app.router.add_get("/items/{id}", get_item)
    app.router.add_delete("/items/{id}", delete_item)
    app.router.add_get("/items", list_items)
    app.router.add_post("/counters/{id}", post_counter)
    app.router.add_get("/counters/{id}", get_counter)
    return app


_WRITES = frozenset({"PUT", "DELETE", "POST", "PATCH"})


async def _name_home(request: web.Request, response: web.StreamResponse) -> None:
    """A successful write names this stamp's region as the writer's home (``home_header``)."""
    if request.method in _WRITES and 200 <= response.status < 300:
        response.headers["Geoproxy-Home"] = request.app[STATE].config.region


#: Connections the kernel holds for a stamp's listeners until they are accepted (capped at
#: ``net.core.somaxconn``), as geoproxy's own (process/sockets.py): a geoproxy facing a
#: burst of new clients opens a connection to the stamp for each at once, and behind
#: aiohttp's 128 the kernel dropped the rest of the handshakes (retried a second later;
#: a 502 under a 1 s connect_timeout).
LISTEN_BACKLOG = 4096


def listen_site(
    runner: web.BaseRunner,
    host: str,
    port: int,
    context: ssl.SSLContext | None,
    sock: socket.socket | None = None,
) -> web.BaseSite:
    """A stamp listener's site: on ``sock`` when given (already bound), else on
    ``host:port``; with the stamp's backlog either way."""
    if sock is not None:
        return web.SockSite(runner, sock, ssl_context=context, backlog=LISTEN_BACKLOG)
    return web.TCPSite(
        runner, host, port, reuse_address=True, ssl_context=context, backlog=LISTEN_BACKLOG
    )


async def _start_peer_site(
    runner: web.AppRunner, config: StampConfig, sock: socket.socket | None
) -> tuple[str, int]:
    context = config.tls.server_context(peers=True) if config.tls else None
    site = listen_site(runner, config.peer_host, config.peer_port, context, sock)
    try:
        await site.start()
    except OSError as exc:
        raise StartError(
            f"cannot listen for peers on {config.peer_host}:{config.peer_port}: "
            f"{exc.strerror or exc}"
        ) from None
    host, port = runner.addresses[0][:2]
    return str(host), int(port)
