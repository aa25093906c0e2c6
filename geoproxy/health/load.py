"""How busy each geode is, as this process sees it: the requests in flight (in total and
per geode), the load a geode reports of itself, and how long its answers take.

Runtime state beside the health board, kept across reloads. Every request path counts
through one ``Ticket`` per request (``GeodeLoad.ticket``): it is counted in ``total`` until
``release()``, and at the geode of its current attempt (``Ticket.at``). ``release`` may
run more than once; only the first counts, so each way a request can end (answered,
failed over, the client gone, a timeout, a geode reset, a drain cut) simply calls it.

The router reads ``full`` (geodes at capacity: ``max_inflight`` requests in flight here,
or a reported load of 100 or more; ``version`` changes with it) and, for regions that
balance by ``peak_ewma``, ``cost``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

from geoproxy.config.values import PEAK_EWMA, Config, Geode

log = logging.getLogger("geoproxy.load")

#: The response header a geode reports its load in: a whole percentage of its capacity
#: (``Geoproxy-Load: 85``, a trailing ``%`` allowed). At 100 or more the geode counts as
#: full. Never passed on to the client (headers.py).
LOAD_HEADER = "Geoproxy-Load"
#: Seconds a report of 100 or more holds without news: a full geode gets no new requests,
#: so no answers that would say it has room again (HAProxy's agent-inter is 2 s as well).
REPORT_HOLDS = 2.0
#: Seconds over which the peak EWMA forgets a latency (Finagle's and Linkerd's default).
DECAY = 10.0
#: The latency a geode with requests in flight but no answer measured yet is taken to
#: have, so that a new geode gets one request, not a burst, before it is known.
UNMEASURED = 1.0

#: ``loop.call_later``-shaped (injected, as for ``HealthBoard``).
Scheduler = Callable[[float, Callable[[], None]], object]


class Ticket:
    """One request's claim on the counts (see the module's docstring)."""

    __slots__ = ("_load", "geode", "live")

    def __init__(self, load: GeodeLoad) -> None:
        self._load = load
        self.geode: str | None = None  # the geode of the attempt under way, by name
        self.live = True

    def at(self, geode: str) -> None:
        """The request's attempt is now at ``geode``: counted there, no longer at the
        geode of its previous attempt."""
        if geode == self.geode or not self.live:
            return
        load = self._load
        if self.geode is not None:
            load._leave(self.geode)
        self.geode = geode
        inflight = load.inflight
        count = inflight[geode] = inflight.get(geode, 0) + 1  # _enter, inlined: per request
        if geode in load.limits:
            load._at_capacity(geode, count)

    def release(self) -> None:
        """The request ended, however it did; later calls do nothing."""
        if not self.live:
            return
        self.live = False
        load = self._load
        load.total -= 1
        geode = self.geode
        if geode is not None:
            self.geode = None
            count = load.inflight[geode] = load.inflight[geode] - 1  # _leave, inlined
            if geode in load._at_limit:
                load._below_capacity(geode, count)


class GeodeLoad:
    """In-flight counts, capacity and latency per geode (see the module's docstring)."""

    def __init__(self, share: int = 1, clock: Callable[[], float] = time.monotonic) -> None:
        self.total = 0  # requests in flight in this process
        self.inflight: dict[str, int] = {}  # by geode: requests whose attempt is there
        self.limits: dict[str, int] = {}  # this process's max_inflight, by geode
        self.full: frozenset[str] = frozenset()  # geodes at capacity: the router skips them
        self.version = 0  # bumped whenever ``full`` changes (for memoised routing)
        self.reported: dict[str, tuple[int, float]] = {}  # by geode: (percent, when)
        self.timed: frozenset[str] = frozenset()  # geodes of peak_ewma regions
        self.schedule: Scheduler | None = None  # set once a loop runs; None: reports hold
        self._share = share  # worker processes sharing each max_inflight
        self._clock = clock
        self._at_limit: set[str] = set()
        self._reported_full: set[str] = set()
        self._ewma: dict[str, list[float]] = {}  # by geode: [cost in seconds, when]
        self._bad: dict[str, bytes] = {}  # the last malformed report, logged once
        self.cost_of: Callable[[str], float] = self.cost  # bound once: read per request

    def configure(self, config: Config) -> None:
        """Take the limits and balances of the config in force (start-up, reloads)."""
        share = self._share
        self.limits = {
            g.name: math.ceil(g.max_inflight / share)
            for g in config.geodes
            if g.max_inflight is not None
        }
        peak = {r.name for r in config.regions if r.balance == PEAK_EWMA}
        self.timed = frozenset(g.name for g in config.geodes if g.region in peak)
        names = {g.name for g in config.geodes}
        self._at_limit = {n for n, limit in self.limits.items() if self.inflight.get(n, 0) >= limit}
        self._reported_full &= names
        for gone in set(self.reported) - names:
            del self.reported[gone]
        for gone in set(self._ewma) - names:
            del self._ewma[gone]
        self._refresh()

    def ticket(self) -> Ticket:
        """A request begins: counted in ``total`` until its ticket is released."""
        self.total += 1
        return Ticket(self)

    def _at_capacity(self, name: str, count: int) -> None:
        """``name`` has ``count`` in flight now, one more than before."""
        if count >= self.limits[name] and name not in self._at_limit:
            self._at_limit.add(name)
            self._refresh()

    def _below_capacity(self, name: str, count: int) -> None:
        """``name``, at its limit, has ``count`` in flight now, one less than before."""
        if count < self.limits.get(name, count + 1):
            self._at_limit.discard(name)
            self._refresh()

    def _leave(self, name: str) -> None:
        count = self.inflight[name] = self.inflight[name] - 1
        if name in self._at_limit:
            self._below_capacity(name, count)

    def _refresh(self) -> None:
        full = frozenset(self._at_limit | self._reported_full)
        if full != self.full:
            self.full = full
            self.version += 1

    # -- what geodes report -------------------------------------------------------------

    def report(self, geode: str, value: bytes | str) -> None:
        """A geode's answer carried ``Geoproxy-Load: value``."""
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        digits = text.strip().removesuffix("%").strip()
        if not digits.isdigit() or not digits.isascii() or len(digits) > 6:
            raw = text.encode("latin-1", "replace")
            if self._bad.get(geode) != raw:
                self._bad[geode] = raw
                log.warning(
                    "geode %s: %s %r is not a whole percentage; ignored",
                    geode,
                    LOAD_HEADER,
                    text[:40],
                )
            return
        percent = int(digits)
        now = self._clock()
        self.reported[geode] = (percent, now)
        if percent >= 100:
            if geode not in self._reported_full:
                self._reported_full.add(geode)
                self._refresh()
            if self.schedule is not None:
                self.schedule(REPORT_HOLDS, lambda: self._expire(geode, now))
        elif geode in self._reported_full:
            self._reported_full.discard(geode)
            self._refresh()

    def _expire(self, geode: str, since: float) -> None:
        """A full report's hold is over, unless a later report came meanwhile."""
        last = self.reported.get(geode)
        if last is not None and last[1] == since and geode in self._reported_full:
            self._reported_full.discard(geode)
            self._refresh()

    # -- latency (peak EWMA) ------------------------------------------------------------

    def latency(self, geode: str, seconds: float) -> None:
        """The time from a request sent to ``geode`` to its answer's head. A peak moves
        the average at once; a lower value moves it by how long it has been since the last
        one (decay ``DECAY``), as Finagle's peak EWMA does."""
        now = self._clock()
        ewma = self._ewma.get(geode)
        if ewma is None:
            self._ewma[geode] = [seconds, now]
            return
        cost, since = ewma
        if seconds > cost:
            ewma[0] = seconds
        else:
            w = math.exp(-(now - since) / DECAY)
            ewma[0] = cost * w + seconds * (1.0 - w)
        ewma[1] = now

    def ewma(self, geode: str) -> float | None:
        """The peak EWMA of ``geode``'s answer times as of now, decayed since its last
        answer (a geode not chosen for a while is tried again); None: never measured."""
        ewma = self._ewma.get(geode)
        if ewma is None:
            return None
        return ewma[0] * math.exp(-(self._clock() - ewma[1]) / DECAY)

    def cost(self, geode: str) -> float:
        """What choosing ``geode`` costs: its peak EWMA times its requests in flight plus
        one (the one being routed)."""
        waiting = self.inflight.get(geode, 0)
        ewma = self.ewma(geode)
        if ewma is None:
            return UNMEASURED * waiting
        return ewma * (waiting + 1)

    # -- for operators ------------------------------------------------------------------

    def describe(self, geodes: Iterable[Geode]) -> dict[str, dict[str, Any]]:
        """Per geode, what /route and /geodes show."""
        out = {}
        now = self._clock()
        for g in geodes:
            name = g.name
            reported = self.reported.get(name)
            ewma = self.ewma(name)
            out[name] = {
                "inflight": self.inflight.get(name, 0),
                "max_inflight": self.limits.get(name),
                "reported_load": reported[0] if reported else None,
                "reported_seconds_ago": round(now - reported[1], 3) if reported else None,
                "full": self.why_full(name),
                "latency_ewma_seconds": round(ewma, 6) if ewma is not None else None,
            }
        return out

    def why_full(self, geode: str) -> str | None:
        """Why the router skips ``geode`` now, or None when it has room."""
        if geode in self._at_limit:
            return f"{self.inflight.get(geode, 0)}/{self.limits[geode]} in flight"
        if geode in self._reported_full:
            return f"reports {LOAD_HEADER}: {self.reported[geode][0]}"
        return None
