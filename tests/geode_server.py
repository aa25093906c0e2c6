"""A geode as a real process, for the fault-injection tests (tests/test_faults.py): a test
can SIGKILL it, SIGSTOP it and start it again on the same port.

    python tests/geode_server.py NAME PORT [POST_LOG]

PORT 0 picks a free port. Once listening it prints ``geode NAME ready on http://HOST:PORT``.
POST_LOG, when given, gets one line per POST to /echo (its ``id`` query parameter), written
with O_APPEND as the request arrives, before the body is read: the line survives a SIGKILL.

/health            200 {"geode": NAME}
/whoami            {"geode": NAME} (any method)
/echo?id=          method, size and digest of the streamed body (any method)
/slow?delay=       answers after ``delay`` seconds
/reset?mode=       sends part of a body, waits a little, then resets the connection (RST). mode:
                   ``length`` (Content-Length larger than what is sent), ``chunked``, or
                   ``close`` (no length: the body would end when the connection closes)
/stats             {"slow_in_flight": n, "hits": {path: n}}
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct
import sys
from collections import Counter

from aiohttp import web

RESET_SENT = 1000  # bytes of body a /reset response sends before the abort


class Geode:
    def __init__(self, name: str, post_log: str | None) -> None:
        self.name = name
        self.hits: Counter[str] = Counter()
        self.slow_in_flight = 0
        self.post_log = (
            os.open(post_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if post_log else None
        )
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_route("*", "/whoami", self.whoami)
        app.router.add_route("*", "/echo", self.echo)
        app.router.add_get("/slow", self.slow)
        app.router.add_get("/reset", self.reset)
        app.router.add_get("/stats", self.stats)
        self.app = app

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"geode": self.name})

    async def whoami(self, request: web.Request) -> web.Response:
        self.hits["/whoami"] += 1
        await request.read()
        return web.json_response({"geode": self.name})

    async def echo(self, request: web.Request) -> web.Response:
        self.hits["/echo"] += 1
        if request.method == "POST" and self.post_log is not None:
            os.write(self.post_log, f"{request.query.get('id', '-')}\n".encode())
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            size += len(chunk)
        return web.json_response(
            {
                "geode": self.name,
                "method": request.method,
                "size": size,
                "sha256": digest.hexdigest(),
            }
        )

    async def slow(self, request: web.Request) -> web.Response:
        self.hits["/slow"] += 1
        self.slow_in_flight += 1
        try:
            await asyncio.sleep(float(request.query.get("delay", "1")))
        finally:
            self.slow_in_flight -= 1
        return web.json_response({"geode": self.name})

    async def reset(self, request: web.Request) -> web.StreamResponse:
        self.hits["/reset"] += 1
        mode = request.query.get("mode", "length")
        transport = request.transport
        assert transport is not None
        part = b"y" * RESET_SENT
        if mode == "close":  # aiohttp would frame it: write the head by hand
            transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                b"Connection: close\r\n\r\n" + part
            )
            await asyncio.sleep(0.05)
            _reset(transport)
            raise asyncio.CancelledError  # nothing more to send; aiohttp drops it quietly
        resp = web.StreamResponse()
        resp.content_type = "application/octet-stream"
        if mode == "chunked":
            resp.enable_chunked_encoding()
        else:
            resp.content_length = 100 * RESET_SENT
        await resp.prepare(request)
        await resp.write(part)
        await asyncio.sleep(0.05)
        _reset(transport)
        return resp

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response({"slow_in_flight": self.slow_in_flight, "hits": dict(self.hits)})


def _reset(transport: asyncio.BaseTransport) -> None:
    """Close with a TCP RST, not a FIN: a FIN is how a close-delimited body ends."""
    sock = transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


async def main(name: str, port: int, post_log: str | None) -> None:
    geode = Geode(name, post_log)
    runner = web.AppRunner(geode.app, access_log=None, handle_signals=False)
    await runner.setup()
    # reuse_address: a restarted geode binds the port its killed predecessor held.
    site = web.TCPSite(runner, "127.0.0.1", port, reuse_address=True, backlog=1024)
    await site.start()
    host, bound = runner.addresses[0][:2]
    print(f"geode {name} ready on http://{host}:{bound}", flush=True)
    try:
        await asyncio.Event().wait()  # until the process is signalled
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit(f"usage: {sys.argv[0]} NAME PORT [POST_LOG]")
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3] if len(sys.argv) == 4 else None))
