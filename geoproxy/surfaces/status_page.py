"""The admin ``/status`` page: one server-rendered HTML page, no external assets, in the
spirit of HAProxy's stats page. Refreshes itself every few seconds.

It tells what ``/readyz``, ``/geodes`` and ``/metrics`` tell: a geode that passive health
ejected reads EJECTED (until when), not UP; readiness, draining and the last reload
(a failed one included) are in the header; rates cover the last minutes.

A world map (inline SVG, no external requests) colours each country by the region that
serves it, shows each region's geodes as markers coloured by state (at the largest country
the region serves), and gives each region's share of the traffic of the last minutes. Its
outlines are Natural Earth's 1:110m countries (public domain): geoproxy/data/README.md.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from html import escape
from importlib import resources
from typing import Any

from geoproxy import __version__
from geoproxy.config.changes import ReloadOutcome, plural
from geoproxy.config.pem import EXPIRY_WARNING_DAYS
from geoproxy.config.tls import certificate_line
from geoproxy.health.board import GeodeHealth
from geoproxy.routing.geoip import MaxMindLookup
from geoproxy.routing.runtime import Runtime
from geoproxy.surfaces.traffic import Rates, Traffic

REFRESH_SECONDS = 5
#: A GeoIP database older than this reads as stale (as the GeoIPDatabaseStale alert):
#: MaxMind publishes GeoLite2 twice a week, so a month means the updates stopped.
GEOIP_STALE_DAYS = 30

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.4em 0 .4em}
table{border-collapse:collapse}th,td{padding:.3em .7em;border:1px solid #ccc;text-align:left}
th{background:#f0f0f0}td.num{text-align:right;font-variant-numeric:tabular-nums}
.up{background:#c8f0c8}.down{background:#f6c4c4}.unknown{background:#e4e4e4}
.ejected{background:#fbdca8}
svg.map{width:100%;max-width:1000px;background:#eef4fb;border:1px solid #ccc}
svg.map path{stroke:#fff;stroke-width:.4}svg.map circle{stroke:#222;stroke-width:.8}
svg.map circle.up{fill:#2a2}svg.map circle.down{fill:#d22}svg.map circle.ejected{fill:#f90}
svg.map circle.unknown{fill:#999}.swatch{display:inline-block;width:.9em;height:.9em;
vertical-align:middle;border:1px solid #888;margin-right:.3em}
.partial{background:#fbf0b0}.fallback{background:#dbe8f8}
.bad{color:#a00;font-weight:bold}.muted{color:#777}code{font-size:12px}
"""

_CSS = {"up": "up", "down": "down", "ejected": "ejected", "unchecked": "unknown"}


@dataclass(frozen=True, slots=True)
class Facts:
    """What the page shows besides the runtime: ``not_ready`` is /readyz's reason (None:
    ready); ``rates`` is None until there is a second of history."""

    not_ready: str | None
    draining: bool
    last_reload: ReloadOutcome | None
    traffic: Traffic
    rates: Rates | None


def _clock(at: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at))


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def geode_state(state: GeodeHealth, traffic: Traffic) -> str:
    """up, down, ejected or unchecked; ejected also when a worker of ``--workers``
    ejected it (the supervisor's own board does not see passive health)."""
    if state.geode.name in traffic.ejected and state.state == "up":
        return "ejected"
    return state.state


def _label(state: GeodeHealth, word: str, now: float) -> str:
    if word == "ejected":
        until = state.ejected_until
        return "EJECTED" + (
            f" until {_clock(until)} ({_ago(until - now)} left)" if until else " by a worker"
        )
    return word.upper()


def _since(state: GeodeHealth, word: str, now: float) -> str:
    if state.since is None or word != state.state:  # a worker's ejection: its time unknown
        return "-"
    verb = "up" if word == "up" else "down"
    return f"{verb} since {_clock(state.since)} ({_ago(now - state.since)})"


def _geode_rows(runtime: Runtime, facts: Facts, now: float) -> tuple[list[str], int]:
    counts = facts.traffic.by_geode()
    rates = facts.rates
    rows, serving = [], 0
    for state in runtime.board.states.values():
        g = state.geode
        word = geode_state(state, facts.traffic)
        serving += word == "up"
        total, errors = counts.get(g.name, (0.0, 0.0))
        latency = f"{state.last_latency * 1000:.1f} ms" if state.last_latency is not None else "-"
        age = f"{now - state.last_check:.0f} s ago" if state.last_check else "never"
        if rates is None:
            rate = err = "-"
        else:
            rate = f"{rates.requests.get(g.name, 0.0):.2f}/s"
            share = rates.error_share(g.name)
            err = "-" if share is None else f"{100 * share:.1f} %"
        rows.append(
            f"<tr class={_CSS[word]}><td>{escape(g.name)}</td><td>{escape(g.region)}</td>"
            f"<td>{escape(_label(state, word, now))}</td>"
            f"<td>{escape(_since(state, word, now))}</td>"
            f"<td class=num>{latency}</td><td class=num>{age}</td>"
            f"<td class=num>{rate}</td><td class=num>{err}</td>"
            f"<td class=num>{total:.0f}</td><td class=num>{errors:.0f}</td>"
            f"<td><code>{escape(str(g.url))}</code></td>"
            f"<td>{escape(state.last_error or '')}</td></tr>"
        )
    return rows, serving


def _region_rows(runtime: Runtime, up: set[str]) -> list[str]:
    topology = runtime.topology
    by_region: dict[str, list[str]] = {}
    for country, region in sorted(topology.country_region.items()):
        by_region.setdefault(region, []).append(country)
    rows = []
    for region, order in topology.try_orders.items():
        geodes = topology.geodes_by_region[region]
        serving = sum(g.name in up for g in geodes)
        if not geodes:
            css, what = "fallback", "no geodes by design: served through its fallback"
        elif serving == 0:
            css, what = "down", "ALL DOWN: served by its fallback"
        elif serving < len(geodes):
            css, what = "partial", "degraded"
        else:
            css, what = "up", "ok"
        rows.append(
            f"<tr class={css}><td>{escape(region)}</td><td>{escape(' → '.join(order))}</td>"
            f"<td class=num>{serving}/{len(geodes)}</td><td>{escape(what)}</td>"
            f"<td><code>{escape(' '.join(by_region.get(region, [])))}</code></td></tr>"
        )
    return rows


def _header(facts: Facts, now: float) -> str:
    ready = (
        "<span class=bad>not ready: " + escape(facts.not_ready) + "</span>"
        if facts.not_ready
        else "ready"
    )
    if facts.draining:
        ready += " · <span class=bad>draining (shutting down)</span>"
    reload = facts.last_reload
    if reload is None:
        reloaded = "no reload since start-up"
    elif reload.ok:
        reloaded = (
            f"last reload ({escape(reload.reason)}) at {_clock(reload.at)}: ok — "
            f"{escape(reload.detail)}"
        )
    else:
        first = reload.detail.splitlines()[0] if reload.detail else ""
        reloaded = (
            f"<span class=bad>last reload ({escape(reload.reason)}) at "
            f"{_clock(reload.at)} FAILED; the running config stays: "
            f"{escape(first)}</span>"
        )
    rates = facts.rates
    if rates is None:
        recent = "rates: not enough history yet"
    else:
        off = "-" if rates.off_region is None else f"{100 * rates.off_region:.1f} %"
        recent = (
            f"last {_ago(rates.seconds)}: {rates.decisions:.2f} requests/s routed, "
            f"{rates.failovers * 60:.1f} failovers/min, {off} served outside the "
            f"client's region"
        )
    return f"<div>{ready}</div>\n<div>{reloaded}</div>\n<div>{recent}</div>"


def _https_line(runtime: Runtime, now: float) -> str:
    """The proxy listener's certificates, as check-config names them."""
    tls = runtime.topology.config.proxy.tls
    if tls is None:
        return "HTTPS: off (listen.proxy.tls is not set)"
    shown = []
    for certificate in tls.certificates:
        line = escape(certificate_line(certificate, now))
        if certificate.info.not_after - now < EXPIRY_WARNING_DAYS * 86400:
            line = f"<span class=bad>{line}</span>"
        shown.append(f"<code>{line}</code>")
    return "HTTPS certificates: " + "<br>".join(shown)


def _geoip_line(runtime: Runtime, now: float) -> str:
    db = runtime.geoip
    if db is None:
        return "GeoIP database: none (geoip.database is not set)"
    if not isinstance(db, MaxMindLookup):
        return "GeoIP database: a look-up given by the embedding program"
    days = (now - db.build_epoch) / 86400
    built = time.strftime("%Y-%m-%d", time.gmtime(db.build_epoch))
    age = f"built {built}, {days:.0f} days ago"
    if days > GEOIP_STALE_DAYS:
        age = f"<span class=bad>{age}: stale, is geoipupdate running?</span>"
    return (
        f"GeoIP database: <code>{escape(str(db.path))}</code> ({escape(db.database_type)}, {age})"
    )


#: Region colours on the map, in the order of the regions' names (then again).
PALETTE = (
    "#4e79a7",
    "#f28e2b",
    "#59a14f",
    "#b07aa1",
    "#edc948",
    "#76b7b2",
    "#ff9da7",
    "#9c755f",
    "#e15759",
    "#bab0ac",
)
_UNMAPPED = "#d8d8d8"


@cache
def _world() -> Mapping[str, Any]:
    """ISO country -> name, SVG path ``d``, centre ``c`` and area ``a`` (data/README.md)."""
    text = (resources.files("geoproxy") / "data" / "world-110m.json").read_text()
    world: dict[str, Any] = json.loads(text)
    return world


def region_colours(regions: frozenset[str]) -> dict[str, str]:
    return {r: PALETTE[i % len(PALETTE)] for i, r in enumerate(sorted(regions))}


def _world_map(runtime: Runtime, facts: Facts) -> str:
    """The map: countries by region, geodes by state, traffic share per region."""
    topology = runtime.topology
    world = _world()
    colours = region_colours(topology.region_names)
    paths: list[str] = []
    anchors: dict[str, tuple[int, list[int]]] = {}  # region -> its largest country
    for code, country in world.items():
        region = topology.country_region.get(code)
        fill = colours.get(region, _UNMAPPED) if region else _UNMAPPED
        served = escape(f"{code} {country['name']} → {region or 'the default region'}")
        paths.append(
            f'<path d="{country["d"]}" fill="{fill}" data-country="{code}">'
            f"<title>{served}</title></path>"
        )
        if region and country["a"] > anchors.get(region, (0, []))[0]:
            anchors[region] = (country["a"], country["c"])
    markers = []
    for region, geodes in topology.geodes_by_region.items():
        if region not in anchors:
            continue
        x, y = anchors[region][1]
        for i, geode in enumerate(geodes):
            state = runtime.board.states.get(geode.name)
            word = "unchecked" if state is None else geode_state(state, facts.traffic)
            markers.append(
                f'<circle cx="{x + 9 * i - 4.5 * (len(geodes) - 1):g}" cy="{y}" '
                f'r="5" class="{_CSS[word]}" data-geode="{escape(geode.name)}">'
                f"<title>{escape(geode.name)} ({escape(region)}): "
                f"{word.upper()}</title></circle>"
            )
    return (
        '<svg class="map" viewBox="0 0 720 360" role="img" aria-label="countries by '
        f'the region that serves them">{"".join(paths)}{"".join(markers)}</svg>\n'
        f"<div>{_legend(runtime, facts, colours)}</div>"
    )


def _legend(runtime: Runtime, facts: Facts, colours: Mapping[str, str]) -> str:
    """Each region's colour and its share of the requests of the last minutes."""
    rates = facts.rates
    by_region: dict[str, float] = {}
    if rates is not None:
        for state in runtime.board.states.values():
            g = state.geode
            by_region[g.region] = by_region.get(g.region, 0.0) + rates.requests.get(g.name, 0.0)
    total = sum(by_region.values())
    items = []
    for region, colour in colours.items():
        share = f"{100 * by_region.get(region, 0.0) / total:.0f} %" if total else "-"
        swatch = f'<span class=swatch style="background:{colour}"></span>'
        items.append(
            f'<span data-region="{escape(region)}">{swatch}{escape(region)} {share}</span>'
        )
    window = f"last {_ago(rates.seconds)}" if rates else "no traffic history yet"
    return (
        " · ".join(items) + f" <span class=muted>(share of requests served, {window};"
        " grey: countries no rule maps, served by the default region)</span>"
    )


def render_status(runtime: Runtime, facts: Facts, now: float | None = None) -> str:
    """The page."""
    now = time.time() if now is None else now
    rows, serving = _geode_rows(runtime, facts, now)
    up = {
        s.geode.name for s in runtime.board.states.values() if geode_state(s, facts.traffic) == "up"
    }
    cfg = runtime.topology.config
    window = f"last {_ago(facts.rates.seconds)}" if facts.rates else "recent"
    return f"""<!doctype html>
<html lang=en><head><meta charset=utf-8>
<meta http-equiv=refresh content="{REFRESH_SECONDS}">
<title>geoproxy status</title><style>{_STYLE}</style></head><body>
<h1>geoproxy status</h1>
<div class=muted>version {escape(__version__)} · config {escape(str(cfg.path))} ·
{serving} of {plural(len(runtime.board.states), "geode")} take traffic ·
refreshes every {REFRESH_SECONDS} s</div>
{_header(facts, now)}
<h2>Map</h2>
{_world_map(runtime, facts)}
<h2>Geodes</h2>
<table><tr><th>geode</th><th>region</th><th>state</th><th>since</th><th>latency</th>
<th>checked</th><th>requests ({window})</th><th>5xx ({window})</th><th>requests (total)</th>
<th>5xx (total)</th><th>url</th><th>last error</th></tr>
{"".join(rows)}
</table>
<h2>Region map</h2>
<div class=muted>sources: {escape(" → ".join((*cfg.region_sources, "default")))};
default region {escape(cfg.default_region)}<br>{_geoip_line(runtime, now)}<br>
{_https_line(runtime, now)}</div>
<table><tr><th>region</th><th>try order</th><th>geodes taking traffic</th><th>state</th>
<th>countries</th></tr>
{"".join(_region_rows(runtime, up))}
</table>
</body></html>
"""
