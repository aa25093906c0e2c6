"""Accepting the proxy's connections in batches.

uvloop accepts one connection per turn of the event loop (libuv stopped accepting in a
loop in 1.45, libuv#3696), and a turn under load takes milliseconds: a burst of new
connections waited in the kernel's queue, 200 at once ~1 s for the last, and their first
requests were the whole latency tail at c=200 (docs/performance.md, "The tail at c=200").
Here the listening socket's readiness accepts up to ``ACCEPT_BATCH`` connections at once,
as asyncio's own loop does, and each becomes a transport through the loop's public
``connect_accepted_socket``.

``BatchSite`` is aiohttp's ``SockSite`` with an ``Acceptor`` where ``SockSite`` calls
``loop.create_server``: it leans on ``BaseSite``'s private ``_server``, ``_runner`` and
``_ssl_context`` (``compat``); public mode uses ``SockSite`` itself.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any

from aiohttp import web

from geoproxy.process import sockets
from geoproxy.proxy import compat

log = logging.getLogger("geoproxy")

#: Connections accepted per readiness of the listening socket at most (asyncio's loop
#: takes up to its backlog, 100 by default): a burst is taken in a few turns, a flood
#: still leaves every turn to the connections already open.
ACCEPT_BATCH = 128
#: Seconds without accepting after the process or system ran out of file descriptors or
#: memory for a new one (as asyncio): the queue waits in the kernel meanwhile.
OUT_OF_RESOURCES_PAUSE = 1.0
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class Acceptor(asyncio.AbstractServer):
    """What aiohttp's sites use of ``asyncio.Server`` (``sockets``, ``close()``: the
    fingerprints in tests/test_compat.py hold them to it) over one listening socket whose
    connections are accepted in batches; the rest of ``AbstractServer`` for its type."""

    def __init__(
        self,
        sock: socket.socket,
        factory: Callable[[], asyncio.BaseProtocol],
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._sock = sock
        self._factory = factory
        self._ssl = ssl_context
        self._serving = True
        self._resume: asyncio.TimerHandle | None = None
        self._adopting: set[asyncio.Task[Any]] = set()
        self._closed = self._loop.create_future()
        sock.setblocking(False)
        self._loop.add_reader(sock.fileno(), self._accept)

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return (self._sock,) if self._serving else ()

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return self._serving

    def close(self) -> None:
        """Stop accepting and close the listening socket; connections still being set up
        (a TLS handshake) are dropped, those made stay with their protocol."""
        if not self._serving:
            return
        self._serving = False
        if self._resume is not None:
            self._resume.cancel()
        else:
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        for task in self._adopting:
            task.cancel()
        self._closed.set_result(None)

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)

    async def start_serving(self) -> None:
        pass  # serving from construction

    async def serve_forever(self) -> None:
        await self.wait_closed()

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return  # the queue is empty
            except ConnectionAbortedError:
                continue  # the client gave up while queued
            except OSError as exc:
                self._refused(exc)
                return
            conn.setblocking(False)
            task = self._loop.create_task(self._adopt(conn))
            self._adopting.add(task)
            task.add_done_callback(self._adopting.discard)

    def _refused(self, exc: OSError) -> None:
        where = _where(self._sock)
        if exc.errno not in _OUT_OF_RESOURCES:
            log.error("cannot accept a connection on %s: %s", where, exc.strerror or exc)
            return  # the next readiness tries again
        log.error(
            "cannot accept a connection on %s: %s; accepting again in %gs (new "
            "connections wait in the kernel's queue meanwhile)",
            where,
            exc.strerror or exc,
            OUT_OF_RESOURCES_PAUSE,
        )
        self._loop.remove_reader(self._sock.fileno())
        self._resume = self._loop.call_later(OUT_OF_RESOURCES_PAUSE, self._accept_again)

    def _accept_again(self) -> None:
        self._resume = None
        if self._serving:
            self._loop.add_reader(self._sock.fileno(), self._accept)

    async def _adopt(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._factory, conn, ssl=self._ssl)
        except (TimeoutError, OSError, ssl.SSLError) as exc:
            # A client that left, or failed its TLS handshake: as asyncio's own server,
            # nothing to answer and nobody to tell but a debug line.
            conn.close()
            log.debug("connection on %s dropped before it was made: %r", _where(conn), exc)
        except asyncio.CancelledError:
            conn.close()
            raise


def _where(sock: socket.socket) -> str:
    try:
        host, port = sock.getsockname()[:2]
    except OSError:
        return "a closed socket"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class BatchSite(web.BaseSite):
    """aiohttp's ``SockSite``, accepting through an ``Acceptor``."""

    __slots__ = ("_name", "_sock")

    def __init__(
        self, runner: web.BaseRunner, sock: socket.socket, ssl_context: ssl.SSLContext | None
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context)
        self._sock = sock
        scheme = "https" if ssl_context is not None else "http"
        self._name = f"{scheme}://{_where(sock)}"

    @property
    def name(self) -> str:
        return self._name

    async def start(self) -> None:
        await super().start()  # registers with the runner
        server = self._runner.server
        assert server is not None
        self._server = Acceptor(self._sock, server, self._ssl_context)


def site(
    runner: web.BaseRunner, sock: socket.socket, ssl_context: ssl.SSLContext | None = None
) -> web.BaseSite:
    """The site serving ``sock``: batched accepts in lean mode, aiohttp's ``SockSite``
    (uvloop's one accept per turn) in public mode."""
    if compat.lean():
        return BatchSite(runner, sock, ssl_context)
    # SockSite listens again, with aiohttp's backlog unless told.
    return web.SockSite(runner, sock, ssl_context=ssl_context, backlog=sockets.BACKLOG)
