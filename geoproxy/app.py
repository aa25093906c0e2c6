"""Composition root: builds the runtime, the proxy and admin apps, and their lifecycle.

Start-up order (aiohttp ``cleanup_ctx``, undone in reverse): open the GeoIP database, open
the client sessions, run the first health round (so the proxy serves with known health),
start the health loop. Shut-down cancels and awaits the loop, then closes what was opened.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from geoproxy import __version__
from geoproxy.admin import build_admin_app
from geoproxy.clientip import TrustedProxies
from geoproxy.config import Config
from geoproxy.forwarder import Forwarder
from geoproxy.geoip import GeoLookup, MaxMindLookup
from geoproxy.health import GeodeHealth, HealthBoard, HealthChecker
from geoproxy.metrics import Metrics
from geoproxy.model import Topology
from geoproxy.observe import Observer
from geoproxy.runtime import Runtime

log = logging.getLogger("geoproxy")

# Headers aiohttp's client would add on its own; the geode must see only the client's.
_SKIP_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")


def forwarding_session(keepalive_timeout: float) -> aiohttp.ClientSession:
    """One pooled session for all forwarding: keep-alive to the geodes, no redirects
    followed (per request), no shared cookie jar, no decompression, no hidden retries."""
    connector = aiohttp.TCPConnector(
        limit=0, keepalive_timeout=keepalive_timeout, ttl_dns_cache=10
    )
    session = aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        skip_auto_headers=_SKIP_AUTO_HEADERS,
        timeout=aiohttp.ClientTimeout(total=None),
    )
    # aiohttp re-sends an idempotent request once, to the same geode, when a connection
    # drops before the response; the forwarder's loop must own every retry (never the same
    # geode twice, counted, capped). aiohttp offers no public switch; its own TestClient
    # sets this attribute. tests/test_forwarding.py pins the behaviour.
    session._retry_connection = False
    return session


class Gateway:
    """One proxy: its runtime from start-up to shut-down, and the two apps serving it."""

    def __init__(
        self,
        config: Config,
        geoip: GeoLookup | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.config = config
        self.topology = Topology.build(config)
        self.board = HealthBoard(config.geodes)
        self._geoip = geoip  # tests may inject a look-up; else opened from the config
        self.runtime: Runtime | None = None
        self.checker: HealthChecker | None = None
        self.metrics = Metrics(registry if registry is not None else CollectorRegistry())
        self.metrics.declare_geodes((g.name, g.region) for g in config.geodes)
        self.board.on_check.append(self._on_check)
        self.board.on_transition.append(self._on_transition)
        self.observer = Observer(self.metrics, config.access_log)

    def _update_ready(self) -> None:
        self.metrics.ready.set(1 if self.board.first_round_done and self.board.healthy else 0)

    def _on_check(self, state: GeodeHealth, ok: bool, latency: float | None) -> None:
        name = state.geode.name
        self.metrics.health_checks.labels(name, "pass" if ok else "fail").inc()
        if latency is not None:
            self.metrics.health_check_duration.labels(name).observe(latency)

    def _on_transition(self, state: GeodeHealth) -> None:
        g = state.geode
        self.metrics.geode_up.labels(g.name, g.region).set(1 if state.healthy else 0)
        self._update_ready()
        self.metrics.transitions.labels(g.name, "healthy" if state.healthy else "unhealthy").inc()

    async def _lifespan(self, app: web.Application) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:  # undone in reverse, always
            geoip = self._geoip
            if geoip is None and self.config.geoip_database is not None:
                reader = MaxMindLookup(self.config.geoip_database)
                stack.callback(reader.close)
                geoip = reader
            session = await stack.enter_async_context(
                forwarding_session(self.config.forwarding.keepalive_timeout)
            )
            health_session = await stack.enter_async_context(aiohttp.ClientSession(
                cookie_jar=aiohttp.DummyCookieJar(),
                connector=aiohttp.TCPConnector(limit=0, force_close=True),
                headers={"User-Agent": f"geoproxy-health/{__version__}"},
            ))  # fmt: skip
            self.runtime = Runtime(self.topology, TrustedProxies(self.config.trusted_proxies),
                                   geoip, self.board, session)  # fmt: skip
            self.forwarder = Forwarder(self.runtime)
            self.checker = HealthChecker(self.board, health_session)
            await self.checker.check_once()
            self._update_ready()
            task = asyncio.create_task(self.checker.run(), name="geoproxy-health")
            stack.push_async_callback(_stop, task)
            yield


    async def _handle(self, request: web.Request) -> web.StreamResponse:
        return await self.forwarder.handle(request)

    def proxy_app(self) -> web.Application:
        app = web.Application(middlewares=[self.observer.middleware])
        app.cleanup_ctx.append(self._lifespan)
        # (?s): a path may hold a percent-decoded newline; it is forwarded like any other.
        app.router.add_route("*", "/{tail:(?s:.*)}", self._handle)
        return app

    def admin_app(self) -> web.Application:
        return build_admin_app(lambda: self.runtime, self.metrics)


async def _stop(task: asyncio.Task[None]) -> None:
    """Cancel a background task and wait for it; a failure it ended with is logged."""
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    except Exception:
        log.exception("background task %s had failed", task.get_name())
