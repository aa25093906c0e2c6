"""The configuration as values: frozen dataclasses, built once by ``loader.py`` and
then only read. Nothing here reads YAML.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from yarl import URL

from geoproxy.config.access import AccessRule
from geoproxy.config.pem import CertificateInfo

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Region sources a config may list in ``region_sources``, in their default order.
SOURCES = ("x-client-region", "cf-ipcountry", "geoip")
#: How a region picks among its healthy geodes (``regions.<id>.balance``).
WEIGHTED, PEAK_EWMA = "weighted", "peak_ewma"
BALANCES = (WEIGHTED, PEAK_EWMA)


@dataclass(frozen=True, slots=True)
class Certificate:
    """One certificate chain and its key for the proxy listener, as read and checked."""

    cert: Path  # the PEM file: the certificate, then its intermediates
    key: Path  # the PEM file of its private key (unencrypted)
    chain: bytes = field(repr=False)  # the bytes read from ``cert``...
    secret: bytes = field(repr=False)  # ...and from ``key``: what is served
    info: CertificateInfo  # names, validity, fingerprint (config/pem.py)
    where: str = ""  # its YAML path (listen.proxy.tls[1]), for messages and metrics


@dataclass(frozen=True, slots=True)
class ListenerTls:
    """HTTPS on a listener: TLS >= 1.2 with Mozilla's "intermediate" ciphers, ALPN
    http/1.1, session tickets. A new handshake gets the certificate whose names match the
    client's SNI (an exact name first, then a wildcard), else the first (the default)."""

    certificates: tuple[Certificate, ...]  # at least one; the first is the default


def sni_index(tls: ListenerTls, server_name: str | None) -> int:
    """Which certificate serves ``server_name``: the first naming it exactly, else the
    first with a wildcard for its first label (``*.example.com`` serves
    ``a.example.com``, not ``example.com`` or ``a.b.example.com``), else 0."""
    if not server_name:
        return 0
    name = server_name.lower().rstrip(".")
    parent = name.partition(".")[2]
    wildcard = None
    for i, certificate in enumerate(tls.certificates):
        for pattern in certificate.info.names:
            low = pattern.lower()
            if low == name:
                return i
            if wildcard is None and parent and low == "*." + parent:
                wildcard = i
    return 0 if wildcard is None else wildcard


@dataclass(frozen=True, slots=True)
class Hsts:  # (hashable: proxy/prelude.py caches its header line)
    """The Strict-Transport-Security header on HTTPS answers (opt-in, RFC 6797)."""

    max_age: int  # seconds browsers remember to use HTTPS only
    include_subdomains: bool = False  # the policy covers every subdomain too
    preload: bool = False  # asks for a place in browsers' preload lists

    def header(self) -> str:
        return (
            f"max-age={self.max_age}"
            + ("; includeSubDomains" if self.include_subdomains else "")
            + ("; preload" if self.preload else "")
        )


@dataclass(frozen=True, slots=True)
class Listener:
    host: str
    port: int  # 0 picks a free port (tests); the bound port is logged.
    tls: ListenerTls | None = None  # HTTPS (the proxy listener only); None: plain HTTP
    hsts: Hsts | None = None  # with ``tls`` only


@dataclass(frozen=True, slots=True)
class Redirect:
    """A plain-HTTP listener that answers every request with a 308 to the same host and
    path on the proxy listener's HTTPS (``listen.redirect``)."""

    host: str
    port: int
    https_port: int | None = None  # the port in the Location; None: the proxy
    # listener's own (omitted when 443). Set it when a load balancer maps ports.


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """Active health check of one geode. Set once under ``health_check``; a geode's own
    ``health`` block overrides single fields."""

    path: str = "/health"  # GET this path on the geode's URL.
    interval: float = 5.0  # seconds between checks of one geode, plus jitter.
    timeout: float = 2.0  # seconds for one check; must be < interval.
    jitter: float = 0.5  # up to this many seconds added at random to each interval.
    healthy_threshold: int = 2  # consecutive passes to turn healthy (the first check at
    # start-up needs only one pass, as in Envoy, so a fresh proxy can serve at once).
    unhealthy_threshold: int = 3  # consecutive failures to turn unhealthy.
    expected_statuses: frozenset[int] = frozenset(range(200, 300))


@dataclass(frozen=True, slots=True)
class GeodeTLS:
    """How geoproxy speaks TLS to an ``https://`` geode: one context per block, used by
    the geode's health checks and its traffic alike (geoproxy/health/tls.py). Set once
    under ``forwarding.tls``; a geode's own ``tls`` block overrides single fields. The
    files are read at load (their bytes are what is used, and part of the config's
    fingerprint: a renewed file reloads)."""

    ca: Path | None = None  # PEM bundle of the CAs that may sign the geode's certificate,
    # instead of the system's trust store (nginx proxy_ssl_trusted_certificate).
    cert: Path | None = None  # client certificate (PEM, its chain after it) for geodes
    # that require one (mTLS, nginx proxy_ssl_certificate); with ``key``: both or neither.
    key: Path | None = None  # its private key (PEM, unencrypted)
    server_name: str | None = None  # sent in SNI and checked in the geode's certificate;
    # None: the host of the geode's URL (nginx proxy_ssl_name).
    verify: bool = True  # false: any certificate is accepted, no name checked; a warning
    # at start-up, on every reload and from check-config.
    ca_pem: bytes | None = field(default=None, repr=False)  # the bytes read from ``ca``,
    cert_pem: bytes | None = field(default=None, repr=False)  # ``cert``
    key_pem: bytes | None = field(default=None, repr=False)  # and ``key``


@dataclass(frozen=True, slots=True)
class Geode:
    name: str
    region: str
    url: URL  # scheme://host[:port][/base-path]; the request path is appended.
    weight: int  # relative share among healthy geodes of one region, >= 1.
    health: HealthCheck
    max_inflight: int | None = None  # requests this proxy process has at the geode at
    # once (WebSockets included); with that many, new requests go to the region's other
    # geodes, then spill down the try order (``spill``); None: no limit. With
    # ``--workers N`` each worker allows its share, rounded up (health/load.py).
    # For an https:// URL: forwarding.tls, overridden by the geode's own block.
    tls: GeodeTLS = field(default_factory=GeodeTLS)
    base: str = field(init=False, repr=False, compare=False)  # url without a trailing "/"
    prefix: str = field(init=False, repr=False, compare=False)  # its path, without "/" at
    # the end: what goes before the request's path (usually "")
    # Whose idle connections a request to this geode may reuse: the same URL and, for
    # https, the same TLS block (another client certificate or server_name is another
    # TLS session, never to be shared).
    pool_key: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        base = str(self.url).rstrip("/")
        object.__setattr__(self, "base", base)
        object.__setattr__(self, "prefix", self.url.raw_path.rstrip("/"))
        tls = f"#tls:{hash(self.tls):x}" if self.url.scheme == "https" else ""
        object.__setattr__(self, "pool_key", base + tls)


@dataclass(frozen=True, slots=True)
class Region:
    name: str
    fallback: tuple[str, ...]  # other regions to try, nearest first.
    location: tuple[float, float] | None = None  # (latitude, longitude) in degrees: where
    # its stamps are. Regions with one take part in geoproximity (``Proximity``).
    bias: int = 0  # -99..99, Route 53's: a client's distance to this region counts as
    # ``distance * (1 - bias / 100)``; positive draws clients from further away.
    balance: str = WEIGHTED  # among its healthy geodes: weighted (random, by weight) or
    # peak_ewma (the less loaded of two: response-header time, peak EWMA, times the
    # requests in flight plus one; routing/router.py).


@dataclass(frozen=True, slots=True)
class Proximity:
    """Geoproximity: a client whose GeoIP record has coordinates, and whose country the
    region map does not place, goes to the nearest region with a ``location``."""

    prefer_over_continent: bool = False  # true: also when only a continent entry would
    # place the country (an entry under ``countries`` always wins). The continent's
    # region is kept while the record's accuracy radius leaves the two too close to call.


#: What a fence does when none of its geodes is healthy.
REJECT, TRY_ALL = "reject", "try_all"


@dataclass(frozen=True, slots=True)
class Fence:
    """A residency fence: its clients (by country, or by continent) are only ever routed
    to its regions — not by fallbacks, not by panic mode, not by any other preference."""

    name: str
    regions: tuple[str, ...]  # the regions its clients may reach. A client whose own
    # region lies outside them (a header, the default region) tries these, in this order.
    countries: frozenset[str]  # ISO alpha-2 codes of its clients...
    continents: frozenset[str]  # ...and continent codes (a country listed in another
    # fence's ``countries`` belongs to that fence, not to the one of its continent).
    on_exhausted: str = REJECT  # no healthy geode inside: reject (``status``, a JSON
    # body naming the fence) | try_all (panic mode inside the fence only). Either way
    # ``forwarding.when_none_healthy`` never takes a fenced client outside it.
    status: int = 503  # the status of that refusal (400-599; 503 adds Retry-After).
    members: frozenset[str] = field(init=False, repr=False, compare=False)  # ``regions``

    def __post_init__(self) -> None:
        object.__setattr__(self, "members", frozenset(self.regions))

    def try_order(self, region: str, order: tuple[str, ...]) -> tuple[str, ...]:
        """``order`` (``region``'s try order) kept to the fence; the fence's own regions
        when ``region`` is outside it."""
        if region not in self.members:
            return self.regions
        return tuple(r for r in order if r in self.members)


@dataclass(frozen=True, slots=True)
class Forwarding:
    connect_timeout: float = 2.0  # seconds to open a connection to a geode; a failure
    # here is always safe to retry on the next candidate (no byte was sent).
    response_timeout: float = 30.0  # seconds the geode may stay silent once the request
    # is sent: before its response head (-> 504) and between body chunks (-> abort).
    failover_timeout: float = 10.0  # no new attempt starts this long after the first.
    max_attempts: int = 3  # geodes tried for one request, across regions.
    when_none_healthy: str = "reject"  # reject: 503 + Retry-After; try_all: panic mode,
    # try every geode of the region's try order regardless of health.
    preserve_host: bool = True  # forward the client's Host; false: the geode's host.
    keepalive_timeout: float = 4.0  # idle pooled connections to geodes close after this;
    # keep it below the geodes' own idle timeout (often 5 s), or a request may meet a
    # connection the geode just closed (a POST then gets 502: it cannot be replayed).
    fast_lane: bool = True  # serve plain GETs with small answers from callbacks (about
    # twice the requests per core; see geoproxy/proxy/fastlane.py); false: every request takes
    # the coroutine path. Both behave the same; this is a switch for diagnosis.
    forward_trace: bool = False  # TRACE is refused at the edge (405: cross-site tracing,
    # and it would echo what the proxy added); true forwards it. CONNECT is always 405.
    tls: GeodeTLS = field(default_factory=GeodeTLS)  # every https:// geode's TLS default


@dataclass(frozen=True, slots=True)
class Limits:
    """What a client may send. Defaults are safe for an internet-facing edge."""

    header_timeout: float = 10.0  # seconds to send a complete request head; else 408 and
    # the connection closes (slowloris: plain aiohttp keeps such connections ~an hour).
    max_header_bytes: int = 64 * 1024  # all request header lines together; else 431.
    max_body_bytes: int = 100 * 1024**2  # a request body; else 413 before forwarding (or
    # the upload is cut when a chunked body grows past it).
    keepalive_timeout: float = 60.0  # an idle client connection closes after this.
    body_timeout: float = 30.0  # seconds a client may pause while its request body is
    # read, before the first piece too (nginx client_body_timeout); else 408, the client
    # connection closes and the request to the geode is aborted (its connection closed,
    # never pooled). A geode slow to take the body does not count against the client.
    body_min_rate: int = 500  # bytes/s a request body must average once the time spent
    # waiting for it passes body_timeout (Apache mod_reqtimeout's MinRate: a trickle of a
    # byte a second is cut); else 408 likewise. 1B turns it off in effect.


@dataclass(frozen=True, slots=True)
class OutlierDetection:
    """Passive health: live traffic judges geodes too (Envoy's outlier detection)."""

    consecutive_failures: int = 5  # connect failures or 502/503/504 in a row to eject a
    # geode; 0 turns passive health off.
    base_ejection_time: float = 30.0  # the n-th ejection lasts n times this...
    max_ejection_time: float = 300.0  # ...up to this. A passing active check re-admits.


@dataclass(frozen=True, slots=True)
class Lifecycle:
    reload_poll_interval: float = 2.0  # how often the config file's content hash is
    # compared (works for ConfigMap symlink swaps and bind mounts); 0s: only on SIGHUP.
    drain_timeout: float = 10.0  # on SIGTERM, in-flight requests get this long to finish.


@dataclass(frozen=True, slots=True)
class HomeCookie:
    """The signed cookie that carries a user's home region once a stamp named it
    (``Geoproxy-Home`` response header). Set under ``home_affinity.cookie``."""

    keys: tuple[tuple[str, bytes], ...]  # (key id, secret): the first signs, any of them
    # verifies (rotation: put the new key first, drop the old one once max_age passed).
    # From ``keys_file`` (one a line) or ``keys_env``; each at least 32 bytes.
    name: str = "geoproxy_home"  # the cookie's name (an RFC 6265 token).
    max_age: float = 30 * 86400.0  # seconds a cookie is valid from when the edge set it;
    # a later one is ignored (counted as expired), as is a forged or unknown-key one.
    secure: str = "auto"  # auto: Secure when the client came over HTTPS (the listener's
    # scheme, or X-Forwarded-Proto from a trusted proxy) | always | never.
    domain: str | None = None  # the cookie's Domain; none: this host only.
    forward: bool = False  # pass the cookie on to geodes; false: the edge takes it out
    # of the Cookie header (it is the edge's; a stamp learns the home from its own data).


@dataclass(frozen=True, slots=True)
class Tenants:
    """A tenant or user key from a request, mapped to a home region (``home_affinity.
    tenants``): the map reloads with the config."""

    source: str  # header | cookie | path_prefix
    name: str  # the header's or cookie's name, or the path prefix ("/t/": the key is the
    # path segment after it). A header is believed only from trusted proxies.
    homes: Mapping[str, str]  # tenant key (as sent, case-sensitive) -> region


@dataclass(frozen=True, slots=True)
class HomeAffinity:
    """Home-stamp affinity: a request that names its home region goes there wherever it
    comes from (read-your-writes across regions). The tenant map is asked first, then
    the cookie."""

    cookie: HomeCookie | None  # None: stamps' Geoproxy-Home headers are stripped unused
    tenants: Tenants | None
    on_unavailable: str = "fallback"  # the home region has no healthy geode: fallback
    # (its own fallback list, then panic mode or 503 as forwarding.when_none_healthy
    # says) | reject (503 naming the home region).


@dataclass(frozen=True, slots=True)
class Config:
    path: Path  # the file it came from, as given (for messages).
    proxy: Listener
    admin: Listener
    trusted_proxies: tuple[IPNetwork, ...]
    region_sources: tuple[str, ...]
    geoip_database: Path | None
    default_region: str
    regions: tuple[Region, ...]
    countries: Mapping[str, str]  # ISO alpha-2 -> region (the region map's overrides).
    continents: Mapping[str, str]  # continent code -> region.
    geodes: tuple[Geode, ...]
    health_check: HealthCheck = field(default_factory=HealthCheck)
    redirect: Redirect | None = None  # needs listen.proxy.tls
    forwarding: Forwarding = field(default_factory=Forwarding)
    access_log: str = "json"  # json: one JSON line per request on stdout | plain | off
    access: tuple[AccessRule, ...] = ()  # the proxy listener's access rules, in order
    # (geoproxy/config/access.py): a denied request never reaches a geode.
    limits: Limits = field(default_factory=Limits)
    outlier_detection: OutlierDetection = field(default_factory=OutlierDetection)
    lifecycle: Lifecycle = field(default_factory=Lifecycle)
    home_affinity: HomeAffinity | None = None  # None: no request has a home region.
    files: tuple[Path, ...] = ()  # every file read (this one, the region map, the TLS
    # certificates and keys, home_affinity's keys and tenant map): a change to any of them
    # triggers a reload.
    fingerprint: bytes = b""  # of the exact bytes this config was read from
    contents: tuple[bytes, ...] = ()  # those bytes, one per file in ``files``
    fences: tuple[Fence, ...] = ()  # residency fences (see ``Fence``), in config order.
    proximity: Proximity = field(default_factory=Proximity)
    warnings: tuple[str, ...] = ()  # ``FILE: PATH: MESSAGE`` lines for what is valid but
    # likely wrong; check-config prints them, start-up and reloads log them.

    def sources(self) -> dict[str, bytes]:
        """The bytes this config was read from, by file: ``load(path, given=...)`` builds
        the very same config from them (a worker of ``--workers`` does)."""
        return {str(f): c for f, c in zip(self.files, self.contents, strict=True)}
