"""The admin ``/status`` page: one server-rendered HTML page, no external assets, in the
spirit of HAProxy's stats page. Refreshes itself every few seconds."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Mapping
from html import escape

from geoproxy import __version__
from geoproxy.runtime import Runtime

REFRESH_SECONDS = 5

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.4em 0 .4em}
table{border-collapse:collapse}th,td{padding:.3em .7em;border:1px solid #ccc;text-align:left}
th{background:#f0f0f0}td.num{text-align:right;font-variant-numeric:tabular-nums}
.up{background:#c8f0c8}.down{background:#f6c4c4}.unknown{background:#e4e4e4}
.muted{color:#777}code{font-size:12px}
"""


def _requests_by_geode(
    requests: Mapping[tuple[str, ...], float],
) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = defaultdict(dict)
    for (geode, code_class), value in requests.items():
        out[geode][code_class] = value
    return out


def render_status(runtime: Runtime, requests: Mapping[tuple[str, ...], float]) -> str:
    """The page; ``requests``: requests answered by (geode, status class)."""
    topology = runtime.topology
    counts = _requests_by_geode(requests)
    now = time.time()
    rows = []
    for state in runtime.board.states.values():
        g = state.geode
        classes = counts.get(g.name, {})
        total = sum(classes.values())
        errors = classes.get("5xx", 0.0)
        if not state.checked:
            css, label = "unknown", "UNCHECKED"
        elif state.healthy:
            css, label = "up", "UP"
        else:
            css, label = "down", "DOWN"
        latency = f"{state.last_latency * 1000:.1f} ms" if state.last_latency is not None else "-"
        age = f"{now - state.last_check:.0f} s ago" if state.last_check else "never"
        rate = f"{100 * errors / total:.1f} %" if total else "-"
        rows.append(
            f"<tr class={css}><td>{escape(g.name)}</td><td>{escape(g.region)}</td>"
            f"<td>{label}</td><td class=num>{latency}</td><td class=num>{age}</td>"
            f"<td class=num>{total:.0f}</td><td class=num>{rate}</td>"
            f"<td><code>{escape(str(g.url))}</code></td>"
            f"<td>{escape(state.last_error or '')}</td></tr>"
        )
    by_region: dict[str, list[str]] = defaultdict(list)
    for country, region in sorted(topology.country_region.items()):
        by_region[region].append(country)
    region_rows = []
    for region, order in topology.try_orders.items():
        healthy = sum(g.name in runtime.board.healthy for g in topology.geodes_by_region[region])
        region_rows.append(
            f"<tr><td>{escape(region)}</td><td>{escape(' → '.join(order))}</td>"
            f"<td class=num>{healthy}/{len(topology.geodes_by_region[region])}</td>"
            f"<td><code>{escape(' '.join(by_region.get(region, [])))}</code></td></tr>"
        )
    cfg = topology.config
    return f"""<!doctype html>
<html lang=en><head><meta charset=utf-8>
<meta http-equiv=refresh content="{REFRESH_SECONDS}">
<title>geoproxy status</title><style>{_STYLE}</style></head><body>
<h1>geoproxy status</h1>
<div class=muted>version {escape(__version__)} · config {escape(str(cfg.path))} ·
{len(runtime.board.healthy)} of {len(runtime.board.states)} geodes up ·
refreshes every {REFRESH_SECONDS} s</div>
<h2>Geodes</h2>
<table><tr><th>geode</th><th>region</th><th>state</th><th>latency</th><th>checked</th>
<th>requests</th><th>5xx rate</th><th>url</th><th>last error</th></tr>
{"".join(rows)}
</table>
<h2>Region map</h2>
<div class=muted>sources: {escape(" → ".join((*cfg.region_sources, "default")))};
default region {escape(cfg.default_region)}</div>
<table><tr><th>region</th><th>try order</th><th>healthy geodes</th><th>countries</th></tr>
{"".join(region_rows)}
</table>
</body></html>
"""
