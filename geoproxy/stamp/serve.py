"""Serving one stamp until told to stop: its public listener (``listen``) here, its peer
listener (``listen.peer``) opened by the app itself as it starts."""

from __future__ import annotations

import asyncio
import logging
import socket

from aiohttp import web

from geoproxy.errors import GeoproxyError
from geoproxy.stamp.app import STATE, build_stamp_app, listen_site, stamp_runner
from geoproxy.stamp.config import StampConfig

log = logging.getLogger("geoproxy.stamp")

# What the process stage (the CLI, ``geoproxy demo``) uses of the stamp: this module and
# ``config``; the rest of the package is the stamp's own.


def stamp_app(config: StampConfig, peer_sock: socket.socket | None = None) -> web.Application:
    """One stamp's public app; its peer listener starts and stops with it (on
    ``peer_sock`` when given, already bound)."""
    return build_stamp_app(config, peer_sock=peer_sock)


def runner_for(app: web.Application) -> web.AppRunner:
    """A stamp's runner carries its listener limits (head timeout, idle keep-alive); any
    other app gets a plain one."""
    return stamp_runner(app) if STATE in app else web.AppRunner(app, access_log=None)


def peer_listener(app: web.Application) -> tuple[str, str] | None:
    """(stamp name, URL of its peer listener) once started; None for another app."""
    state = app.get(STATE)
    if state is None or state.peer_address is None:
        return None
    host, port = state.peer_address
    scheme = "https" if state.config.tls else "http"
    return state.config.name, f"{scheme}://{host}:{port}"


async def serve_stamp(config: StampConfig, stop: asyncio.Event) -> None:
    runner = stamp_runner(build_stamp_app(config))
    await runner.setup()
    try:
        context = config.tls.server_context(peers=False) if config.tls else None
        site = listen_site(runner, config.host, config.port, context)
        try:
            await site.start()
        except OSError as exc:
            raise GeoproxyError(
                f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}"
            ) from None
        host, port = runner.addresses[0][:2]
        scheme = "https" if config.tls else "http"
        log.info(
            "stamp %s (%s) listening on %s://%s:%d", config.name, config.region, scheme, host, port
        )
        await stop.wait()
    finally:
        await runner.cleanup()
