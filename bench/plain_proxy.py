#!/usr/bin/env python3
"""The reference "straightforward aiohttp proxy": web server + one pooled ClientSession,
streaming both ways, no routing, no metrics. python bench/plain_proxy.py PORT UPSTREAM"""

from __future__ import annotations

import sys

import aiohttp
from aiohttp import web

HOP = {"connection", "keep-alive", "transfer-encoding", "upgrade", "te", "trailer",
       "proxy-connection", "proxy-authorization", "proxy-authenticate"}  # fmt: skip


def main() -> None:
    port, upstream = int(sys.argv[1]), sys.argv[2].rstrip("/")
    session: aiohttp.ClientSession | None = None

    async def startup(app: web.Application) -> None:
        nonlocal session
        session = aiohttp.ClientSession(auto_decompress=False)

    async def cleanup(app: web.Application) -> None:
        assert session is not None
        await session.close()

    async def handle(request: web.Request) -> web.StreamResponse:
        assert session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        async with session.request(request.method, upstream + request.path_qs,
                                   headers=headers, data=request.content if request.body_exists
                                   else None, allow_redirects=False) as up:  # fmt: skip
            resp = web.StreamResponse(status=up.status, headers={
                k: v for k, v in up.headers.items() if k.lower() not in HOP})  # fmt: skip
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    app = web.Application()
    app.on_startup.append(startup)
    app.on_cleanup.append(cleanup)
    app.router.add_route("*", "/{tail:.*}", handle)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


if __name__ == "__main__":
    main()
