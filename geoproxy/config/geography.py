"""The readers of where things are: the regions (ids, locations, bias), the region map
(countries and continents, inline or from their own file) and the residency fences. Each
records its problems with their paths; ``loader.py`` calls them in order.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from geoproxy.config.countries import CONTINENTS, COUNTRY_CONTINENT
from geoproxy.config.schema import (
    Node,
    Problems,
    read_side_file,
)
from geoproxy.config.values import (
    BALANCES,
    REJECT,
    TRY_ALL,
    WEIGHTED,
    Fence,
    Region,
)

_REGION_ID_MAX = 63  # a DNS label, so a region id fits in a host name
_REGION_ID = re.compile(r"^[a-z0-9][a-z0-9-]*$")


Known = tuple[set[str], set[str]]  # valid region ids; declared but invalid ones

#: The codes a region map or a fence lists clients by: (section, word, known codes, what
#: a valid one looks like).
_PLACES = (
    ("countries", "country", COUNTRY_CONTINENT.keys(), "ISO 3166-1 alpha-2, e.g. FR"),
    ("continents", "continent", CONTINENTS, "known: " + ", ".join(sorted(CONTINENTS))),
)


def region_id_problem(key: str) -> str | None:
    if len(key) > _REGION_ID_MAX:
        return f"{len(key)} characters, at most {_REGION_ID_MAX}"
    if not key.isascii():
        return "not ASCII: lowercase ASCII letters, digits and '-', e.g. eu-west"
    if not _REGION_ID.match(key):
        return "lowercase letters, digits and '-', e.g. eu-west"
    return None


def regions(node: Node) -> tuple[Region, ...]:
    if not node.expect_mapping(None):
        return ()
    names = node.keys()
    for key in names:
        if (why := region_id_problem(key)) is not None:
            node.get(key).problem(f"invalid region id {key!r} ({why})")
    valid = {key for key in names if region_id_problem(key) is None}
    regions = []
    for name in names:
        entry = node.get(name)
        if entry.value is None:
            regions.append(Region(name, ()))
            continue
        entry.expect_mapping(("fallback", "location", "bias", "balance"), allow_missing=True)
        fallback: list[str] = []
        for item in entry.get("fallback").items(optional=True):
            other = item.region(valid, set(names) - valid)
            if other == name:
                item.problem(f"region {name!r} cannot fall back to itself")
            elif other in fallback:
                item.problem(f"{other!r} is listed twice")
            elif other is not None:
                fallback.append(other)
        at = location(entry.get("location"))
        bias = entry.get("bias").integer(-99, 99, optional=True) or 0
        balance = entry.get("balance").choice(BALANCES, optional=True) or WEIGHTED
        regions.append(Region(name, tuple(fallback), at, bias, balance))
    return tuple(regions)


def location(node: Node) -> tuple[float, float] | None:
    """``{lat: 50.11, lon: 8.68}``: degrees north and east."""
    if node.missing or not node.expect_mapping(("lat", "lon"), ("lat", "lon")):
        return None
    lat = degrees(node.get("lat"), 90.0)
    lon = degrees(node.get("lon"), 180.0)
    return None if lat is None or lon is None else (lat, lon)


def degrees(node: Node, limit: float) -> float | None:
    value = node.value
    if node.missing:
        return None  # reported as required
    if isinstance(value, bool) or not isinstance(value, int | float):
        node.problem(f"must be a number of degrees from {-limit:g} to {limit:g}, got {value!r}")
        return None
    if not -limit <= value <= limit:
        node.problem(f"must be from {-limit:g} to {limit:g}, got {value}")
        return None
    return float(value)


def region_map(
    root: Node,
    base: Path,
    known: Known,
    problems: Problems,
    read: list[bytes],
    given: Mapping[str, bytes],
) -> tuple[dict[str, str], dict[str, str]]:
    """The region map: ``region_map`` (a file) first, then inline entries override it."""
    maps: dict[str, dict[str, str]] = {"countries": {}, "continents": {}}
    layers: list[Node] = []
    # The map file's own lines (``FILE: PATH: MESSAGE``) go under the config's ``region_map``.
    sub = Problems("")
    file = root.get("region_map").string(optional=True)
    if file:
        top, sub = read_side_file(base / file, given, read, ("countries", "continents"), True)
        if top is not None:
            layers.append(top)
    layers.append(root)
    for layer in layers:
        for kind, word, table, looks in _PLACES:
            section = layer.get(kind)
            for key, value in section.pairs():
                code = key.upper().strip()
                if code not in table:
                    section.get(key).problem(f"unknown {word} code {key!r} ({looks})")
                elif (region := value.region(*known)) is not None:
                    maps[kind][code] = region
    for line in sub.lines:  # only now: the loop above records the map's entry problems
        problems.add("region_map", line)
    return maps["countries"], maps["continents"]


def fences(node: Node, known: Known) -> tuple[Fence, ...]:
    """``fences``: name -> {regions, countries and/or continents, on_exhausted, status}.
    A country (or continent) belongs to one fence at most."""
    if node.missing or node.value is None or not node.expect_mapping(None):
        return ()
    out: list[Fence] = []
    owner: dict[tuple[str, str], str] = {}  # (kind, code) -> the fence that lists it
    names = node.keys()
    for name in names:
        entry = node.get(name)
        if (why := region_id_problem(name)) is not None:
            entry.problem(f"invalid fence name {name!r} ({why})")
            continue
        if not entry.expect_mapping(
            ("regions", "countries", "continents", "on_exhausted", "status"), ("regions",)
        ):
            continue
        regions: list[str] = []
        for item in entry.get("regions").items():
            region = item.region(*known)
            if region in regions:
                item.problem(f"{region!r} is listed twice")
            elif region is not None:
                regions.append(region)
        if entry.get("regions").value == []:
            entry.get("regions").problem("a fence needs at least one region")
        codes: dict[str, set[str]] = {"countries": set(), "continents": set()}
        for kind, word, table, looks in _PLACES:
            for item in entry.get(kind).items(optional=True):
                text = item.string()
                code = text.strip().upper() if text else None
                if code is None:
                    continue
                if code not in table:
                    item.problem(f"unknown {word} code {text!r} ({looks})")
                elif (other := owner.get((kind, code))) is not None:
                    item.problem(f"{code} is already in fence {other!r}: a client has one fence")
                else:
                    owner[(kind, code)] = name
                    codes[kind].add(code)
        if entry.get("countries").missing and entry.get("continents").missing:
            entry.problem("a fence needs countries or continents (whose clients it holds)")
        on_exhausted = entry.get("on_exhausted").choice((REJECT, TRY_ALL), optional=True)
        status = entry.get("status").integer(400, 599, optional=True)
        if regions:
            out.append(
                Fence(
                    name,
                    tuple(regions),
                    frozenset(codes["countries"]),
                    frozenset(codes["continents"]),
                    on_exhausted or REJECT,
                    503 if status is None else status,
                )
            )
    return tuple(out)
