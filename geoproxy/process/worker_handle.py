"""One worker process as its supervisor sees it (``--workers``): the sockets it inherits,
its process, its end of the control channel (control.py), its counts, and how it is
asked to stop or killed. The restart policy and the wiring are supervisor.py's."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

from geoproxy.process import control

log = logging.getLogger("geoproxy")

_METRICS_TIMEOUT = 2.0  # a worker's answer to a scrape; else its last counts serve


class Worker:
    """A worker process: its sockets, process and control channel. ``hello`` makes the
    first message (config and health as they are at that moment)."""

    def __init__(
        self,
        index: int,
        sockets: list[socket.socket],
        argv: list[str],
        hello: Callable[[], control.Message],
        on_metrics: Callable[[int, list[Any]], None],
        geoip_fd: Callable[[], int | None] = lambda: None,
    ) -> None:
        self.index = index
        self.geoip_fd = geoip_fd  # the supervisor's GeoIP database, inherited at start
        self.sockets = sockets
        self.argv = argv
        self.hello = hello
        self.on_metrics = on_metrics
        self.proc: asyncio.subprocess.Process | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.ready = asyncio.Event()
        self.started = 0.0
        self.ready_at: float | None = None  # when it said it serves (None: not yet)
        self.misses = 0  # metrics polls in a row left unanswered
        self.drained = self.cut = 0  # requests its stop drained and cut off (it says so)
        self._ids = 0
        self._pending: dict[int, asyncio.Future[bool]] = {}
        self._reader_task: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self) -> None:
        ours, theirs = socket.socketpair()
        fds = [s.fileno() for s in self.sockets]
        argv = [
            *self.argv,
            "--index",
            str(self.index),
            "--control-fd",
            str(theirs.fileno()),
            "--supervisor-pid",
            str(os.getpid()),
        ]
        for fd in fds:
            argv += ["--listen-fd", str(fd)]
        if (geoip := self.geoip_fd()) is not None:
            fds.append(geoip)
            argv += ["--geoip-fd", str(geoip)]
        self.ready = asyncio.Event()
        self.ready_at = None
        self.misses = 0
        self.writer = None  # the last incarnation's channel is closed: none until connected
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *argv, pass_fds=(*fds, theirs.fileno()), start_new_session=True
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.started = time.monotonic()
        try:
            reader, self.writer = await asyncio.open_unix_connection(
                sock=ours, limit=control.LINE_LIMIT
            )
        except BaseException:  # cancelled by a stop, say: the process gets a SIGTERM
            ours.close()
            raise
        self._reader_task = asyncio.create_task(self._read(reader), name=f"worker-{self.index}")
        # No await since the connection: what changed while the process started is in it.
        self.send(self.hello())

    async def until_ready(self) -> int | None:
        """Wait until it serves (None) or exits (its exit code)."""
        assert self.proc is not None
        ready = asyncio.ensure_future(self.ready.wait())
        exited = asyncio.ensure_future(self.proc.wait())
        try:
            await asyncio.wait({ready, exited}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
            exited.cancel()
        return None if self.ready.is_set() else self.proc.returncode

    def send(self, message: Mapping[str, Any]) -> None:
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write(control.encode(message))

    def _handle(self, message: dict[str, Any]) -> None:
        op = message["op"]
        if op == control.READY:
            self.ready_at = time.monotonic()
            self.ready.set()
        elif op == control.DRAINED:
            self.drained, self.cut = int(message["drained"]), int(message["cut"])
        elif op == control.RELOADED and not message.get("ok"):
            log.error("worker %d: reload failed; it keeps its config", self.index)
        elif op == control.METRICS:
            # Recorded as it arrives: when the worker exits, its last answer is in.
            self.on_metrics(self.index, message.get("families", []))
            future = self._pending.pop(message["id"], None)
            if future is not None and not future.done():
                future.set_result(True)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while raw := await reader.readline():
                try:
                    self._handle(control.decode(raw))
                except Exception:
                    log.exception("worker %d sent what cannot be handled: %.200r", self.index, raw)
        except (ConnectionResetError, BrokenPipeError):
            # It exited with our messages unread, or closed its end before our last write
            # (an idle worker draining on its own SIGTERM as we tell it to stop): an end
            # like EOF, not a broken channel.
            pass
        except (ConnectionError, ValueError) as exc:  # ValueError: a line over the limit
            if self.running:
                log.error("worker %d: control channel broken (%s); stopping it", self.index, exc)
                self.kill()
        for future in self._pending.values():
            if not future.done():
                future.set_result(False)  # no answer is coming
        self._pending.clear()
        if self.writer is not None:
            self.writer.close()

    async def ask_metrics(self) -> bool:
        """Ask for the worker's counts; True if they came in time."""
        if self.writer is None or self.writer.is_closing():
            return False
        self._ids += 1
        ident = self._ids
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending[ident] = future
        self.send(control.ask_metrics(ident))
        try:
            async with asyncio.timeout(_METRICS_TIMEOUT):
                return await future
        except TimeoutError:
            return False
        finally:
            self._pending.pop(ident, None)

    def stop(self) -> None:
        """Ask it to drain and exit. Not a signal: with systemd's KillMode=control-group
        the worker got a SIGTERM already, and a second signal means 'stop at once'. A
        channel that was never connected takes a SIGTERM instead; one the worker closed
        means it is leaving already (the caller's grace period and SIGKILL remain)."""
        if self.writer is None:
            self._signal(signal.SIGTERM)
        elif not self.writer.is_closing():
            self.send(control.stop())

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    async def wait(self) -> int:
        assert self.proc is not None
        code = await self.proc.wait()
        if self._reader_task is not None:  # shielded: a cancelled waiter must not end it
            await asyncio.shield(self._reader_task)
        return code


def describe_exit(code: int) -> str:
    if code >= 0:
        return f"exit code {code}"
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:  # real-time signals have no name
        return f"killed by signal {-code}"


# -- the supervisor -----------------------------------------------------------------------
