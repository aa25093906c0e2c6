"""Ordered candidates for a request: pure, over the topology and the healthy set.

Healthy geodes of the client's region first (weighted random order), then those of each
fallback region in order. With none healthy: nothing (``none_healthy``), or in panic mode
(``when_none_healthy: try_all``) every geode of the try order regardless of health.

A client of a residency fence (``Resolution.fence``) gets its try order kept to the fence
here, where every candidate list is made: no fallback, panic mode or other preference
reaches past it. With no healthy geode inside: ``fenced`` (the fence's refusal), or panic
mode inside the fence when its ``on_exhausted`` is ``try_all``. A new way to pick the
client's region passes its fence on and so is held by it too.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass

from geoproxy.config.model import Topology
from geoproxy.config.values import TRY_ALL, Fence, Geode

# Decisions, also the values of the `decision` metric label.
HOME, FALLBACK, PANIC, NONE_HEALTHY = "home", "fallback", "panic", "none_healthy"
FENCED = "fenced"  # refused by a residency fence: no healthy geode inside it
PROXIMITY = "proximity"  # the client's region by geoproximity (nearest by distance)
ALL_FAILED = "all_failed"  # set by the forwarder when every candidate failed


@dataclass(frozen=True, slots=True)
class Candidate:
    geode: Geode
    decision: str  # home (or proximity) | fallback | panic


def weighted_order(geodes: Sequence[Geode], rand: Callable[[], float]) -> list[Geode]:
    """A random order in which a geode comes first in proportion to its weight
    (Efraimidis-Spirakis keys)."""
    if len(geodes) < 2:
        return list(geodes)
    keyed = [(rand() ** (1.0 / g.weight), i) for i, g in enumerate(geodes)]
    keyed.sort(reverse=True)
    return [geodes[i] for _, i in keyed]


def candidates(
    topology: Topology,
    region: str,
    healthy: Container[str],
    limit: int,
    rand: Callable[[], float] = random.random,
    fence: Fence | None = None,
    own: str = HOME,
) -> tuple[list[Candidate], str]:
    """Up to ``limit`` candidates and the decision for the first one. ``fence``: the
    client's residency fence, which no candidate leaves; ``own``: the decision for the
    geodes of ``region`` itself (``proximity`` when the distance chose it)."""
    order = try_order(topology, region, fence)
    out: list[Candidate] = []
    for other in order:
        group = [g for g in topology.geodes_by_region[other] if g.name in healthy]
        decision = own if other == region else FALLBACK
        out.extend(Candidate(g, decision) for g in weighted_order(group, rand))
        if len(out) >= limit:
            return out[:limit], out[0].decision
    if out:
        return out, out[0].decision
    panic = topology.config.forwarding.when_none_healthy if fence is None else fence.on_exhausted
    if panic == TRY_ALL:
        for other in order:
            group = list(topology.geodes_by_region[other])
            out.extend(Candidate(g, PANIC) for g in weighted_order(group, rand))
        return out[:limit], PANIC
    return [], NONE_HEALTHY if fence is None else FENCED


def try_order(topology: Topology, region: str, fence: Fence | None) -> tuple[str, ...]:
    """The regions a client of ``region`` may go to, in order, as its fence allows."""
    order = topology.try_orders[region]
    return order if fence is None else fence.try_order(region, order)


class CandidateCache:
    """Memoises ``candidates`` while the topology and the healthy set stay the same, for
    regions whose answer involves no random draw (each group of healthy geodes it uses has
    one geode) — the common case. ``version`` must change whenever ``healthy`` does."""

    def __init__(self) -> None:
        self._memo: dict[str, tuple[Topology, int, list[Candidate], str]] = {}

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
    ) -> tuple[list[Candidate], str]:
        key = region  # a space, in no id, sets the rarer variants apart
        if fence is not None or own != HOME:
            key = f"{region} {fence.name if fence else ''} {own}"
        hit = self._memo.get(key)
        if hit is not None and hit[0] is topology and hit[1] == version:
            return hit[2], hit[3]
        cands, decision = candidates(topology, region, healthy, limit, rand, fence, own)
        regions = {c.geode.region for c in cands}
        if all(
            sum(g.name in healthy for g in topology.geodes_by_region[r]) <= 1 for r in regions
        ) or decision in (NONE_HEALTHY, FENCED):
            self._memo[key] = (topology, version, cands, decision)
        return cands, decision
