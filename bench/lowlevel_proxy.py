#!/usr/bin/env python3
"""geoproxy served by aiohttp's low-level ``web.Server`` instead of ``web.Application``
with a router: the same Gateway, forwarder and observer, one handler for every request
(no URL dispatch, no match info, no per-app signals). Measures what app.py/server.py
would gain from that switch; the slowloris head timer (HeadTimeoutRunner) is left out.

    python bench/lowlevel_proxy.py CONFIG   (listens on the config's proxy port)"""

from __future__ import annotations

import asyncio
import sys

import uvloop
from aiohttp import web

from geoproxy import config as config_mod
from geoproxy.app import Gateway


def main() -> None:
    cfg = config_mod.load(sys.argv[1])

    async def serve() -> None:
        gateway = Gateway(cfg)
        lifespan = gateway._lifespan(web.Application())
        await lifespan.__anext__()  # runtime, pool, first health round
        handler = gateway.observer.wrap(gateway._forward, lambda: None)
        server = web.Server(handler, access_log=None,  # type: ignore[arg-type]
                            keepalive_timeout=cfg.limits.keepalive_timeout)  # fmt: skip
        loop = asyncio.get_running_loop()
        await loop.create_server(server, cfg.proxy.host, cfg.proxy.port, reuse_address=True)
        await asyncio.Event().wait()

    uvloop.run(serve())


if __name__ == "__main__":
    main()
