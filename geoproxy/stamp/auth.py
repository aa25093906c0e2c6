"""Peer authentication: every replication request carries an HMAC-SHA256, keyed with the
fleet's shared secret, over the method, the path and query, a timestamp, the sending
stamp's name and the body's SHA-256.

The receiver checks the signature (in constant time) before it reads the body, then the
body against its digest. A request is good for ``window`` seconds either side of its
timestamp: a replay after that is refused, and a replay within it re-sends changes whose
application is idempotent (last-write-wins, per-slot maximum), so it changes nothing.
The secret never appears in a log line, an error or a repr.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Collection, Mapping

PEER = "X-Stamp-Peer"
TIMESTAMP = "X-Stamp-Timestamp"
DIGEST = "X-Stamp-Content-SHA256"
SIGNATURE = "X-Stamp-Signature"
_SCHEME = "geoproxy-stamp-v1"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_TIME = re.compile(r"^\d{1,12}$")


class AuthError(Exception):
    """A request that is not from a peer; ``reason`` is a short metric label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message


def body_digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def _mac(secret: bytes, method: str, path_qs: str, timestamp: str, peer: str, digest: str) -> str:
    text = "\n".join((_SCHEME, method.upper(), path_qs, timestamp, peer, digest))
    return hmac.new(secret, text.encode(), hashlib.sha256).hexdigest()


def sign(
    secret: bytes, peer: str, method: str, path_qs: str, body: bytes, now: float | None = None
) -> dict[str, str]:
    """The headers that authenticate one request of ``peer`` (``path_qs`` as sent: the
    raw path and query)."""
    timestamp = str(int(time.time() if now is None else now))
    digest = body_digest(body)
    return {
        PEER: peer,
        TIMESTAMP: timestamp,
        DIGEST: digest,
        SIGNATURE: _mac(secret, method, path_qs, timestamp, peer, digest),
    }


def verify(
    secret: bytes | None,
    peers: Collection[str],
    window: float,
    method: str,
    path_qs: str,
    headers: Mapping[str, str],
    now: float | None = None,
) -> tuple[str, str]:
    """The signing peer's name and the body digest it signed (check the body against it
    once read); AuthError if the request is not signed by a configured peer, now."""
    if secret is None:
        raise AuthError("no_secret", "this stamp has no peer secret: it takes no replication")
    peer, timestamp = headers.get(PEER), headers.get(TIMESTAMP)
    digest, signature = headers.get(DIGEST), headers.get(SIGNATURE)
    if peer is None or timestamp is None or digest is None or signature is None:
        raise AuthError(
            "unsigned",
            f"a peer request needs {PEER}, {TIMESTAMP}, {DIGEST} and {SIGNATURE} headers",
        )
    if peer not in peers:
        raise AuthError("unknown_peer", f"{peer[:64]!r} is not a peer of this stamp")
    if not _TIME.match(timestamp) or not _HEX64.match(digest):
        raise AuthError("malformed", f"malformed {TIMESTAMP} or {DIGEST}")
    expected = _mac(secret, method, path_qs, timestamp, peer, digest)
    if not hmac.compare_digest(expected, signature):
        raise AuthError("bad_signature", "the signature does not match")
    skew = (time.time() if now is None else now) - int(timestamp)
    if abs(skew) > window:
        raise AuthError(
            "expired",
            f"signed {skew:.0f}s from now, outside the {window:g}s "
            "window (replayed, or the clocks are apart)",
        )
    return peer, digest


def claimed(peers: Collection[str], headers: Mapping[str, str]) -> tuple[str, str]:
    """Without a shared secret (mutual TLS alone vouches for the peer): the peer the
    request names and the body digest it sent, both well formed; the certificate check
    (stamp/tls.py) says whether the peer is who it claims."""
    peer, digest = headers.get(PEER), headers.get(DIGEST)
    if peer is None or digest is None:
        raise AuthError("unsigned", f"a peer request needs {PEER} and {DIGEST} headers")
    if peer not in peers:
        raise AuthError("unknown_peer", f"{peer[:64]!r} is not a peer of this stamp")
    if not _HEX64.match(digest):
        raise AuthError("malformed", f"malformed {DIGEST}")
    return peer, digest


def check_body(digest: str, body: bytes) -> None:
    """The body is the one that was signed."""
    if not hmac.compare_digest(digest, body_digest(body)):
        raise AuthError("bad_digest", "the body does not match its signed digest")
