"""Serving one stamp until told to stop: its public listener (``listen``) here, its peer
listener (``listen.peer``) opened by the app itself as it starts."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from geoproxy.errors import GeoproxyError
from geoproxy.stamp.app import build_stamp_app, stamp_runner
from geoproxy.stamp.config import StampConfig

log = logging.getLogger("geoproxy.stamp")


async def serve_stamp(config: StampConfig, stop: asyncio.Event) -> None:
    runner = stamp_runner(build_stamp_app(config))
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            raise GeoproxyError(
                f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}"
            ) from None
        host, port = runner.addresses[0][:2]
        log.info("stamp %s (%s) listening on http://%s:%d", config.name, config.region, host, port)
        await stop.wait()
    finally:
        await runner.cleanup()
