"""The reader of ``home_affinity``: the home cookie (its signing keys from a file or the
environment) and the tenant map (inline, or a YAML file read and watched like the
region map). Values in ``values.py``; what a request does with them in
``routing/affinity.py``.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

from geoproxy.config.schema import Node, Problems, parse_duration, read_side_file
from geoproxy.config.values import HomeAffinity, HomeCookie, Tenants

#: The response header a stamp names its user's home region with.
HOME_HEADER = "Geoproxy-Home"
MIN_KEY_BYTES = 32
MAX_AGE_LIMIT = 400 * 86400.0  # browsers cap a cookie's lifetime at 400 days
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")  # RFC 9110 token: a cookie or header name
_DOMAIN = re.compile(
    r"^\.?[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*$"
)
_DAYS = re.compile(r"^\s*(\d+)\s*d\s*$")
_TENANT_SOURCES = ("header", "cookie", "path_prefix")
_Known = tuple[set[str], set[str]]


def key_id(secret: bytes) -> str:
    """A key's public name (in each cookie, in check-config): 8 hex digits of a hash."""
    return hashlib.sha256(b"geoproxy-home-key\0" + secret).hexdigest()[:8]


def home_affinity(
    root: Node,
    base: Path,
    known: _Known,
    problems: Problems,
    read: list[bytes],
    given: Mapping[str, bytes],
) -> tuple[HomeAffinity | None, list[Path]]:
    """``home_affinity`` and the files it read (appended to ``read`` in that order)."""
    node = root.get("home_affinity")
    if node.missing or not node.expect_mapping(("cookie", "tenants", "on_unavailable")):
        return None, []
    files: list[Path] = []
    cookie = _cookie(node.get("cookie"), base, problems, read, given, files)
    tenants = _tenants(node.get("tenants"), base, known, problems, read, given, files)
    policy = node.get("on_unavailable").choice(("fallback", "reject"), optional=True)
    if node.get("cookie").missing and node.get("tenants").missing:
        node.problem("names no source of a home region: set cookie, tenants or both")
    return HomeAffinity(cookie, tenants, policy or "fallback"), files


_COOKIE_KEYS = ("name", "max_age", "keys_file", "keys_env", "secure", "domain", "forward")


def _cookie(
    node: Node,
    base: Path,
    problems: Problems,
    read: list[bytes],
    given: Mapping[str, bytes],
    files: list[Path],
) -> HomeCookie | None:
    if node.missing or not node.expect_mapping(_COOKIE_KEYS):
        return None
    default = HomeCookie(keys=())
    name = node.get("name").string(optional=True) or default.name
    if not _TOKEN.match(name):
        node.get("name").problem(f"not a cookie name: {name!r} (letters, digits, '_', '-')")
    max_age = _max_age(node.get("max_age"), default.max_age)
    keys = _keys(node, base, problems, read, given, files)
    secure = node.get("secure").choice(("auto", "always", "never"), optional=True)
    domain = node.get("domain").string(optional=True)
    if domain is not None and not _DOMAIN.match(domain):
        node.get("domain").problem(f"not a domain name: {domain!r} (e.g. example.com)")
    forward = node.get("forward").boolean(optional=True)
    return HomeCookie(
        keys=keys,
        name=name,
        max_age=max_age or default.max_age,
        secure=secure or default.secure,
        domain=domain,
        forward=bool(forward),
    )


def _max_age(node: Node, default: float) -> float | None:
    """A duration like the others (``12h``), or whole days (``30d``), up to 400 days."""
    if node.missing:
        return default
    days = _DAYS.match(node.value) if isinstance(node.value, str) else None
    seconds = int(days.group(1)) * 86400.0 if days else parse_duration(node)
    if seconds is None:
        return None
    if not 60 <= seconds <= MAX_AGE_LIMIT:
        node.problem(f"must be from 1m to 400d, got {node.value!r}")
        return None
    return seconds


def _keys(
    node: Node,
    base: Path,
    problems: Problems,
    read: list[bytes],
    given: Mapping[str, bytes],
    files: list[Path],
) -> tuple[tuple[str, bytes], ...]:
    """The signing keys, the first first: one a line in ``keys_file`` (blank lines and
    ``#`` comments skipped), or separated by commas or spaces in ``keys_env``."""
    file_node, env_node = node.get("keys_file"), node.get("keys_env")
    file, env = file_node.string(optional=True), env_node.string(optional=True)
    if file and env:
        env_node.problem("set keys_file or keys_env, not both")
        return ()
    secrets: list[bytes]
    if file:
        where, path = file_node, base / file
        raw = given.get(str(path))
        try:
            raw = path.read_bytes() if raw is None else raw
        except OSError as exc:
            file_node.problem(f"cannot read {str(path)!r}: {exc.strerror or exc}")
            return ()
        read.append(raw)
        files.append(path)
        lines = (line.strip() for line in raw.splitlines())
        secrets = [line for line in lines if line and not line.startswith(b"#")]
        empty = f"{str(path)!r} holds no key"
    elif env:
        where = env_node
        value = os.environ.get(env)
        if value is None:
            env_node.problem(f"environment variable {env} is not set")
            return ()
        secrets = [s.encode() for s in re.split(r"[\s,]+", value) if s]
        empty = f"environment variable {env} holds no key"
    else:
        node.problem("needs signing keys: set keys_file or keys_env")
        return ()
    if not secrets:
        where.problem(empty)
    out: list[tuple[str, bytes]] = []
    for index, secret in enumerate(secrets):
        if len(secret) < MIN_KEY_BYTES:
            where.problem(
                f"key {index + 1} has {len(secret)} bytes, at least {MIN_KEY_BYTES} are needed "
                "(e.g. openssl rand -hex 32)"
            )
        elif any(secret == s for _, s in out):
            where.problem(f"key {index + 1} is listed twice")
        else:
            out.append((key_id(secret), secret))
    return tuple(out)


def _tenants(
    node: Node,
    base: Path,
    known: _Known,
    problems: Problems,
    read: list[bytes],
    given: Mapping[str, bytes],
    files: list[Path],
) -> Tenants | None:
    if node.missing or not node.expect_mapping((*_TENANT_SOURCES, "map", "homes")):
        return None
    named = [s for s in _TENANT_SOURCES if not node.get(s).missing]
    if len(named) != 1:
        node.problem(
            "names where the tenant key is: exactly one of header, cookie, path_prefix"
            + (f" (got {', '.join(named)})" if named else "")
        )
        return None
    source = named[0]
    name = node.get(source).string()
    if name is None:
        return None
    if source == "path_prefix" and not (name.startswith("/") and name.endswith("/")):
        node.get(source).problem(f"must start and end with '/': {name!r} (e.g. /t/)")
    elif source != "path_prefix" and not _TOKEN.match(name):
        node.get(source).problem(f"not a {source} name: {name!r}")
    homes: dict[str, str] = {}
    layers: list[Node] = []
    sub = Problems("")
    file = node.get("map").string(optional=True)
    if file:
        top, sub = read_side_file(base / file, given, read, ("homes",))
        if top is not None:
            files.append(base / file)
            layers.append(top)
    layers.append(node)  # inline entries override the file's
    for layer in layers:
        for key, value in layer.get("homes").pairs():
            region = value.region(*known)
            if region is not None:
                homes[key] = region
    for line in sub.lines:
        problems.add(node.path_of("map"), line)
    return Tenants(source, name, MappingProxyType(homes))


def describe_homes(homes: HomeAffinity | None) -> list[str]:
    """``home_affinity`` as check-config prints it (key ids, never keys)."""
    if homes is None:
        return ["home affinity: off (Geoproxy-Home answer headers are stripped unused)"]
    lines = [
        f"home affinity: tenant map first, then the cookie; on_unavailable: {homes.on_unavailable}"
    ]
    cookie = homes.cookie
    if cookie is not None:
        kids = [kid for kid, _ in cookie.keys]
        lines.append(
            f"  cookie {cookie.name}: max_age {cookie.max_age / 86400:g}d, secure {cookie.secure}"
            + (f", domain {cookie.domain}" if cookie.domain else "")
            + (", forwarded to geodes" if cookie.forward else ", not forwarded to geodes")
            + f"; signing key {kids[0] if kids else 'none'}"
            + (f", also accepted: {', '.join(kids[1:])}" if kids[1:] else "")
        )
    else:
        lines.append("  cookie: none (Geoproxy-Home answer headers are stripped unused)")
    tenants = homes.tenants
    if tenants is not None:
        per: dict[str, int] = {}
        for region in tenants.homes.values():
            per[region] = per.get(region, 0) + 1
        counts = ", ".join(f"{r} {n}" for r, n in sorted(per.items())) or "none"
        lines.append(f"  tenants from {tenants.source} {tenants.name}: {counts}")
    return lines
