"""TLS to geodes at run time: one ``ssl.SSLContext`` per ``https://`` geode, shared by its
health checks and its traffic (the lean client, aiohttp's session, WebSockets), and the
reason a handshake failed, in words and as a metric label.

In the health stage: the lowest stage that speaks to geodes; the proxy stage and the
composition root use the same ``GeodeContexts``. A context is rebuilt only when its
``tls`` block or the bytes of one of its files changed (a reload after a renewal).
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable
from dataclasses import dataclass

import aiohttp

from geoproxy.config.pem import PemError, load_chain_into
from geoproxy.config.values import Geode, GeodeTLS
from geoproxy.errors import GeoproxyError

#: Metric label values of ``TLSFailure.reason`` (a bounded set).
UNTRUSTED = "untrusted"  # signed by no CA this geode's tls.ca (or the system) trusts
EXPIRED = "expired"
NOT_YET_VALID = "not_yet_valid"
HOSTNAME_MISMATCH = "hostname_mismatch"
VERIFY_FAILED = "verify_failed"  # another verification error
CLIENT_CERT_REQUIRED = "client_cert_required"  # the geode wants one, none is configured
CLIENT_CERT_REFUSED = "client_cert_refused"  # the geode does not accept ours
NOT_TLS = "not_tls"  # the geode's port does not speak TLS (an http:// port?)
HANDSHAKE_TIMEOUT = "handshake_timeout"
HANDSHAKE_FAILED = "handshake_failed"  # anything else (no shared cipher, a reset, ...)
REASONS = (
    UNTRUSTED,
    EXPIRED,
    NOT_YET_VALID,
    HOSTNAME_MISMATCH,
    VERIFY_FAILED,
    CLIENT_CERT_REQUIRED,
    CLIENT_CERT_REFUSED,
    NOT_TLS,
    HANDSHAKE_TIMEOUT,
    HANDSHAKE_FAILED,
)

# OpenSSL's X509_V_ERR_* codes (x509_vfy.h), as ``SSLCertVerificationError.verify_code``.
_VERIFY_REASONS = {
    2: UNTRUSTED,  # unable to get issuer certificate
    9: NOT_YET_VALID,
    10: EXPIRED,
    18: UNTRUSTED,  # self-signed certificate
    19: UNTRUSTED,  # self-signed certificate in certificate chain
    20: UNTRUSTED,  # unable to get local issuer certificate
    21: UNTRUSTED,  # unable to verify the first certificate
    62: HOSTNAME_MISMATCH,
    64: HOSTNAME_MISMATCH,  # IP address mismatch
}
# What the geode's alert says about our client certificate (OpenSSL reason names).
_ALERTS = {
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": (
        CLIENT_CERT_REQUIRED,
        "the geode requires a client certificate (tls.cert and tls.key)",
    ),
    "TLSV1_ALERT_UNKNOWN_CA": (
        CLIENT_CERT_REFUSED,
        "the geode refused the client certificate: its CA is unknown to the geode",
    ),
    "SSLV3_ALERT_BAD_CERTIFICATE": (
        CLIENT_CERT_REFUSED,
        "the geode refused the client certificate (bad certificate)",
    ),
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": (
        CLIENT_CERT_REFUSED,
        "the geode refused the client certificate: it has expired",
    ),
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": (
        CLIENT_CERT_REFUSED,
        "the geode refused the client certificate (certificate unknown)",
    ),
    "WRONG_VERSION_NUMBER": (
        NOT_TLS,
        "the geode did not answer in TLS (is it an http:// port?)",
    ),
}


@dataclass(frozen=True, slots=True)
class TLSFailure:
    """Why a TLS handshake with a geode failed."""

    reason: str  # one of REASONS: the metric label
    detail: str  # for people: "certificate verify failed: certificate has expired"

    def message(self, geode: str) -> str:
        """The line logs, ``/geodes`` and the access log show."""
        return f"{self.detail} (geode {geode})"


def failure_of(exc: BaseException) -> TLSFailure | None:
    """The TLS failure ``exc`` is, or carries (aiohttp wraps OpenSSL's errors), or
    ``None`` when it is none."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        exc = exc.certificate_error
    elif isinstance(exc, aiohttp.ClientConnectorSSLError):
        exc = exc.os_error
    return describe(exc) if isinstance(exc, ssl.SSLError) else None


def describe(exc: ssl.SSLError) -> TLSFailure:
    """What OpenSSL's error says, for people and as a reason label."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        text = exc.verify_message or exc.reason or str(exc)
        return TLSFailure(
            _VERIFY_REASONS.get(exc.verify_code, VERIFY_FAILED),
            f"certificate verify failed: {text}",
        )
    name = str(exc.reason or "")
    if name in _ALERTS:
        return TLSFailure(*_ALERTS[name])
    return TLSFailure(HANDSHAKE_FAILED, f"TLS handshake failed: {name or exc}")


def broken_handshake(exc: OSError) -> TLSFailure:
    """The connection ended during the handshake (the geode reset or closed it)."""
    return TLSFailure(HANDSHAKE_FAILED, f"TLS handshake failed: {exc.strerror or exc}")


def handshake_timeout(seconds: float) -> TLSFailure:
    return TLSFailure(HANDSHAKE_TIMEOUT, f"TLS handshake timeout ({seconds:g}s)")


def server_name(geode: Geode) -> str:
    """The name sent in SNI and checked in the geode's certificate."""
    return geode.tls.server_name or geode.url.host or ""


def build_context(tls: GeodeTLS) -> ssl.SSLContext:
    """A client context for ``tls``, from the bytes the config was read from: its CA
    bundle instead of the system's store, its client certificate, no verification only
    when ``verify`` is false. ``GeoproxyError`` when OpenSSL refuses what was checked."""
    try:
        cadata = tls.ca_pem.decode("latin-1") if tls.ca_pem is not None else None
        context = ssl.create_default_context(cadata=cadata)
    except ssl.SSLError as exc:
        raise GeoproxyError(f"{tls.ca}: OpenSSL refuses the CA bundle: {exc.reason}") from None
    if tls.cert_pem is not None and tls.key_pem is not None:
        try:
            load_chain_into(context, tls.cert_pem, tls.key_pem)
        except PemError as exc:
            raise GeoproxyError(f"{tls.cert} and {tls.key}: {exc}") from None
    if not tls.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


@dataclass(frozen=True, slots=True)
class Prepared:
    """Contexts built for a config, not yet in use (``GeodeContexts.prepare``)."""

    by_geode: dict[str, ssl.SSLContext]
    built: dict[GeodeTLS, ssl.SSLContext]


class GeodeContexts:
    """The TLS context of every ``https://`` geode, by name. For each config (start-up,
    every reload): ``prepare`` builds what is new or changed (a context whose block and
    files are unchanged is kept, and with it aiohttp's pooled connections), ``adopt``
    puts them in use."""

    def __init__(self) -> None:
        self._by_geode: dict[str, ssl.SSLContext] = {}
        self._built: dict[GeodeTLS, ssl.SSLContext] = {}

    def prepare(self, geodes: Iterable[Geode]) -> Prepared:
        """Contexts for ``geodes``; raises ``GeoproxyError`` if one cannot be built, and
        then nothing changed."""
        prepared = Prepared({}, {})
        for geode in geodes:
            if geode.url.scheme != "https":
                continue
            key = geode.tls  # with the bytes of its files: a renewal is another key
            context = prepared.built.get(key) or self._built.get(key) or build_context(geode.tls)
            prepared.built[key] = prepared.by_geode[geode.name] = context
        return prepared

    def adopt(self, prepared: Prepared) -> list[str]:
        """Use ``prepared`` from now on; the names of the geodes whose context is new."""
        old = self._by_geode
        self._by_geode, self._built = prepared.by_geode, prepared.built
        return [name for name, context in prepared.by_geode.items() if old.get(name) is not context]

    def get(self, geode: Geode) -> ssl.SSLContext | None:
        """The geode's context; ``None`` for an ``http://`` geode."""
        return self._by_geode.get(geode.name)
