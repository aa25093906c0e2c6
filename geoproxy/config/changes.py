"""What a reload changed, in words for the log and the ``/status`` page, and how the last
reload went."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, fields
from typing import Any

from geoproxy.config import tls
from geoproxy.config.affinity import describe_homes
from geoproxy.config.model import Topology
from geoproxy.config.values import WEIGHTED, Config, Fence, Geode, GeodeTLS, Region

#: Config attributes by the YAML path an operator knows them by.
_SETTINGS = {
    "listen.proxy": "proxy",
    "listen.admin": "admin",
    "trusted_proxies": "trusted_proxies",
    "region_sources": "region_sources",
    "geoip.database": "geoip_database",
    "default_region": "default_region",
    "access_log": "access_log",
}
_SECTIONS = {
    "health_check": "health_check",
    "forwarding": "forwarding",
    "limits": "limits",
    "outlier_detection": "outlier_detection",
    "proximity": "proximity",
}
_LIFECYCLE = {
    "reload_poll_interval": "reload.poll_interval",
    "drain_timeout": "shutdown.drain_timeout",
}
_LISTENERS = ("listen.proxy", "listen.admin")
_SHOWN = 12  # countries named per move; the rest are counted


@dataclass(frozen=True, slots=True)
class ReloadOutcome:
    """The last reload: when, why, whether the new config took over, and what changed
    (or the error that kept the running config)."""

    at: float  # wall-clock time
    reason: str  # SIGHUP, config file changed, ...
    ok: bool
    detail: str


def plural(count: int, noun: str) -> str:
    """``1 geode``, ``2 geodes``."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _show(value: Any) -> str:
    if hasattr(value, "host") and hasattr(value, "port"):  # a Listener
        return f"{value.host}:{value.port}"
    if isinstance(value, tuple):
        return ", ".join(map(str, value)) or "none"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, frozenset):
        return ",".join(map(str, sorted(value)))
    return "none" if value is None else str(value)


def _fields_changed(old: Any, new: Any) -> list[tuple[str, Any, Any]]:
    return [
        (f.name, getattr(old, f.name), getattr(new, f.name))
        for f in fields(old)
        if f.compare and getattr(old, f.name) != getattr(new, f.name)  # not derived ones
    ]


def tls_changes(path: str, old: GeodeTLS, new: GeodeTLS) -> list[str]:
    """What changed of a geode TLS block: ``forwarding.tls.ca renewed`` when only a
    file's content changed (a renewal on disk), else ``path.field before -> after``."""
    changed = {name: (b, a) for name, b, a in _fields_changed(old, new)}
    out = []
    for name, (before, after) in changed.items():
        if name.endswith("_pem"):
            if name[: -len("_pem")] not in changed:
                out.append(f"{path}.{name[: -len('_pem')]} renewed")
        else:
            out.append(f"{path}.{name} {_show(before)} -> {_show(after)}")
    return out


def _geode_changes(old: Geode, new: Geode, defaults_changed: tuple[bool, bool]) -> str:
    parts = []
    for name, before, after in _fields_changed(old, new):
        if (name, True) in (("health", defaults_changed[0]), ("tls", defaults_changed[1])):
            continue  # told once, as the health_check or forwarding section's change
        if name == "tls":
            parts.extend(tls_changes("tls", before, after))
        elif name == "health":
            for sub, b, a in _fields_changed(before, after):
                parts.append(f"health_check.{sub} {_show(b)} -> {_show(a)}")
        else:
            parts.append(f"{name} {_show(before)} -> {_show(after)}")
    return f"{new.name} ({', '.join(parts)})"


def _region(region: Region) -> str:
    """``eu-central[eu-west,us-east]@50.11,8.68+10(peak_ewma)``: fallbacks, location,
    bias and a balance other than weighted."""
    text = f"{region.name}[{','.join(region.fallback)}]"
    if region.location is not None:
        text += f"@{region.location[0]:g},{region.location[1]:g}"
    text += f"{region.bias:+d}" if region.bias else ""
    return text + (f"({region.balance})" if region.balance != WEIGHTED else "")


def _fence(fence: Fence) -> str:
    """``eu(EU CH -> eu-west,eu-central; reject 503)``."""
    held = " ".join((*sorted(fence.continents), *sorted(fence.countries)))
    return f"{fence.name}({held} -> {','.join(fence.regions)}; {fence.on_exhausted} {fence.status})"


def _countries_moved(old: Config, new: Config) -> list[str]:
    before = Topology.build(old).country_region
    after = Topology.build(new).country_region
    moves: dict[tuple[str, str], list[str]] = defaultdict(list)
    for country in sorted(before.keys() | after.keys()):
        was = before.get(country, f"{old.default_region} (default)")
        now = after.get(country, f"{new.default_region} (default)")
        if was != now:
            moves[(was, now)].append(country)
    out = []
    for (was, now), countries in sorted(moves.items()):
        shown = " ".join(countries[:_SHOWN])
        if len(countries) > _SHOWN:
            shown += f" (+{len(countries) - _SHOWN} more)"
        out.append(f"{shown} {was} -> {now}")
    return out


def describe(old: Config, new: Config) -> list[str]:
    """What differs from ``old`` to ``new``, one item per kind of change."""
    out: list[str] = []
    was = {g.name: g for g in old.geodes}
    now = {g.name: g for g in new.geodes}
    added = [f"{g.name} ({g.region})" for n, g in now.items() if n not in was]
    removed = [f"{g.name} ({g.region})" for n, g in was.items() if n not in now]
    defaults = (old.health_check != new.health_check, old.forwarding.tls != new.forwarding.tls)
    changed = [
        _geode_changes(was[n], g, defaults) for n, g in now.items() if n in was and was[n] != g
    ]
    changed = [c for c in changed if not c.endswith("()")]
    for what, items in (("added", added), ("removed", removed), ("changed", changed)):
        if items:
            out.append(f"{plural(len(items), 'geode')} {what}: {', '.join(items)}")
    if {r.name: r for r in old.regions} != {r.name: r for r in new.regions}:
        out.append("regions: " + " ".join(_region(r) for r in new.regions))
    if old.fences != new.fences:
        out.append("fences: " + (" ".join(_fence(f) for f in new.fences) or "none"))
    moved = _countries_moved(old, new)
    if moved:
        out.append("countries moved: " + "; ".join(moved))
    settings = []
    for path, attr in _SETTINGS.items():
        before, after = getattr(old, attr), getattr(new, attr)
        if path in _LISTENERS:  # where it binds; its TLS is told apart (config/tls.py)
            before, after = _show(before), _show(after)
        if before != after:
            later = " (takes effect after a restart)" if path in _LISTENERS else ""
            settings.append(f"{path} {_show(before)} -> {_show(after)}{later}")
    for path, attr in _SECTIONS.items():
        for name, before, after in _fields_changed(getattr(old, attr), getattr(new, attr)):
            if isinstance(before, GeodeTLS):
                settings.extend(tls_changes(f"{path}.{name}", before, after))
            else:
                settings.append(f"{path}.{name} {_show(before)} -> {_show(after)}")
    for name, before, after in _fields_changed(old.lifecycle, new.lifecycle):
        settings.append(f"{_LIFECYCLE.get(name, name)} {_show(before)} -> {_show(after)}")
    if settings:
        out.append("settings: " + ", ".join(settings))
    if old.home_affinity != new.home_affinity:
        out.append(" ".join(line.strip() for line in describe_homes(new.home_affinity)))
    return out + tls.changes(old, new)
