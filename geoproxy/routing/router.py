"""Ordered candidates for a request: pure, over the topology, the healthy set and the
geodes at capacity.

Healthy geodes of the client's region first, then those of each fallback region in order.
Within a region: a random order weighted by ``weight`` (``balance: weighted``), or the
less costly of two such draws first and the rest by cost (``balance: peak_ewma``, power
of two choices over ``GeodeLoad.cost``). A geode at capacity (``full``) is skipped; when
that empties a region that had healthy geodes, the request spills down the try order
(``spill``, GCP's waterfall by region), and when every healthy geode is full it is refused
(``over_capacity``). With none healthy: nothing (``none_healthy``), or in panic mode
(``when_none_healthy: try_all``) every geode of the try order with room, regardless of
health.

A client of a residency fence (``Resolution.fence``) gets its try order kept to the fence
here, where every candidate list is made: no fallback, panic mode or other preference
reaches past it. With no healthy geode inside: ``fenced`` (the fence's refusal), or panic
mode inside the fence when its ``on_exhausted`` is ``try_all``. A new way to pick the
client's region passes its fence on and so is held by it too.

A request with a home region (home-stamp affinity) is routed the same way from its home
region, with decisions of their own (``own=affinity``: ``affinity``,
``affinity_fallback``); with ``home_affinity.on_unavailable: reject`` only the home
region's own geodes are tried (``affinity_rejected`` when none is healthy).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass

from geoproxy.config.model import Topology
from geoproxy.config.values import PEAK_EWMA, TRY_ALL, Fence, Geode

# Decisions, also the values of the `decision` metric label.
HOME, FALLBACK, PANIC, NONE_HEALTHY = "home", "fallback", "panic", "none_healthy"
FENCED = "fenced"  # refused by a residency fence: no healthy geode inside it
PROXIMITY = "proximity"  # the client's region by geoproximity (nearest by distance)
SPILL = "spill"  # another region, because healthy geodes before it in the try order are full
OVER_CAPACITY = "over_capacity"  # every healthy geode of the try order is full: 503
ALL_FAILED = "all_failed"  # set by the forwarder when every candidate failed
# A home region's geodes, its fallbacks', none healthy there and on_unavailable: reject.
AFFINITY, AFFINITY_FALLBACK, AFFINITY_REJECTED = (
    "affinity",
    "affinity_fallback",
    "affinity_rejected",
)

#: What choosing a geode costs (``GeodeLoad.cost``), by name: lower is better.
Cost = Callable[[str], float]
_NONE: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Candidate:
    geode: Geode
    decision: str  # home (or proximity) | fallback | spill | panic | affinity | affinity_fallback


def weighted_order(geodes: Sequence[Geode], rand: Callable[[], float]) -> list[Geode]:
    """A random order in which a geode comes first in proportion to its weight
    (Efraimidis-Spirakis keys)."""
    if len(geodes) < 2:
        return list(geodes)
    keyed = [(rand() ** (1.0 / g.weight), i) for i, g in enumerate(geodes)]
    keyed.sort(reverse=True)
    return [geodes[i] for _, i in keyed]


def two_choices(geodes: Sequence[Geode], rand: Callable[[], float], cost: Cost) -> list[Geode]:
    """Power of two choices: of two geodes drawn as ``weighted_order`` draws, the less
    costly first; then the others, least costly first (for failover)."""
    if len(geodes) < 2:
        return list(geodes)
    drawn = weighted_order(geodes, rand)
    costs = {g.name: cost(g.name) for g in drawn}
    first = drawn[1] if costs[drawn[1].name] < costs[drawn[0].name] else drawn[0]
    rest = sorted((g for g in drawn if g is not first), key=lambda g: costs[g.name])
    return [first, *rest]


def candidates(
    topology: Topology,
    region: str,
    healthy: Container[str],
    limit: int,
    rand: Callable[[], float] = random.random,
    fence: Fence | None = None,
    own: str = HOME,
    full: Container[str] = _NONE,
    cost: Cost | None = None,
) -> tuple[list[Candidate], str]:
    """Up to ``limit`` candidates and the decision for the first one. ``fence``: the
    client's residency fence, which no candidate leaves; ``own``: the decision for the
    geodes of ``region`` itself (``proximity`` when the distance chose it, ``affinity``
    when it is the request's home region: its fallbacks are ``affinity_fallback``); ``full``:
    geodes at capacity; ``cost``: for regions that balance by ``peak_ewma`` (without it,
    they balance by weight)."""
    order = try_order(topology, region, fence)
    fallback = FALLBACK
    only_home = False
    if own == AFFINITY:
        fallback = AFFINITY_FALLBACK
        affinity = topology.config.home_affinity
        only_home = affinity is not None and affinity.on_unavailable == "reject"
        if only_home:
            order = tuple(r for r in order if r == region)
    out: list[Candidate] = []
    spilled = False  # a region before this one had healthy geodes, all of them full
    balances = topology.balances
    for other in order:
        group = [g for g in topology.geodes_by_region[other] if g.name in healthy]
        if full and group:
            room = [g for g in group if g.name not in full]
            spilled = spilled or not room
            group = room
        decision = own if other == region else SPILL if spilled else fallback
        if cost is not None and balances[other] == PEAK_EWMA:
            ordered = two_choices(group, rand, cost)
        else:
            ordered = weighted_order(group, rand)
        out.extend(Candidate(g, decision) for g in ordered)
        if len(out) >= limit:
            return out[:limit], out[0].decision
    if out:
        return out, out[0].decision
    if spilled:
        return [], OVER_CAPACITY
    if only_home:
        return [], AFFINITY_REJECTED
    panic = topology.config.forwarding.when_none_healthy if fence is None else fence.on_exhausted
    if panic == TRY_ALL:
        for other in order:
            group = [g for g in topology.geodes_by_region[other] if g.name not in full]
            out.extend(Candidate(g, PANIC) for g in weighted_order(group, rand))
        return out[:limit], PANIC if out else OVER_CAPACITY
    return [], NONE_HEALTHY if fence is None else FENCED


def try_order(topology: Topology, region: str, fence: Fence | None) -> tuple[str, ...]:
    """The regions a client of ``region`` may go to, in order, as its fence allows."""
    order = topology.try_orders[region]
    return order if fence is None else fence.try_order(region, order)


class CandidateCache:
    """Memoises ``candidates`` while the topology, the healthy set and the full set stay
    the same, for regions whose answer involves no random draw or cost (each group of
    healthy geodes it uses has one geode; never panic mode's) — the common case.
    ``version`` must change whenever ``healthy`` does, ``full_version`` whenever ``full``
    does."""

    def __init__(self) -> None:
        self._memo: dict[str, tuple[Topology, int, int, list[Candidate], str]] = {}

    def candidates(
        self,
        topology: Topology,
        region: str,
        healthy: Container[str],
        version: int,
        limit: int,
        rand: Callable[[], float] = random.random,
        fence: Fence | None = None,
        own: str = HOME,
        full: Container[str] = _NONE,
        full_version: int = 0,
        cost: Cost | None = None,
    ) -> tuple[list[Candidate], str]:
        key = region  # a space, in no id, sets the rarer variants apart
        if fence is not None or own is not HOME:
            key = f"{region} {fence.name if fence else ''} {own}"
        hit = self._memo.get(key)
        if hit is not None and hit[0] is topology and hit[1] == version and hit[2] == full_version:
            return hit[3], hit[4]
        cands, decision = candidates(topology, region, healthy, limit, rand, fence, own, full, cost)
        regions = {c.geode.region for c in cands}
        # Panic mode draws over every geode, healthy or not: never kept.
        if (
            decision != PANIC
            and all(
                sum(g.name in healthy for g in topology.geodes_by_region[r]) <= 1 for r in regions
            )
        ) or decision in (NONE_HEALTHY, FENCED, OVER_CAPACITY, AFFINITY_REJECTED):
            self._memo[key] = (topology, version, full_version, cands, decision)
        return cands, decision
