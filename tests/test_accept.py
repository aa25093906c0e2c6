"""New connections. Accepting them (geoproxy/process/acceptor.py, sockets.listening): a
burst is taken in a few turns of a busy loop, uvloop's included; the kernel holds a burst
while nothing accepts; stopping closes the port and drops unfinished handshakes; running
out of file descriptors pauses accepting and recovers. And a new connection for every
request: each is freed once closed, and its request takes the fast lane."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import select
import socket
import ssl
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry
from yarl import URL

from geoproxy.config import loader
from geoproxy.config.values import Listener
from geoproxy.process import acceptor, demo, sockets
from geoproxy.process.acceptor import BatchSite
from geoproxy.process.app import Gateway
from geoproxy.process.server import make_proxy_runner, start_site
from geoproxy.proxy import compat
from geoproxy.proxy.fastlane import ProxyConnection
from geoproxy.stamp.config import StampConfig
from geoproxy.stamp.serve import serve_stamp
from tests.conftest import (
    FakeGeode,
    GeodeFactory,
    Proxy,
    ProxyFactory,
    base_config,
    geode_entry,
)
from tests.tls_certs import Authority
from tests.wire import read_response

LOOPBACK = Listener("127.0.0.1", 0)
FAST = "geoproxy_fast_lane_requests_total"
BURST = 200


async def _hello(request: web.BaseRequest) -> web.StreamResponse:
    return web.Response(text="hello")


def _need_backlog(count: int) -> None:
    """Skip where the kernel caps every backlog below ``count``."""
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    if somaxconn < count:
        pytest.skip(f"net.core.somaxconn is {somaxconn} on this machine")


def _url(sock: socket.socket) -> str:
    return f"http://127.0.0.1:{sock.getsockname()[1]}"


def _connect_all(port: int, count: int, timeout: float) -> list[socket.socket]:
    """``count`` TCP connections to ``port``, opened at once; the ones whose handshake
    completed within ``timeout`` (the kernel completes them whether or not anything
    accepts, while the backlog has room)."""
    pending = []
    for _ in range(count):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        pending.append(s)
    done: list[socket.socket] = []
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        _, writable, _ = select.select([], pending, [], 0.05)
        for s in writable:
            pending.remove(s)
            if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                done.append(s)
    for s in pending:
        s.close()
    return done


def test_a_burst_is_accepted_in_a_few_turns_of_a_busy_uvloop() -> None:
    """uvloop's own server takes one connection per loop turn (libuv#3696): with turns of
    ~2 ms, 200 clients waited up to ~0.4 s. The acceptor takes them in batches."""
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> int:
        server = web.Server(_hello)
        runner = web.ServerRunner(server, shutdown_timeout=1)
        await runner.setup()
        (sock,) = sockets.listening(LOOPBACK, "test")
        await BatchSite(runner, sock, None).start()
        loop = asyncio.get_running_loop()
        turns = 0
        stop = False

        def busy() -> None:  # a loop turn with work in it, as under load
            nonlocal turns
            turns += 1
            time.sleep(0.002)
            if not stop:
                loop.call_soon(busy)

        clients = _connect_all(sock.getsockname()[1], BURST, timeout=5)
        try:
            assert len(clients) == BURST
            turns = 0
            loop.call_soon(busy)
            while len(server.connections) < BURST and turns < 2 * BURST:  # noqa: ASYNC110
                await asyncio.sleep(0)  # a turn at a time: the count is the measure
            return turns
        finally:
            stop = True
            for s in clients:
                s.close()
            await runner.cleanup()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        turns = runner.run(scenario())
    assert turns <= 10, f"{BURST} connections took {turns} loop turns to accept"


@pytest.mark.parametrize("mode", [compat.LEAN, compat.PUBLIC])
async def test_the_kernel_holds_a_burst_while_nothing_accepts(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The backlog (sockets.BACKLOG, capped by net.core.somaxconn) holds 300 handshakes
    at once, in both modes (aiohttp's SockSite listens again, with 128 unless told); with
    128 the kernel dropped the rest, whose clients tried again a second later."""
    _need_backlog(300)
    monkeypatch.setattr(compat, "mode", lambda: mode)
    runner = web.ServerRunner(web.Server(_hello), shutdown_timeout=1)
    await runner.setup()
    (sock,) = sockets.listening(LOOPBACK, "test")
    try:
        await acceptor.site(runner, sock).start()
        # Blocking here, the loop accepts nothing: only the kernel's queue holds them.
        clients = _connect_all(sock.getsockname()[1], 300, timeout=0.5)
        for s in clients:
            s.close()
        assert len(clients) == 300
    finally:
        await runner.cleanup()


async def test_a_burst_of_clients_through_the_proxy_all_get_their_answers(
    proxy_factory: ProxyFactory,
) -> None:
    """300 clients at once, each with a request of its own, all answered by the geode.
    The geode listens as geoproxy does (backlog 4096): the proxy opens a connection to it
    per client, and behind aiohttp's 128 the geode's kernel would drop the rest."""
    geode = FakeGeode("eu-1", "eu-west")
    runner = web.AppRunner(geode.app, access_log=None)
    await runner.setup()
    (sock,) = sockets.listening(LOOPBACK, "test")
    await BatchSite(runner, sock, None).start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        proxy = await proxy_factory(
            base_config([{"name": "eu-1", "region": "eu-west", "url": url}])
        )
        await _answers_a_burst(proxy, geode)
    finally:
        await runner.cleanup()


async def _answers_a_burst(proxy: Proxy, geode: FakeGeode) -> None:
    host, port = proxy.url.removeprefix("http://").rsplit(":", 1)

    async def one(n: int) -> bytes:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(f"GET /burst/{n} HTTP/1.1\r\nHost: x\r\nCookie: id={n}\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        writer.close()
        return head.split(b"\r\n", 1)[0]

    lines = await asyncio.wait_for(asyncio.gather(*(one(n) for n in range(300))), 30)
    assert set(lines) == {b"HTTP/1.1 200 OK"}
    assert {path: n for path, n in geode.hits.items() if path.startswith("/burst/")} == {
        f"/burst/{n}": 1 for n in range(300)
    }


async def test_stopping_closes_the_port_and_drops_unfinished_handshakes(
    tmp_path: Path,
) -> None:
    authority = Authority(tmp_path)
    front = authority.server(authority.issue("localhost"))
    server = web.Server(_hello)
    runner = web.ServerRunner(server)
    await runner.setup()
    (sock,) = sockets.listening(LOOPBACK, "test")
    port = sock.getsockname()[1]
    site = BatchSite(runner, sock, front)
    await site.start()
    try:
        # A client that connects and never says hello: its handshake is unfinished.
        silent_reader, silent = await asyncio.open_connection("127.0.0.1", port)
        # One that finishes its handshake is served.
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=authority.client(), server_hostname="localhost"
        )
        writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        answer = await read_response(reader)
        assert (answer.status, answer.body) == (200, b"hello")
        await site.stop()
        assert await asyncio.wait_for(silent_reader.read(), 5) == b""  # dropped
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")  # made ones stay
        answer = await read_response(reader)
        assert (answer.status, answer.body) == (200, b"hello")
        writer.close()
        silent.close()
        await writer.wait_closed()
    finally:
        await runner.cleanup()


_OUT_OF_FDS = textwrap.dedent(
    """
    import asyncio, logging, resource, socket, sys
    from geoproxy.process import acceptor
    acceptor.OUT_OF_RESOURCES_PAUSE = 0.2
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")

    class Echo(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport
        def data_received(self, data):
            self.transport.write(data)

    async def main():
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(100)
        acceptor.Acceptor(sock, Echo)
        import os
        used = len(os.listdir("/proc/self/fd"))
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (used + 10, hard))
        print("port", sock.getsockname()[1], flush=True)
        await asyncio.sleep(30)

    asyncio.run(main())
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/fd")
def test_running_out_of_file_descriptors_pauses_accepting_and_recovers() -> None:
    with subprocess.Popen(
        [sys.executable, "-c", _OUT_OF_FDS],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    ) as proc:
        try:
            _out_of_fds(proc)
        finally:
            proc.kill()


def _out_of_fds(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    port = int(proc.stdout.readline().split()[1])
    clients = _connect_all(port, 40, timeout=2)  # more than the process may open
    assert len(clients) == 40  # the kernel's queue holds the rest
    line = proc.stdout.readline()
    assert "cannot accept a connection on 127.0.0.1:" in line
    assert "accepting again in 0.2s" in line
    for s in clients:
        s.close()
    # Once descriptors are free again, a new client is served.
    deadline = time.monotonic() + 10
    while True:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(b"ping")
            try:
                if s.recv(4) == b"ping":
                    break
            except (TimeoutError, ConnectionResetError):
                pass
        assert time.monotonic() < deadline, "accepting never resumed"
    assert proc.poll() is None  # still running: no traceback, no exit


def test_a_bad_host_is_a_listen_error_naming_it() -> None:
    from geoproxy.errors import ListenError

    with pytest.raises(ListenError, match=r"cannot listen for proxy on no-such-host\.invalid"):
        sockets.listening(
            Listener("no-such-host.invalid", 0), "cannot listen for proxy on no-such-host.invalid:0"
        )


async def test_the_site_names_its_address() -> None:
    runner = web.ServerRunner(web.Server(_hello))
    await runner.setup()
    (sock,) = sockets.listening(LOOPBACK, "test")
    try:
        site = BatchSite(runner, sock, None)
        assert site.name == f"http://127.0.0.1:{sock.getsockname()[1]}"
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        assert BatchSite(runner, sock, context).name.startswith("https://127.0.0.1:")
    finally:
        sock.close()
        await runner.cleanup()


# -- connection churn: a new connection for every request --------------------------------


async def _closing_gets(url: str, count: int) -> list[bytes]:
    """``count`` requests, each on a connection of its own that the answer closes; the
    status lines."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    lines = []
    for n in range(count):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(f"GET /churn/{n} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        answer = await reader.read()  # to the close
        lines.append(answer.split(b"\r\n", 1)[0])
        writer.close()
        await writer.wait_closed()
    return lines


async def test_a_closed_connection_is_freed_at_once_not_after_the_header_timeout(
    proxy_factory: ProxyFactory, geode_factory: GeodeFactory
) -> None:
    """The head deadline's timer held every connection for limits.header_timeout (10 s)
    after its request: at 8,000 new connections a second, 80,000 connections alive, and
    the collector's pauses (35-100 ms) in the latency tail. The timer is cancelled when
    the head arrives."""
    geode = await geode_factory("eu-1", "eu-west")
    proxy = await proxy_factory(base_config([geode_entry(geode)]))

    def alive() -> int:
        return sum(isinstance(o, ProxyConnection) for o in gc.get_objects())

    before = alive()
    assert await _closing_gets(proxy.url, 40) == [b"HTTP/1.1 200 OK"] * 40
    for _ in range(50):  # the last connection's task ends a turn or two after its close
        gc.collect()
        if alive() <= before:
            break
        await asyncio.sleep(0.01)
    assert alive() <= before


def test_a_new_connection_s_first_request_takes_the_fast_lane_under_uvloop(
    write_config: Callable[[dict[str, Any]], Path],
) -> None:
    """Under uvloop a new connection's first request arrives before the connection task's
    first step; the fast lane took only idle connections whose task waited, so every
    request of a client without keep-alive went the coroutine way (~75 µs more CPU).
    Run under uvloop as `geoproxy run` is (pytest's loop starts the task first)."""
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> float:
        geode = FakeGeode("eu-1", "eu-west")
        geodes = web.AppRunner(geode.app, access_log=None)
        await geodes.setup()
        (sock,) = sockets.listening(LOOPBACK, "test")
        await BatchSite(geodes, sock, None).start()
        entry = {"name": "eu-1", "region": "eu-west", "url": _url(sock)}
        config = loader.load(write_config(base_config([entry])))
        gateway = Gateway(config, registry=CollectorRegistry())
        try:
            async with gateway.lifespan():
                runner = make_proxy_runner(gateway)
                await runner.setup()
                try:
                    host, port = await start_site(runner, "proxy", LOOPBACK, False)
                    lines = await _closing_gets(f"http://{host}:{port}", 20)
                    assert lines == [b"HTTP/1.1 200 OK"] * 20
                finally:
                    await runner.cleanup()
        finally:
            await geodes.cleanup()
        registry = gateway.metrics.registry
        return registry.get_sample_value(FAST, {"outcome": "answered"}) or 0.0

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(scenario()) == 20


# -- the stamps: geoproxy opens a connection to a geode per new client -------------------


async def test_the_demo_s_stamps_hold_a_burst_on_both_listeners(tmp_path: Path) -> None:
    """A burst of new clients makes the proxy open as many geode connections at once;
    behind aiohttp's 128 a stamp's kernel dropped the rest (a 502 under a 1 s
    connect_timeout)."""
    _need_backlog(300)
    cfg = loader.load(demo.demo_config_path())
    cfg = dataclasses.replace(
        cfg, geodes=tuple(dataclasses.replace(g, url=g.url.with_port(0)) for g in cfg.geodes)
    )
    live, runners = await demo.start_geodes(cfg, demo.stamp_apps(tmp_path))
    try:
        geode = live.geodes[0]
        peer = URL(demo.peer_listeners(runners)[geode.name])
        for port in (geode.url.port, peer.port):
            assert port is not None
            clients = _connect_all(port, 300, timeout=0.5)  # the loop accepts nothing
            for s in clients:
                s.close()
            assert len(clients) == 300, port
    finally:
        for runner in runners:
            await runner.cleanup()


async def test_geoproxy_stamp_holds_a_burst(tmp_path: Path) -> None:
    _need_backlog(300)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = StampConfig(
        path=None,
        name="stamp-a",
        region="eu-west",
        host="127.0.0.1",
        port=port,
        database=tmp_path / "a.db",
        peer_port=0,
        peers=(),
    )
    stop = asyncio.Event()
    task = asyncio.create_task(serve_stamp(config, stop))
    try:
        for _ in range(200):  # until it listens
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            await asyncio.sleep(0.05)
        clients = _connect_all(port, 300, timeout=0.5)  # the loop accepts nothing
        for s in clients:
            s.close()
        assert len(clients) == 300
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
