"""Home-stamp affinity: which home region a request names, and why. Pure: the config's
``home_affinity``, the request's headers (and path), the trust decision and the time in;
a ``Home`` out.

Two sources, asked in this order: the **tenant map** (a key from a header, a cookie or a
path prefix, mapped to a region by the config), then the **home cookie** the edge set
when a stamp named the user's home region (``Geoproxy-Home``). The cookie is
``REGION.EXPIRES.KEYID.SIGNATURE``: HMAC-SHA256 over the first three with the key
``KEYID`` names (signed with the first configured key, verified with any of them).
A cookie that fails is ignored, never an error to the client; its result is counted.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote

from geoproxy.config.values import Fence, HomeAffinity, HomeCookie, Tenants

# Sources, also the values of the `source` metric label.
COOKIE, TENANT = "cookie", "tenant"
# Results, also the values of the `result` metric label (a bounded set).
OK = "ok"
MALFORMED = "malformed"  # not REGION.EXPIRES.KEYID.SIGNATURE
UNKNOWN_KEY = "unknown_key"  # signed with a key no longer (or never) configured
FORGED = "forged"  # the signature does not match
EXPIRED = "expired"
UNKNOWN_REGION = "unknown_region"  # a region the config in force does not declare
UNKNOWN_TENANT = "unknown_tenant"  # a tenant key the map does not list
INVALID = "invalid"  # a tenant key that is not short printable ASCII
UNTRUSTED = "untrusted"  # a tenant header from a peer that is not a trusted proxy
FENCED = "fenced"  # a home outside the client's residency fence: never followed

_MAX_KEY = 128  # a tenant key's length, at most
_SIGNATURE_CHARS = 43  # 32 bytes, base64url without padding


@dataclass(frozen=True, slots=True)
class Home:
    """A source's answer: the home region, or None with the reason it did not decide."""

    region: str | None
    source: str  # cookie | tenant
    result: str
    expires: int | None = None  # a cookie's expiry (Unix seconds)


def signature(secret: bytes, payload: str) -> str:
    digest = hmac.digest(secret, payload.encode("ascii"), hashlib.sha256)
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def make_cookie(cookie: HomeCookie, region: str, now: float) -> str:
    """The cookie value naming ``region``, valid for ``max_age`` from ``now``."""
    kid, secret = cookie.keys[0]
    payload = f"{region}.{int(now + cookie.max_age)}.{kid}"
    return f"{payload}.{signature(secret, payload)}"


def verify(cookie: HomeCookie, value: str, regions: frozenset[str], now: float) -> Home:
    """What a cookie value says, checked: its signature, its expiry, its region."""
    parts = value.split(".")
    if len(parts) != 4 or len(parts[3]) != _SIGNATURE_CHARS or not parts[1].isdigit():
        return Home(None, COOKIE, MALFORMED)
    region, expires, kid, sig = parts
    secret = next((s for k, s in cookie.keys if k == kid), None)
    if secret is None:
        return Home(None, COOKIE, UNKNOWN_KEY)
    if not hmac.compare_digest(signature(secret, f"{region}.{expires}.{kid}"), sig):
        return Home(None, COOKIE, FORGED)
    if int(expires) <= now:
        return Home(None, COOKIE, EXPIRED, int(expires))
    if region not in regions:
        return Home(None, COOKIE, UNKNOWN_REGION, int(expires))
    return Home(region, COOKIE, OK, int(expires))


def cookie_values(headers: Mapping[str, str], name: str) -> list[str]:
    """Every value of cookie ``name`` in the request's Cookie header lines, in order."""
    found = []
    get = getattr(headers, "getall", None)
    lines = get("Cookie", ()) if get is not None else [headers.get("Cookie", "")]
    for line in lines:
        if name not in line:
            continue
        for pair in line.split(";"):
            key, eq, value = pair.partition("=")
            if eq and key.strip() == name:
                found.append(value.strip().strip('"'))
    return found


def from_cookie(
    cookie: HomeCookie, headers: Mapping[str, str], regions: frozenset[str], now: float
) -> Home | None:
    """The first home cookie that verifies; else the first one's failure; None when the
    request carries none."""
    first = None
    for value in cookie_values(headers, cookie.name):
        home = verify(cookie, value, regions, now)
        if home.region is not None:
            return home
        first = first or home
    return first


def _tenant(tenants: Tenants, key: str | None) -> Home | None:
    if key is None:
        return None
    key = key.strip()
    if not key or len(key) > _MAX_KEY or not key.isascii() or not key.isprintable():
        return Home(None, TENANT, INVALID)
    region = tenants.homes.get(key)
    return Home(region, TENANT, OK if region else UNKNOWN_TENANT)


def from_tenant_headers(tenants: Tenants, headers: Mapping[str, str], trusted: bool) -> Home | None:
    """The tenant key of a header (believed from trusted proxies only) or a cookie."""
    if tenants.source == "header":
        value = headers.get(tenants.name)
        if value is not None and not trusted:
            return Home(None, TENANT, UNTRUSTED)
        return _tenant(tenants, value)
    if tenants.source == "cookie":
        values = cookie_values(headers, tenants.name)
        return _tenant(tenants, values[0] if values else None)
    return None


def from_path(tenants: Tenants, path: str) -> Home | None:
    """The tenant key of a path prefix: the segment after it (``/t/acme/x``: acme),
    percent-decoded."""
    prefix = tenants.name
    if not path.startswith(prefix):
        return None
    rest = path[len(prefix) :].partition("?")[0]
    return _tenant(tenants, unquote(rest.partition("/")[0]) or None)


def home_of(
    affinity: HomeAffinity,
    headers: Mapping[str, str],
    trusted: bool,
    regions: frozenset[str],
    now: float,
) -> Home | None:
    """What the request's headers name (the same for the same header lines from the same
    peer, but for the time: see ``current``): a tenant header or cookie first, then the
    home cookie; a failure only when nothing decided (the cookie's first)."""
    failed = None
    tenants = affinity.tenants
    if tenants is not None and tenants.source != "path_prefix":
        failed = from_tenant_headers(tenants, headers, trusted)
        if failed is not None and failed.region is not None:
            return failed
    cookie = affinity.cookie
    if cookie is not None and "Cookie" in headers:
        home = from_cookie(cookie, headers, regions, now)
        if home is not None:
            return home
    return failed


def current(affinity: HomeAffinity, home: Home | None, path: str, now: float) -> Home | None:
    """The home of one request: ``home_of``'s answer (perhaps worked out for an earlier
    request with the same headers) with a path prefix's tenant before it, and a cookie
    that expired since counted as such."""
    tenants = affinity.tenants
    if tenants is not None and tenants.source == "path_prefix":
        found = from_path(tenants, path)
        if found is not None and (found.region is not None or home is None):
            return found
    if home is not None and home.region is not None and home.expires and home.expires <= now:
        return Home(None, COOKIE, EXPIRED, home.expires)
    return home


def given(
    affinity: HomeAffinity,
    tenant: str | None,
    cookie_value: str | None,
    regions: frozenset[str],
    now: float,
) -> Home | None:
    """The home for a tenant key and a cookie value given directly (``/route``'s query
    form, ``geoproxy route``), asked in the order a request's are."""
    tenants, cookie = affinity.tenants, affinity.cookie
    failed = _tenant(tenants, tenant) if tenants is not None else None
    if failed is not None and failed.region is not None:
        return failed
    if cookie is not None and cookie_value is not None:
        return verify(cookie, cookie_value, regions, now)
    return failed


def fenced_in(home: Home | None, fence: Fence | None) -> Home | None:
    """``home``, unless it lies outside the client's residency fence: home affinity
    never takes a fenced client out of its fence (it is then routed by geography, inside
    the fence, and the home counted as ``fenced``)."""
    if home is None or home.region is None or fence is None or home.region in fence.members:
        return home
    return Home(None, home.source, FENCED, home.expires)
