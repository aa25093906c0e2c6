"""``geoproxy run --workers N``: a supervisor process and N worker processes.

The supervisor binds N listening sockets to the proxy address with SO_REUSEPORT (the
kernel spreads new connections over them), runs the active health checks, the config
watcher and the admin listener, and starts N workers; each serves one of the sockets on
its own event loop. A worker runs no health checks of its own: the supervisor hands it
every change of active health, so the geodes see one checker, not N + 1. Passive ejection
stays per worker (each sees its own traffic).

Supervisor and worker talk over a socket pair, one JSON object per line:

    supervisor -> worker  {"op": "health", "health": {...}}    active health, on every change
                          {"op": "reload", "health": {...}}    load the config file again
                          {"op": "metrics", "id": n}           send your counts
    worker -> supervisor  {"op": "ready", "fingerprint": hex}  serving
                          {"op": "reloaded", "ok": bool, "fingerprint": hex}
                          {"op": "metrics", "id": n, "families": [...]}   (fleet.py)

A worker that exits unexpectedly is started again, with backoff, on the same socket:
connections that arrive meanwhile wait in that socket's backlog. Workers run in their own
session (a terminal's Ctrl-C reaches only the supervisor, which stops them gracefully) and
are killed by the kernel if the supervisor dies (Linux), so none is left orphaned.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from geoproxy import fleet
from geoproxy.admin import Scrape
from geoproxy.app import Gateway
from geoproxy.config import Config, Listener
from geoproxy.errors import GeoproxyError
from geoproxy.metrics import WorkerMetrics
from geoproxy.server import (
    Bound,
    ListenError,
    make_proxy_runner,
    serve_until_stopped,
    start_site,
    unless_stopped,
    watch_config,
)

log = logging.getLogger("geoproxy")

_LINE_LIMIT = 64 * 1024 * 1024  # a metrics answer with many geodes is a long line
_READY_TIMEOUT = 30.0  # a worker's start-up: interpreter, imports, its first message
_METRICS_TIMEOUT = 2.0  # a busy worker's answer to a scrape; else its last counts serve
_METRICS_POLL = 5.0  # counts are also fetched this often: a crash loses at most this much
_BACKLOG = 128  # per socket, as aiohttp's own listeners
MAX_WORKERS = 256


def _line(message: Mapping[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


# -- sockets ------------------------------------------------------------------------------


def reuseport_sockets(listener: Listener, count: int) -> list[list[socket.socket]]:
    """For each of ``count`` workers, a listening socket per address of ``listener``, all
    on one port (with port 0: the one the kernel picked for the first)."""
    where = f"cannot listen for proxy on {listener.host}:{listener.port}"
    if not hasattr(socket, "SO_REUSEPORT"):
        raise ListenError(f"{where}: --workers needs SO_REUSEPORT (Linux, BSD or macOS)")
    try:
        infos = socket.getaddrinfo(listener.host or None, listener.port,
                                   type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)  # fmt: skip
    except socket.gaierror as exc:
        raise ListenError(f"{where}: {exc.strerror}") from None
    addresses = list(dict.fromkeys((info[0], info[4]) for info in infos))
    port = listener.port
    made: list[list[socket.socket]] = []
    try:
        for _ in range(count):
            mine: list[socket.socket] = []
            made.append(mine)
            for family, address in addresses:
                sock = socket.socket(family, socket.SOCK_STREAM)
                mine.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:  # as asyncio: never an IPv4 socket as well
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((address[0], port, *address[2:]))
                port = sock.getsockname()[1]
                sock.listen(_BACKLOG)
    except OSError as exc:
        for sock in (s for mine in made for s in mine):
            sock.close()
        raise ListenError(f"{where}: {exc.strerror or exc}") from None
    return made


# -- the supervisor -----------------------------------------------------------------------


class Worker:
    """One worker process as the supervisor sees it: its sockets, process and channel."""

    def __init__(self, index: int, sockets: list[socket.socket], argv: list[str]) -> None:
        self.index = index
        self.sockets = sockets
        self.argv = argv
        self.proc: asyncio.subprocess.Process | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.ready = asyncio.Event()
        self.fingerprint = ""
        self.started = 0.0
        self._ids = 0
        self._pending: dict[int, asyncio.Future[list[fleet.Family] | None]] = {}
        self._reader_task: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    async def start(self, health: Mapping[str, Any]) -> None:
        ours, theirs = socket.socketpair()
        fds = [s.fileno() for s in self.sockets]
        argv = [*self.argv, "--index", str(self.index), "--control-fd", str(theirs.fileno()),
                "--supervisor-pid", str(os.getpid())]  # fmt: skip
        for fd in fds:
            argv += ["--listen-fd", str(fd)]
        self.ready = asyncio.Event()
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *argv, pass_fds=(*fds, theirs.fileno()), start_new_session=True
            )
        finally:
            theirs.close()
        self.started = time.monotonic()
        reader, self.writer = await asyncio.open_unix_connection(sock=ours, limit=_LINE_LIMIT)
        self._reader_task = asyncio.create_task(self._read(reader), name=f"worker-{self.index}")
        self.send({"op": "health", "health": health})

    def send(self, message: Mapping[str, Any]) -> None:
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write(_line(message))

    def _handle(self, message: dict[str, Any]) -> None:
        op = message.get("op")
        if op in ("ready", "reloaded"):
            self.fingerprint = message.get("fingerprint", "")
            self.ready.set()
            if op == "reloaded" and not message.get("ok"):
                log.error("worker %d: reload failed; it keeps its config", self.index)
        elif op == "metrics":
            future = self._pending.pop(message["id"], None)
            if future is not None and not future.done():
                future.set_result(message.get("families", []))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(ConnectionError):
            while line := await reader.readline():
                try:
                    self._handle(json.loads(line))
                except Exception:
                    log.exception("worker %d sent what cannot be handled: %.200r", self.index,
                                  line)  # fmt: skip
        for future in self._pending.values():
            if not future.done():
                future.set_result(None)  # it exited: no answer is coming
        self._pending.clear()
        if self.writer is not None:
            self.writer.close()

    async def metrics(self) -> list[fleet.Family] | None:
        """The worker's counts now, or None when it does not answer in time."""
        if self.writer is None or self.writer.is_closing():
            return None
        self._ids += 1
        ident = self._ids
        future: asyncio.Future[list[fleet.Family] | None]
        future = asyncio.get_running_loop().create_future()
        self._pending[ident] = future
        self.send({"op": "metrics", "id": ident})
        try:
            async with asyncio.timeout(_METRICS_TIMEOUT):
                return await future
        except TimeoutError:
            return None
        finally:
            self._pending.pop(ident, None)

    async def wait(self) -> int:
        assert self.proc is not None
        code = await self.proc.wait()
        if self._reader_task is not None:  # shielded: a cancelled waiter must not end it
            await asyncio.shield(self._reader_task)
        return code


class Supervisor:
    def __init__(
        self, gateway: Gateway, sockets: list[list[socket.socket]], argv: list[str],
        fleet_: fleet.Fleet, metrics: WorkerMetrics,
    ) -> None:  # fmt: skip
        self.gateway = gateway
        self.fleet = fleet_
        self.metrics = metrics
        self.workers = [Worker(i, s, argv) for i, s in enumerate(sockets)]
        self.stopping = False
        self._watchers: list[asyncio.Task[None]] = []
        self._refresh_lock = asyncio.Lock()

    def _health(self) -> dict[str, dict[str, object]]:
        return self.gateway.board.snapshot()

    async def start(self) -> None:
        """Start every worker and wait until each serves; one that fails to start stops
        the whole start-up with its exit code."""
        for worker in self.workers:
            await worker.start(self._health())
        waiting: dict[asyncio.Future[Any], Worker] = {
            asyncio.ensure_future(w.ready.wait()): w for w in self.workers
        }
        exits: dict[asyncio.Future[Any], Worker] = {
            asyncio.ensure_future(w.wait()): w for w in self.workers
        }
        try:
            async with asyncio.timeout(_READY_TIMEOUT):
                while waiting:
                    done, _ = await asyncio.wait({*waiting, *exits},
                                                 return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
                    for task in done:
                        if task in exits:
                            raise GeoproxyError(
                                f"worker {exits[task].index} exited during start-up "
                                f"(exit code {task.result()}); see its messages above"
                            )
                        del waiting[task]
        except TimeoutError:
            raise GeoproxyError(f"workers did not start within {_READY_TIMEOUT:g}s") from None
        finally:
            for task in (*waiting, *exits):
                task.cancel()
        self.metrics.running.set(len(self.workers))
        self._check_configs()
        self._watchers = [asyncio.create_task(self._watch(w), name=f"watch-worker-{w.index}")
                          for w in self.workers]  # fmt: skip

    def _check_configs(self) -> None:
        mine = self.gateway.config.fingerprint.hex()
        for worker in self.workers:
            if worker.ready.is_set() and worker.fingerprint != mine:
                log.warning("worker %d loaded a different config (the file changed as it "
                            "started); telling it to reload", worker.index)  # fmt: skip
                worker.send({"op": "reload", "health": self._health()})

    async def _watch(self, worker: Worker) -> None:
        """Start the worker again whenever it exits, until the supervisor stops."""
        backoff = 0.25
        while True:
            code = await worker.wait()
            if self.stopping:
                return
            self.fleet.retire(worker.index)
            self.metrics.restarts.inc()
            self.metrics.running.dec()
            lived = time.monotonic() - worker.started
            backoff = 0.5 if lived > 30 else min(backoff * 2, 10.0)
            log.error("worker %d (pid %s) exited unexpectedly (%s); starting it again in "
                      "%gs", worker.index, worker.pid, _describe_exit(code), backoff)  # fmt: skip
            while True:
                await asyncio.sleep(backoff)
                if self.stopping:
                    return
                try:
                    await worker.start(self._health())
                    break
                except OSError as exc:  # fork or exec failed: out of memory, say
                    backoff = min(backoff * 2, 10.0)
                    log.error("worker %d could not be started (%s); trying again in %gs",
                              worker.index, exc, backoff)  # fmt: skip
            self.metrics.running.inc()

    def broadcast_health(self) -> None:
        message = {"op": "health", "health": self._health()}
        for worker in self.workers:
            worker.send(message)

    def broadcast_reload(self) -> None:
        message = {"op": "reload", "health": self._health()}
        for worker in self.workers:
            worker.send(message)

    async def refresh_metrics(self) -> None:
        """Fetch every worker's counts (one at a time across concurrent scrapes)."""
        async with self._refresh_lock:
            answers = await asyncio.gather(*(w.metrics() for w in self.workers))
            for worker, families in zip(self.workers, answers, strict=True):
                if families is not None:
                    self.fleet.update(worker.index, families)

    async def poll_metrics(self) -> None:
        while True:
            await asyncio.sleep(_METRICS_POLL)
            await self.refresh_metrics()

    async def stop(self, grace: float) -> None:
        """SIGTERM every worker (each drains its in-flight requests), then wait up to
        ``grace`` seconds; whatever is left is killed."""
        self.stopping = True
        for watcher in self._watchers:
            watcher.cancel()
        live = [w for w in self.workers if w.proc is not None and w.proc.returncode is None]
        for worker in live:
            with contextlib.suppress(ProcessLookupError):
                assert worker.proc is not None
                worker.proc.send_signal(signal.SIGTERM)
        waits = [asyncio.ensure_future(w.wait()) for w in live]
        if not waits:
            return
        _, pending = await asyncio.wait(waits, timeout=grace)
        for worker, waited in zip(live, waits, strict=True):
            if waited in pending and worker.proc is not None:
                log.error("worker %d did not stop within %gs; killing it", worker.index, grace)
                with contextlib.suppress(ProcessLookupError):
                    worker.proc.kill()
        if pending:
            await asyncio.wait(pending)
        self.metrics.running.set(0)


def _describe_exit(code: int) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


async def serve_workers(
    config: Config,
    count: int,
    stop: asyncio.Event,
    reload: asyncio.Event | None = None,
    on_ready: Callable[[Bound], None] | None = None,
    log_level: str = "info",
) -> None:
    """Run the proxy as ``count`` worker processes under this supervisor until ``stop``."""
    own = CollectorRegistry()
    gateway = Gateway(config, registry=own)
    fleet_ = fleet.Fleet(own)
    exposed = CollectorRegistry()
    exposed.register(fleet_)
    sockets = reuseport_sockets(config.proxy, count)
    argv = [sys.executable, "-m", "geoproxy", "worker", "--config", str(config.path),
            "--log-level", log_level]  # fmt: skip
    supervisor = Supervisor(gateway, sockets, argv, fleet_, WorkerMetrics(own))
    gateway.board.on_transition.append(lambda _state: supervisor.broadcast_health())
    gateway.on_reload.append(supervisor.broadcast_reload)
    # The proxy app's lifespan (GeoIP, health checks) runs here; its listener is the workers'.
    lifespan = web.AppRunner(gateway.proxy_app(), handle_signals=False)
    scrape = Scrape(exposed, supervisor.refresh_metrics, fleet_.request_counts)
    admin_runner = web.AppRunner(gateway.admin_app(scrape), access_log=None,
                                 handle_signals=False)  # fmt: skip
    drain = config.lifecycle.drain_timeout
    tasks: list[asyncio.Task[Any]] = []
    log.info("geoproxy starting %d workers: first health round over %d geodes", count,
             len(config.geodes))  # fmt: skip
    try:
        if not await unless_stopped(lifespan.setup(), stop):
            return
        if not await unless_stopped(supervisor.start(), stop):
            return
        await admin_runner.setup()
        admin = await start_site(admin_runner, "admin", config.admin, False)
        host, port = sockets[0][0].getsockname()[:2]
        bound = Bound((str(host), int(port)), admin)
        log.info("geoproxy proxying on %s with %d workers (pids %s), admin on %s",
                 bound.proxy_url, count, " ".join(str(w.pid) for w in supervisor.workers),
                 bound.admin_url)  # fmt: skip
        tasks = [
            asyncio.create_task(watch_config(gateway, reload or asyncio.Event()),
                                name="geoproxy-config-watch"),
            asyncio.create_task(supervisor.poll_metrics(), name="geoproxy-worker-metrics"),
        ]  # fmt: skip
        await serve_until_stopped(gateway, bound, stop, on_ready)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await supervisor.stop(drain + 5.0)
        await lifespan.cleanup()
        await admin_runner.cleanup()
        for sock in (s for mine in sockets for s in mine):
            sock.close()


# -- a worker -----------------------------------------------------------------------------


def die_with_supervisor(supervisor_pid: int) -> None:
    """Have the kernel kill this process when its parent dies (Linux); if the supervisor
    is already gone, exit now."""
    if sys.platform == "linux":
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != supervisor_pid:
        raise SystemExit("geoproxy worker: the supervisor has gone")


async def serve_worker(
    config: Config, index: int, sockets: list[socket.socket], control: socket.socket,
    stop: asyncio.Event,
) -> None:  # fmt: skip
    """Serve the proxy on ``sockets`` with health and reloads from the supervisor."""
    gateway = Gateway(config, active_health=False)
    runner = make_proxy_runner(gateway)
    reader, writer = await asyncio.open_unix_connection(sock=control, limit=_LINE_LIMIT)

    def send(message: Mapping[str, Any]) -> None:
        if not writer.is_closing():
            writer.write(_line(message))

    async def handle(message: dict[str, Any]) -> None:
        op = message.get("op")
        if op == "health":
            gateway.adopt_health(message["health"])
        elif op == "reload":
            ok = await gateway.reload_from_file("told by the supervisor")
            gateway.adopt_health(message["health"])
            send({"op": "reloaded", "ok": ok, "fingerprint": gateway.config.fingerprint.hex()})
        elif op == "metrics":
            families = fleet.snapshot(gateway.metrics.registry)
            send({"op": "metrics", "id": message.get("id"), "families": families})

    async def obey() -> None:
        with contextlib.suppress(ConnectionError):
            while line := await reader.readline():
                try:
                    await handle(json.loads(line))
                except Exception:  # a bug here must not cut the worker off its supervisor
                    log.exception("worker %d: cannot handle %.200r", index, line)
        if not stop.is_set():
            log.warning("worker %d: the supervisor went away; stopping", index)
            stop.set()

    first = await reader.readline()
    if not first:
        return
    obeying: asyncio.Task[None] | None = None
    try:
        if not await unless_stopped(runner.setup(), stop):
            return
        gateway.adopt_health(json.loads(first)["health"])
        for sock in sockets:
            await web.SockSite(runner, sock).start()
        obeying = asyncio.create_task(obey(), name="geoproxy-worker-control")
        send({"op": "ready", "fingerprint": gateway.config.fingerprint.hex()})
        await stop.wait()
        gateway.start_draining()
    finally:
        await runner.cleanup()  # stop accepting, drain, close
        if obeying is not None:
            obeying.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await obeying
        writer.close()
