"""YAML -> validated, frozen configuration. The only module that reads YAML.

Every problem is collected (not just the first) into one ``ConfigError`` whose lines read
``config/geoproxy.yaml: geodes[2].region: unknown region 'eu-wst' (known: eu-west, us-east)``.
Cross-references (a geode's region, fallbacks, the default region, the region map) are
checked here; the derived topology lives in ``model.py``, the values in ``values.py``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from pathlib import Path
from types import MappingProxyType
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
    SOURCES,
    Config,
    Forwarding,
    Geode,
    HealthCheck,
    IPAddress,
    IPNetwork,
    Lifecycle,
    Limits,
    Listener,
    OutlierDetection,
    Region,
)
from geoproxy.errors import ConfigError

_REGION_ID_MAX = 63  # a DNS label, so a region id fits in a host name
_REGION_ID = re.compile(r"^[a-z0-9][a-z0-9-]*$")
_GEODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def fingerprint(contents: Iterable[bytes]) -> bytes:
    digest = hashlib.sha256()
    for content in contents:
        digest.update(hashlib.sha256(content).digest())
    return digest.digest()


def files_fingerprint(files: Iterable[Path]) -> bytes:
    """The fingerprint of the files as they are now (an unreadable one counts as such)."""
    contents = []
    for path in files:
        try:
            contents.append(path.read_bytes())
        except OSError as exc:  # mid-swap or deleted: compare as such, report at load
            contents.append(f"unreadable: {exc.errno}".encode())
    return fingerprint(contents)


def load(path: str | Path, given: Mapping[str, bytes] | None = None) -> Config:
    """Read and validate a config file; raise ``ConfigError`` listing every problem.
    ``given``: file contents to use instead of reading those files (``Config.sources``)."""
    path = Path(path)
    given = given or {}
    data, raw = read_yaml_bytes(path, given.get(str(path)))
    problems = Problems(str(path))
    read: list[bytes] = [raw]
    config = _build(Node(data, "", problems), path, problems, read, given)
    if problems or config is None:
        raise ConfigError(problems.lines)
    return dataclasses.replace(
        config,
        fingerprint=fingerprint(read),
        contents=tuple(read),
        warnings=tuple(_warnings(config)),
    )


_TOP_KEYS = (
    "listen",
    "trusted_proxies",
    "region_sources",
    "geoip",
    "default_region",
    "regions",
    "region_map",
    "countries",
    "continents",
    "geodes",
    "health_check",
    "forwarding",
    "access_log",
    "limits",
    "outlier_detection",
    "reload",
    "shutdown",
    "access",
)


def _build(
    root: Node, path: Path, problems: Problems, read: list[bytes], given: Mapping[str, bytes]
) -> Config | None:
    # regions, geodes and default_region are required: their readers say so (once).
    if not root.expect_mapping(_TOP_KEYS):
        return None
    base = path.parent
    listen = root.get("listen")
    listen.expect_mapping(("proxy", "admin"), allow_missing=True)
    proxy = _listener(listen.get("proxy"), Listener("0.0.0.0", 8080))
    admin = _listener(listen.get("admin"), Listener("127.0.0.1", 9901))
    if (shared := _shared_address(proxy, admin)) is not None:
        listen.get("admin").problem(
            f"{admin.host}:{admin.port} collides with the proxy listener "
            f"{proxy.host}:{proxy.port} ({shared}); give them different ports"
        )

    trusted = tuple(_cidrs(root.get("trusted_proxies")))
    geoip = root.get("geoip")
    geoip.expect_mapping(("database",), allow_missing=True)
    database = geoip.get("database").string(optional=True)
    geoip_database = (base / database) if database else None
    sources = _sources(root.get("region_sources"), geoip_database is not None)

    regions = _regions(root.get("regions"))
    known = {r.name for r in regions if _region_id_problem(r.name) is None}
    quiet = {r.name for r in regions} - known  # invalid ids: reported once, where declared
    default_region = root.get("default_region").region(known, quiet)
    countries, continents = _region_map(root, base, (known, quiet), problems, read, given)
    region_map = root.get("region_map").string(optional=True)

    health = _health(root.get("health_check"), HealthCheck())
    before = len(problems.lines)
    geodes = _geodes(root.get("geodes"), (known, quiet), health)
    if root.get("geodes").value == []:
        root.get("geodes").problem("at least one geode is required")
    elif geodes and len(problems.lines) == before:  # a broken entry would make this noise
        _check_servable(regions, geodes, root.get("regions"))
    forwarding = _forwarding(root.get("forwarding"))
    access_log = root.get("access_log").choice(("json", "plain", "off"), optional=True)
    access = _access(root.get("access"))
    limits = _section(
        root.get("limits"),
        Limits(),
        {
            "header_timeout": _DURATION,
            "max_header_bytes": _SIZE,
            "max_body_bytes": _SIZE,
            "keepalive_timeout": _DURATION,
            "body_timeout": _DURATION,
            "body_min_rate": _SIZE,
        },
    )
    outliers = _section(
        root.get("outlier_detection"),
        OutlierDetection(),
        {
            "consecutive_failures": _int(0, 1000),
            "base_ejection_time": _DURATION,
            "max_ejection_time": _DURATION,
        },
    )
    reload = _section(
        root.get("reload"),
        Lifecycle(),
        {"poll_interval": _DURATION_OR_ZERO},
        rename={"poll_interval": "reload_poll_interval"},
    )
    lifecycle = _section(root.get("shutdown"), reload, {"drain_timeout": _DURATION})
    if problems:
        return None
    assert default_region is not None  # guarded by `problems` (internal invariant only)
    return Config(
        path=path,
        proxy=proxy,
        admin=admin,
        trusted_proxies=trusted,
        region_sources=sources,
        geoip_database=geoip_database,
        default_region=default_region,
        regions=regions,
        countries=MappingProxyType(countries),
        continents=MappingProxyType(continents),
        geodes=geodes,
        health_check=health,
        forwarding=forwarding,
        access_log=access_log or "json",
        access=access,
        limits=limits,
        outlier_detection=outliers,
        lifecycle=lifecycle,
        files=(path,) + ((base / region_map,) if region_map else ()),
    )


def _listener(node: Node, default: Listener) -> Listener:
    if node.missing:
        return default
    node.expect_mapping(("host", "port"), allow_missing=True)
    host = node.get("host").string(optional=True) or default.host
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            node.get("host").problem(f"not an IP address: {host!r} (e.g. 127.0.0.1, ::)")
    port = node.get("port").integer(0, 65535, optional=True)
    return Listener(host, default.port if port is None else port)


def _addresses(host: str) -> set[IPAddress]:
    if host == "localhost":  # what getaddrinfo gives for it
        return {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")}
    try:
        return {ipaddress.ip_address(host)}
    except ValueError:
        return set()  # already reported


def _shared_address(a: Listener, b: Listener) -> str | None:
    """What two listeners would both bind, or ``None``. 0.0.0.0 covers every IPv4 address
    and :: every IPv6 one (IPv6 sockets are IPv6-only, as asyncio makes them); port 0
    picks a free port each."""
    if a.port != b.port or a.port == 0:
        return None
    for x in _addresses(a.host):
        for y in _addresses(b.host):
            if x.version != y.version:
                continue
            if x == y:
                return f"both bind port {a.port} on {x}"
            if x.is_unspecified or y.is_unspecified:
                wild = x if x.is_unspecified else y
                every = "IPv4" if wild.version == 4 else "IPv6"
                return f"{wild} binds port {a.port} on every {every} address"
    return None


def _cidrs(node: Node) -> list[IPNetwork]:
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


def _sources(node: Node, have_geoip: bool) -> tuple[str, ...]:
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


def _region_id_problem(key: str) -> str | None:
    if len(key) > _REGION_ID_MAX:
        return f"{len(key)} characters, at most {_REGION_ID_MAX}"
    if not key.isascii():
        return "not ASCII: lowercase ASCII letters, digits and '-', e.g. eu-west"
    if not _REGION_ID.match(key):
        return "lowercase letters, digits and '-', e.g. eu-west"
    return None


def _regions(node: Node) -> tuple[Region, ...]:
    if not node.expect_mapping(None):
        return ()
    names = node.keys()
    for key in names:
        if (why := _region_id_problem(key)) is not None:
            node.get(key).problem(f"invalid region id {key!r} ({why})")
    valid = {key for key in names if _region_id_problem(key) is None}
    regions = []
    for name in names:
        entry = node.get(name)
        if entry.value is None:
            regions.append(Region(name, ()))
            continue
        entry.expect_mapping(("fallback",), allow_missing=True)
        fallback: list[str] = []
        for item in entry.get("fallback").items(optional=True):
            other = item.region(valid, set(names) - valid)
            if other == name:
                item.problem(f"region {name!r} cannot fall back to itself")
            elif other in fallback:
                item.problem(f"{other!r} is listed twice")
            elif other is not None:
                fallback.append(other)
        regions.append(Region(name, tuple(fallback)))
    return tuple(regions)


def _region_map(
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


_HEALTH_KEYS = (
    "path",
    "interval",
    "timeout",
    "jitter",
    "healthy_threshold",
    "unhealthy_threshold",
    "expected_statuses",
)


def _health(node: Node, base: HealthCheck) -> HealthCheck:
    if node.missing or not node.expect_mapping(_HEALTH_KEYS):
        return base
    path = node.get("path").string(optional=True) or base.path
    if not path.startswith("/"):
        node.get("path").problem(f"must start with '/': {path!r}")
    interval = _duration(node.get("interval"), base.interval)
    timeout = _duration(node.get("timeout"), base.timeout)
    jitter = _duration(node.get("jitter"), base.jitter, allow_zero=True)
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


def _duration(node: Node, default: float, allow_zero: bool = False) -> float | None:
    if node.missing:
        return default
    return parse_duration(node, allow_zero=allow_zero)


def _geodes(node: Node, known: _Known, health: HealthCheck) -> tuple[Geode, ...]:
    geodes: list[Geode] = []
    seen: dict[str, str] = {}
    for item in node.items():
        # name, region and url are required: their readers below say so (once).
        if not item.expect_mapping(("name", "region", "url", "weight", "health")):
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
        url = _geode_url(item.get("url"))
        weight = item.get("weight").integer(1, 1000, optional=True) or 1
        own = _health(item.get("health"), health)
        if name and region and url:
            geodes.append(Geode(name, region, url, weight, own))
    return tuple(geodes)


def _geode_url(node: Node) -> URL | None:
    url = parse_http_url(node)
    return None if url is None else url.with_path(url.path.rstrip("/"))


def _forwarding(node: Node) -> Forwarding:
    return _section(
        node,
        Forwarding(),
        {
            "connect_timeout": _DURATION,
            "response_timeout": _DURATION,
            "failover_timeout": _DURATION,
            "max_attempts": _int(1, 20),
            "when_none_healthy": lambda n: n.choice(("reject", "try_all")),
            "preserve_host": lambda n: n.boolean(),
            "keepalive_timeout": _DURATION,
            "fast_lane": lambda n: n.boolean(),
            "forward_trace": lambda n: n.boolean(),
        },
    )


def _access(node: Node) -> tuple[AccessRule, ...]:
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
_DURATION: Reader = parse_duration
_DURATION_OR_ZERO: Reader = partial(parse_duration, allow_zero=True)
_SIZE: Reader = parse_size


def _int(low: int, high: int) -> Reader:
    return lambda node: node.integer(low, high)


_T = TypeVar("_T")


def _section(
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


def _warnings(config: Config) -> Iterable[str]:
    """What is valid but probably not meant. Paths index the YAML lists: a config with
    no problems kept every entry."""
    where = Problems(str(config.path))
    for i, network in enumerate(config.trusted_proxies):
        if network.prefixlen == 0:
            where.add(
                f"trusted_proxies[{i}]",
                f"{network} trusts every IPv{network.version} "
                "client: any client can pick its region (X-Client-Region, CF-IPCountry) "
                "and its address (X-Forwarded-For)",
            )
    first: dict[tuple[str, str | None, int | None, str], tuple[int, Geode]] = {}
    for i, geode in enumerate(config.geodes):
        url = geode.url
        key = (url.scheme, url.host, url.port, geode.prefix)
        if key not in first:
            first[key] = (i, geode)
        elif (other := first[key][1]).region != geode.region:
            where.add(
                f"geodes[{i}].url",
                f"same URL as geodes[{first[key][0]}] "
                f"({other.name}, region {other.region}): one stamp would serve "
                f"regions {other.region} and {geode.region}",
            )
    return where.lines


def _check_servable(regions: tuple[Region, ...], geodes: tuple[Geode, ...], node: Node) -> None:
    """Every region must reach at least one geode through itself or its fallbacks."""
    served = {g.region for g in geodes}
    for region in regions:
        if not served.intersection((region.name, *region.fallback)):
            node.get(region.name).problem(
                f"no geode can serve region {region.name!r}: it has no geode and none of its "
                f"fallback regions ({', '.join(region.fallback) or 'none'}) has one"
            )
