"""Which region a client belongs to, and why. Pure: headers, the client IP, the trust
decision and a GeoIP look-up in; a ``Resolution`` out."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass

from geoproxy.config.countries import COUNTRY_CONTINENT
from geoproxy.config.model import Topology
from geoproxy.config.values import Fence
from geoproxy.errors import GeoIPLookupError
from geoproxy.routing.clientip import IPAddress
from geoproxy.routing.geoip import GeoAnswer, GeoLookup
from geoproxy.routing.proximity import Nearest, nearest
from geoproxy.routing.router import HOME, PROXIMITY

X_CLIENT_REGION = "X-Client-Region"
CF_IPCOUNTRY = "CF-IPCountry"
HEADER_OF = {"x-client-region": X_CLIENT_REGION, "cf-ipcountry": CF_IPCOUNTRY}
#: Cloudflare's "unknown" (XX) and "Tor exit" (T1) pseudo-countries.
CF_UNKNOWN = frozenset({"XX", "T1"})
_MAX_HEADER_VALUE = 64

# Step results, also the values of the `result` metric label (a bounded set).
OK, ABSENT, UNKNOWN, INVALID, UNTRUSTED = "ok", "absent", "unknown", "invalid", "untrusted"
ERROR = "error"  # the GeoIP look-up itself failed (a corrupt record), unlike UNKNOWN


@dataclass(frozen=True, slots=True)
class Resolution:
    region: str
    source: str  # x-client-region | cf-ipcountry | geoip | default
    country: str | None  # the country that decided, when one did
    client_ip: IPAddress | None
    steps: tuple[tuple[str, str], ...]  # (source, result) for every source consulted
    fence: Fence | None = None  # the client's residency fence: by the first country (or
    # continent) any source named; a region id alone names none: the next source that does.
    nearest: Nearest | None = None  # set when geoproximity was consulted (source geoip):
    # ``nearest.decided`` when the distance, not the map, chose ``region``.

    own: str = HOME  # the decision for geodes of ``region`` itself: proximity when
    # geoproximity, not the region map, chose it (read per request: a plain field)


def _clean(value: str | None) -> str | None:
    """Normalise a header value; ``None`` for anything that is not short printable ASCII."""
    if value is None:
        return None
    value = value.strip()
    if not value or len(value) > _MAX_HEADER_VALUE:
        return None
    if not value.isascii() or not value.isprintable():
        return None
    return value


def from_client_region(value: str, topology: Topology) -> tuple[str | None, str | None, str]:
    """``X-Client-Region``: a declared region id, or an ISO country code."""
    low = value.lower()
    if low in topology.region_names:
        return low, None, OK
    code = value.upper()
    if code in COUNTRY_CONTINENT:
        region = topology.country_region.get(code)
        return region, code, OK if region else UNKNOWN
    return None, None, INVALID


def from_country(value: str, topology: Topology) -> tuple[str | None, str | None, str]:
    """``CF-IPCountry``: ISO alpha-2; XX and T1 mean unknown."""
    code = value.upper()
    if code in CF_UNKNOWN:
        return None, None, UNKNOWN
    if code not in COUNTRY_CONTINENT:
        return None, None, INVALID
    region = topology.country_region.get(code)
    return region, code, OK if region else UNKNOWN


_PARSERS = {"x-client-region": from_client_region, "cf-ipcountry": from_country}


def resolve(
    topology: Topology,
    headers: Mapping[str, str],
    peer_trusted: bool,
    client_ip: IPAddress | None,
    lookup: GeoLookup | None,
) -> Resolution:
    steps: list[tuple[str, str]] = []
    seen: tuple[str | None, str | None] = (None, None)  # the first country, continent named
    near: Nearest | None = None
    for source in topology.config.region_sources:
        if source == "geoip":
            region, answer, result, near = _from_geoip(client_ip, lookup, topology)
            country = answer.country if answer is not None else None
            if answer is not None and seen == (None, None):
                seen = (country, answer.continent)
        else:
            raw = headers.get(HEADER_OF[source])
            if raw is None:
                steps.append((source, ABSENT))
                continue
            if not peer_trusted:
                steps.append((source, UNTRUSTED))
                continue
            value = _clean(raw)
            if value is None:
                region, country, result = None, None, INVALID
            else:
                region, country, result = _PARSERS[source](value, topology)
        steps.append((source, result))
        if country is not None and seen == (None, None):
            seen = (country, None)
        if region is not None:
            fence = _fence(topology, seen, steps, client_ip, lookup, headers, peer_trusted)
            own = PROXIMITY if near is not None and near.decided else HOME
            return Resolution(region, source, country, client_ip, tuple(steps), fence, near, own)
    fence = _fence(topology, seen, steps, client_ip, lookup, headers, peer_trusted)
    region = topology.config.default_region
    return Resolution(region, "default", None, client_ip, tuple(steps), fence)


def _fence(
    topology: Topology,
    seen: tuple[str | None, str | None],
    steps: list[tuple[str, str]],
    ip: IPAddress | None,
    lookup: GeoLookup | None,
    headers: Mapping[str, str],
    peer_trusted: bool,
) -> Fence | None:
    """The client's fence by what the sources named; when they named no country (a
    region id decided before a country header or GeoIP was reached), by the first of the
    sources not consulted yet that names one (a trusted country header, the client's
    GeoIP record)."""
    if not topology.config.fences:
        return None
    if seen == (None, None):
        consulted = {source for source, _ in steps}
        for source in topology.config.region_sources:
            if source in consulted:
                continue
            if source == "geoip":
                answer = _from_geoip(ip, lookup, topology)[1]
                if answer is not None:
                    seen = (answer.country, answer.continent)
            elif peer_trusted and (value := _clean(headers.get(HEADER_OF[source]))) is not None:
                seen = (_PARSERS[source](value, topology)[1], None)
            if seen != (None, None):
                break
    return topology.fence_of(*seen)


def _from_geoip(
    ip: IPAddress | None, lookup: GeoLookup | None, topology: Topology
) -> tuple[str | None, GeoAnswer | None, str, Nearest | None]:
    if ip is None or lookup is None:
        return None, None, ABSENT, None
    if not ip.is_global:
        return None, None, UNKNOWN, None  # private, loopback, link-local, documentation
    try:
        answer = lookup(ip)
    except GeoIPLookupError:
        return None, None, ERROR, None  # counted and logged (rate-limited) by the look-up
    if answer is None:
        return None, None, UNKNOWN, None
    region = topology.region_of(answer.country, answer.continent)
    if answer.location is not None and topology.located:
        country = answer.country
        listed = country is not None and country in topology.config.countries
        if region is None or (topology.config.proximity.prefer_over_continent and not listed):
            near = _nearest(topology, answer, answer.location, region)
            if near is not None:
                return near.region, answer, OK, near
    return region, answer, OK if region else UNKNOWN, None


def _nearest(
    topology: Topology, answer: GeoAnswer, location: tuple[float, float], mapped: str | None
) -> Nearest | None:
    """Geoproximity over the regions the client may reach (its fence's, if any)."""
    regions = topology.located
    fence = topology.fence_of(answer.country, answer.continent)
    if fence is not None:
        regions = tuple(r for r in regions if r.name in fence.members)
    return nearest(regions, location, answer.accuracy_radius, mapped)


class ResolutionCache:
    """Memoises ``resolve`` by what decides it: the client (``key``: the peer's address
    as the transport gave it, and the X-Forwarded-For lines the caller believes) and the
    values of the region headers the topology consults (``X-Client-Region``,
    ``CF-IPCountry``), while the topology, the GeoIP look-up and the trust rules stay the
    same. Nothing else of a request is part of the key or kept: a cookie or a token
    never decides a region, so one never reaches the cache. ``client_ip`` is asked only
    on a miss (an X-Forwarded-For walk costs a parse per hop)."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._for: tuple[Topology, GeoLookup | None, object] | None = None
        self._headers: tuple[str, ...] = ()
        self._memo: dict[Hashable, Resolution] = {}

    def resolve(
        self,
        topology: Topology,
        headers: Mapping[str, str],
        peer_trusted: bool,
        client_ip: Callable[[], IPAddress | None],
        lookup: GeoLookup | None,
        key: Hashable | None,
        trust: object = None,
    ) -> Resolution:
        """``trust``: the trust rules in force (the memo starts afresh when they change,
        as for the topology and the look-up)."""
        scope = self._for
        if (
            scope is None
            or scope[0] is not topology
            or scope[1] is not lookup
            or scope[2] is not trust
        ):
            self._for = (topology, lookup, trust)
            self._headers = tuple(
                HEADER_OF[s] for s in topology.config.region_sources if s in HEADER_OF
            )
            self._memo = {}
        if key is None:
            return resolve(topology, headers, peer_trusted, client_ip(), lookup)
        full = (key, peer_trusted, *[headers.get(name) for name in self._headers])
        hit = self._memo.get(full)
        if hit is None:
            hit = resolve(topology, headers, peer_trusted, client_ip(), lookup)
            if len(self._memo) >= self.size:
                self._memo.clear()  # bounded: many clients just resolve afresh
            self._memo[full] = hit
        return hit
