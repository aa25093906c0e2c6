"""The readers of the config's TLS blocks: the proxy listener's certificates
(``listen.proxy.tls``), HSTS (``listen.proxy.hsts``), the plain-HTTP redirect listener
(``listen.redirect``) and how geoproxy speaks TLS to geodes (``forwarding.tls``, a geode's
``tls``). Certificate and key files are read here, checked with
``config/pem.py``, and their bytes join the config's fingerprinted files: a renewal on disk
is a config reload.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from geoproxy.config import sections
from geoproxy.config.pem import (
    CertificateInfo,
    PairError,
    PemError,
    certificates,
    check_pair,
    describe,
)
from geoproxy.config.schema import Node, host_name_problem
from geoproxy.config.values import (
    Certificate,
    Config,
    GeodeTLS,
    Hsts,
    Listener,
    ListenerTls,
    Redirect,
)


@dataclass(slots=True)
class Reads:
    """The files a config reads besides itself, in order, and their bytes; ``given``:
    contents to use instead of the disk (``Config.sources``, in a worker)."""

    given: Mapping[str, bytes]
    files: list[Path] = field(default_factory=list)
    contents: list[bytes] = field(default_factory=list)

    def read(self, node: Node, base: Path) -> tuple[Path, bytes] | None:
        """The file ``node`` names (relative to ``base``) and its bytes, or None after
        recording why it cannot be read."""
        text = node.string()
        if text is None:
            return None
        path = base / text
        raw = self.given.get(str(path))
        if raw is None:
            try:
                raw = path.read_bytes()
            except OSError as exc:
                node.problem(f"cannot read {path}: {exc.strerror or exc}")
                return None
        self.files.append(path)
        self.contents.append(raw)
        return path, raw


_PAIR_KEYS = ("cert", "key")


def listener_tls(node: Node, base: Path, reads: Reads) -> ListenerTls | None:
    """``tls: {cert, key}``, or a list of such pairs (the first is the default)."""
    if node.missing or node.value is None:
        return None
    items = node.items() if isinstance(node.value, list) else [node]
    if isinstance(node.value, list) and not items:
        node.problem("must list at least one {cert, key} pair")
    found: list[Certificate] = []
    for item in items:
        if not item.expect_mapping(_PAIR_KEYS, required=_PAIR_KEYS):
            continue
        # (A missing one is reported by expect_mapping; the other is still read.)
        cert, key = (
            None if item.get(k).missing else reads.read(item.get(k), base) for k in _PAIR_KEYS
        )
        if cert is None or key is None:
            continue
        about = _checked_pair(item, cert, key)
        if about is None:
            continue
        found.append(Certificate(cert[0], key[0], cert[1], key[1], about, item.path))
    if len(found) != len(items):
        return None
    return ListenerTls(tuple(found))


_AGE = re.compile(r"^\s*(\d+)\s*(s|m|h|d)\s*$")
_AGE_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_AGE_MAX = 730 * 86400  # two years: what browsers' preload lists ask at most


def hsts(node: Node) -> Hsts | None:
    """``hsts: {max_age: 365d, include_subdomains: false, preload: false}``."""
    if node.missing or node.value is None:
        return None
    keys = ("max_age", "include_subdomains", "preload")
    if not node.expect_mapping(keys, required=("max_age",)):
        return None
    age_node = node.get("max_age")
    value = age_node.value
    match = _AGE.match(value) if isinstance(value, str) else None
    age = None
    if match is None:
        if not age_node.missing:
            age_node.problem(f"not a duration: {value!r} (e.g. 365d, 12h; 0s turns HSTS off)")
    elif (age := int(match.group(1)) * _AGE_UNIT[match.group(2)]) > _AGE_MAX:
        age_node.problem(f"must be at most 730d, got {value!r}")
        age = None
    subdomains = node.get("include_subdomains").boolean(optional=True)
    preload = node.get("preload").boolean(optional=True)
    if age is None:
        return None
    return Hsts(age, bool(subdomains), bool(preload))


def redirect(node: Node, tls: ListenerTls | None, https: Node) -> Redirect | None:
    """``listen.redirect: {host, port, https_port}``; ``https``: the proxy listener's
    ``tls`` node, which it needs."""
    if node.missing or node.value is None:
        return None
    where = sections.listener(node, Listener("0.0.0.0", 80), extra=("https_port",))
    https_port = node.get("https_port").integer(1, 65535, optional=True)
    if tls is None and https.missing:
        node.problem(f"redirects to HTTPS, but {https.path} is not set")
    if tls is None:
        return None  # (a broken tls block is reported there)
    return Redirect(where.host, where.port, https_port)


def certificate_line(certificate: Certificate, now: float) -> str:
    """How check-config, the /status page and the log name a certificate in force:
    ``certs/site.pem: example.com, *.example.com; expires 2027-03-01 12:00 UTC (in 85
    days)``."""
    about = certificate.info
    ends = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(about.not_after))
    left = (about.not_after - now) / 86400
    when = f"in {left:.0f} days" if left >= 1 else f"in {left * 24:.1f} hours"
    if left <= 0:
        when = "EXPIRED"
    return f"{certificate.cert}: {describe(about)}; expires {ends} ({when})"


def changes(old: Config, new: Config) -> list[str]:
    """What a reload changed of HTTPS, for ``changes.describe``."""
    out = []
    before, after = old.proxy.tls, new.proxy.tls
    if (before is None) != (after is None):
        state = "on" if after is not None else "off"
        out.append(f"listen.proxy.tls: HTTPS {state} (takes effect after a restart)")
    elif before is not None and after is not None:
        was = [(c.cert, c.info.sha256) for c in before.certificates]
        now = [(c.cert, c.info.sha256) for c in after.certificates]
        if was != now:
            shown = "; ".join(certificate_line(c, time.time()) for c in after.certificates)
            out.append(f"listen.proxy.tls: certificates renewed or changed, now {shown}")
    if old.proxy.hsts != new.proxy.hsts:
        out.append(f"listen.proxy.hsts {_hsts(old.proxy.hsts)} -> {_hsts(new.proxy.hsts)}")
    if old.redirect != new.redirect:
        out.append("listen.redirect changed (takes effect after a restart)")
    return out


def _hsts(hsts: Hsts | None) -> str:
    return "none" if hsts is None else hsts.header()


_GEODE_TLS_KEYS = ("ca", "cert", "key", "server_name", "verify")


def geode_tls(node: Node, base: Path, reads: Reads, default: GeodeTLS) -> GeodeTLS:
    """A geode's ``tls`` block (or ``forwarding.tls``) over ``default``: each key given
    replaces the default's; a file that cannot be used is reported where it is named."""
    if node.missing or not node.expect_mapping(_GEODE_TLS_KEYS):
        return default
    out = default
    ca_node = node.get("ca")
    if not ca_node.missing and (ca := reads.read(ca_node, base)) is not None:
        try:
            certificates(ca[1])
        except PemError as exc:
            ca_node.problem(f"{ca[0]}: {exc}")
        else:
            out = dataclasses.replace(out, ca=ca[0], ca_pem=ca[1])
    cert_node, key_node = node.get("cert"), node.get("key")
    if cert_node.missing != key_node.missing:
        given, other = ("cert", "key") if key_node.missing else ("key", "cert")
        node.get(other).problem(f"a client certificate needs both cert and key ({given} is set)")
    elif not cert_node.missing:
        cert, key = reads.read(cert_node, base), reads.read(key_node, base)
        if cert is not None and key is not None and _checked_pair(node, cert, key):
            out = dataclasses.replace(
                out, cert=cert[0], cert_pem=cert[1], key=key[0], key_pem=key[1]
            )
    name_node = node.get("server_name")
    if not name_node.missing and (name := name_node.string()) is not None:
        if (why := _server_name_problem(name)) is not None:
            name_node.problem(why)
        else:
            out = dataclasses.replace(out, server_name=name)
    verify = node.get("verify").boolean(optional=True)
    return out if verify is None else dataclasses.replace(out, verify=verify)


def _checked_pair(
    node: Node, cert: tuple[Path, bytes], key: tuple[Path, bytes]
) -> CertificateInfo | None:
    """What the certificate says, or None after recording what is wrong with the pair
    (under ``cert``, ``key``, or the block for a pair that does not match)."""
    try:
        return check_pair(cert[1], key[1])
    except PairError as exc:
        for what, why in exc.parts:
            if what in _PAIR_KEYS:
                node.get(what).problem(f"{(cert if what == 'cert' else key)[0]}: {why}")
            else:
                node.problem(f"{cert[0]} and {key[0]}: {why}")
        return None


def _server_name_problem(text: str) -> str | None:
    if "/" in text or ":" in text or text != text.strip():
        return f"a host name only, without scheme, port or spaces: {text!r}"
    try:
        encoded = text.encode("idna").decode()
    except UnicodeError:
        return f"not a DNS name: {text!r}"
    if (why := host_name_problem(encoded)) is not None:
        return f"not a DNS name ({why}): {text!r}"
    return None
