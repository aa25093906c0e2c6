"""Serving a ``Gateway`` on its two listeners until told to stop."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from geoproxy.app import Gateway
from geoproxy.config import Config, Listener
from geoproxy.errors import GeoproxyError

log = logging.getLogger("geoproxy")


class ListenError(GeoproxyError):
    """A listener could not bind."""


@dataclass(frozen=True, slots=True)
class Bound:
    proxy: tuple[str, int]
    admin: tuple[str, int]

    @property
    def proxy_url(self) -> str:
        return _url(*self.proxy)

    @property
    def admin_url(self) -> str:
        return _url(*self.admin)


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def _start_site(
    runner: web.AppRunner, what: str, listener: Listener, any_port_if_taken: bool
) -> tuple[str, int]:
    site = web.TCPSite(runner, listener.host, listener.port, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE and any_port_if_taken:
            log.warning("%s port %d is taken; using a free port instead", what, listener.port)
            return await _start_site(runner, what, Listener(listener.host, 0), False)
        raise ListenError(
            f"cannot listen for {what} on {listener.host}:{listener.port}: "
            f"{exc.strerror or exc}"
        ) from None
    host, port = runner.addresses[0][:2]  # one site per runner
    return str(host), int(port)


#: How long shutdown waits for in-flight requests before closing their connections.
DRAIN_TIMEOUT = 10.0


async def serve(
    config: Config,
    stop: asyncio.Event,
    on_ready: Callable[[Bound], None] | None = None,
    any_port_if_taken: bool = False,
) -> None:
    """Run the proxy and admin listeners until ``stop`` is set; clean up in reverse.

    A stop during start-up (GeoIP, first health round) abandons it: the listeners never
    open once told to stop."""
    gateway = Gateway(config)
    proxy_runner = web.AppRunner(gateway.proxy_app(), access_log=None, handle_signals=False,
                                 shutdown_timeout=DRAIN_TIMEOUT)  # fmt: skip
    admin_runner = web.AppRunner(gateway.admin_app(), access_log=None, handle_signals=False,
                                 shutdown_timeout=DRAIN_TIMEOUT)  # fmt: skip
    log.info("geoproxy starting: first health round over %d geodes", len(config.geodes))
    try:
        if not await _unless_stopped(proxy_runner.setup(), stop):
            log.info("geoproxy stopped during start-up")
            return
        await admin_runner.setup()
        proxy = await _start_site(proxy_runner, "proxy", config.proxy, any_port_if_taken)
        admin = await _start_site(admin_runner, "admin", config.admin, any_port_if_taken)
        bound = Bound(proxy, admin)
        log.info("geoproxy proxying on %s, admin on %s (%d geodes, %d healthy)",
                 bound.proxy_url, bound.admin_url, len(gateway.board.states),
                 len(gateway.board.healthy))  # fmt: skip
        if on_ready is not None:
            on_ready(bound)
        await stop.wait()
        log.info("geoproxy shutting down (waiting up to %gs for in-flight requests)",
                 DRAIN_TIMEOUT)  # fmt: skip
    finally:
        await admin_runner.cleanup()
        await proxy_runner.cleanup()


async def _unless_stopped(work: Coroutine[Any, Any, None], stop: asyncio.Event) -> bool:
    """Run ``work`` unless ``stop`` is set first (then cancel it); True if it finished."""
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        stopped.cancel()
        task.result()  # start-up errors (a GeoIP file, say) propagate
        return True
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return False
