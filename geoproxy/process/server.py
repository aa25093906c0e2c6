"""Serving a ``Gateway`` on its two listeners until told to stop."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import ssl
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from geoproxy.config.changes import plural
from geoproxy.config.loader import files_fingerprint
from geoproxy.config.tls import certificate_line
from geoproxy.config.values import Config, Listener
from geoproxy.errors import ListenError
from geoproxy.process import acceptor, sockets
from geoproxy.process.app import Gateway
from geoproxy.proxy import compat, redirect
from geoproxy.proxy.fastlane import ProxyServer
from geoproxy.proxy.responses import HeadDeadline
from geoproxy.surfaces.observe import Observer

log = logging.getLogger("geoproxy")

#: Seconds a stop may take beyond ``shutdown.drain_timeout``: cutting off what is still in
#: flight then, and closing. The process exits within drain_timeout + DRAIN_MARGIN.
DRAIN_MARGIN = 1.0
_CUT_WAIT = 0.5  # of that margin: for the requests cut off to finish their bookkeeping
_POLL = 0.02  # seconds between two looks at the in-flight count while draining


@dataclass(frozen=True, slots=True)
class Bound:
    proxy: tuple[str, int]
    admin: tuple[str, int]
    https: bool = False  # the proxy listener speaks HTTPS
    redirect: tuple[str, int] | None = None  # the plain-HTTP listener redirecting to it

    @property
    def proxy_url(self) -> str:
        return _url(*self.proxy, "https" if self.https else "http")

    @property
    def admin_url(self) -> str:
        return _url(*self.admin)


def _url(host: str, port: int, scheme: str = "http") -> str:
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


async def start_site(
    runner: web.BaseRunner,
    what: str,
    listener: Listener,
    any_port_if_taken: bool,
    ssl_context: ssl.SSLContext | None = None,
) -> tuple[str, int]:
    where = f"cannot listen for {what} on {listener.host}:{listener.port}"
    try:
        socks = sockets.listening(listener, where)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE and any_port_if_taken:
            log.warning("%s port %d is taken; using a free port instead", what, listener.port)
            return await start_site(runner, what, Listener(listener.host, 0), False, ssl_context)
        raise ListenError(f"{where}: {exc.strerror or exc}") from None
    try:
        for sock in socks:
            await acceptor.site(runner, sock, ssl_context).start()
    except BaseException:
        sockets.close_all([socks])
        raise
    host, port = runner.addresses[0][:2]  # the first address's
    return str(host), int(port)


class HeadTimeoutRunner(web.ServerRunner):
    """A runner whose connections get a ``HeadDeadline`` (the proxy calls ``note_request``
    first thing for every request)."""

    def __init__(self, server: web.Server, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(server, **kwargs)
        self.header_timeout = header_timeout
        self.heads = HeadDeadline(header_timeout)
        self.note_request = self.heads.note_request

    @property
    def server(self) -> Any:
        inner = super().server
        return None if inner is None else self.heads.wrap(inner)

    async def drain(self, gateway: Gateway) -> tuple[int, int]:
        """Stop accepting, give in-flight requests ``shutdown.drain_timeout`` to finish,
        then cut off what is left (closing its connection; logged with status 503 and
        ``cut``), close everything. Returns (requests drained, requests cut). aiohttp's
        own ``shutdown(timeout)`` waits, cancels, then waits again: up to twice the
        timeout, while the configured value is what stop timeouts are sized by."""
        timeout = gateway.config.lifecycle.drain_timeout
        observer = gateway.observer
        observer.draining = True
        for site in list(self.sites):
            await site.stop()
        inner = super().server
        if inner is not None:
            inner.pre_shutdown()  # idle connections close; busy ones after their answer
            if not await _until_idle(observer, timeout):
                log.warning(
                    "shutdown.drain_timeout (%gs) is over: cutting off %s still in flight",
                    timeout,
                    plural(observer.inflight, "request"),
                )
                observer.cutting = True
                for connection in inner.connections:
                    connection.force_close()
                await _until_idle(observer, _CUT_WAIT)
        await self.cleanup()
        return observer.drained, observer.cut


async def _until_idle(observer: Observer, seconds: float) -> bool:
    """Wait up to ``seconds`` for no request to be in flight; True if none is."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    # A poll: the count is a plain int, changed from the fast lane's callbacks too.
    while observer.inflight > 0 and loop.time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(_POLL)
    return observer.inflight == 0


#: The cyclic collector's young-generation threshold once started (CPython's default is
#: 700 net container allocations). Requests in flight hold a few thousand short-lived
#: containers at c=200 whose ebb and flow crossed 700 every ~130 requests: ~380 young
#: collections per 50k browser-like requests, ~0.6 ms of CPU each (about 5 µs per
#: request) with every request behind one waiting. Nearly all of it is freed by reference
#: counting; cycles (a closed connection's protocol and transport) are few, and at 20,000
#: they wait at most a few MiB before a collection frees them.
YOUNG_THRESHOLD = 20_000


def freeze_startup_heap() -> None:
    """Take what is alive once started (modules, aiohttp, config, topology, GeoIP reader)
    out of the cyclic garbage collector's reach: under load its full collections walk all
    of it again and again, and the requests that wait behind one make the latency tail.
    Measured (bench/ab.py, c=200): p99 39-45 ms -> 20-23 ms, p99/p50 about 3 -> 1.6.
    Reference counting still frees these objects; only cycles among them would stay.
    Then young collections run every ``YOUNG_THRESHOLD`` net allocations, not 700."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)


class PublicServer(web.Server):
    """aiohttp's own low-level server, for public mode (``compat``): no fast lane, and
    none of ``ProxyConnection``'s fixes to aiohttp's request parsing."""

    def __init__(self, gateway: Gateway, **kwargs: Any) -> None:
        super().__init__(gateway.proxy_handler(), **kwargs)


def make_proxy_runner(gateway: Gateway) -> HeadTimeoutRunner:
    """The runner of the proxy listener: limits and drain time from the config. The
    gateway's ``lifespan()`` must be entered around it."""
    config = gateway.config
    # handler_cancellation: a client that goes away cancels its request, and with it the
    # exchange with the geode (logged as 499, as nginx does). aiohttp's default keeps
    # forwarding to the geode for nobody (its test server turns it on).
    # auto_decompress=False: a request body passes as it came, whatever its
    # Content-Encoding. aiohttp inflates it by default, and the geode then got the
    # inflated bytes under the client's Content-Length (truncated, altered); inflating
    # is also what makes a decompression bomb cost the edge, not the geode.
    kind = ProxyServer if compat.lean() else PublicServer
    server = kind(
        gateway,
        access_log=None,
        handler_cancellation=True,
        keepalive_timeout=config.limits.keepalive_timeout,
        auto_decompress=False,
    )
    # shutdown_timeout: what is left once ``drain`` has cut off what outlived the drain.
    runner = HeadTimeoutRunner(
        server, config.limits.header_timeout, handle_signals=False, shutdown_timeout=_CUT_WAIT
    )
    gateway.on_request = runner.note_request
    return runner


async def serve(
    config: Config,
    stop: asyncio.Event,
    on_ready: Callable[[Bound], None] | None = None,
    any_port_if_taken: bool = False,
    reload: asyncio.Event | None = None,
) -> None:
    """Run the proxy and admin listeners until ``stop`` is set; clean up in reverse.

    A stop during start-up (GeoIP, first health round) abandons it: the listeners never
    open once told to stop. ``reload`` (SIGHUP) and a change of the config files' content
    reload the config. On stop: /readyz turns 503 at once, the proxy listener stops
    accepting, in-flight requests get ``shutdown.drain_timeout`` to finish."""
    gateway = Gateway(config)
    proxy_runner = make_proxy_runner(gateway)
    admin_runner = web.AppRunner(
        gateway.admin_app(), access_log=None, handle_signals=False, shutdown_timeout=_CUT_WAIT
    )
    log.info("geoproxy starting: first health round over %s", plural(len(config.geodes), "geode"))
    async with contextlib.AsyncExitStack() as stack:  # undone in reverse
        stack.push_async_callback(admin_runner.cleanup)  # last: /readyz 503 while draining
        if not await unless_stopped(stack.enter_async_context(gateway.lifespan()), stop):
            log.info("geoproxy stopped during start-up")
            return
        stack.push_async_callback(drain_and_report, proxy_runner, gateway, "geoproxy")
        freeze_startup_heap()
        await proxy_runner.setup()
        await admin_runner.setup()
        front = None if gateway.tls is None else gateway.tls.front
        proxy = await start_site(proxy_runner, "proxy", config.proxy, any_port_if_taken, front)
        admin = await start_site(admin_runner, "admin", config.admin, any_port_if_taken)
        plain = await start_redirect(stack, config, proxy[1], any_port_if_taken)
        bound = Bound(proxy, admin, front is not None, plain)
        log_certificates(config)
        log.info(
            "geoproxy proxying on %s, admin on %s (%s, %d healthy)",
            bound.proxy_url,
            bound.admin_url,
            plural(len(gateway.board.states), "geode"),
            len(gateway.board.healthy),
        )
        watcher = asyncio.create_task(
            watch_config(gateway, reload or asyncio.Event()), name="geoproxy-config-watch"
        )
        stack.push_async_callback(cancel_and_wait, watcher)
        await serve_until_stopped(gateway, bound, stop, on_ready)


async def start_redirect(
    stack: contextlib.AsyncExitStack, config: Config, proxy_port: int, any_port_if_taken: bool
) -> tuple[str, int] | None:
    """The plain-HTTP listener that answers 308 to HTTPS (``listen.redirect``), if set,
    and where it listens; closed by ``stack``. ``proxy_port``: the proxy listener's bound
    port."""
    if config.redirect is None:
        return None
    to = config.redirect.https_port or proxy_port
    answer = redirect.handler(to)

    async def noted(request: web.BaseRequest) -> web.StreamResponse:
        runner.note_request(request.protocol)
        return await answer(request)

    # The proxy listener's limits on the head and idle connections hold here too: this
    # listener faces the same clients (slowloris on port 80).
    limits = config.limits
    server = web.Server(noted, access_log=None, keepalive_timeout=limits.keepalive_timeout)
    runner = HeadTimeoutRunner(
        server, limits.header_timeout, handle_signals=False, shutdown_timeout=_CUT_WAIT
    )
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    where = Listener(config.redirect.host, config.redirect.port)
    host, port = await start_site(runner, "redirect", where, any_port_if_taken)
    log.info("redirecting plain HTTP on %s to HTTPS port %d", _url(host, port), to)
    return host, port


def log_certificates(config: Config) -> None:
    """One line per certificate of the proxy listener, as check-config prints it."""
    now = time.time()
    for certificate in config.proxy.tls.certificates if config.proxy.tls else ():
        log.info("HTTPS certificate %s", certificate_line(certificate, now))


async def drain_and_report(runner: HeadTimeoutRunner, gateway: Gateway, who: str) -> None:
    """Stop accepting, drain, close (``HeadTimeoutRunner.drain``); log the counts."""
    drained, cut = await runner.drain(gateway)
    log.info(
        "%s stopped: %s drained, %d cut off by shutdown.drain_timeout",
        who,
        plural(drained, "request"),
        cut,
    )


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def serve_until_stopped(
    gateway: Gateway, bound: Bound, stop: asyncio.Event, on_ready: Callable[[Bound], None] | None
) -> None:
    """Tell ``on_ready``, serve until ``stop``, then turn /readyz to 503 (draining)."""
    if on_ready is not None:
        on_ready(bound)
    await stop.wait()
    gateway.start_draining()
    log.info(
        "geoproxy shutting down (in-flight requests get up to %gs)",
        gateway.config.lifecycle.drain_timeout,
    )


async def watch_config(gateway: Gateway, reload: asyncio.Event) -> None:
    """Reload on ``reload`` (SIGHUP), and when the content of a config file changes:
    compared by hash every ``reload.poll_interval``, which catches Kubernetes ConfigMap
    symlink swaps and bind mounts that inotify-based watchers miss. At the same moments
    the GeoIP database file is looked at (``Gateway.refresh_geoip``): ``geoipupdate``'s
    new file is opened and swapped in without a restart."""
    digest = gateway.config.fingerprint  # of the bytes it was loaded from, at start-up
    while True:
        interval = gateway.config.lifecycle.reload_poll_interval
        try:
            async with asyncio.timeout(interval if interval > 0 else None):
                await reload.wait()
            reason = "SIGHUP"
        except TimeoutError:
            reason = "config file changed"
        reload.clear()
        now = files_fingerprint(gateway.config.files)
        if reason == "SIGHUP" or now != digest:
            ok = await gateway.reload_from_file(reason)
            # A broken file is reported once, not at every poll.
            digest = gateway.config.fingerprint if ok else now
        await gateway.refresh_geoip()


async def unless_stopped(work: Coroutine[Any, Any, Any], stop: asyncio.Event) -> bool:
    """Run ``work`` unless ``stop`` is set first (then cancel it); True if it finished.
    When both happen at once the stop wins: a start-up that failed because of the stop
    (a worker that exited on the same SIGTERM, say) is no error to report."""
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if not stop.is_set():
        stopped.cancel()
        task.result()  # start-up errors (a GeoIP file, say) propagate
        return True
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    except Exception as exc:
        log.info("start-up ended by the stop (%s)", exc)
    return False
