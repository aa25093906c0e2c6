"""Certificates for the HTTPS tests, made by ``trustme`` at test time: a throwaway CA and
leaf certificates written as PEM files, and client contexts that trust the CA."""

from __future__ import annotations

import datetime
import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme
from cryptography import x509


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path
    serial: int

    def entry(self) -> dict[str, str]:
        """As the config names it (``{cert, key}``), relative to the config's folder."""
        return {"cert": self.cert.name, "key": self.key.name}


class Authority:
    """A CA that writes its leaves into ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.ca = trustme.CA()
        self.folder = folder

    def issue(
        self,
        name: str,
        *names: str,
        days: float = 90,
        file: str | None = None,
        expired: bool = False,
    ) -> Pair:
        """A leaf for ``name`` (and ``names``) valid for ``days`` from an hour ago (or,
        ``expired``, for a day that ended yesterday), written to ``FILE.pem`` and
        ``FILE.key`` (``file`` defaults to ``name``)."""
        now = datetime.datetime.now(datetime.UTC)
        start = now - (datetime.timedelta(days=2) if expired else datetime.timedelta(hours=1))
        end = now - datetime.timedelta(days=1) if expired else now + datetime.timedelta(days=days)
        leaf = self.ca.issue_cert(name, *names, not_before=start, not_after=end)
        stem = file or name.replace("*", "star")
        cert, key = self.folder / f"{stem}.pem", self.folder / f"{stem}.key"
        write_atomically(cert, b"".join(p.bytes() for p in leaf.cert_chain_pems))
        write_atomically(key, leaf.private_key_pem.bytes())
        serial = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).serial_number
        return Pair(cert, key, serial)

    def ca_file(self, file: str = "ca") -> Path:
        """The CA's certificate, written to ``FILE.pem``: what a ``tls.ca`` names."""
        path = self.folder / f"{file}.pem"
        write_atomically(path, self.ca.cert_pem.bytes())
        return path

    def server(self, pair: Pair, client_ca: Path | None = None) -> ssl.SSLContext:
        """A server context presenting ``pair``; with ``client_ca``, one that requires a
        client certificate signed by that CA (mutual TLS)."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(pair.cert, pair.key)
        if client_ca is not None:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cafile=client_ca)
        return context

    def client(self, **options: object) -> ssl.SSLContext:
        """A client context that trusts this CA (and checks host names)."""
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        for name, value in options.items():
            setattr(context, name, value)
        return context


def write_atomically(path: Path, data: bytes) -> None:
    """As certbot and cert-manager do: a new file renamed over the old one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
