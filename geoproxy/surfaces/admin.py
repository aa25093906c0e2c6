"""The admin listener: liveness, readiness, metrics, geode health, route explanation and a
status page. Binds to loopback by default (``listen.admin``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass

from aiohttp import web
from multidict import MultiDict
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from geoproxy.config.changes import ReloadOutcome
from geoproxy.proxy.responses import json_error
from geoproxy.routing import affinity
from geoproxy.routing.clientip import client_ip, parse_ip
from geoproxy.routing.explain import explain, explain_access
from geoproxy.routing.resolver import CF_IPCOUNTRY, X_CLIENT_REGION, resolve
from geoproxy.routing.runtime import Runtime
from geoproxy.surfaces.metrics import Metrics
from geoproxy.surfaces.status_page import Facts, geode_state, render_status
from geoproxy.surfaces.traffic import STEP, Traffic, TrafficHistory

RuntimeGetter = Callable[[], Runtime | None]


@dataclass(frozen=True, slots=True)
class Scrape:
    """Where /metrics and /status read from: ``refresh`` first (with ``--workers``, the
    supervisor asks every worker for its counts), then ``registry`` is exposed and
    ``traffic`` gives the counts the status page shows."""

    registry: CollectorRegistry
    refresh: Callable[[], Awaitable[None]]
    traffic: Callable[[], Traffic]

    @classmethod
    def local(cls, metrics: Metrics) -> Scrape:
        """This process's own metrics."""
        return cls(metrics.registry, _nothing, lambda: Traffic.of(metrics, frozenset()))


async def _nothing() -> None:
    pass


RUNTIME: web.AppKey[RuntimeGetter] = web.AppKey("runtime")
SCRAPE = web.AppKey("scrape", Scrape)
DRAINING: web.AppKey[Callable[[], bool]] = web.AppKey("draining")
LAST_RELOAD: web.AppKey[Callable[[], ReloadOutcome | None]] = web.AppKey("last_reload")
HISTORY = web.AppKey("history", TrafficHistory)


def _runtime(request: web.Request) -> Runtime:
    runtime: Runtime | None = request.app[RUNTIME]()
    if runtime is None:
        raise web.HTTPServiceUnavailable(
            text='{"error":{"status":503,"code":"starting","message":"geoproxy is starting"}}',
            content_type="application/json",
        )
    return runtime


async def healthz(request: web.Request) -> web.Response:
    """The process is alive and its event loop answers."""
    return web.json_response({"status": "ok"})


def readiness(runtime: Runtime | None, draining: bool) -> str | None:
    """Why the proxy is not ready, or None when it is: the first health round is done,
    at least one geode takes traffic, and shutdown has not begun."""
    if draining:
        return "shutting down"
    if runtime is None or not runtime.board.first_round_done:
        return "first health round running"
    if not runtime.board.healthy:
        return "no healthy geode"
    return None


async def readyz(request: web.Request) -> web.Response:
    """Ready once the first health round is done and at least one geode takes traffic;
    not ready again from the moment shutdown begins."""
    runtime = request.app[RUNTIME]()
    reason = readiness(runtime, request.app[DRAINING]())
    if reason is not None or runtime is None:
        return web.json_response({"ready": False, "reason": reason}, status=503)
    return web.json_response({"ready": True, "healthy_geodes": sorted(runtime.board.healthy)})


async def metrics(request: web.Request) -> web.Response:
    scrape = request.app[SCRAPE]
    await scrape.refresh()
    body = generate_latest(scrape.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def geodes(request: web.Request) -> web.Response:
    board = _runtime(request).board
    scrape = request.app[SCRAPE]
    await scrape.refresh()
    traffic = scrape.traffic()
    listed = []
    for state in board.states.values():
        entry = state.as_dict()
        word = geode_state(state, traffic)
        if word != state.state:  # ejected by a worker of --workers, as /status says
            entry.update(state=word, ejected=True, takes_traffic=False)
        listed.append(entry)
    return web.json_response({"geodes": listed})


_ROUTE_QUERY = ("ip", "country", "region", "trusted", "home_cookie", "tenant")


async def route(request: web.Request) -> web.Response:
    """What the proxy would do for a client.

    Query form, a client described directly: ``ip`` (the real client IP, for GeoIP),
    ``country`` (as CF-IPCountry), ``region`` (as X-Client-Region), ``trusted`` (whether
    those headers come from a trusted proxy; default true), ``home_cookie`` (a home
    cookie's value) and ``tenant`` (a tenant key), for home affinity.
    Header form (no query): this very request, treated as the proxy would treat it — its
    peer, X-Forwarded-For, CF-IPCountry, X-Client-Region, its cookies and tenant header.
    ``path`` (either form): also what the access rules do with that request path (and
    the tenant key a path prefix gives).
    """
    rt = _runtime(request)
    q = MultiDict(request.query)
    path = q.popone("path", None)
    if unknown := ", ".join(sorted(q.keys() - set(_ROUTE_QUERY))):
        known = ", ".join((*_ROUTE_QUERY, "path"))
        return json_error(400, "bad_query", f"unknown parameter(s): {unknown} (known: {known})")
    topology = rt.topology
    homes = topology.config.home_affinity
    now = time.time()
    home = None
    headers: Mapping[str, str]
    if q:
        ip = None
        if "ip" in q:
            ip = parse_ip(q["ip"])
            if ip is None:
                return json_error(400, "bad_query", f"ip: not an IP address: {q['ip'][:64]!r}")
        trusted = q.get("trusted", "true").lower()
        if trusted not in ("true", "false"):
            return json_error(400, "bad_query", "trusted: must be true or false")
        given: dict[str, str] = {}
        if "country" in q:
            given[CF_IPCOUNTRY] = q["country"]
        if "region" in q:
            given[X_CLIENT_REGION] = q["region"]
        headers = given
        peer, peer_trusted, cip = None, trusted == "true", ip
        if homes is not None:
            home = affinity.given(
                homes, q.get("tenant"), q.get("home_cookie"), topology.region_names, now
            )
    else:
        # The request's own case-insensitive headers, as the forwarder reads them: a
        # plain dict would miss ``cf-ipcountry`` sent in lower case.
        headers = request.headers
        peer = parse_ip(request.remote) if request.remote else None
        peer_trusted = peer is not None and rt.trusted.contains(peer)
        cip = client_ip(peer, request.headers.getall("X-Forwarded-For", ()), rt.trusted)
        if homes is not None:
            home = affinity.home_of(homes, headers, peer_trusted, topology.region_names, now)
    if homes is not None:
        home = affinity.current(homes, home, path or "/", now)
    resolution = resolve(topology, headers, peer_trusted, cip, rt.geoip)
    answer = explain(
        topology, resolution, rt.board.healthy, peer, peer_trusted, load=rt.load, home=home
    )
    if path is not None:
        answer["access"] = explain_access(topology, path)
    return web.json_response(answer, dumps=_dumps)


def _dumps(obj: object) -> str:
    return json.dumps(obj, indent=2) + "\n"


async def status(request: web.Request) -> web.Response:
    app = request.app
    runtime = _runtime(request)
    scrape = app[SCRAPE]
    await scrape.refresh()
    traffic = scrape.traffic()
    now = time.time()
    history = app[HISTORY]
    history.note(now, traffic)
    draining = app[DRAINING]()
    facts = Facts(
        readiness(runtime, draining),
        draining,
        app[LAST_RELOAD](),
        traffic,
        history.rates(now, traffic),
    )
    return web.Response(text=render_status(runtime, facts, now), content_type="text/html")


async def _sample_traffic(app: web.Application) -> AsyncIterator[None]:
    """Note the traffic counts every ``STEP`` seconds, for the rates on /status."""

    async def sample() -> None:
        while True:
            app[HISTORY].note(time.time(), app[SCRAPE].traffic())
            await asyncio.sleep(STEP)

    task = asyncio.create_task(sample(), name="geoproxy-traffic-history")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def build_admin_app(
    runtime: RuntimeGetter,
    scrape: Scrape,
    draining: Callable[[], bool] = lambda: False,
    last_reload: Callable[[], ReloadOutcome | None] = lambda: None,
) -> web.Application:
    app = web.Application()
    app[RUNTIME] = runtime
    app[SCRAPE] = scrape
    app[DRAINING] = draining
    app[LAST_RELOAD] = last_reload
    app[HISTORY] = TrafficHistory()
    app.cleanup_ctx.append(_sample_traffic)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/geodes", geodes)
    app.router.add_get("/route", route)
    app.router.add_get("/status", status)
    app.router.add_get("/", status)
    return app
