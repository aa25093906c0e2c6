"""Active health checks: one task per geode GETs its health path and reports to the board."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Callable, Iterable

import aiohttp
from yarl import URL

from geoproxy import __version__
from geoproxy.config.values import Geode
from geoproxy.health.board import HealthBoard
from geoproxy.health.tls import GeodeContexts, TLSFailure, failure_of, server_name

log = logging.getLogger("geoproxy.health")


def connect_failure(exc: aiohttp.ClientConnectorError, geode: str) -> str:
    """Why a connection to a geode failed, in words an operator can act on."""
    if (tls := failure_of(exc)) is not None:
        return tls.message(geode)
    err = exc.os_error
    # getaddrinfo's errors are negative (EAI_*): os.strerror does not know them.
    reason = os.strerror(err.errno) if err.errno and err.errno > 0 else err.strerror or str(err)
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return f"cannot resolve host {exc.host}: {reason}"
    return f"connect failed: {reason}"


MAYBE_CLIENT_CERT = (
    "the geode closed the connection after the TLS handshake without answering: does it "
    "require a client certificate (tls.cert and tls.key)? (geode {geode})"
)
#: Told of every TLS failure a check met: (geode, failure).
TLSHook = Callable[[Geode, TLSFailure], None]


class HealthChecker:
    """Checks every geode at its interval (+ jitter) with its timeout, over the geode's
    TLS context (``contexts``: the one its traffic uses)."""

    def __init__(
        self,
        board: HealthBoard,
        session: aiohttp.ClientSession,
        rand: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.monotonic,
        contexts: GeodeContexts | None = None,
        on_tls_failure: TLSHook | None = None,
    ) -> None:
        self.board = board
        self.session = session
        self.contexts = contexts or GeodeContexts()
        self.on_tls_failure = on_tls_failure
        self.rand = rand
        self.clock = clock
        self._due: dict[str, float] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._running = False

    async def check(self, geode: Geode) -> tuple[bool, float | None, str | None]:
        """One check of one geode: (passed, latency in seconds, error)."""
        hc = geode.health
        url = URL(geode.base + hc.path, encoded=True)
        tls = self.contexts.get(geode)
        start = time.perf_counter()
        try:
            async with asyncio.timeout(hc.timeout):
                async with self.session.get(
                    url,
                    allow_redirects=False,
                    headers={"User-Agent": f"geoproxy-health/{__version__}"},
                    ssl=tls if tls is not None else True,
                    server_hostname=server_name(geode) if tls is not None else None,
                ) as resp:
                    await resp.content.read(65536)  # a bounded drain; the rest is discarded
                    status = resp.status
        except TimeoutError:
            return False, None, f"timeout after {hc.timeout:g}s"
        except aiohttp.ClientConnectorError as exc:
            if self.on_tls_failure is not None and (failure := failure_of(exc)) is not None:
                self.on_tls_failure(geode, failure)
            return False, None, connect_failure(exc, geode.name)
        except aiohttp.ServerDisconnectedError as exc:
            if tls is not None and geode.tls.cert is None:
                # TLS 1.3: a geode that requires a client certificate checks it after
                # the handshake and closes; OpenSSL's alert does not reach asyncio.
                return False, None, MAYBE_CLIENT_CERT.format(geode=geode.name)
            return False, None, f"{type(exc).__name__}: {exc}"
        except (aiohttp.ClientError, OSError) as exc:
            return False, None, f"{type(exc).__name__}: {exc}"
        latency = time.perf_counter() - start
        if status not in hc.expected_statuses:
            return False, latency, f"unexpected status {status}"
        return True, latency, None

    async def check_once(self, geodes: Iterable[Geode] | None = None) -> None:
        """One round: check the given geodes (default: all) concurrently and record."""
        if geodes is None:
            geodes = [s.geode for s in self.board.states.values()]
        await asyncio.gather(*(self._check_and_record(g) for g in geodes))
        self.board.first_round_done = True

    async def _check_and_record(self, geode: Geode) -> None:
        """Check one geode, record it, and set when it is next due (counted from the start
        of this check, so a slow check does not stretch the period)."""
        started = self.clock()
        try:
            ok, latency, error = await self.check(geode)
            self.board.record(geode.name, ok, latency, error)
        except Exception:  # a bug here must not stop health checking for good
            log.exception("health check of geode %s failed unexpectedly", geode.name)
        hc = geode.health
        self._due[geode.name] = started + hc.interval + self.rand() * hc.jitter

    async def _loop(self, name: str) -> None:
        while (state := self.board.states.get(name)) is not None:
            delay = self._due.get(name, 0.0) - self.clock()
            if delay > 0:
                await asyncio.sleep(delay)
                continue  # the geode may have been removed or changed meanwhile
            await self._check_and_record(state.geode)

    def sync(self, removed: Iterable[Geode] = ()) -> None:
        """After a reload: a loop for every geode on the board; none for removed ones."""
        for geode in removed:
            self._due.pop(geode.name, None)
            task = self._tasks.pop(geode.name, None)
            if task is not None:
                task.cancel()
        if not self._running:
            return
        for name in self.board.states:
            if name not in self._tasks or self._tasks[name].done():
                self._tasks[name] = asyncio.create_task(self._loop(name), name=f"health:{name}")

    async def run(self) -> None:
        """Forever: every geode on its own schedule, so a geode whose checks hang until
        their timeout delays no other geode's checks. Starts with a full round unless one
        was already done (at start-up, before the proxy serves)."""
        if not self.board.first_round_done:
            await self.check_once()
        self._running = True
        try:
            self.sync()
            await asyncio.Event().wait()  # until cancelled
        finally:
            self._running = False
            tasks = list(self._tasks.values())
            self._tasks.clear()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
