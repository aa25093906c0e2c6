"""Listening sockets. One process binds one per address of a listener (``listening``).
Under ``--workers`` each worker gets its own, bound with ``SO_REUSEPORT`` (the kernel
spreads new connections over them), after a probe that the address is free
(``SO_REUSEPORT`` alone would let a second geoproxy, or anything else of the same user,
share the port)."""

from __future__ import annotations

import socket
import sys
from typing import Any

from geoproxy.config.values import Listener
from geoproxy.errors import ListenError

#: Connections the kernel holds for a listening socket until they are accepted (capped
#: at ``net.core.somaxconn``, 4096 on current Linux; Go's listeners ask for that, nginx
#: for 511). aiohttp's 128 overflowed when 200 clients connected at once: the kernel
#: dropped the rest of the handshakes, and those clients tried again a second later.
BACKLOG = 4096


def _addresses(listener: Listener, where: str) -> list[tuple[int, Any]]:
    try:
        infos = socket.getaddrinfo(
            listener.host or None, listener.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise ListenError(f"{where}: {exc.strerror}") from None
    return list(dict.fromkeys((info[0], info[4]) for info in infos))


def _bind(family: int, address: Any, port: int, reuseport: bool) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:  # as asyncio: never an IPv4 socket as well
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address[0], port, *address[2:]))
    except OSError:
        sock.close()
        raise
    return sock


def _probe(addresses: list[tuple[int, Any]], port: int, where: str) -> int:
    """Bind every address without SO_REUSEPORT and let go: fails (ListenError) when
    anything listens there, another geoproxy included — which SO_REUSEPORT alone would let
    us join. Returns the port (the kernel's choice for port 0)."""
    for family, address in addresses:
        try:
            with _bind(family, address, port, reuseport=False) as probe:
                port = probe.getsockname()[1]
        except OSError as exc:
            raise ListenError(f"{where}: {exc.strerror or exc}") from None
    return port


def listening(listener: Listener, where: str) -> list[socket.socket]:
    """One process's listening sockets for ``listener``: one per address of its host, all
    on one port (with port 0: the one the kernel picked for the first). Raises OSError
    when one cannot bind, ListenError (``where``: what and where) for a bad host."""
    made: list[socket.socket] = []
    port = listener.port
    try:
        for family, address in _addresses(listener, where):
            made.append(_bind(family, address, port, reuseport=False))
            port = made[-1].getsockname()[1]
            made[-1].listen(BACKLOG)
    except OSError:
        close_all([made])
        raise
    return made


def check_free(listener: Listener, what: str) -> None:
    """Fail (ListenError) now if the listener's address is taken."""
    where = f"cannot listen for {what} on {listener.host}:{listener.port}"
    _probe(_addresses(listener, where), listener.port, where)


def reuseport_sockets(listener: Listener, count: int) -> list[list[socket.socket]]:
    """For each of ``count`` workers, a listening socket per address of ``listener``, all
    on one port (with port 0: one the kernel picked)."""
    where = f"cannot listen for proxy on {listener.host}:{listener.port}"
    if not sys.platform.startswith("linux"):  # elsewhere one socket would get every connection
        raise ListenError(f"{where}: --workers needs Linux's SO_REUSEPORT")
    addresses = _addresses(listener, where)
    port = _probe(addresses, listener.port, where)
    made: list[list[socket.socket]] = []
    try:
        for _ in range(count):
            mine: list[socket.socket] = []
            made.append(mine)
            for family, address in addresses:
                mine.append(_bind(family, address, port, reuseport=True))
                mine[-1].listen(BACKLOG)
    except OSError as exc:
        close_all(made)
        raise ListenError(f"{where}: {exc.strerror or exc}") from None
    return made


def close_all(sockets: list[list[socket.socket]]) -> None:
    for mine in sockets:
        for sock in mine:
            sock.close()


# -- one worker, as the supervisor sees it ------------------------------------------------
