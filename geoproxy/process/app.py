"""Composition root: builds the runtime, the proxy handler and admin app, and their
lifecycle.

Start-up order (``Gateway.lifespan``, undone in reverse): open the GeoIP database, open
the client sessions, run the first health round (so the proxy serves with known health),
start the health loop. Shut-down cancels and awaits the loop, then closes what was opened.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from geoproxy import __version__
from geoproxy.config import changes, pem
from geoproxy.config import loader as config_mod
from geoproxy.config.changes import ReloadOutcome, plural
from geoproxy.config.model import Topology
from geoproxy.config.values import Config
from geoproxy.errors import GeoproxyError
from geoproxy.health.board import HealthBoard
from geoproxy.health.checker import HealthChecker
from geoproxy.health.load import GeodeLoad
from geoproxy.health.tls import GeodeContexts
from geoproxy.proxy import https
from geoproxy.proxy.connection import Pool
from geoproxy.proxy.forwarder import Forwarder
from geoproxy.proxy.headers import via_name
from geoproxy.proxy.trace import TRACE_KEY
from geoproxy.routing.clientip import TrustedProxies
from geoproxy.routing.geoip import FileIdentity, GeoLookup, MaxMindLookup, open_geoip
from geoproxy.routing.runtime import Runtime
from geoproxy.surfaces.admin import Scrape, build_admin_app
from geoproxy.surfaces.healthmetrics import HealthMetrics
from geoproxy.surfaces.metrics import Metrics
from geoproxy.surfaces.observe import Observer

log = logging.getLogger("geoproxy")

# Headers aiohttp's client would add on its own; the geode must see only the client's.
_SKIP_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")


def forwarding_session(keepalive_timeout: float) -> aiohttp.ClientSession:
    """One pooled session for all forwarding: keep-alive to the geodes, no redirects
    followed (per request), no shared cookie jar, no decompression, no hidden retries."""
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=keepalive_timeout, ttl_dns_cache=10)
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
    # sets this attribute. tests/test_forwarding.py pins the behaviour. (Only the public
    # mode of compat.py forwards through this session; WebSockets always do.)
    if hasattr(session, "_retry_connection"):
        session._retry_connection = False
    return session


class Gateway:
    """One proxy: its runtime from start-up to shut-down, the two apps serving it, and
    reloads of its config."""

    def __init__(
        self,
        config: Config,
        geoip: GeoLookup | None = None,
        registry: CollectorRegistry | None = None,
        active_health: bool = True,
        geoip_source: str | None = None,
        share: int = 1,
    ) -> None:
        self.config = config
        # False in a worker of ``--workers``: the supervisor checks and hands health over
        # (HealthBoard.adopt); passive ejection stays per process.
        self.active_health = active_health
        self.via = via_name()
        self.board = HealthBoard(config.geodes, config.outlier_detection)
        # ``share``: worker processes serving the listener, each allowing its share of a
        # geode's max_inflight.
        self.load = GeodeLoad(share)
        self.load.configure(config)
        self._geoip = geoip  # tests may inject a look-up; else opened from the config
        self._own_geoip: MaxMindLookup | None = None
        self._geoip_source = geoip_source  # what to open at start-up instead of the path
        self._geoip_refused: FileIdentity | None = None  # a new file that did not open
        self.on_geoip: list[Callable[[MaxMindLookup], None]] = []  # after a new database
        self.geode_tls = GeodeContexts()  # one per https geode: its checks and traffic
        self.runtime: Runtime | None = None
        self.forwarder: Forwarder | None = None
        self.checker: HealthChecker | None = None
        self.draining = False
        self.on_request: Callable[[object], None] | None = None  # see HeadTimeoutRunner
        self.on_reload: list[Callable[[], None]] = []  # after a config was swapped in
        self._reload_lock = asyncio.Lock()
        self.last_reload: ReloadOutcome | None = None  # None: none since start-up
        self.metrics = Metrics(registry if registry is not None else CollectorRegistry())
        self.metrics.declare_geodes((g.name, g.region) for g in config.geodes)
        self.metrics.last_reload.set_to_current_time()
        self.health_metrics = HealthMetrics(
            self.metrics, self.board, self.load, lambda: self.config.geodes
        )
        self.board.on_transition.append(lambda _: self._update_ready())
        self.observer = Observer(self.metrics, self.load, config.access_log)
        # The proxy listener's HTTPS: PemError (OpenSSL refuses a certificate) ends the
        # start-up with its reason.
        self.tls = None if config.proxy.tls is None else https.Terminator(config.proxy.tls)
        self._note_certificates()

    # -- health and readiness -----------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.board.first_round_done and bool(self.board.healthy) and not self.draining

    def _update_ready(self) -> None:
        self.metrics.ready.set(1 if self.ready else 0)

    def adopt_health(self, results: Iterable[tuple[str, str, bool, bool]]) -> None:
        """Active health from the supervisor (a worker of ``--workers``):
        ``HealthBoard.take_checks``."""
        self.board.take_checks(results)
        self._update_ready()

    def start_draining(self) -> None:
        """Shutdown began: /readyz answers 503 at once, so load balancers stop sending."""
        self.draining = True
        self._update_ready()

    # -- lifecycle ------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        """The runtime from start-up (first health round included) to shut-down."""
        async with contextlib.AsyncExitStack() as stack:  # undone in reverse, always
            self.geode_tls.adopt(self.geode_tls.prepare(self.config.geodes))
            geoip = self._geoip
            if geoip is None and self.config.geoip_database is not None:
                self._own_geoip = geoip = open_geoip(self.config, self._geoip_source)
                stack.callback(self._close_geoip)
                self._note_geoip()
            session = await stack.enter_async_context(
                forwarding_session(self.config.forwarding.keepalive_timeout)
            )
            loop = asyncio.get_running_loop()
            self.board._schedule = loop.call_later  # ejection timers
            self.load.schedule = loop.call_later  # how long a full report holds
            self.runtime = Runtime(
                Topology.build(self.config),
                TrustedProxies(self.config.trusted_proxies),
                geoip,
                self.board,
                session,
                self.via,
                self.load,
                self.geode_tls,
            )
            pool = Pool(self.config.forwarding.keepalive_timeout)
            stack.callback(pool.close)
            self.forwarder = Forwarder(self.runtime, pool)
            if self.active_health:
                health_session = await stack.enter_async_context(
                    aiohttp.ClientSession(
                        cookie_jar=aiohttp.DummyCookieJar(),
                        connector=aiohttp.TCPConnector(limit=0, force_close=True),
                        headers={"User-Agent": f"geoproxy-health/{__version__}"},
                    )
                )
                self.checker = HealthChecker(
                    self.board,
                    health_session,
                    contexts=self.geode_tls,
                    on_tls_failure=self.health_metrics.on_tls_failure,
                )
                await self.checker.check_once()
                self._warn_failing()
                task = asyncio.create_task(self.checker.run(), name="geoproxy-health")
                stack.push_async_callback(_stop, task)
            self._update_ready()
            sweeper = asyncio.create_task(self._sweep(pool), name="geoproxy-pool-sweep")
            stack.push_async_callback(_stop, sweeper)
            yield

    def _warn_failing(self) -> None:
        """After the first health round: name every geode that failed it."""
        failing = [s for s in self.board.states.values() if not s.healthy]
        if failing:
            log.warning(
                "first health round: %s of %d failed: %s",
                plural(len(failing), "geode"),
                len(self.board.states),
                "; ".join(f"{s.geode.name} ({s.geode.region}): {s.last_error}" for s in failing),
            )

    async def _sweep(self, pool: Pool) -> None:
        """Close pooled geode connections that idled past keepalive_timeout, or whose
        geode a reload removed."""
        while True:
            await asyncio.sleep(max(0.5, pool.keepalive_timeout / 2))
            pool.sweep(self.config.geodes)

    def _close_geoip(self) -> None:
        if self._own_geoip is not None:
            self._own_geoip.close()
            self._own_geoip = None

    @property
    def geoip(self) -> MaxMindLookup | None:
        """The GeoIP database this gateway opened (None: none, or a test's look-up)."""
        return self._own_geoip

    def _note_geoip(self) -> None:
        """The build-date gauge, as the database in use says (none without one)."""
        self.metrics.geoip_built.clear()
        if self._own_geoip is not None:
            db = self._own_geoip
            self.metrics.geoip_built.labels(db.database_type).set(db.build_epoch)

    def _note_certificates(self) -> None:
        """The expiry gauge, one series per certificate the config in force serves, or
        presents to https geodes."""
        self.metrics.certificate_expiry.clear()
        for certificate in self.config.proxy.tls.certificates if self.config.proxy.tls else ():
            label = self.metrics.certificate_expiry.labels(str(certificate.cert))
            label.set(certificate.info.not_after)
        for geode in self.config.geodes:
            client = geode.tls
            if geode.url.scheme == "https" and client.cert_pem is not None:
                about = pem.info(pem.certificates(client.cert_pem)[0])  # checked at load
                self.metrics.certificate_expiry.labels(str(client.cert)).set(about.not_after)

    async def refresh_geoip(self, expect: FileIdentity | None = None) -> bool:
        """Open ``geoip.database`` again if its file changed since it was opened (a new
        inode from ``geoipupdate``'s rename, or a new mtime or size), and swap it in; True
        if it did. A file that cannot be used is logged once (until it changes again) and
        counted; the database in use keeps answering. ``expect``: the identity the
        supervisor of ``--workers`` validated; any other file is left alone."""
        async with self._reload_lock:  # a reload builds its runtime from the old look-up
            current, runtime = self._own_geoip, self.runtime
            if current is None or runtime is None or self.forwarder is None:
                return False
            now = FileIdentity.of(current.path)
            if now is None or now in (current.identity, self._geoip_refused):
                return False
            if expect is not None and now != expect:
                log.info(
                    "%s: changed again since the supervisor opened it; waiting for its word",
                    current.path,
                )
                return False
            try:
                new = MaxMindLookup(current.path)
            except GeoproxyError as exc:
                self._geoip_refused = now
                self.metrics.geoip_reloads.labels("failure").inc()
                log.error(
                    "%s: the GeoIP database file changed but cannot be used; the one "
                    "opened before keeps answering (built %s): %s",
                    current.path,
                    _date(current.build_epoch),
                    exc,
                )
                return False
            self._geoip_refused = None
            self.runtime = dataclasses.replace(runtime, geoip=new)
            self.forwarder.runtime = self.runtime
            self._own_geoip = new
            current.close()  # look-ups are synchronous: none is in progress
            self._note_geoip()
            self.metrics.geoip_reloads.labels("success").inc()
            log.info(
                "%s: GeoIP database re-opened: %s built %s (was built %s)",
                new.path,
                new.database_type,
                _date(new.build_epoch),
                _date(current.build_epoch),
            )
            for hook in self.on_geoip:
                hook(new)
            return True

    async def reload(self, new: Config) -> list[str]:
        """Swap in a validated config; returns what changed (``changes.describe``).
        Health of unchanged geodes carries over; new geodes are checked before they can
        take traffic; removed ones take no new requests while their in-flight requests
        finish. Raises GeoproxyError (a GeoIP file that cannot be opened) and then
        nothing has changed."""
        async with self._reload_lock:
            old, runtime, checker = self.config, self.runtime, self.checker
            if runtime is None:
                raise GeoproxyError("not started yet")
            if _bound(new) != _bound(old):
                log.warning("%s: listener changes take effect only after a restart", new.path)
            # Before anything changes: a certificate OpenSSL refuses keeps the old ones.
            contexts = None
            if self.tls is not None and new.proxy.tls is not None:
                contexts = https.contexts_for(new.proxy.tls)
            what = changes.describe(old, new)
            geode_contexts = self.geode_tls.prepare(new.geodes)
            geoip = runtime.geoip
            opened = None
            if self._geoip is None and new.geoip_database != old.geoip_database:
                opened = open_geoip(new)
                geoip = opened
            regions = {name: s.geode.region for name, s in self.board.states.items()}
            renewed = self.geode_tls.adopt(geode_contexts)
            added, removed = self.board.sync(new.geodes, new.outlier_detection)
            self.metrics.forget_geodes((g.name, g.region) for g in removed)
            self.metrics.declare_geodes((g.name, g.region) for g in added)
            # A geode kept (same name and URL) in another region: its series move with it.
            for name, state in self.board.states.items():
                if regions.get(name, state.geode.region) != state.geode.region:
                    self.metrics.forget_geodes([(name, regions[name])])
                    self.health_metrics.publish(state)
            if checker is not None:
                await checker.check_once(added)  # before they can take traffic
            self.runtime = Runtime(
                Topology.build(new),
                TrustedProxies(new.trusted_proxies),
                geoip,
                self.board,
                runtime.session,
                self.via,
                self.load,
                self.geode_tls,
            )
            self.load.configure(new)
            assert self.forwarder is not None
            # Pooled connections of a geode whose TLS changed were made with the old one.
            kept = {g.name: g for g in new.geodes}
            self.forwarder.adopt(self.runtime, [*removed, *(kept[n] for n in renewed)])
            if checker is not None:
                checker.sync(removed)
            self.observer.use_format(new.access_log)
            self.config = new
            if self.tls is not None and contexts is not None:
                self.tls.adopt(contexts)  # new handshakes; open connections keep theirs
            self._note_certificates()
            if geoip is not runtime.geoip:
                self._close_geoip()  # look-ups are synchronous: none is in progress
                self._own_geoip = opened
                self._geoip_refused = None
                self._note_geoip()
            self._update_ready()
            log.info(
                "%s: config reloaded (%s): %s",
                new.path,
                plural(len(new.geodes), "geode"),
                "; ".join(what) or "nothing that takes effect changed",
            )
            for hook in self.on_reload:
                hook()
            return what

    async def reload_from_file(self, reason: str) -> bool:
        """Load the config file again and swap it in; on any error the running config
        stays, the error is logged with its path and value, and counted."""
        path = self.config.path
        try:
            new = config_mod.load(path)
            what = await self.reload(new)
        except GeoproxyError as exc:
            self.metrics.reloads.labels("failure").inc()
            self.last_reload = ReloadOutcome(time.time(), reason, False, str(exc))
            log.error("%s: reload (%s) failed; the running config stays:\n%s", path, reason, exc)
            return False
        self.last_reload = ReloadOutcome(
            time.time(), reason, True, "; ".join(what) or "no change in effect"
        )
        self.metrics.reloads.labels("success").inc()
        self.metrics.last_reload.set_to_current_time()
        for line in new.warnings:
            log.warning("%s", line)
        return True

    def _forward(self, request: web.BaseRequest) -> Awaitable[web.StreamResponse]:
        # Not a coroutine itself: the forwarder's coroutine is awaited by the observer.
        assert self.forwarder is not None
        work = self.forwarder.handle(request)
        hsts = self.config.proxy.hsts
        if hsts is None or not request.secure:
            return work
        return _own_answer_with_hsts(request, work, hsts.header())

    def proxy_handler(self) -> Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]:
        """Every request to the proxy listener, whatever its path: for aiohttp's low-level
        ``web.Server`` (no Application, no router: measured +6 to +16 % req/s under load).
        Serve it within ``lifespan()``."""
        return self.observer.wrap(self._forward, lambda: self.on_request)

    def admin_app(self, scrape: Scrape | None = None) -> web.Application:
        """The admin app; ``scrape``: where its metrics come from (default: this process)."""
        return build_admin_app(
            lambda: self.runtime,
            scrape or Scrape.local(self.metrics),
            lambda: self.draining,
            lambda: self.last_reload,
        )


async def _own_answer_with_hsts(
    request: web.BaseRequest, work: Awaitable[web.StreamResponse], value: str
) -> web.StreamResponse:
    """geoproxy's own answers over HTTPS carry HSTS too (a geode's answer was given it
    with the lines this hop adds: ``Route.hsts``)."""
    response = await work
    trace = request.get(TRACE_KEY)
    if not response.prepared and (trace is None or trace.geode is None):
        response.headers["Strict-Transport-Security"] = value
    return response


def _bound(config: Config) -> tuple[object, ...]:
    """What of the listeners takes effect only at start-up: where they bind, and
    whether the proxy listener speaks HTTPS (its certificates are reloaded)."""
    proxy = config.proxy
    return (proxy.host, proxy.port, proxy.tls is None, config.admin, config.redirect)


def _date(epoch: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(epoch))


async def _stop(task: asyncio.Task[None]) -> None:
    """Cancel a background task and wait for it; a failure it ended with is logged."""
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    except Exception:
        log.exception("background task %s had failed", task.get_name())
