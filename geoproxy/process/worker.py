"""One worker process of ``geoproxy run --workers N`` (the supervisor is supervisor.py).

A worker serves the listening sockets it inherited and does what its supervisor says over
the control channel (control.py: every message type, both ways).

``config`` carries the exact bytes of the supervisor's config files (``Config.sources``):
a worker never reads them from disk, so it serves the config the supervisor validated and
health-checks, even when the files have changed or broken since. Likewise the GeoIP
database: a worker starts from the descriptor of the file the supervisor opened
(``--geoip-fd``), and after a ``geoipupdate`` opens the new file only when it is the one the
supervisor opened and probed (same device, inode, mtime and size).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
from collections.abc import Mapping
from typing import Any

from geoproxy.config.changes import plural
from geoproxy.errors import GeoproxyError
from geoproxy.process import acceptor, control, fleet
from geoproxy.process.app import Gateway
from geoproxy.process.server import (
    HeadTimeoutRunner,
    cancel_and_wait,
    freeze_startup_heap,
    make_proxy_runner,
    unless_stopped,
)
from geoproxy.routing.geoip import FileIdentity, fd_path

log = logging.getLogger("geoproxy")


def die_with_supervisor(supervisor_pid: int) -> None:
    """Have the kernel kill this process when its parent dies (Linux); if the supervisor
    is already gone, exit now."""
    if sys.platform == "linux":
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != supervisor_pid:
        raise SystemExit("geoproxy worker: the supervisor has gone")


class _Channel:
    """The worker's end of the control channel and what it is told."""

    def __init__(
        self,
        gateway: Gateway,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        stop: asyncio.Event,
    ) -> None:
        self.gateway = gateway
        self.reader, self.writer = reader, writer
        self.stop = stop

    def send(self, message: Mapping[str, Any]) -> None:
        if not self.writer.is_closing():
            self.writer.write(control.encode(message))

    async def handle(self, message: dict[str, Any]) -> None:
        gateway = self.gateway
        op = message["op"]
        if op == control.HEALTH:
            gateway.adopt_health(control.health_results(message["health"]))
        elif op == control.PASSED:
            gateway.board.check_passed(message["geode"], message["url"])
        elif op == control.RELOAD:
            ok = True
            try:
                new = control.load_sent(str(gateway.config.path), message["config"])
                await gateway.reload(new)
            except GeoproxyError as exc:  # the supervisor loaded it: rare
                ok = False
                log.error("reload failed; the running config stays:\n%s", exc)
            gateway.adopt_health(control.health_results(message["health"]))
            self.send(control.reloaded(ok, gateway.config.fingerprint.hex()))
        elif op == control.GEOIP:
            await gateway.refresh_geoip(FileIdentity(*message["identity"]))
        elif op == control.METRICS:
            families = fleet.snapshot(gateway.metrics.registry)
            self.send(control.metrics(message.get("id"), families))
        elif op == control.STOP:
            if not self.stop.is_set():
                log.info("the supervisor says stop: draining")
            self.stop.set()

    async def drain(self, runner: HeadTimeoutRunner) -> None:
        """Stop accepting, drain and close; tell the supervisor the counts."""
        drained, cut = await runner.drain(self.gateway)
        log.info(
            "worker stopped: %s drained, %d cut off by shutdown.drain_timeout",
            plural(drained, "request"),
            cut,
        )
        self.send(control.drained(drained, cut))
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()

    async def obey(self) -> None:
        with contextlib.suppress(ConnectionError, ValueError):  # ValueError: line too long
            while raw := await self.reader.readline():
                try:
                    await self.handle(control.decode(raw))
                except Exception:  # a bug here must not cut the worker off its supervisor
                    log.exception("cannot handle %.200r", raw)
        if not self.stop.is_set():
            log.warning("the supervisor went away; stopping")
            self.stop.set()


async def serve_worker(
    sockets: list[socket.socket],
    channel_socket: socket.socket,
    stop: asyncio.Event,
    geoip_fd: int | None = None,
) -> None:
    """Serve the proxy on ``sockets`` with the config, health and reloads the supervisor
    sends, until ``stop`` (a signal, or the supervisor says so or goes away).
    ``geoip_fd``: the GeoIP database the supervisor opened (inherited)."""
    reader, writer = await asyncio.open_unix_connection(
        sock=channel_socket, limit=control.LINE_LIMIT
    )
    first = await reader.readline()
    if not first:
        return  # the supervisor went away before it said anything
    hello = control.decode(first)
    gateway = Gateway(
        control.load_sent(hello["path"], hello["config"]),
        active_health=False,
        geoip_source=None if geoip_fd is None else fd_path(geoip_fd),
        share=int(hello.get("workers", 1)),
    )
    channel = _Channel(gateway, reader, writer, stop)
    runner = make_proxy_runner(gateway)
    async with contextlib.AsyncExitStack() as stack:  # undone in reverse
        started = await unless_stopped(stack.enter_async_context(gateway.lifespan()), stop)
        if geoip_fd is not None:
            os.close(geoip_fd)  # opened again by the gateway, or not needed
        if not started:
            return
        stack.callback(writer.close)
        gateway.adopt_health(control.health_results(hello["health"]))
        if hello.get("geoip") is not None:  # swapped since this process was forked?
            await gateway.refresh_geoip(FileIdentity(*hello["geoip"]))
        obeying = asyncio.create_task(channel.obey(), name="geoproxy-worker-control")
        stack.push_async_callback(cancel_and_wait, obeying)  # after the drain: still obeys
        stack.push_async_callback(channel.drain, runner)  # stop accepting, drain, close
        freeze_startup_heap()
        await runner.setup()
        for sock in sockets:
            front = None if gateway.tls is None else gateway.tls.front
            await acceptor.site(runner, sock, front).start()
        channel.send(control.ready(gateway.config.fingerprint.hex()))
        await stop.wait()
        gateway.start_draining()
