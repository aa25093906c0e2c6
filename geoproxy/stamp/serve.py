"""Serving one stamp until told to stop."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from geoproxy.errors import GeoproxyError
from geoproxy.stamp.app import build_stamp_app
from geoproxy.stamp.config import StampConfig

log = logging.getLogger("geoproxy.stamp")


async def serve_stamp(config: StampConfig, stop: asyncio.Event) -> None:
    runner = web.AppRunner(build_stamp_app(config), access_log=None, handle_signals=False,
                           shutdown_timeout=10.0)  # fmt: skip
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
        log.info("stamp %s (%s) listening on http://%s:%d", config.name, config.region, host,
                 port)  # fmt: skip
        await stop.wait()
    finally:
        await runner.cleanup()
