#!/usr/bin/env python3
"""aiohttp's web server alone, answering by itself (no upstream): the ceiling for anything
served by aiohttp.web, geoproxy included. Same low-level ``web.Server``, uvloop and
``gc.freeze()`` as geoproxy; /16k answers 16 KiB, anything else 2 bytes.

    python bench/aiohttp_alone.py PORT"""

from __future__ import annotations

import asyncio
import gc
import sys

import uvloop
from aiohttp import web

BODIES = {"/16k": b"x" * 16384}
SMALL = b"ok"


async def handle(request: web.BaseRequest) -> web.Response:
    return web.Response(body=BODIES.get(request.path, SMALL))


async def serve(port: int) -> None:
    runner = web.ServerRunner(web.Server(handle, access_log=None), handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    gc.collect()
    gc.freeze()
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1])))
