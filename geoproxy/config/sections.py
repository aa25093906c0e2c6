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
from typing import Any, TypeVar

from yarl import URL

from geoproxy.config.access import ALLOW, DENY, AccessRule, prefix_problem
from geoproxy.config.geography import Known
from geoproxy.config.schema import (
    Node,
    parse_duration,
    parse_http_url,
    parse_size,
    parse_statuses,
)
from geoproxy.config.values import (
    SOURCES,
    Forwarding,
    Geode,
    GeodeTLS,
    HealthCheck,
    IPAddress,
    IPNetwork,
    Listener,
)

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
    node: Node, known: Known, health: HealthCheck, tls: Callable[[Node], GeodeTLS]
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
