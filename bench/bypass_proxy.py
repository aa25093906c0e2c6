#!/usr/bin/env python3
"""geoproxy with region resolution, routing and metrics bypassed: the same forwarder and
header rules, a fixed home geode, no observer. Measures what routing + metrics cost.

    python bench/bypass_proxy.py CONFIG   (listens on the config's proxy port)"""

from __future__ import annotations

import asyncio
import sys

import uvloop
from aiohttp import web

from geoproxy import config as config_mod
from geoproxy import forwarder
from geoproxy.app import Gateway
from geoproxy.resolver import Resolution
from geoproxy.router import HOME, Candidate


def main() -> None:
    cfg = config_mod.load(sys.argv[1])
    geode = cfg.geodes[0]
    fixed = Resolution(geode.region, "default", None, None, ())
    # Measurement only: swap the routing functions the forwarder calls for constants.
    forwarder.resolve = lambda *args: fixed  # type: ignore[assignment]
    plan = ([Candidate(geode, HOME)], HOME)
    forwarder.CandidateCache.candidates = lambda *args: plan  # type: ignore[method-assign]

    async def serve() -> None:
        gateway = Gateway(cfg)
        async with gateway.lifespan():
            server = web.Server(gateway._forward, access_log=None)  # no observer: no metrics
            runner = web.ServerRunner(server)
            await runner.setup()
            await web.TCPSite(runner, cfg.proxy.host, cfg.proxy.port).start()
            await asyncio.Event().wait()

    uvloop.run(serve())


if __name__ == "__main__":
    main()
