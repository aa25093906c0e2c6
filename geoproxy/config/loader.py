"""YAML -> validated, frozen configuration. The only module that reads YAML.

Every problem is collected (not just the first) into one ``ConfigError`` whose lines read
``config/geoproxy.yaml: geodes[2].region: unknown region 'eu-wst' (known: eu-west, us-east)``.
Cross-references (a geode's region, fallbacks, the default region, the region map) are
checked here, over the section readers of ``sections.py``; the values are in ``values.py``,
the derived topology in ``model.py``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import MappingProxyType

from geoproxy.config import affinity, geography, sections, tls
from geoproxy.config.countries import COUNTRY_CONTINENT
from geoproxy.config.pem import certificates, expiry_warning, info
from geoproxy.config.schema import (
    Node,
    Problems,
    read_yaml_bytes,
)
from geoproxy.config.values import (
    Config,
    Fence,
    Geode,
    GeodeTLS,
    HealthCheck,
    Lifecycle,
    Limits,
    Listener,
    OutlierDetection,
    Proximity,
    Region,
)
from geoproxy.errors import ConfigError


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
    "fences",
    "proximity",
    "home_affinity",
)


def _build(
    root: Node, path: Path, problems: Problems, read: list[bytes], given: Mapping[str, bytes]
) -> Config | None:
    # regions, geodes and default_region are required: their readers say so (once).
    if not root.expect_mapping(_TOP_KEYS):
        return None
    base = path.parent
    listen = root.get("listen")
    listen.expect_mapping(("proxy", "admin", "redirect"), allow_missing=True)
    proxy_node = listen.get("proxy")
    proxy = sections.listener(proxy_node, Listener("0.0.0.0", 8080), extra=("tls", "hsts"))
    admin = sections.listener(listen.get("admin"), Listener("127.0.0.1", 9901))
    _check_apart(listen, "admin", admin, [("the proxy listener", proxy)])

    trusted = tuple(sections.cidrs(root.get("trusted_proxies")))
    geoip = root.get("geoip")
    geoip.expect_mapping(("database",), allow_missing=True)
    database = geoip.get("database").string(optional=True)
    geoip_database = (base / database) if database else None
    sources = sections.sources(root.get("region_sources"), geoip_database is not None)

    regions = geography.regions(root.get("regions"))
    known = {r.name for r in regions if geography.region_id_problem(r.name) is None}
    quiet = {r.name for r in regions} - known  # invalid ids: reported once, where declared
    default_region = root.get("default_region").region(known, quiet)
    countries, continents = geography.region_map(root, base, (known, quiet), problems, read, given)
    region_map = root.get("region_map").string(optional=True)
    # After the region map: the files are fingerprinted in the order they were read.
    reads = tls.Reads(given)
    https = tls.listener_tls(proxy_node.get("tls"), base, reads)
    hsts = tls.hsts(proxy_node.get("hsts"))
    if hsts is not None and https is None and proxy_node.get("tls").missing:
        proxy_node.get("hsts").problem("HSTS is sent over HTTPS only: set listen.proxy.tls")
    proxy = dataclasses.replace(proxy, tls=https, hsts=hsts)
    redirect = tls.redirect(listen.get("redirect"), https, proxy_node.get("tls"))
    if redirect is not None:
        plain = Listener(redirect.host, redirect.port)
        _check_apart(listen, "redirect", plain, [("the proxy listener", proxy), ("admin", admin)])
    home_read: list[bytes] = []  # fingerprinted after the TLS files, as ``files`` lists them
    homes, home_files = affinity.home_affinity(
        root, base, (known, quiet), problems, home_read, given
    )

    proximity = sections.section(
        root.get("proximity"),
        Proximity(),
        {"prefer_over_continent": lambda n: n.boolean()},
    )
    if proximity.prefer_over_continent and not any(r.location for r in regions):
        root.get("proximity").get("prefer_over_continent").problem(
            "is true, but no region has a location (regions.<id>.location: {lat, lon})"
        )
    fences = geography.fences(root.get("fences"), (known, quiet))
    if fences and not problems:
        _check_fences(fences, regions, countries, continents, problems)
    health = sections.health_check(root.get("health_check"), HealthCheck())
    # The geodes need forwarding.tls (their TLS default); its problems are told where
    # the forwarding section is read, to keep the file's order.
    tls_problems = Problems(problems.file)
    tls_node = root.get("forwarding").get("tls")
    geode_default = tls.geode_tls(
        Node(tls_node.value, tls_node.path, tls_problems), base, reads, GeodeTLS()
    )
    before = len(problems.lines)
    geodes = sections.geodes(
        root.get("geodes"),
        (known, quiet),
        health,
        lambda node: tls.geode_tls(node, base, reads, geode_default),
    )
    if root.get("geodes").value == []:
        root.get("geodes").problem("at least one geode is required")
    elif geodes and len(problems.lines) == before:  # a broken entry would make this noise
        _check_servable(regions, geodes, root.get("regions"))
    forwarding = sections.forwarding(root.get("forwarding"), geode_default)
    problems.lines.extend(tls_problems.lines)
    access_log = root.get("access_log").choice(("json", "plain", "off"), optional=True)
    access = sections.access_rules(root.get("access"))
    limits = sections.section(
        root.get("limits"),
        Limits(),
        {
            "header_timeout": sections.DURATION,
            "max_header_bytes": sections.SIZE,
            "max_body_bytes": sections.SIZE,
            "keepalive_timeout": sections.DURATION,
            "body_timeout": sections.DURATION,
            "body_min_rate": sections.SIZE,
        },
    )
    outliers = sections.section(
        root.get("outlier_detection"),
        OutlierDetection(),
        {
            "consecutive_failures": sections.int_in(0, 1000),
            "base_ejection_time": sections.DURATION,
            "max_ejection_time": sections.DURATION,
        },
    )
    reload = sections.section(
        root.get("reload"),
        Lifecycle(),
        {"poll_interval": sections.DURATION_OR_ZERO},
        rename={"poll_interval": "reload_poll_interval"},
    )
    lifecycle = sections.section(root.get("shutdown"), reload, {"drain_timeout": sections.DURATION})
    if problems:
        return None
    assert default_region is not None  # guarded by `problems` (internal invariant only)
    read.extend(reads.contents)  # the TLS files, in the order they were read
    read.extend(home_read)  # then home_affinity's keys file and tenant map
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
        redirect=redirect,
        files=(path,)
        + ((base / region_map,) if region_map else ())
        + tuple(reads.files)
        + tuple(home_files),
        fences=fences,
        proximity=proximity,
        home_affinity=homes,
    )


def _warnings(config: Config) -> Iterable[str]:
    """What is valid but probably not meant. Paths index the YAML lists: a config with
    no problems kept every entry."""
    where = Problems(str(config.path))
    for i, geode in enumerate(config.geodes):
        if geode.url.scheme == "https" and not geode.tls.verify:
            where.add(
                f"geodes[{i}].tls.verify",
                f"false: the certificate of geode {geode.name} is not verified; anyone "
                "on the path to it can read and change its traffic",
            )
    for i, network in enumerate(config.trusted_proxies):
        if network.prefixlen == 0:
            where.add(
                f"trusted_proxies[{i}]",
                f"{network} trusts every IPv{network.version} "
                "client: any client can pick its region (X-Client-Region, CF-IPCountry) "
                "and its address (X-Forwarded-For)",
            )
    for certificate in config.proxy.tls.certificates if config.proxy.tls else ():
        if (soon := expiry_warning(certificate.info, time.time())) is not None:
            where.add(f"{certificate.where}.cert", f"{certificate.cert}: {soon}")
    # Client certificates for geodes: each told once, where it was given.
    blocks = [("forwarding.tls", config.forwarding.tls)]
    blocks += [(f"geodes[{i}].tls", g.tls) for i, g in enumerate(config.geodes)]
    told: set[bytes] = set()
    for path, block in blocks:
        if block.cert_pem is None or block.cert_pem in told:
            continue
        told.add(block.cert_pem)
        about = info(certificates(block.cert_pem)[0])  # checked at load: it parses
        if (soon := expiry_warning(about, time.time())) is not None:
            where.add(f"{path}.cert", f"{block.cert}: {soon}")
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


def _check_fences(
    fences: tuple[Fence, ...],
    regions: tuple[Region, ...],
    countries: Mapping[str, str],
    continents: Mapping[str, str],
    problems: Problems,
) -> None:
    """A fence's regions fall back only inside it, and the region map sends none of its
    countries outside it: what the config says and what the proxy does stay the same."""
    fallbacks = {r.name: r.fallback for r in regions}
    for fence in fences:
        inside = ", ".join(fence.regions)
        for region in fence.regions:
            for i, other in enumerate(fallbacks[region]):
                if other not in fence.members:
                    problems.add(
                        f"regions.{region}.fallback[{i}]",
                        f"{other!r} leaves fence {fence.name!r} (its regions: {inside}): "
                        "its clients are never sent there; move the region into the fence "
                        "or out of this list",
                    )
        outside: dict[str, list[str]] = {}
        for code, continent in COUNTRY_CONTINENT.items():
            if code in fence.countries or (
                continent in fence.continents and not any(code in f.countries for f in fences)
            ):
                mapped = countries.get(code) or continents.get(continent)
                if mapped is not None and mapped not in fence.members:
                    outside.setdefault(mapped, []).append(code)
        for mapped, codes in sorted(outside.items()):
            problems.add(
                f"fences.{fence.name}",
                f"the region map sends its countries {' '.join(sorted(codes))} to {mapped!r}, "
                f"outside the fence (its regions: {inside}); map them to a region inside it",
            )


def _check_apart(
    listen: Node, key: str, listener: Listener, others: list[tuple[str, Listener]]
) -> None:
    """``listen.KEY`` must bind nothing that one of ``others`` binds."""
    for what, other in others:
        if (shared := sections.shared_address(other, listener)) is not None:
            listen.get(key).problem(
                f"{listener.host}:{listener.port} collides with {what} "
                f"{other.host}:{other.port} ({shared}); give them different ports"
            )


def _check_servable(regions: tuple[Region, ...], geodes: tuple[Geode, ...], node: Node) -> None:
    """Every region must reach at least one geode through itself or its fallbacks."""
    served = {g.region for g in geodes}
    for region in regions:
        if not served.intersection((region.name, *region.fallback)):
            node.get(region.name).problem(
                f"no geode can serve region {region.name!r}: it has no geode and none of its "
                f"fallback regions ({', '.join(region.fallback) or 'none'}) has one"
            )
