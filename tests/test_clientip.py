"""Client-IP extraction: address parsing and the X-Forwarded-For walk over trusted hops."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network

import pytest

from geoproxy.routing.clientip import TrustedProxies, client_ip, parse_ip

# --- parse_ip -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("192.0.2.1", IPv4Address("192.0.2.1")),
        ("  192.0.2.1\t", IPv4Address("192.0.2.1")),
        ("2001:db8::1", IPv6Address("2001:db8::1")),
        ("2001:DB8::A", IPv6Address("2001:db8::a")),
        ("1.2.3.4:5678", IPv4Address("1.2.3.4")),
        ("[2001:db8::1]:443", IPv6Address("2001:db8::1")),
        ("[2001:db8::1]", IPv6Address("2001:db8::1")),
        ("::ffff:192.0.2.1", IPv4Address("192.0.2.1")),
        ("::ffff:c000:201", IPv4Address("192.0.2.1")),
        ("[::ffff:192.0.2.1]:8080", IPv4Address("192.0.2.1")),
        ("::1", IPv6Address("::1")),
    ],
    ids=[
        "ipv4",
        "ipv4-surrounding-whitespace",
        "ipv6",
        "ipv6-upper-case",
        "ipv4-with-port",
        "bracketed-ipv6-with-port",
        "bracketed-ipv6-without-port",
        "ipv4-mapped-ipv6-unmapped",
        "ipv4-mapped-ipv6-hex-form-unmapped",
        "bracketed-ipv4-mapped-with-port-unmapped",
        "ipv6-loopback",
    ],
)
def test_parse_ip_accepts_forms_proxies_write(
    text: str, expected: IPv4Address | IPv6Address
) -> None:
    ip = parse_ip(text)
    assert ip == expected
    assert type(ip) is type(expected)  # a mapped address comes back as IPv4, not IPv6


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "unknown",
        "not-an-ip",
        "1.2.3",
        "256.1.1.1",
        "1.2.3.4.5",
        "1.2.3.4:5678:9",
        "1.2.3.4:",
        "1.2.3.4:port",
        "1.2.3.4:-1",
        "[2001:db8::1",
        "[2001:db8::1]:https",
        "[2001:db8::1]junk",
        "2001:db8::1::2",
        "[]",
        "x" * 500,
        "1" * 500,
        "1.2.3.4" + " " * 500 + "5",
        "1.2.3.4\x00",
        "fe80::1%" + "x" * 100,
    ],
    ids=[
        "empty",
        "whitespace-only",
        "rfc7239-unknown",
        "word",
        "three-octets",
        "octet-out-of-range",
        "five-octets",
        "two-ports",
        "empty-port",
        "non-numeric-port",
        "negative-port",
        "unclosed-bracket",
        "bracketed-ipv6-with-named-port",
        "bracketed-ipv6-trailing-junk",
        "ipv6-two-double-colons",
        "empty-brackets",
        "500-letters",
        "500-digits",
        "500-chars-with-spaces",
        "nul-byte",
        "overlong-zone-id",
    ],
)
def test_parse_ip_returns_none_for_malformed_input(text: str) -> None:
    assert parse_ip(text) is None


# --- client_ip ----------------------------------------------------------------------------

PROXIES = ("10.0.0.0/8", "fd00::/8")


@pytest.mark.parametrize(
    ("peer", "xff", "trusted", "expected"),
    [
        ("203.0.113.7", ["198.51.100.23"], PROXIES, "203.0.113.7"),
        ("203.0.113.7", ["10.0.0.5, 198.51.100.23"], PROXIES, "203.0.113.7"),
        ("10.0.0.1", [], PROXIES, "10.0.0.1"),
        ("10.0.0.1", ["198.51.100.23"], PROXIES, "198.51.100.23"),
        ("10.0.0.1", ["198.51.100.23, 10.0.0.3, 10.0.0.2"], PROXIES, "198.51.100.23"),
        ("10.0.0.1", ["6.6.6.6, 198.51.100.23, 10.0.0.2"], PROXIES, "198.51.100.23"),
        ("10.0.0.1", ["6.6.6.6,198.51.100.23"], PROXIES, "198.51.100.23"),
        ("10.0.0.1", ["203.0.113.9", "198.51.100.23"], PROXIES, "198.51.100.23"),
        ("10.0.0.1", ["6.6.6.6, 198.51.100.23", "10.0.0.3", "10.0.0.2"], PROXIES, "198.51.100.23"),
        ("10.0.0.1", ["198.51.100.23, garbage, 10.0.0.2"], PROXIES, "10.0.0.2"),
        ("10.0.0.1", ["198.51.100.23, not-an-ip"], PROXIES, "10.0.0.1"),
        ("10.0.0.1", ["198.51.100.23,,10.0.0.2"], PROXIES, "10.0.0.2"),
        ("10.0.0.1", ["198.51.100.23, " + "9" * 500], PROXIES, "10.0.0.1"),
        ("10.0.0.1", ["10.0.0.9, 10.0.0.3"], PROXIES, "10.0.0.9"),
        ("10.0.0.1", ["198.51.100.23:4711, 10.0.0.2:80"], PROXIES, "198.51.100.23"),
        ("fd00::1", ["2001:db8::7, fd00::2"], PROXIES, "2001:db8::7"),
        ("fd00::1", ["2001:db8::66, 2001:db8::7, fd00::3, fd00::2"], PROXIES, "2001:db8::7"),
        ("fd00::1", ["[2001:db8::7]:51000, 10.0.0.2"], PROXIES, "2001:db8::7"),
        ("10.0.0.1", ["2001:db8::7, fd00::2"], PROXIES, "2001:db8::7"),
        ("fd00::1", ["fd00::9, fd00::2"], PROXIES, "fd00::9"),
        ("2001:db8::1", ["198.51.100.23"], PROXIES, "2001:db8::1"),
        ("::ffff:10.0.0.1", ["198.51.100.23, ::ffff:10.0.0.2"], PROXIES, "198.51.100.23"),
        ("10.0.0.1", ["198.51.100.23"], (), "10.0.0.1"),
        ("127.0.0.1", ["198.51.100.23"], ("127.0.0.1/32",), "198.51.100.23"),
    ],
    ids=[
        "untrusted-peer-ignores-xff-spoofing-attempt",
        "untrusted-peer-ignores-xff-even-with-trusted-looking-entries",
        "trusted-peer-without-xff-is-the-client",
        "trusted-peer-one-client",
        "chain-of-trusted-hops-skipped-right-to-left",
        "right-most-untrusted-wins-spoofed-left-most-ignored",
        "entries-without-spaces",
        "multiple-header-lines-read-in-arrival-order",
        "multiple-header-lines-joined-across-a-chain",
        "malformed-entry-stops-at-last-trusted-hop",
        "malformed-right-most-entry-falls-back-to-peer",
        "empty-entry-stops-the-walk",
        "overlong-entry-stops-the-walk",
        "all-entries-trusted-left-most-wins",
        "entries-with-ports",
        "ipv6-chain",
        "ipv6-chain-spoofed-left-most-ignored",
        "bracketed-ipv6-entry-behind-ipv4-hop",
        "ipv6-entries-behind-ipv4-peer",
        "ipv6-all-trusted-left-most-wins",
        "untrusted-ipv6-peer",
        "ipv4-mapped-peer-and-hop-are-trusted",
        "empty-trusted-list-ignores-xff",
        "single-host-trusted-cidr",
    ],
)
def test_client_ip_walks_forwarded_for_over_trusted_hops(
    peer: str, xff: list[str], trusted: tuple[str, ...], expected: str
) -> None:
    proxies = TrustedProxies(ip_network(n) for n in trusted)
    assert client_ip(parse_ip(peer), xff, proxies) == ip_address(expected)


def test_client_ip_is_none_without_a_peer() -> None:
    proxies = TrustedProxies([ip_network("10.0.0.0/8")])
    assert client_ip(None, ["198.51.100.23"], proxies) is None


@pytest.mark.parametrize(
    ("networks", "address", "expected"),
    [
        (["10.0.0.0/8"], "10.255.0.1", True),
        (["10.0.0.0/8"], "11.0.0.1", False),
        (["10.0.0.0/8"], "::ffff:a00:1", False),  # callers unmap first (parse_ip does)
        (["fd00::/8"], "fd12::1", True),
        (["fd00::/8"], "fe80::1", False),
        (["10.0.0.0/8", "fd00::/8"], "fd00::1", True),
        ([], "10.0.0.1", False),
    ],
    ids=[
        "v4-inside",
        "v4-outside",
        "v6-mapped-form-not-matched-by-v4-cidr",
        "v6-inside",
        "v6-outside",
        "mixed-list-v6-inside",
        "empty-list",
    ],
)
def test_trusted_proxies_membership(networks: list[str], address: str, expected: bool) -> None:
    proxies = TrustedProxies(ip_network(n) for n in networks)
    assert proxies.contains(ip_address(address)) is expected
    assert bool(proxies) is bool(networks)
