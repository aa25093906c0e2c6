"""The real client IP: the TCP peer, or, when the peer is a trusted proxy, the right-most
untrusted address in ``X-Forwarded-For``. Pure functions over values."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from functools import lru_cache

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@lru_cache(maxsize=4096)
def parse_ip(text: str) -> IPAddress | None:
    """An address from a peer or an XFF entry; ``None`` when malformed. Accepts the forms
    proxies write (``1.2.3.4:5678``, ``[2001:db8::1]:443``) and unmaps ``::ffff:a.b.c.d``."""
    text = text.strip()
    if not text or len(text) > 64:
        return None
    if text.startswith("["):
        end = text.find("]")
        rest = text[end + 1 :] if end >= 0 else ""
        if end < 0 or (rest and not (rest[0] == ":" and _is_port(rest[1:]))):
            return None
        text = text[1:end]
    elif text.count(":") == 1:
        text, port = text.split(":", 1)
        if not _is_port(port):
            return None  # "1.2.3.4:http" is garbage, not 1.2.3.4
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _is_port(text: str) -> bool:
    return 0 < len(text) <= 5 and text.isascii() and text.isdigit()


class TrustedProxies:
    """Membership test over the ``trusted_proxies`` CIDRs, cached per address."""

    def __init__(self, networks: Iterable[IPNetwork]) -> None:
        self.networks = tuple(networks)
        self._v4 = tuple(n for n in self.networks if n.version == 4)
        self._v6 = tuple(n for n in self.networks if n.version == 6)
        self.contains = lru_cache(maxsize=4096)(self._contains)
        self.peer = lru_cache(maxsize=4096)(self._peer)

    def _contains(self, ip: IPAddress) -> bool:
        nets = self._v4 if ip.version == 4 else self._v6
        return any(ip in net for net in nets)

    def _peer(self, remote: str) -> tuple[IPAddress | None, bool]:
        """The TCP peer's address (``None`` when malformed) and whether it is trusted,
        cached by the text the transport gave."""
        ip = parse_ip(remote)
        return ip, ip is not None and self.contains(ip)

    def __bool__(self) -> bool:
        return bool(self.networks)


def client_ip(
    peer: IPAddress | None, forwarded_for: Iterable[str], trusted: TrustedProxies
) -> IPAddress | None:
    """Walk ``X-Forwarded-For`` right to left over trusted hops.

    ``forwarded_for`` are the raw header values in arrival order. Only a trusted peer's XFF
    is read. The walk stops at the first untrusted address (the client) or at a malformed
    entry, in which case the last address known good (a trusted hop) is the answer: nothing
    to the left of garbage is believed.
    """
    if peer is None or not trusted or not trusted.contains(peer):
        return peer
    current = peer
    entries = [e for value in forwarded_for for e in value.split(",")]
    for entry in reversed(entries):
        ip = parse_ip(entry)
        if ip is None:
            return current
        current = ip
        if not trusted.contains(ip):
            return ip
    return current
