"""PEM certificates and keys: read, inspected and matched, and loaded into an
``ssl.SSLContext`` from the bytes the config was read from.

Shared by every TLS block of the config (the proxy listener's certificates, a geode's CA
and client certificate). The checks name what is wrong in words an operator can act on
("the key does not belong to the certificate"), not OpenSSL's codes; the config readers
put the YAML path in front.

``cryptography`` reads what the standard library cannot: a certificate's names and
validity, and whether a key belongs to it, before the context is built.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import ssl
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from geoproxy.errors import GeoproxyError

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import types

# ``cryptography`` is imported where a certificate or key is read, not with this module:
# it is ~9 MiB of resident memory that a proxy without TLS never needs (every process
# imports this module through config.values).


class PemError(GeoproxyError):
    """A PEM file does not hold what it should; the message says what, without a path."""


@dataclass(frozen=True, slots=True)
class CertificateInfo:
    """What a certificate says of itself: what operators see in check-config, /status and
    the logs, and what SNI selects by."""

    subject: str  # RFC 4514, e.g. "CN=example.com,O=Example"
    issuer: str
    names: tuple[str, ...]  # its DNS names and IP addresses (subjectAltName), as written;
    # a wildcard as "*.example.com"
    not_before: float  # epoch seconds
    not_after: float  # epoch seconds: it expires then
    serial: str  # hex
    sha256: str  # hex fingerprint of the leaf, as `openssl x509 -fingerprint -sha256`


def certificates(data: bytes) -> list[x509.Certificate]:
    """The certificates of a PEM chain, leaf first; PemError when there is none or one
    is malformed."""
    if b"-----BEGIN" not in data:
        raise PemError("not a PEM file (no '-----BEGIN' line)")
    if b"PRIVATE KEY-----" in data and b"CERTIFICATE-----" not in data:
        raise PemError("holds a private key, not a certificate (are cert and key swapped?)")
    from cryptography import x509

    try:
        found = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise PemError(f"no readable certificate in it ({exc})") from None
    return found


def private_key(data: bytes) -> types.PrivateKeyTypes:
    """The private key of a PEM file (unencrypted); PemError otherwise."""
    if b"-----BEGIN" not in data:
        raise PemError("not a PEM file (no '-----BEGIN' line)")
    if b"ENCRYPTED" in data:
        raise PemError("the key is encrypted with a passphrase; give an unencrypted key")
    if b"PRIVATE KEY-----" not in data and b"CERTIFICATE-----" in data:
        raise PemError("holds a certificate, not a private key (are cert and key swapped?)")
    from cryptography.hazmat.primitives import serialization

    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise PemError(f"no readable private key in it ({exc})") from None
    except Exception as exc:  # cryptography's UnsupportedAlgorithm: not a ValueError
        raise PemError(f"unsupported private key ({exc})") from None


def _public(key: types.PrivateKeyTypes | types.CertificatePublicKeyTypes) -> bytes:
    from cryptography.hazmat.primitives import serialization

    public = key.public_key() if hasattr(key, "public_key") else key
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def key_matches(leaf: x509.Certificate, key: types.PrivateKeyTypes) -> bool:
    """True when ``key`` is the private half of the certificate's public key."""
    return _public(key) == _public(leaf.public_key())


def info(leaf: x509.Certificate) -> CertificateInfo:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [*san.get_values_for_type(x509.DNSName)]
        names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        names = []
    return CertificateInfo(
        subject=leaf.subject.rfc4514_string(),
        issuer=leaf.issuer.rfc4514_string(),
        names=tuple(names),
        not_before=leaf.not_valid_before_utc.timestamp(),
        not_after=leaf.not_valid_after_utc.timestamp(),
        serial=f"{leaf.serial_number:x}",
        sha256=hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)).hexdigest(),
    )


class PairError(PemError):
    """What is wrong with a certificate and its key: ``parts`` of (``cert``, ``key`` or
    ``pair``, the reason), each for its own line."""

    def __init__(self, parts: list[tuple[str, str]]) -> None:
        self.parts = parts
        super().__init__("; ".join(f"{what}: {why}" for what, why in parts))


#: A certificate expiring sooner than this is warned about (check-config, start-up,
#: reloads); the alert rule in deploy/prometheus fires at the same point.
EXPIRY_WARNING_DAYS = 14


def expiry_warning(about: CertificateInfo, now: float) -> str | None:
    """Why a certificate needs renewing now (expired, expiring within
    ``EXPIRY_WARNING_DAYS``, not valid yet), or None."""
    ends = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(about.not_after))
    left = about.not_after - now
    if left <= 0:
        return f"the certificate ({describe(about)}) expired on {ends}: clients refuse it"
    if left < EXPIRY_WARNING_DAYS * 86400:
        return (
            f"the certificate ({describe(about)}) expires in {left / 86400:.1f} days, "
            f"on {ends}: renew it"
        )
    if about.not_before > now:
        starts = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(about.not_before))
        return f"the certificate ({describe(about)}) is not valid before {starts}"
    return None


def describe(about: CertificateInfo) -> str:
    """Its names, else its subject: how messages name a certificate."""
    return ", ".join(about.names) or about.subject


def check_pair(chain: bytes, key: bytes) -> CertificateInfo:
    """A certificate chain and its key, checked (both parse, the key is the leaf's);
    what the leaf says. PairError names what is wrong and in which of the two."""
    parts: list[tuple[str, str]] = []
    leaf = secret = None
    try:
        leaf = certificates(chain)[0]
    except PemError as exc:
        parts.append(("cert", str(exc)))
    try:
        secret = private_key(key)
    except PemError as exc:
        parts.append(("key", str(exc)))
    if leaf is not None and secret is not None and not key_matches(leaf, secret):
        about = info(leaf)
        parts.append(
            (
                "pair",
                "the key does not belong to the certificate "
                f"({describe(about)}): its public key differs",
            )
        )
    if parts or leaf is None:
        raise PairError(parts)
    return info(leaf)


@contextlib.contextmanager
def _as_file(data: bytes) -> Iterator[str]:
    """A path whose file holds ``data``, for OpenSSL's file-only loaders: an anonymous
    in-memory file on Linux (a private key never touches a disk), else a file in a
    private temporary folder, removed at once."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("geoproxy-pem", os.MFD_CLOEXEC)
        try:
            os.write(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="geoproxy-pem-") as folder:  # mode 0700
        path = Path(folder) / "pem"
        path.write_bytes(data)
        yield str(path)


def load_chain_into(context: ssl.SSLContext, chain: bytes, key: bytes) -> None:
    """``context.load_cert_chain`` from bytes; PemError (OpenSSL's reason) when OpenSSL
    refuses them (a key too small for its security level, say)."""
    try:
        with _as_file(chain) as cert_path, _as_file(key) as key_path:
            context.load_cert_chain(cert_path, key_path)
    except ssl.SSLError as exc:
        raise PemError(f"OpenSSL refuses the certificate and key: {exc.reason or exc}") from None
