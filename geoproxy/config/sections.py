"""The readers of the config file's sections: one function per section or value kind,
each reading a ``Node`` and recording every problem with its path. ``loader.py`` calls
them in order and cross-checks what they return.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from yarl import URL

from geoproxy.config.access import ALLOW, DENY, AccessRule, prefix_problem
from geoproxy.config.countries import CONTINENTS, COUNTRY_CONTINENT
from geoproxy.config.schema import (
    Node,
    Problems,
    parse_duration,
    parse_http_url,
    parse_size,
    parse_statuses,
    read_yaml_bytes,
)
from geoproxy.config.values import (
    BALANCES,
    REJECT,
    SOURCES,
    TRY_ALL,
    WEIGHTED,
    Fence,
    Forwarding,
    Geode,
    GeodeTLS,
    HealthCheck,
    IPAddress,
    IPNetwork,
    Listener,
    Region,
)
from geoproxy.errors import ConfigError

_REGION_ID_MAX = 63  # a DNS label, so a region id fits in a host name
_REGION_ID = re.compile(r"^[a-z0-9][a-z0-9-]*$")
_GEODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def listener(node: Node, default: Listener, extra: tuple[str, ...] = ()) -> Listener:
    """Host and port; ``extra``: the other keys this listener takes (read elsewhere)."""
    if node.missing:
        return default
    node.expect_mapping(("host", "port", *extra), allow_missing=True)
    host = node.get("host").string(optional=True) or default.host
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            node.get("host").problem(f"not an IP address: {host!r} (e.g. 127.0.0.1, ::)")
    port = node.get("port").integer(0, 65535, optional=True)
    return Listener(host, default.port if port is None else port)


def addresses(host: str) -> set[IPAddress]:
    if host == "localhost":  # what getaddrinfo gives for it
        return {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")}
    try:
        return {ipaddress.ip_address(host)}
    except ValueError:
        return set()  # already reported


def shared_address(a: Listener, b: Listener) -> str | None:
    """What two listeners would both bind, or ``None``. 0.0.0.0 covers every IPv4 address
    and :: every IPv6 one (IPv6 sockets are IPv6-only, as asyncio makes them); port 0
    picks a free port each."""
    if a.port != b.port or a.port == 0:
        return None
    for x in addresses(a.host):
        for y in addresses(b.host):
            if x.version != y.version:
                continue
            if x == y:
                return f"both bind port {a.port} on {x}"
            if x.is_unspecified or y.is_unspecified:
                wild = x if x.is_unspecified else y
                every = "IPv4" if wild.version == 4 else "IPv6"
                return f"{wild} binds port {a.port} on every {every} address"
    return None


def cidrs(node: Node) -> list[IPNetwork]:
    out: list[IPNetwork] = []
    for item in node.items(optional=True):
        text = item.string()
        if text is None:
            continue
        try:
            out.append(ipaddress.ip_network(text.strip(), strict=True))
        except ValueError as exc:
            item.problem(f"invalid CIDR {text!r}: {exc}")
    return out


def sources(node: Node, have_geoip: bool) -> tuple[str, ...]:
    if node.missing:
        return SOURCES if have_geoip else SOURCES[:2]
    out: list[str] = []
    for item in node.items():
        name = item.choice(SOURCES)
        if name is None:
            continue
        if name in out:
            item.problem(f"{name!r} is listed twice")
        elif name == "geoip" and not have_geoip:
            item.problem("'geoip' is listed but geoip.database is not set")
        else:
            out.append(name)
    return tuple(out)


_Known = tuple[set[str], set[str]]  # valid region ids; declared but invalid ones


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
    known: _Known,
    problems: Problems,
    read: list[bytes],
    given: Mapping[str, bytes],
) -> tuple[dict[str, str], dict[str, str]]:
    """The region map: ``region_map`` (a file) first, then inline entries override it."""
    countries: dict[str, str] = {}
    continents: dict[str, str] = {}
    layers: list[Node] = []
    # The map file's own lines (``FILE: PATH: MESSAGE``) go under the config's ``region_map``.
    sub = Problems("")
    file = root.get("region_map").string(optional=True)
    if file:
        map_path = base / file
        try:
            data, raw = read_yaml_bytes(map_path, given.get(str(map_path)))
            read.append(raw)
        except ConfigError as exc:
            sub.lines.extend(exc.problems)
        else:
            sub = Problems(str(map_path))
            node = Node(data, "", sub)
            if node.expect_mapping(("countries", "continents"), allow_missing=True):
                layers.append(node)
    layers.append(root)
    for layer in layers:
        for key, value in layer.get("countries").pairs():
            code = key.upper().strip()
            if code not in COUNTRY_CONTINENT:
                layer.get("countries").get(key).problem(
                    f"unknown country code {key!r} (ISO 3166-1 alpha-2, e.g. FR)"
                )
            elif (region := value.region(*known)) is not None:
                countries[code] = region
        for key, value in layer.get("continents").pairs():
            code = key.upper().strip()
            if code not in CONTINENTS:
                layer.get("continents").get(key).problem(
                    f"unknown continent code {key!r} (known: {', '.join(sorted(CONTINENTS))})"
                )
            elif (region := value.region(*known)) is not None:
                continents[code] = region
    for line in sub.lines:  # only now: the loop above records the map's entry problems
        problems.add("region_map", line)
    return countries, continents


def fences(node: Node, known: _Known) -> tuple[Fence, ...]:
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
        for kind, word, table in (
            ("countries", "country", COUNTRY_CONTINENT),
            ("continents", "continent", CONTINENTS),
        ):
            for item in entry.get(kind).items(optional=True):
                text = item.string()
                code = text.strip().upper() if text else None
                if code is None:
                    continue
                if code not in table:
                    example = (
                        "ISO 3166-1 alpha-2, e.g. FR"
                        if kind == "countries"
                        else ("known: " + ", ".join(sorted(CONTINENTS)))
                    )
                    item.problem(f"unknown {word} code {text!r} ({example})")
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


_HEALTH_KEYS = (
    "path",
    "interval",
    "timeout",
    "jitter",
    "healthy_threshold",
    "unhealthy_threshold",
    "expected_statuses",
)


def health_check(node: Node, base: HealthCheck) -> HealthCheck:
    if node.missing or not node.expect_mapping(_HEALTH_KEYS):
        return base
    path = node.get("path").string(optional=True) or base.path
    if not path.startswith("/"):
        node.get("path").problem(f"must start with '/': {path!r}")
    interval = duration(node.get("interval"), base.interval)
    timeout = duration(node.get("timeout"), base.timeout)
    jitter = duration(node.get("jitter"), base.jitter, allow_zero=True)
    if interval is not None and timeout is not None and timeout >= interval:
        node.get("timeout").problem(
            f"timeout ({timeout:g}s) must be shorter than interval ({interval:g}s)"
        )
    rise = node.get("healthy_threshold").integer(1, 100, optional=True)
    fall = node.get("unhealthy_threshold").integer(1, 100, optional=True)
    statuses = base.expected_statuses
    st = node.get("expected_statuses")
    if not st.missing:
        statuses = parse_statuses(st) or statuses
    return HealthCheck(
        path=path,
        interval=interval or base.interval,
        timeout=timeout or base.timeout,
        jitter=base.jitter if jitter is None else jitter,
        healthy_threshold=rise or base.healthy_threshold,
        unhealthy_threshold=fall or base.unhealthy_threshold,
        expected_statuses=statuses,
    )


def duration(node: Node, default: float, allow_zero: bool = False) -> float | None:
    if node.missing:
        return default
    return parse_duration(node, allow_zero=allow_zero)


def geodes(
    node: Node, known: _Known, health: HealthCheck, tls: Callable[[Node], GeodeTLS]
) -> tuple[Geode, ...]:
    """The geodes; ``tls`` reads a geode's ``tls`` block (over ``forwarding.tls``)."""
    geodes: list[Geode] = []
    seen: dict[str, str] = {}
    for item in node.items():
        # name, region and url are required: their readers below say so (once).
        keys = ("name", "region", "url", "weight", "health", "max_inflight", "tls")
        if not item.expect_mapping(keys):
            continue
        name = item.get("name").string()
        if name is not None and not _GEODE_NAME.match(name):
            item.get("name").problem(
                f"invalid geode name {name!r} (letters, digits, '.', '_', '-'; up to 63)"
            )
        elif name is not None and name in seen:
            item.get("name").problem(f"duplicate geode name {name!r} (first at {seen[name]})")
        elif name is not None:
            seen[name] = item.path
        region = item.get("region").region(*known)
        url = geode_url(item.get("url"))
        weight = item.get("weight").integer(1, 1000, optional=True) or 1
        own = health_check(item.get("health"), health)
        max_inflight = item.get("max_inflight").integer(1, 1_000_000, optional=True)
        tls_node = item.get("tls")
        if url is not None and url.scheme != "https" and not tls_node.missing:
            tls_node.problem(f"only for https:// geodes; this one is {url.scheme}://")
        own_tls = tls(tls_node)
        if name and region and url:
            geodes.append(Geode(name, region, url, weight, own, max_inflight, own_tls))
    return tuple(geodes)


def geode_url(node: Node) -> URL | None:
    url = parse_http_url(node)
    return None if url is None else url.with_path(url.path.rstrip("/"))


def forwarding(node: Node, tls: GeodeTLS) -> Forwarding:
    """The ``forwarding`` section; its ``tls`` block (``tls``) is read before it, with
    the geodes' files."""
    out = section(
        node,
        Forwarding(),
        {
            "connect_timeout": DURATION,
            "response_timeout": DURATION,
            "failover_timeout": DURATION,
            "max_attempts": int_in(1, 20),
            "when_none_healthy": lambda n: n.choice(("reject", "try_all")),
            "preserve_host": lambda n: n.boolean(),
            "keepalive_timeout": DURATION,
            "fast_lane": lambda n: n.boolean(),
            "forward_trace": lambda n: n.boolean(),
            "tls": lambda n: None,  # read before (config/tls.py)
        },
    )
    return dataclasses.replace(out, tls=tls)


def access_rules(node: Node) -> tuple[AccessRule, ...]:
    rules: list[AccessRule] = []
    seen: dict[str, str] = {}
    for index, item in enumerate(node.items(optional=True)):
        if not item.expect_mapping(("name", "path_prefix", "action", "status")):
            continue
        name = item.get("name").string(optional=True)
        if name is not None and not _GEODE_NAME.match(name):
            item.get("name").problem(
                f"invalid rule name {name!r} (letters, digits and '._-', at most 63)"
            )
            name = None
        elif name is not None and name in seen:
            item.get("name").problem(f"duplicate rule name {name!r} (first at {seen[name]})")
        name = name or f"access[{index}]"
        seen.setdefault(name, item.path)
        prefix = item.get("path_prefix").string()
        if prefix is not None and (problem := prefix_problem(prefix)) is not None:
            item.get("path_prefix").problem(problem)
            prefix = None
        action = item.get("action").choice((DENY, ALLOW))
        status = 404
        status_node = item.get("status")
        if not status_node.missing:
            if action == ALLOW:
                status_node.problem("only a deny rule has a status")
            elif status_node.value not in (403, 404) or isinstance(status_node.value, bool):
                status_node.problem(f"must be 403 or 404, got {status_node.value!r}")
            else:
                status = status_node.value
        if prefix is not None and action is not None:
            rules.append(AccessRule(name, prefix, action, status))
    return tuple(rules)


Reader = Callable[[Node], Any]
DURATION: Reader = parse_duration
DURATION_OR_ZERO: Reader = partial(parse_duration, allow_zero=True)
SIZE: Reader = parse_size


def int_in(low: int, high: int) -> Reader:
    return lambda node: node.integer(low, high)


_T = TypeVar("_T")


def section(
    node: Node, base: _T, readers: Mapping[str, Reader], rename: Mapping[str, str] | None = None
) -> _T:
    """A mapping of optional fields over the frozen dataclass ``base``: each key read by
    its reader; missing or invalid keys keep the base value (the problem is recorded)."""
    if node.missing or not node.expect_mapping(readers):
        return base
    values = {}
    for key, read in readers.items():
        sub = node.get(key)
        if not sub.missing and (value := read(sub)) is not None:
            values[(rename or {}).get(key, key)] = value
    return dataclasses.replace(base, **values)  # type: ignore[type-var]
