"""``geoproxy run --workers N``: the supervisor of N worker processes (worker.py).

The supervisor binds N listening sockets to the proxy address with SO_REUSEPORT (the Linux
kernel spreads new connections over them), runs the active health checks, the config
watcher and the admin listener, and starts N workers; each serves one of the sockets on
its own event loop. Workers run no health checks: the supervisor hands them every change
of active health, so the geodes see one checker, not N + 1. Passive ejection stays per
worker (each sees its own traffic). Workers get the supervisor's config as bytes, at start
and after each of its successful reloads, and never read the files themselves.

A worker that exits unexpectedly, or stops answering, is started again with backoff on the
same socket: connections that arrive meanwhile wait in that socket's backlog. Workers run
in their own session (a terminal's Ctrl-C reaches only the supervisor, which stops them
gracefully) and are killed by the kernel if the supervisor dies, so none is orphaned.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from geoproxy.config.changes import plural
from geoproxy.config.values import Config
from geoproxy.errors import GeoproxyError
from geoproxy.health.board import GeodeHealth
from geoproxy.process import control, fleet
from geoproxy.process.app import Gateway
from geoproxy.process.server import (
    DRAIN_MARGIN,
    Bound,
    cancel_and_wait,
    log_certificates,
    serve_until_stopped,
    start_redirect,
    start_site,
    unless_stopped,
    watch_config,
)
from geoproxy.process.sockets import check_free, close_all, reuseport_sockets
from geoproxy.process.worker_handle import Worker, describe_exit
from geoproxy.surfaces.admin import Scrape
from geoproxy.surfaces.metrics import WorkerMetrics

log = logging.getLogger("geoproxy")

#: A worker's start-up (interpreter, imports, GeoIP database, its first message), in
#: seconds; GEOPROXY_WORKER_START_TIMEOUT overrides it (a slow disk, a huge database).
READY_TIMEOUT = 30.0
START_TIMEOUT_VAR = "GEOPROXY_WORKER_START_TIMEOUT"
_METRICS_POLL = 5.0  # counts are also fetched this often: a crash loses at most this much
_MISSES = 3  # polls in a row a worker may leave unanswered before it counts as hung
MAX_WORKERS = 256


# -- sockets ------------------------------------------------------------------------------


class Supervisor:
    def __init__(
        self,
        gateway: Gateway,
        sockets: list[list[socket.socket]],
        argv: list[str],
        fleet_: fleet.Fleet,
        metrics: WorkerMetrics,
        ready_timeout: float = READY_TIMEOUT,
    ) -> None:
        self.gateway = gateway
        self.ready_timeout = ready_timeout
        self.sockets = sockets
        self.fleet = fleet_
        self.metrics = metrics
        self.workers = [
            Worker(i, s, argv, self._hello, fleet_.update, self._geoip_fd)
            for i, s in enumerate(sockets)
        ]
        self.stopping = False
        self._watchers: list[asyncio.Task[None]] = []
        self._refresh_lock = asyncio.Lock()
        gateway.board.on_transition.append(lambda _state: self.broadcast_health())
        gateway.board.on_check.append(self._on_check)
        gateway.on_reload.append(self.broadcast_reload)
        gateway.on_geoip.append(lambda db: self._broadcast(control.geoip(db.identity.as_list())))

    def _geoip_fd(self) -> int | None:
        db = self.gateway.geoip
        return None if db is None else db.fd

    def _hello(self) -> control.Message:
        config = self.gateway.config
        db = self.gateway.geoip  # the one whose descriptor the worker inherits, or newer
        return control.start(
            str(config.path),
            control.encode_sources(config),
            control.health_snapshot(self.gateway.board),
            None if db is None else db.identity.as_list(),
            len(self.workers),
        )

    async def start(self) -> None:
        """Start every worker and wait until each serves; one that fails to start fails
        the whole start-up, with its exit code."""
        for worker in self.workers:
            try:
                await worker.start()
            except OSError as exc:  # out of file descriptors or memory, say
                raise GeoproxyError(
                    f"cannot start worker {worker.index}: {exc.strerror or exc}"
                ) from None
        pending = {asyncio.ensure_future(w.until_ready()): w for w in self.workers}
        try:
            async with asyncio.timeout(self.ready_timeout):
                while pending:
                    done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        worker = pending.pop(task)
                        if (code := task.result()) is not None:
                            raise GeoproxyError(
                                f"worker {worker.index} exited during start-up "
                                f"({describe_exit(code)}); see its messages above"
                            )
        except TimeoutError:
            raise GeoproxyError(
                f"workers did not start within {self.ready_timeout:g}s ({START_TIMEOUT_VAR})"
            ) from None
        finally:
            for task in pending:
                task.cancel()
        self._count_serving()
        self._watchers = [
            asyncio.create_task(self._watch(w), name=f"watch-worker-{w.index}")
            for w in self.workers
        ]

    async def _watch(self, worker: Worker) -> None:
        """Start the worker again whenever it exits, until the supervisor stops."""
        backoff = 0.25
        while not self.stopping:
            try:
                code = await worker.wait()
                if self.stopping:
                    return
                self._count_serving()
                served = 0.0 if worker.ready_at is None else time.monotonic() - worker.ready_at
                backoff = 0.5 if served > 30 else min(backoff * 2, 10.0)
                clean = code == 0
                if clean:
                    # Not called a crash at once: with systemd's KillMode=control-group a
                    # worker's own SIGTERM (a clean drain, exit code 0) can be ahead of
                    # the supervisor's.
                    await asyncio.sleep(backoff)
                    if self.stopping:
                        return
                self.fleet.retire(worker.index)
                self.metrics.restarts.inc()
                log.error(
                    "worker %d (pid %s) exited unexpectedly (%s); starting it again in %gs",
                    worker.index,
                    worker.pid,
                    describe_exit(code),
                    0 if clean else backoff,
                )
                if not clean:
                    await asyncio.sleep(backoff)
                await self._restart(worker, backoff)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not leave a worker dead for good
                log.exception("supervising worker %d failed; trying again", worker.index)
                await asyncio.sleep(1.0)

    async def _restart(self, worker: Worker, backoff: float) -> None:
        """Start it again and wait until it serves; one that does not within
        ``ready_timeout`` is killed (and ``_watch`` starts it again)."""
        while True:
            if self.stopping:
                return
            try:
                await worker.start()
            except OSError as exc:  # fork or exec failed: out of memory, say
                backoff = min(backoff * 2, 10.0)
                log.error(
                    "worker %d could not be started (%s); trying again in %gs",
                    worker.index,
                    exc.strerror or exc,
                    backoff,
                )
                await asyncio.sleep(backoff)
                continue
            break
        try:
            async with asyncio.timeout(self.ready_timeout):
                await worker.until_ready()  # an exit: _watch sees it
            if worker.ready.is_set():
                log.info("worker %d started again (pid %s)", worker.index, worker.pid)
        except TimeoutError:
            if not self.stopping:
                log.error(
                    "worker %d (pid %s) did not start within %gs; killing it",
                    worker.index,
                    worker.pid,
                    self.ready_timeout,
                )
                worker.kill()
        self._count_serving()

    def _count_serving(self) -> None:
        self.metrics.running.set(sum(w.running and w.ready.is_set() for w in self.workers))

    def _broadcast(self, message: Mapping[str, Any]) -> None:
        for worker in self.workers:
            worker.send(message)

    def broadcast_health(self) -> None:
        self._broadcast(control.health(control.health_snapshot(self.gateway.board)))

    def _on_check(self, state: GeodeHealth, ok: bool, _latency: float | None) -> None:
        if ok:  # a pass re-admits a geode a worker ejected
            self._broadcast(control.passed(state.geode.name, str(state.geode.url)))

    def broadcast_reload(self) -> None:
        self._broadcast(
            control.reload(
                control.encode_sources(self.gateway.config),
                control.health_snapshot(self.gateway.board),
            )
        )

    async def refresh_metrics(self) -> None:
        """Fetch every worker's counts (one round at a time across concurrent scrapes). A
        worker that leaves _MISSES rounds in a row unanswered is hung: it is killed, and
        started again like a worker that crashed."""
        async with self._refresh_lock:
            live = [w for w in self.workers if w.running and w.ready.is_set()]
            answers = await asyncio.gather(*(w.ask_metrics() for w in live))
            for worker, answered in zip(live, answers, strict=True):
                worker.misses = 0 if answered else worker.misses + 1
                if worker.misses >= _MISSES and worker.running and not self.stopping:
                    log.error(
                        "worker %d (pid %s) has not answered for %d rounds; killing it",
                        worker.index,
                        worker.pid,
                        worker.misses,
                    )
                    worker.kill()

    async def poll_metrics(self) -> None:
        while True:
            await asyncio.sleep(_METRICS_POLL)
            await self.refresh_metrics()

    async def stop(self, grace: float) -> None:
        """Tell every worker to drain, wait up to ``grace`` seconds, kill what is left."""
        self.stopping = True
        for watcher in self._watchers:
            watcher.cancel()
        # A restart cancelled halfway leaves no channel or process half made.
        await asyncio.gather(*self._watchers, return_exceptions=True)
        # Our copies of the sockets go first: once the workers close theirs, the port
        # refuses new connections instead of queueing them where nobody will accept.
        close_all(self.sockets)
        live = [w for w in self.workers if w.running]
        for worker in live:
            worker.stop()
        waits = [asyncio.ensure_future(w.wait()) for w in live]
        if not waits:
            return
        _, pending = await asyncio.wait(waits, timeout=grace)
        for worker, waited in zip(live, waits, strict=True):
            if waited in pending:
                log.error("worker %d did not stop within %gs; killing it", worker.index, grace)
                worker.kill()
        if pending:
            await asyncio.wait(pending)
        for worker, waited in zip(live, waits, strict=True):
            if waited.result() != 0:  # a clean stop is exit code 0
                log.warning(
                    "worker %d (pid %s) stopped with %s",
                    worker.index,
                    worker.pid,
                    describe_exit(waited.result()),
                )
        self.metrics.running.set(0)
        log.info(
            "geoproxy stopped: %s drained, %d cut off by shutdown.drain_timeout (over %s)",
            plural(sum(w.drained for w in live), "request"),
            sum(w.cut for w in live),
            plural(len(live), "worker"),
        )


def start_timeout() -> float:
    text = os.environ.get(START_TIMEOUT_VAR, "")
    if not text:
        return READY_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise GeoproxyError(f"{START_TIMEOUT_VAR}={text!r}: expected seconds, a number > 0")
    return value


async def serve_workers(
    config: Config,
    count: int,
    stop: asyncio.Event,
    reload: asyncio.Event | None = None,
    on_ready: Callable[[Bound], None] | None = None,
    log_level: str = "info",
) -> None:
    """Run the proxy as ``count`` worker processes under this supervisor until ``stop``."""
    ready_timeout = start_timeout()
    if config.admin.port:
        check_free(config.admin, "admin")  # before any worker takes a connection
    sockets = reuseport_sockets(config.proxy, count)
    own = CollectorRegistry()
    gateway = Gateway(config, registry=own)
    fleet_ = fleet.Fleet(own)
    exposed = CollectorRegistry()
    exposed.register(fleet_)
    argv = [sys.executable, "-m", "geoproxy", "worker", "--log-level", log_level]
    supervisor = Supervisor(gateway, sockets, argv, fleet_, WorkerMetrics(own), ready_timeout)
    scrape = Scrape(exposed, supervisor.refresh_metrics, fleet_.traffic)
    admin_runner = web.AppRunner(
        gateway.admin_app(scrape),
        access_log=None,
        handle_signals=False,
        shutdown_timeout=config.lifecycle.drain_timeout,
    )

    async def stop_workers() -> None:
        # Each worker exits within drain_timeout + DRAIN_MARGIN (server.py); what is
        # still running then is killed, so the supervisor keeps to the same bound.
        await supervisor.stop(gateway.config.lifecycle.drain_timeout + DRAIN_MARGIN)

    log.info(
        "geoproxy starting %d workers: first health round over %s",
        count,
        plural(len(config.geodes), "geode"),
    )
    async with contextlib.AsyncExitStack() as stack:  # undone in reverse
        stack.push_async_callback(admin_runner.cleanup)
        stack.callback(close_all, sockets)
        # The gateway's lifespan (GeoIP, health checks) runs here; the workers serve.
        if not await unless_stopped(stack.enter_async_context(gateway.lifespan()), stop):
            log.info("geoproxy stopped during start-up")
            return
        stack.push_async_callback(stop_workers)
        if not await unless_stopped(supervisor.start(), stop):
            log.info("geoproxy stopped during start-up")
            return
        await admin_runner.setup()
        admin = await start_site(admin_runner, "admin", config.admin, False)
        host, port = sockets[0][0].getsockname()[:2]
        plain = await start_redirect(stack, config, int(port), False)
        bound = Bound((str(host), int(port)), admin, config.proxy.tls is not None, plain)
        log_certificates(config)
        log.info(
            "geoproxy proxying on %s with %d workers (pids %s), admin on %s",
            bound.proxy_url,
            count,
            " ".join(str(w.pid) for w in supervisor.workers),
            bound.admin_url,
        )
        for task in (
            asyncio.create_task(
                watch_config(gateway, reload or asyncio.Event()), name="geoproxy-config-watch"
            ),
            asyncio.create_task(supervisor.poll_metrics(), name="geoproxy-worker-metrics"),
        ):
            stack.push_async_callback(cancel_and_wait, task)
        await serve_until_stopped(gateway, bound, stop, on_ready)
