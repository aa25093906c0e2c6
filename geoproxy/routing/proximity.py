"""Geoproximity: the region nearest to a client's coordinates, with Route 53's bias. Pure.

A region with a ``location`` is ``distance * (1 - bias / 100)`` away from the client
(great-circle distance, in km). The client goes to the region with the least of that.

The coordinates of a GeoIP record are uncertain by its accuracy radius ``r`` (MaxMind: the
client is within ``r`` km with 67 % confidence). Moving the client by up to ``r`` changes
its distance to each region by up to ``r``. So when the region map would place the client
too (a continent entry, with ``proximity.prefer_over_continent``), the nearest region
takes over only when it wins wherever the client is within ``r``: when it is nearer by
more than ``r`` weighted by both regions' bias. Otherwise the map's region stays (the
coordinates cannot tell them apart). A client the map does not place goes to the nearest
region whatever ``r``: a country's centre is a better guess than ``default_region``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from geoproxy.config.values import Region

#: The mean radius of the Earth, in km (IUGG).
EARTH_RADIUS_KM = 6371.0088


@dataclass(frozen=True, slots=True)
class Ranked:
    region: str
    distance_km: float  # great-circle, from the client's coordinates
    effective_km: float  # distance_km * (1 - bias / 100): what is compared


@dataclass(frozen=True, slots=True)
class Nearest:
    """What geoproximity found for one client, for ``/route`` and the decision."""

    location: tuple[float, float]  # the client's (latitude, longitude)
    accuracy_radius: int | None  # km, as the GeoIP record gives it
    ranking: tuple[Ranked, ...]  # every located region the client may go to, nearest first
    region: str  # where the client goes
    decided: bool  # True: the distance chose ``region``; False: the map's region was kept,
    # the nearest one being too close to it to tell apart within the accuracy radius


def distance_km(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Great-circle distance (haversine) between two (latitude, longitude) points."""
    lat1, lon1, lat2, lon2 = map(math.radians, (*a, *b))
    h = (
        math.sin((lat2 - lat1) / 2) ** 2
        + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    )
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(h)))


def nearest(
    regions: Iterable[Region],
    location: tuple[float, float],
    accuracy_radius: int | None,
    mapped: str | None = None,
) -> Nearest | None:
    """The nearest of ``regions`` that have a location (ties: the first listed), or
    ``None`` when none has. ``mapped``: the region the map would give the client, kept
    unless the nearest one beats it by more than the accuracy radius allows."""
    located = [(r, at) for r in regions if (at := r.location) is not None]
    if not located:
        return None
    weights = {r.name: 1 - r.bias / 100 for r, _at in located}
    ranked = []
    for index, (region, at) in enumerate(located):
        km = distance_km(location, at)
        ranked.append((km * weights[region.name], index, Ranked(region.name, km, 0.0)))
    ranked.sort()
    ranking = tuple(Ranked(r.region, r.distance_km, eff) for eff, _i, r in ranked)
    best = ranking[0]
    if mapped is not None and mapped != best.region and mapped in weights and accuracy_radius:
        theirs = next(r for r in ranking if r.region == mapped)
        slack = accuracy_radius * (weights[mapped] + weights[best.region])
        if theirs.effective_km - best.effective_km <= slack:
            return Nearest(location, accuracy_radius, ranking, mapped, False)
    return Nearest(location, accuracy_radius, ranking, best.region, True)
