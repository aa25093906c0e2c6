"""Geode health: runtime state kept apart from the frozen config, and the active checker.

``HealthBoard`` is the state machine (no I/O): it counts consecutive passes and failures
of active checks and flips a geode at the thresholds, and ejects a geode that live traffic
keeps failing on (passive health). ``HealthChecker`` does the I/O: ``check_once`` is one
round; ``run`` only adds timing, one loop per geode.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from geoproxy.config.values import Geode, OutlierDetection

log = logging.getLogger("geoproxy.health")


@dataclass(slots=True)
class GeodeHealth:
    geode: Geode
    healthy: bool = False  # active checks: a geode that never answered is unhealthy
    checked: bool = False
    passes: int = 0  # consecutive
    failures: int = 0  # consecutive
    last_check: float | None = None  # wall-clock time of the last check
    last_latency: float | None = None  # seconds
    last_error: str | None = None
    # Passive health (outlier ejection), from live traffic:
    passive_failures: int = 0  # consecutive connect failures / 502 / 503 / 504
    ejections: int = 0  # how often ejected so far; the n-th lasts n x base time
    ejected_until: float | None = None  # wall-clock time; None: not ejected
    # Wall-clock time since which the geode has (or has not) taken traffic: its first
    # check, then every change. None: never checked.
    since: float | None = None

    @property
    def ejected(self) -> bool:
        return self.ejected_until is not None

    def readmit(self) -> None:
        """End a passive ejection (its time is over, or an active check passed)."""
        self.ejected_until = None
        self.passive_failures = 0

    @property
    def takes_traffic(self) -> bool:
        return self.healthy and not self.ejected

    @property
    def state(self) -> str:
        """One word for operators: unchecked, up, ejected (by passive health) or down."""
        if self.ejected:
            return "ejected"
        if not self.checked:
            return "unchecked"
        return "up" if self.healthy else "down"

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.geode.name,
            "region": self.geode.region,
            "url": str(self.geode.url),
            "weight": self.geode.weight,
            "state": self.state,
            "takes_traffic": self.takes_traffic,
            "since": self.since,
            "healthy": self.healthy,
            "checked": self.checked,
            "consecutive_passes": self.passes,
            "consecutive_failures": self.failures,
            "last_check": self.last_check,
            "last_latency_seconds": self.last_latency,
            "last_error": self.last_error,
            "ejected": self.ejected,
            "ejected_until": self.ejected_until,
            "ejections": self.ejections,
            "consecutive_passive_failures": self.passive_failures,
        }


Transition = Callable[[GeodeHealth], None]
#: Called after every check: (state, passed, latency in seconds or None).
CheckHook = Callable[[GeodeHealth, bool, float | None], None]
#: ``loop.call_later``-shaped: run a callback after a delay (injected; tests use a fake).
Scheduler = Callable[[float, Callable[[], None]], object]


class HealthBoard:
    """Health of every geode by name, and ``healthy``: the names that take traffic (passing
    active checks and not ejected), which is what the router reads."""

    def __init__(
        self,
        geodes: Iterable[Geode],
        outliers: OutlierDetection | None = None,
        schedule: Scheduler | None = None,
    ) -> None:
        self.states = {g.name: GeodeHealth(g) for g in geodes}
        self.healthy: set[str] = set()
        self.version = 0  # bumped whenever ``healthy`` changes (for memoised routing)
        self.first_round_done = False
        self.outliers = outliers or OutlierDetection()
        self._schedule = schedule
        self.on_transition: list[Transition] = []  # takes_traffic changed
        self.on_check: list[CheckHook] = []
        self.on_eject: list[Transition] = []

    def _update(self, state: GeodeHealth, why: str | None, quiet: bool = False) -> None:
        """Keep ``healthy`` in step with the state; tell the hooks when it flips."""
        name = state.geode.name
        now = state.takes_traffic
        if now == (name in self.healthy):
            return
        if now:
            self.healthy.add(name)
        else:
            self.healthy.discard(name)
        state.since = time.time()
        self.version += 1
        if not quiet:
            log.log(
                logging.INFO if now else logging.WARNING,
                "geode %s (%s) %s%s",
                name,
                state.geode.region,
                "takes traffic" if now else "is out of rotation",
                f": {why}" if why else "",
            )
        for hook in self.on_transition:
            hook(state)

    def record(self, name: str, ok: bool, latency: float | None, error: str | None) -> None:
        """One active check's result."""
        state = self.states.get(name)
        if state is None:
            return  # removed by a reload while its check ran
        first = not state.checked
        state.checked = True
        state.last_check = time.time()
        if first:
            state.since = state.last_check
        state.last_latency = latency
        state.last_error = error
        check = state.geode.health
        if ok:
            state.passes += 1
            state.failures = 0
            # The first check at start-up needs a single pass, so a fresh proxy serves at once.
            if not state.healthy and (first or state.passes >= check.healthy_threshold):
                state.healthy = True
            if state.ejected:  # a passing active check re-admits an ejected geode
                state.readmit()
        else:
            state.failures += 1
            state.passes = 0
            if state.healthy and state.failures >= check.unhealthy_threshold:
                state.healthy = False
        for check_hook in self.on_check:
            check_hook(state, ok, latency)
        self._update(state, error)

    def observe(self, name: str, ok: bool) -> None:
        """One forwarding attempt's outcome (passive health). After
        ``consecutive_failures`` failures in a row the geode is ejected for a while — but
        never the last geode that takes traffic."""
        state = self.states.get(name)
        limit = self.outliers.consecutive_failures
        if state is None or limit == 0:
            return
        if ok:
            state.passive_failures = 0
            return
        state.passive_failures += 1
        if state.passive_failures < limit or state.ejected or not state.takes_traffic:
            return
        if len(self.healthy) <= 1:
            return  # ejecting it would leave nothing to route to
        state.ejections += 1
        duration = min(
            self.outliers.base_ejection_time * state.ejections, self.outliers.max_ejection_time
        )
        until = time.time() + duration
        state.ejected_until = until
        for hook in self.on_eject:
            hook(state)
        self._update(
            state,
            f"ejected for {duration:g}s after {state.passive_failures} failed requests in a row",
        )
        if self._schedule is not None:
            self._schedule(duration, lambda: self._readmit(name, until))

    def _readmit(self, name: str, until: float) -> None:
        state = self.states.get(name)
        if state is None or state.ejected_until != until:
            return  # re-admitted earlier (an active pass), or removed
        state.readmit()
        self._update(state, "ejection time over")

    def take_checks(self, results: Iterable[tuple[str, str, bool, bool]]) -> None:
        """Active-check results from a process that checks for us (the supervisor of
        ``--workers``): ``(geode name, URL, checked, healthy)`` for every geode it has.
        A result for a geode this board does not have, or has at another URL (a reload
        not applied here yet), is ignored; passive ejection stays local. Not logged: the
        supervisor logs each transition once."""
        for name, url, checked, healthy in results:
            state = self.states.get(name)
            if state is None or str(state.geode.url) != url:
                continue
            if checked and not state.checked:
                state.since = time.time()
            state.checked, state.healthy = checked, healthy
            self._update(state, None, quiet=True)
        self.first_round_done = True

    def check_passed(self, name: str, url: str) -> None:
        """An active check of this geode passed in the process that checks for us: as
        with our own checks, that re-admits a geode passive health ejected."""
        state = self.states.get(name)
        if state is None or str(state.geode.url) != url or not state.ejected:
            return
        state.readmit()
        self._update(state, "an active check passed")

    def sync(
        self, geodes: Iterable[Geode], outliers: OutlierDetection
    ) -> tuple[list[Geode], list[Geode]]:
        """Adopt a reloaded geode list and outlier settings: state carries over for a
        geode whose name and URL are unchanged; a new (or moved) geode starts unchecked
        and takes no traffic until it passes a check. Returns (added, removed)."""
        self.outliers = outliers
        new = {g.name: g for g in geodes}
        added, removed = [], []
        self.version += 1
        for name, state in list(self.states.items()):
            geode = new.get(name)
            if geode is None or geode.url != state.geode.url:
                removed.append(state.geode)
                del self.states[name]
                self.healthy.discard(name)
        for name, geode in new.items():
            if name in self.states:
                self.states[name].geode = geode  # new weight, region or check settings
            else:
                self.states[name] = GeodeHealth(geode)
                added.append(geode)
        return added, removed
