#!/usr/bin/env python3
"""geoproxy with region resolution, routing and metrics bypassed: the same forwarder, fast
lane and header rules, a fixed home geode, no metrics or access log. Measures what
routing + metrics cost.

    python bench/bypass_proxy.py CONFIG   (listens on the config's proxy port)"""

from __future__ import annotations

import asyncio
import sys

import uvloop
from aiohttp import web

from geoproxy.config import loader as config_mod
from geoproxy.process.app import Gateway
from geoproxy.process.server import freeze_startup_heap, make_proxy_runner
from geoproxy.proxy import prelude
from geoproxy.routing.resolver import Resolution
from geoproxy.routing.router import HOME, Candidate


def main() -> None:
    cfg = config_mod.load(sys.argv[1])
    geode = cfg.geodes[0]
    fixed = Resolution(geode.region, "default", None, None, ())
    # Measurement only: swap the routing functions prelude.py calls for constants.
    prelude.resolve = lambda *args: fixed  # type: ignore[assignment]
    prelude.ResolutionCache.resolve = lambda *args: fixed  # type: ignore[method-assign]
    plan = ([Candidate(geode, HOME)], HOME)
    prelude.CandidateCache.candidates = lambda *args: plan  # type: ignore[method-assign]

    async def serve() -> None:
        gateway = Gateway(cfg)
        forward = gateway._forward

        async def bypass(request: web.BaseRequest) -> web.StreamResponse:
            assert gateway.on_request is not None
            gateway.on_request(request.protocol)  # the head timer's hook, as the observer calls it
            return await forward(request)

        # No observer (no metrics); otherwise served as `geoproxy run` serves.
        gateway.proxy_handler = lambda: bypass  # type: ignore[method-assign]
        gateway.observer.note = lambda *args: None  # type: ignore[method-assign]  # fast lane
        async with gateway.lifespan():
            runner = make_proxy_runner(gateway)
            freeze_startup_heap()
            await runner.setup()
            await web.TCPSite(runner, cfg.proxy.host, cfg.proxy.port).start()
            await asyncio.Event().wait()

    uvloop.run(serve())


if __name__ == "__main__":
    main()
