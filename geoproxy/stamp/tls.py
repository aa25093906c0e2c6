"""TLS for the reference stamp: one ``tls`` block serves both listeners (the public API
and the peer listener) and replication to the peers.

    tls:
      cert: certs/stamp-eu-west.pem   # this stamp's certificate, its name in the SAN
      key: certs/stamp-eu-west.key
      ca: certs/fleet-ca.pem          # optional: the CA that signs the fleet's stamps

With ``ca`` the peers speak mutual TLS: the peer listener requires a client certificate
signed by that CA, replication presents this stamp's own and checks each peer's against
it, and a replication request is taken only when the client certificate names the peer
the request claims to come from (``check_peer``): a second way to authenticate peers,
besides the shared secret (either one alone will do; with both, both must hold).
The PEM files are read and checked by ``config/pem.py``, shared with the proxy.
"""

from __future__ import annotations

import ssl
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from geoproxy.config.pem import PemError, certificates, check_pair, load_chain_into
from geoproxy.config.schema import Node


@dataclass(frozen=True, slots=True)
class StampTLS:
    cert: Path  # PEM: this stamp's certificate (chain after it), served on both listeners
    # and presented to peers when it replicates.
    key: Path  # PEM: its private key, unencrypted.
    ca: Path | None = None  # PEM: the fleet's CA; set, the peers speak mutual TLS.
    cert_pem: bytes = field(default=b"", repr=False)  # the bytes read from the files
    key_pem: bytes = field(default=b"", repr=False)
    ca_pem: bytes | None = field(default=None, repr=False)

    @property
    def mutual(self) -> bool:
        """Peers must present a certificate signed by ``ca`` (mutual TLS)."""
        return self.ca is not None

    def server_context(self, *, peers: bool) -> ssl.SSLContext:
        """For a listener: the public one (``peers`` false), or the peer listener, which
        requires a client certificate when ``mutual``."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        load_chain_into(context, self.cert_pem, self.key_pem)
        if peers and self.ca_pem is not None:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cadata=self.ca_pem.decode("latin-1"))
        return context

    def client_context(self) -> ssl.SSLContext:
        """For replication: the peers' certificates checked against ``ca`` (else the
        system's store), this stamp's own presented."""
        cadata = self.ca_pem.decode("latin-1") if self.ca_pem is not None else None
        context = ssl.create_default_context(cadata=cadata)
        load_chain_into(context, self.cert_pem, self.key_pem)
        return context


def read(node: Node, base: Path) -> StampTLS | None:
    """The ``tls`` block (paths relative to the config file's folder), its files read and
    checked; None when it is absent or after recording what is wrong."""
    if node.missing or not node.expect_mapping(("cert", "key", "ca"), required=("cert", "key")):
        return None
    found: dict[str, tuple[Path, bytes]] = {}
    for key in ("cert", "key", "ca"):
        sub = node.get(key)
        if sub.missing or (text := sub.string()) is None:
            continue
        path = base / text
        try:
            found[key] = (path, path.read_bytes())
        except OSError as exc:
            sub.problem(f"cannot read {path}: {exc.strerror or exc}")
    if "ca" in found:
        try:
            certificates(found["ca"][1])
        except PemError as exc:
            node.get("ca").problem(f"{found['ca'][0]}: {exc}")
            return None
    if "cert" not in found or "key" not in found:
        return None
    try:
        check_pair(found["cert"][1], found["key"][1])
    except PemError as exc:
        node.problem(f"{found['cert'][0]} and {found['key'][0]}: {exc}")
        return None
    ca = found.get("ca")
    return StampTLS(
        cert=found["cert"][0],
        key=found["key"][0],
        ca=ca[0] if ca else None,
        cert_pem=found["cert"][1],
        key_pem=found["key"][1],
        ca_pem=ca[1] if ca else None,
    )


def certificate_names(peercert: Mapping[str, Any] | None) -> set[str]:
    """The DNS names and IP addresses in a verified peer certificate's SAN (what
    ``SSLObject.getpeercert()`` gives; empty without one)."""
    if not peercert:
        return set()
    return {
        str(value)
        for kind, value in peercert.get("subjectAltName", ())
        if kind
        in (
            "DNS",
            "IP Address",
        )
    }


def peer_mismatch(peer: str, names: Collection[str]) -> str | None:
    """Why a client certificate with ``names`` may not speak for ``peer``, or None: its
    subjectAltName must carry the peer's configured name. The host of the peer's URL does
    not do: stamps that share a host, an address or a VIP would speak for each other."""
    if not names:
        return "no client certificate (mutual TLS is on: the peer must present one)"
    if peer in names:
        return None
    shown = ", ".join(sorted(names))
    return f"the client certificate names {shown}, not peer {peer!r}"
