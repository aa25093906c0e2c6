"""The proxy listener's HTTPS: server contexts per certificate, chosen by SNI, swapped
on reload without touching open connections.

The listener is opened once with a *front* context and never with another. Its SNI
callback (which OpenSSL calls for every handshake, with or without SNI) hands the
connection the context of the certificate that serves the name asked for
(``ListenerTls.select``); a reload swaps the set of contexts in one assignment, so the
next handshake gets the new certificate while established connections keep the one
they were made with. Session tickets and the session cache belong to the front context
(OpenSSL's ``session_ctx`` does not follow the switch), so a client resumes its session
across certificate rotations. (Each process has its own: under ``--workers`` a client
resumes when the kernel hands it the same worker again.)

The profile is Mozilla's "intermediate" (TLS 1.2 and 1.3, its TLS 1.2 cipher list,
the client's cipher preference honoured), ALPN ``http/1.1``.
"""

from __future__ import annotations

import ssl

from geoproxy.config.pem import PemError, load_chain_into
from geoproxy.config.values import Certificate, ListenerTls, sni_index

#: Mozilla's "intermediate" TLS 1.2 ciphers (server side TLS guidelines 5.7) without
#: the DHE ones, which need DH parameters the profile gives as a file to download:
#: every client of the profile's list negotiates ECDHE. TLS 1.3's suites are OpenSSL's
#: defaults, which are the profile's.
INTERMEDIATE_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    )
)
ALPN = ("http/1.1",)


def server_context(certificate: Certificate | None = None) -> ssl.SSLContext:
    """A server context of the profile, with ``certificate`` loaded (PemError when
    OpenSSL refuses it)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(INTERMEDIATE_CIPHERS)
    context.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE  # the profile: the client's order
    context.set_alpn_protocols(list(ALPN))
    if certificate is not None:
        load_chain_into(context, certificate.chain, certificate.secret)
    return context


Contexts = tuple[ListenerTls, tuple[ssl.SSLContext, ...]]


def contexts_for(tls: ListenerTls) -> Contexts:
    """One context per certificate, in order; PemError naming the YAML path and the
    files when OpenSSL refuses one."""
    made = []
    for certificate in tls.certificates:
        try:
            made.append(server_context(certificate))
        except PemError as exc:
            files = f"{certificate.cert} and {certificate.key}"
            raise PemError(f"{certificate.where}: {files}: {exc}") from None
    return tls, tuple(made)


class Terminator:
    """The front context of the proxy listener and the certificates it serves now."""

    def __init__(self, tls: ListenerTls) -> None:
        self._now = contexts_for(tls)
        self.front = server_context()  # its certificate comes from the SNI callback
        self.front.sni_callback = self._choose

    @property
    def tls(self) -> ListenerTls:
        return self._now[0]

    def adopt(self, contexts: Contexts) -> None:
        """Serve these from the next handshake on (``contexts_for`` built them)."""
        self._now = contexts

    def _choose(self, conn: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
        tls, contexts = self._now  # one read: a swap between two reads would mix sets
        conn.context = contexts[sni_index(tls, server_name)]
