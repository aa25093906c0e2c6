"""Geode health: runtime state kept apart from the frozen config, and the active checker.

``HealthBoard`` is the state machine (no I/O): it counts consecutive passes and failures
and flips a geode at the thresholds. ``HealthChecker`` does the I/O: ``check_once`` is one
round over the geodes that are due; ``run`` only adds timing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import aiohttp
from yarl import URL

from geoproxy import __version__
from geoproxy.config import Geode

log = logging.getLogger("geoproxy.health")


@dataclass(slots=True)
class GeodeHealth:
    geode: Geode
    healthy: bool = False  # a geode that never answered is unhealthy
    checked: bool = False
    passes: int = 0  # consecutive
    failures: int = 0  # consecutive
    last_check: float | None = None  # wall-clock time of the last check
    last_latency: float | None = None  # seconds
    last_error: str | None = None

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.geode.name,
            "region": self.geode.region,
            "url": str(self.geode.url),
            "weight": self.geode.weight,
            "healthy": self.healthy,
            "checked": self.checked,
            "consecutive_passes": self.passes,
            "consecutive_failures": self.failures,
            "last_check": self.last_check,
            "last_latency_seconds": self.last_latency,
            "last_error": self.last_error,
        }


Transition = Callable[[GeodeHealth], None]
#: Called after every check: (state, passed, latency in seconds or None).
CheckHook = Callable[[GeodeHealth, bool, float | None], None]


class HealthBoard:
    """Health of every geode by name, and the set of healthy names the router reads."""

    def __init__(self, geodes: Iterable[Geode]) -> None:
        self.states = {g.name: GeodeHealth(g) for g in geodes}
        self.healthy: set[str] = set()
        self.first_round_done = False
        self.on_transition: list[Transition] = []
        self.on_check: list[CheckHook] = []

    def record(self, name: str, ok: bool, latency: float | None, error: str | None) -> None:
        state = self.states[name]
        first = not state.checked
        state.checked = True
        state.last_check = time.time()
        state.last_latency = latency
        state.last_error = error
        check = state.geode.health
        if ok:
            state.passes += 1
            state.failures = 0
            # The first check at start-up needs a single pass, so a fresh proxy serves at once.
            turn = not state.healthy and (first or state.passes >= check.healthy_threshold)
        else:
            state.failures += 1
            state.passes = 0
            turn = state.healthy and state.failures >= check.unhealthy_threshold
        for check_hook in self.on_check:
            check_hook(state, ok, latency)
        if turn:
            state.healthy = ok
            if ok:
                self.healthy.add(name)
            else:
                self.healthy.discard(name)
            log.log(
                logging.INFO if ok else logging.WARNING, "geode %s (%s) is now %s%s", name,
                state.geode.region, "healthy" if ok else "unhealthy", f": {error}" if error else "",
            )  # fmt: skip
            for hook in self.on_transition:
                hook(state)


class HealthChecker:
    """Checks every geode at its interval (+ jitter) with its timeout."""

    def __init__(
        self,
        board: HealthBoard,
        session: aiohttp.ClientSession,
        rand: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.board = board
        self.session = session
        self.rand = rand
        self.clock = clock
        self._due: dict[str, float] = {}

    async def check(self, geode: Geode) -> tuple[bool, float | None, str | None]:
        """One check of one geode: (passed, latency in seconds, error)."""
        hc = geode.health
        url = URL(geode.base + hc.path, encoded=True)
        start = time.perf_counter()
        try:
            async with asyncio.timeout(hc.timeout):
                async with self.session.get(
                    url,
                    allow_redirects=False,
                    headers={"User-Agent": f"geoproxy-health/{__version__}"},
                ) as resp:
                    await resp.content.read(65536)  # a bounded drain; the rest is discarded
                    status = resp.status
        except TimeoutError:
            return False, None, f"timeout after {hc.timeout:g}s"
        except aiohttp.ClientConnectorError as exc:
            err = exc.os_error
            reason = os.strerror(err.errno) if err.errno else str(err)
            return False, None, f"connect failed: {reason}"
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

    async def _loop(self, geode: Geode) -> None:
        while True:
            delay = self._due.get(geode.name, 0.0) - self.clock()
            if delay > 0:
                await asyncio.sleep(delay)
            await self._check_and_record(geode)

    async def run(self) -> None:
        """Forever: every geode on its own schedule, so a geode whose checks hang until
        their timeout delays no other geode's checks. Starts with a full round unless one
        was already done (at start-up, before the proxy serves)."""
        if not self.board.first_round_done:
            await self.check_once()
        async with asyncio.TaskGroup() as group:
            for state in self.board.states.values():
                group.create_task(self._loop(state.geode), name=f"health:{state.geode.name}")
