"""Route explanation: the decision the proxy would take for a client, and why.

Built from the same pure functions the forwarder calls (client IP, resolver, router), so
the answer cannot drift from what the proxy does. Used by the admin ``/route`` endpoint and
by ``geoproxy route`` (offline, where every geode counts as healthy); ``explain_access``
answers which access rule a path meets, from the same ``AccessRules.decide``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Container
from typing import Any

from geoproxy.config.model import Topology
from geoproxy.config.values import PEAK_EWMA
from geoproxy.health.load import GeodeLoad
from geoproxy.routing.affinity import COOKIE, OK, Home, fenced_in
from geoproxy.routing.clientip import IPAddress
from geoproxy.routing.proximity import Nearest
from geoproxy.routing.resolver import Resolution
from geoproxy.routing.router import (
    AFFINITY,
    AFFINITY_FALLBACK,
    AFFINITY_REJECTED,
    FENCED,
    HOME,
    NONE_HEALTHY,
    OVER_CAPACITY,
    PANIC,
    PROXIMITY,
    SPILL,
    candidates,
    try_order,
)


def explain(
    topology: Topology,
    resolution: Resolution,
    healthy: Container[str],
    peer: IPAddress | None,
    peer_trusted: bool,
    rand: Callable[[], float] = random.random,
    load: GeodeLoad | None = None,
    home: Home | None = None,
) -> dict[str, Any]:
    """A JSON-able account of one routing decision. ``load``: the process's in-flight
    counts and latencies (None: offline, nothing in flight). ``home``: the home region
    the request names (``affinity.home_of``/``current``), which beats its geography."""
    fwd = topology.config.forwarding
    region = resolution.region
    fence = resolution.fence
    own = resolution.own
    home = fenced_in(home, fence)  # home affinity never leaves a residency fence
    if home is not None and home.region is not None:
        region, own = home.region, AFFINITY
    order = try_order(topology, region, fence)
    affinity = topology.config.home_affinity
    if own == AFFINITY and affinity is not None and affinity.on_unavailable == "reject":
        order = tuple(r for r in order if r == region)
    if load is None:  # offline: the limits the config sets, nothing in flight
        load = GeodeLoad()
        load.configure(topology.config)
    cands, decision = candidates(
        topology, region, healthy, fwd.max_attempts, rand, fence, own, load.full, load.cost
    )
    busy = load.describe(g for other in order for g in topology.geodes_by_region[other])
    listing = [
        {
            "geode": g.name,
            "region": other,
            "role": "home" if other == region else "fallback",
            "healthy": g.name in healthy,
            "weight": g.weight,
            **busy[g.name],
        }
        for other in order
        for g in topology.geodes_by_region[other]
    ]
    chosen = cands[0].geode if cands else None
    # The geodes the first pick was drawn from (weighted random when more than one).
    pool = [c.geode.name for c in cands if chosen and c.geode.region == chosen.region]
    balance = topology.balances[chosen.region] if chosen else None
    full = {g: why for g, facts in busy.items() if (why := facts["full"]) and g in healthy}
    return {
        "client": {
            "peer": str(peer) if peer is not None else None,
            "peer_trusted": peer_trusted,
            "ip": str(resolution.client_ip) if resolution.client_ip is not None else None,
        },
        "resolution": {
            "region": resolution.region,
            "source": resolution.source,
            "country": resolution.country,
            "steps": [{"source": s, "result": r} for s, r in resolution.steps],
        },
        "proximity": _proximity(topology, resolution),
        "fence": None
        if fence is None
        else {
            "name": fence.name,
            "regions": list(fence.regions),
            "on_exhausted": fence.on_exhausted,
            "status": fence.status,
            "kept_out": [r for r in topology.try_orders[region] if r not in fence.members],
        },
        "home": None
        if home is None
        else {
            "region": home.region,
            "source": home.source,
            "result": home.result,
            "expires": home.expires,
        },
        "try_order": list(order),
        "candidates": listing,
        "attempt_order": [c.geode.name for c in cands],
        "decision": decision,
        "chosen": chosen.name if chosen else None,
        "chosen_region": chosen.region if chosen else None,
        "balance": balance,
        "at_capacity": full,
        "reason": _reason(
            topology,
            resolution,
            decision,
            chosen.region if chosen else None,
            pool,
            balance,
            full,
            home,
        ),
    }


def explain_access(topology: Topology, path: str) -> dict[str, Any]:
    """A JSON-able account of what the access rules do with a request path."""
    decision = topology.access.decide(path)
    rule = decision.rule
    if rule is None:
        why = "allowed: no rule matches"
    elif decision.allowed:
        why = f"allowed by rule {rule.name!r} ({rule.path_prefix})"
    elif rule.status == 400:
        why = "400: the path cannot be read safely (an encoded '/' or '\\', a NUL, not UTF-8)"
    else:
        why = f"denied by rule {rule.name!r} ({rule.path_prefix}): {rule.status}"
    return {
        "path": path,
        "allowed": decision.allowed,
        "rule": rule.name if rule is not None else None,
        "status": None if decision.allowed or rule is None else rule.status,
        "reason": why,
    }


def _proximity(topology: Topology, resolution: Resolution) -> dict[str, Any] | None:
    """Geoproximity's account: the client's coordinates, every located region it may go
    to by effective distance, and whether the distance decided."""
    near = resolution.nearest
    if near is None:
        return None
    bias = {r.name: r.bias for r in topology.located}
    return {
        "location": {"lat": near.location[0], "lon": near.location[1]},
        "accuracy_radius_km": near.accuracy_radius,
        "ranking": [
            {
                "region": r.region,
                "distance_km": round(r.distance_km, 1),
                "bias": bias[r.region],
                "effective_km": round(r.effective_km, 1),
            }
            for r in near.ranking
        ],
        "region": near.region,
        "decided": near.decided,
    }


def _reason(
    topology: Topology,
    resolution: Resolution,
    decision: str,
    served_region: str | None,
    pool: list[str],
    balance: str | None,
    full: dict[str, str],
    home: Home | None = None,
) -> str:
    region = resolution.region
    why = f"client region {region} from {resolution.source}"
    if resolution.country:
        why += f" (country {resolution.country})"
    if (near := resolution.nearest) is not None:
        why += _by_distance(near)
    fence = resolution.fence
    if fence is not None:
        why += f"; held by residency fence {fence.name} ({', '.join(fence.regions)})"
    if home is not None and home.result != OK:
        named = "a home cookie" if home.source == COOKIE else "a tenant key"
        why += f"; {named} was ignored ({home.result}): routed by geography"
    if home is not None and home.region is not None:
        region = home.region
        named = "a signed home cookie" if home.source == COOKIE else "the tenant map"
        why = f"home region {region} from {named} (home affinity beats {why})"
    if decision == FENCED and fence is not None:
        return (
            f"{why}; no healthy geode inside the fence: {fence.status} "
            f"(fences.{fence.name}.on_exhausted: {fence.on_exhausted}), never sent outside it"
        )
    how = "by latency (peak EWMA, the less loaded of two)" if balance == PEAK_EWMA else "by weight"
    weighted = f", picked {how} among {', '.join(pool)}" if len(pool) > 1 else ""
    skipped = "; ".join(f"{g}: {what}" for g, what in full.items())
    if skipped and decision in (HOME, PROXIMITY, PANIC, AFFINITY):
        weighted += f" (at capacity, skipped: {skipped})"
    if decision in (HOME, PROXIMITY, AFFINITY):
        return f"{why}; a healthy geode in the home region{weighted}"
    if decision == AFFINITY_FALLBACK:
        return (
            f"{why}; no healthy geode in the home region: its nearest fallback with one "
            f"is {served_region}{weighted}"
        )
    if decision == AFFINITY_REJECTED:
        return f"{why}; no healthy geode in {region}: 503 (home_affinity.on_unavailable: reject)"
    if decision == SPILL:
        return (
            f"{why}; healthy geodes before {served_region} in the try order are at capacity "
            f"({skipped}): spilled to {served_region}{weighted}"
        )
    if decision == OVER_CAPACITY:
        return (
            f"{why}; every healthy geode in {', '.join(try_order(topology, region, fence))} "
            f"is at capacity ({skipped}): 503 over_capacity"
        )
    if decision == NONE_HEALTHY:
        return (
            f"{why}; no healthy geode in {', '.join(topology.try_orders[region])}: "
            "503 (forwarding.when_none_healthy: reject)"
        )
    if decision == PANIC:
        setting = (
            "forwarding.when_none_healthy" if fence is None else f"fences.{fence.name}.on_exhausted"
        )
        return (
            f"{why}; no healthy geode anywhere in its try order: panic mode tries "
            f"them all ({setting}: try_all)"
        )
    if fence is not None and region not in fence.members:
        return f"{why}; {region} is outside the fence: the first region inside it with a " + (
            f"healthy geode is {served_region}{weighted}"
        )
    return f"{why}; no healthy geode in {region}: nearest fallback with one is {served_region}" + (
        weighted
    )


def _by_distance(near: Nearest) -> str:
    best, *others = near.ranking
    radius = f" ±{near.accuracy_radius} km" if near.accuracy_radius else ""
    nearest = f"by geoproximity: nearest is {best.region} ({best.effective_km:,.0f} km{radius}"
    nearest += "".join(f"; {r.region} {r.effective_km:,.0f} km" for r in others[:2]) + ")"
    if near.decided:
        return f" {nearest}"
    return (
        f" by the region map: {nearest}, too close to {near.region} to tell apart within the "
        "accuracy radius"
    )
