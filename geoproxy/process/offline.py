"""The commands that read a config and answer without serving: ``geoproxy check-config``
(like ``nginx -t``: the derived topology, warnings, every error) and ``geoproxy route``
(a routing decision explained from the config alone, as ``/route`` explains it live).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from geoproxy.config import loader as config_mod
from geoproxy.config.affinity import describe_homes
from geoproxy.config.model import Topology
from geoproxy.config.tls import certificate_line
from geoproxy.config.values import WEIGHTED, Config, Geode
from geoproxy.errors import GeoproxyError
from geoproxy.health.tls import GeodeContexts
from geoproxy.proxy import https
from geoproxy.routing import affinity
from geoproxy.routing.clientip import parse_ip
from geoproxy.routing.explain import explain, explain_access
from geoproxy.routing.geoip import open_geoip
from geoproxy.routing.resolver import (
    CF_IPCOUNTRY,
    CF_UNKNOWN,
    ERROR,
    INVALID,
    UNKNOWN,
    X_CLIENT_REGION,
    Resolution,
    resolve,
)


def _fail(message: str, who: str = "geoproxy") -> int:
    print(f"{who}: {message}", file=sys.stderr)
    return 1


def check_config(path: Path) -> int:
    """Like ``nginx -t``: exit 0 and the derived topology, or 1 and every error."""
    note = ""
    try:
        cfg = config_mod.load(path)
        if cfg.proxy.tls is not None:
            https.contexts_for(cfg.proxy.tls)  # what OpenSSL says of them, as at start-up
        GeodeContexts().prepare(cfg.geodes)  # the geodes' TLS contexts, likewise
        if (lookup := open_geoip(cfg)) is not None:
            built = time.strftime("%Y-%m-%d", time.gmtime(lookup.build_epoch))
            note = f" ({lookup.database_type}, built {built})"  # as /status shows it
            lookup.close()
    except GeoproxyError as exc:
        print(f"{path}: configuration is invalid", file=sys.stderr)
        print(str(exc), file=sys.stderr)
        return 1
    print(describe(Topology.build(cfg), note))
    for line in cfg.warnings:
        print(f"warning: {line}", file=sys.stderr)
    print(f"{path}: configuration is valid")
    return 0


def route_cmd(
    path: Path,
    ip: str | None,
    country: str | None,
    region: str | None,
    as_json: bool,
    request_path: str | None = None,
    home_cookie: str | None = None,
    tenant: str | None = None,
) -> int:
    """Explain a routing decision from the config alone, every geode counted healthy."""
    try:
        cfg = config_mod.load(path)
        lookup = open_geoip(cfg)
    except GeoproxyError as exc:
        return _fail(f"{path}: configuration is invalid\n{exc}")
    client = parse_ip(ip) if ip else None
    if ip and client is None:
        return _fail(f"--ip: not an IP address: {ip!r}")
    headers = {}
    if country:
        headers[CF_IPCOUNTRY] = country
    if region:
        headers[X_CLIENT_REGION] = region
    topology = Topology.build(cfg)
    try:
        resolution = resolve(topology, headers, True, client, lookup)
    finally:
        if lookup is not None:
            lookup.close()
    every = {g.name for g in cfg.geodes}
    homes, home = cfg.home_affinity, None
    if homes is None and (home_cookie or tenant):
        print(
            "geoproxy route: the config sets no home_affinity: "
            "--home-cookie and --tenant were ignored",
            file=sys.stderr,
        )
    elif homes is not None:
        now = time.time()
        home = affinity.given(homes, tenant, home_cookie, topology.region_names, now)
        home = affinity.current(homes, home, request_path or "/", now)
    answer = explain(topology, resolution, every, None, True, home=home)
    given = {
        "x-client-region": ("--region", region),
        "cf-ipcountry": ("--country", country),
        "geoip": ("--ip", ip),
    }
    for source, (flag, value) in given.items():
        if value is not None and (why := _unused(source, value, cfg, resolution)):
            print(f"geoproxy route: {flag} {value!r} {why}", file=sys.stderr)
    if request_path is not None:
        answer["access"] = explain_access(topology, request_path)
    if as_json:
        print(json.dumps(answer, indent=2))
        return 0
    res = answer["resolution"]
    steps = ", ".join(f"{s['source']}={s['result']}" for s in res["steps"]) or "none"
    print(
        f"client region: {res['region']} (source: {res['source']}"
        + (f", country {res['country']}" if res["country"] else "")
        + ")"
    )
    print(f"sources consulted: {steps}")
    if (near := answer["proximity"]) is not None:
        ranking = ", ".join(f"{r['region']} {r['effective_km']:,.0f} km" for r in near["ranking"])
        how = "chose" if near["decided"] else "too close to call; the region map chose"
        print(f"geoproximity: {ranking} ({how} {near['region']})")
    if (fence := answer["fence"]) is not None:
        kept = f"; keeps out {', '.join(fence['kept_out'])}" if fence["kept_out"] else ""
        print(f"residency fence: {fence['name']} ({', '.join(fence['regions'])}{kept})")
    if (found := answer["home"]) is not None:
        print(f"home region: {found['region'] or 'none'} ({found['source']}: {found['result']})")
    print(f"try order: {' -> '.join(answer['try_order'])}")
    print(f"attempt order: {', '.join(answer['attempt_order']) or 'none'}")
    print(f"chosen geode: {answer['chosen']} ({answer['decision']})")
    print(f"why: {answer['reason']}")
    print("health: not known offline; every geode counted healthy")
    if request_path is not None:
        print(f"access: {request_path} -> {answer['access']['reason']}")
    return 0


def _unused(source: str, value: str, cfg: Config, res: Resolution) -> str | None:
    """Why an input of ``route`` did not decide the region, or ``None`` when it did."""
    results = dict(res.steps)
    if source == "geoip" and cfg.geoip_database is None:
        return "was ignored: the config sets no geoip.database"
    if source not in cfg.region_sources:
        return f"was ignored: {source!r} is not in region_sources"
    if source not in results:
        return f"was not consulted: {res.source} decided first"
    result = results[source]
    if result == INVALID and source == "x-client-region":
        regions = ", ".join(r.name for r in cfg.regions)
        return (
            f"is unknown: neither a region ({regions}) nor an ISO 3166-1 alpha-2 country "
            "code; ignored"
        )
    if result == INVALID:
        return "is unknown: not an ISO 3166-1 alpha-2 country code; ignored"
    if result == UNKNOWN and source == "geoip":
        client = parse_ip(value)
        if client is not None and not client.is_global:
            return "was not looked up: a private or reserved address"
        return "is not in the GeoIP database, or has no country or continent there"
    if result == UNKNOWN and value.strip().upper() in CF_UNKNOWN:
        return "means an unknown country (Cloudflare's XX or T1); ignored"
    if result == UNKNOWN:
        return "is a country the region map gives no region; ignored"
    if result == ERROR:
        return "could not be looked up: the GeoIP database is corrupt"
    return None


def _https_lines(cfg: Config) -> list[str]:
    """The proxy listener's certificates (the first is the default), HSTS, redirect."""
    lines = []
    now = time.time()
    for i, certificate in enumerate(cfg.proxy.tls.certificates if cfg.proxy.tls else ()):
        default = (
            " [default]" if i == 0 and cfg.proxy.tls and len(cfg.proxy.tls.certificates) > 1 else ""
        )
        lines.append(f"  certificate {certificate_line(certificate, now)}{default}")
    if cfg.proxy.hsts is not None:
        lines.append(f"  HSTS: {cfg.proxy.hsts.header()}")
    if cfg.redirect is not None:
        to = cfg.redirect.https_port or cfg.proxy.port
        lines.append(
            f"redirect listener: {cfg.redirect.host}:{cfg.redirect.port} (308 to HTTPS port {to})"
        )
    return lines


def _tls_note(geode: Geode) -> str:
    """How an https geode is verified: ``  tls: ca pki/ca.pem, client cert pki/edge.pem,
    server_name x``; ``verify OFF`` stands out."""
    if geode.url.scheme != "https":
        return ""
    tls = geode.tls
    parts = [f"ca {tls.ca}" if tls.ca else "system trust store"]
    if tls.cert is not None:
        parts.append(f"client cert {tls.cert}")
    if tls.server_name is not None:
        parts.append(f"server_name {tls.server_name}")
    if not tls.verify:
        parts = ["verify OFF (any certificate)"]
    return "  tls: " + ", ".join(parts)


def describe(topology: Topology, geoip_note: str = "") -> str:
    """The topology as check-config prints it; ``geoip_note``: what the GeoIP database
    is, once opened."""
    cfg = topology.config
    lines = [
        f"proxy listener: {cfg.proxy.host}:{cfg.proxy.port}"
        + (" (HTTPS)" if cfg.proxy.tls else ""),
        *_https_lines(cfg),
        f"admin listener: {cfg.admin.host}:{cfg.admin.port}",
        "trusted proxies: " + (", ".join(map(str, cfg.trusted_proxies)) or "none"),
        "region sources: " + " -> ".join((*cfg.region_sources, f"default ({cfg.default_region})")),
        f"geoip database: {cfg.geoip_database or 'none'}{geoip_note}",
        "geodes:",
    ]
    for g in cfg.geodes:
        cap = f"  max_inflight={g.max_inflight}" if g.max_inflight is not None else ""
        lines.append(
            f"  {g.name:<20} {g.region:<14} {g.url}  weight={g.weight}{cap}"
            f"  check={g.health.path} every {g.health.interval:g}s{_tls_note(g)}"
        )
    located = {
        r.name: f"   at {r.location[0]:g},{r.location[1]:g}"
        + (f" bias {r.bias:+d}" if r.bias else "")
        for r in cfg.regions
        if r.location is not None
    }
    lines.append("regions (try order; geodes per region):")
    for region, order in topology.try_orders.items():
        counts = ", ".join(f"{r}({len(topology.geodes_by_region[r])})" for r in order)
        served = sum(1 for c in topology.country_region.values() if c == region)
        balance = topology.balances[region]
        how = f"   balance: {balance}" if balance != WEIGHTED else ""  # the default: unsaid
        lines.append(f"  {region:<14} {counts}{how}   countries: {served}{located.get(region, '')}")
    lines.append(
        "access rules (first match per reading of the path; none: forwarded):"
        if cfg.access
        else "access rules: none (every path is forwarded)"
    )
    for rule in cfg.access:
        answer = f"{rule.action} {rule.status}" if rule.action == "deny" else rule.action
        lines.append(f"  {rule.name:<20} {answer:<9} {rule.path_prefix}")
    if located:
        when = (
            "used for clients of countries the map does not place, or places by continent"
            if cfg.proximity.prefer_over_continent
            else "used for clients of countries the map does not place"
        )
        if cfg.geoip_database is None:
            when = "not used: no geoip.database (a City edition gives clients coordinates)"
        lines.append(f"geoproximity: {len(located)} regions located; {when}")
    for fence in cfg.fences:
        held = " ".join(sorted(fence.continents)) + " " + " ".join(sorted(fence.countries))
        refusal = (
            f"{fence.on_exhausted} ({fence.status})"
            if fence.on_exhausted == "reject"
            else fence.on_exhausted
        )
        lines.append(
            f"residency fence {fence.name}: {held.strip()} -> only {', '.join(fence.regions)}"
            f"; none healthy: {refusal}"
        )
    trace = "forwarded" if cfg.forwarding.forward_trace else "405"
    lines.append(f"methods refused at the edge: CONNECT (405); TRACE: {trace}")
    lines += describe_homes(cfg.home_affinity)
    unmapped = topology.unmapped_countries()
    if unmapped:
        lines.append(
            f"countries with no region (go to {cfg.default_region}): " + " ".join(unmapped)
        )
    return "\n".join(lines)
