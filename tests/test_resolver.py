"""Region resolution over a real topology (loaded through the YAML loader) and real .mmdb
files: headers, trust, source order, GeoIP and the default region, with every step."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any

import pytest
from mmdb_writer import MMDBWriter
from multidict import CIMultiDict
from netaddr import IPSet

from geoproxy.config import loader as config_mod
from geoproxy.config.model import Topology
from geoproxy.errors import GeoIPError, GeoIPLookupError
from geoproxy.routing.clientip import IPAddress
from geoproxy.routing.geoip import GeoAnswer, MaxMindLookup
from geoproxy.routing.resolver import Resolution, ResolutionCache, resolve

from conftest import GEO_LOCATIONS, base_config

WriteConfig = Callable[..., Path]
MakeMmdb = Callable[..., Path]

GEODES = [
    {"name": "eu-1", "region": "eu-west", "url": "http://127.0.0.1:9101"},
    {"name": "us-1", "region": "us-east", "url": "http://127.0.0.1:9102"},
    {"name": "ap-1", "region": "ap-northeast", "url": "http://127.0.0.1:9103"},
]
# South America and Antarctica are left unmapped, so BR and AQ resolve to no region.
CONTINENTS = {
    "EU": "eu-west",
    "NA": "us-east",
    "AS": "ap-northeast",
    "AF": "eu-west",
    "OC": "ap-northeast",
}
CLIENT = ip_address("198.51.100.7")

XCR, CF, GEO = "x-client-region", "cf-ipcountry", "geoip"


def topology_of(write_config: WriteConfig, **overrides: Any) -> Topology:
    data = base_config(GEODES, **{"continents": CONTINENTS, **overrides})
    return Topology.build(config_mod.load(write_config(data)))


@pytest.fixture
def headers_topology(write_config: WriteConfig) -> Topology:
    return topology_of(write_config)


# --- headers ------------------------------------------------------------------------------

# (headers, region, source, country, steps)
HEADER_CASES: list[tuple[dict[str, str], str, str, str | None, tuple[tuple[str, str], ...]]] = [
    ({"X-Client-Region": "us-east"}, "us-east", XCR, None, ((XCR, "ok"),)),
    ({"x-client-region": "  AP-Northeast\t"}, "ap-northeast", XCR, None, ((XCR, "ok"),)),
    ({"X-CLIENT-REGION": "US-EAST"}, "us-east", XCR, None, ((XCR, "ok"),)),
    ({"X-Client-Region": "jp"}, "ap-northeast", XCR, "JP", ((XCR, "ok"),)),
    ({"X-Client-Region": " US "}, "us-east", XCR, "US", ((XCR, "ok"),)),
    ({"X-Client-Region": "KR"}, "ap-northeast", XCR, "KR", ((XCR, "ok"),)),
    ({"X-Client-Region": "BR"}, "eu-west", "default", None, ((XCR, "unknown"), (CF, "absent"))),
    (
        {"X-Client-Region": "BR", "CF-IPCountry": "US"},
        "us-east",
        CF,
        "US",
        ((XCR, "unknown"), (CF, "ok")),
    ),
    ({"CF-IPCountry": "US"}, "us-east", CF, "US", ((XCR, "absent"), (CF, "ok"))),
    ({"cf-ipcountry": "jp"}, "ap-northeast", CF, "JP", ((XCR, "absent"), (CF, "ok"))),
    ({"CF-IPCountry": "KR"}, "ap-northeast", CF, "KR", ((XCR, "absent"), (CF, "ok"))),
    ({"CF-IPCountry": "AQ"}, "eu-west", "default", None, ((XCR, "absent"), (CF, "unknown"))),
    ({"CF-IPCountry": "XX"}, "eu-west", "default", None, ((XCR, "absent"), (CF, "unknown"))),
    ({"CF-IPCountry": "T1"}, "eu-west", "default", None, ((XCR, "absent"), (CF, "unknown"))),
    ({"CF-IPCountry": "us-east"}, "eu-west", "default", None, ((XCR, "absent"), (CF, "invalid"))),
    (
        {"X-Client-Region": "ap-northeast", "CF-IPCountry": "US"},
        "ap-northeast",
        XCR,
        None,
        ((XCR, "ok"),),
    ),
    ({}, "eu-west", "default", None, ((XCR, "absent"), (CF, "absent"))),
    ({"X-Other": "us-east"}, "eu-west", "default", None, ((XCR, "absent"), (CF, "absent"))),
]


@pytest.mark.parametrize(
    ("headers", "region", "source", "country", "steps"),
    HEADER_CASES,
    ids=[
        "client-region-as-region-id",
        "client-region-any-case-and-whitespace",
        "client-region-header-name-any-case",
        "client-region-as-lower-case-country-code",
        "client-region-country-code-with-whitespace",
        "client-region-country-code-via-continent",
        "client-region-unmapped-country-falls-to-default",
        "client-region-unmapped-country-falls-through-to-cf-ipcountry",
        "cf-ipcountry",
        "cf-ipcountry-lower-case",
        "cf-ipcountry-via-continent",
        "cf-ipcountry-unmapped-country-unknown",
        "cf-ipcountry-xx-unknown-falls-through",
        "cf-ipcountry-t1-tor-unknown-falls-through",
        "cf-ipcountry-region-id-is-not-a-country",
        "client-region-beats-cf-ipcountry-by-default-order",
        "no-headers-default",
        "unrelated-header-default",
    ],
)
def test_resolves_region_from_trusted_headers(
    headers_topology: Topology,
    headers: dict[str, str],
    region: str,
    source: str,
    country: str | None,
    steps: tuple[tuple[str, str], ...],
) -> None:
    got = resolve(headers_topology, CIMultiDict(headers), True, CLIENT, None)
    assert got == Resolution(region, source, country, CLIENT, steps)


GARBAGE = {
    "unassigned-code": "ZZ",
    "500-chars": "Q" * 500,
    "non-ascii": "FRé",
    "nul": "F\x00R",
    "crlf-injection": "eu-west\r\nX-Evil: 1",
    "del-char": "\x7f",
    "empty": "",
    "whitespace-only": "   ",
    "underscore-region": "eu_west",
    "flag-emoji": "🇫🇷",
    "long-s-upper-cases-to-us": "u\u017f",
    "tab-inside": "U\tS",
}


@pytest.mark.parametrize("value", GARBAGE.values(), ids=GARBAGE.keys())
def test_garbage_client_region_is_invalid_and_falls_through_to_cf_ipcountry(
    headers_topology: Topology, value: str
) -> None:
    headers = CIMultiDict({"X-Client-Region": value, "CF-IPCountry": "JP"})
    got = resolve(headers_topology, headers, True, CLIENT, None)
    assert got == Resolution("ap-northeast", CF, "JP", CLIENT, ((XCR, "invalid"), (CF, "ok")))


@pytest.mark.parametrize("value", GARBAGE.values(), ids=GARBAGE.keys())
def test_garbage_cf_ipcountry_is_invalid_and_falls_to_default(
    headers_topology: Topology, value: str
) -> None:
    got = resolve(headers_topology, CIMultiDict({"CF-IPCountry": value}), True, CLIENT, None)
    assert got == Resolution("eu-west", "default", None, CLIENT, ((XCR, "absent"), (CF, "invalid")))


def test_untrusted_peer_cannot_set_client_region_or_country(headers_topology: Topology) -> None:
    headers = CIMultiDict({"X-Client-Region": "ap-northeast", "CF-IPCountry": "US"})
    got = resolve(headers_topology, headers, False, CLIENT, None)
    assert got == Resolution(
        "eu-west", "default", None, CLIENT, ((XCR, "untrusted"), (CF, "untrusted"))
    )


def test_untrusted_peer_without_headers_reports_absent_not_untrusted(
    headers_topology: Topology,
) -> None:
    got = resolve(headers_topology, CIMultiDict(), False, CLIENT, None)
    assert got.steps == ((XCR, "absent"), (CF, "absent"))


# (region_sources, headers, region, source, country, steps)
ORDER_CASES: list[
    tuple[list[str], dict[str, str], str, str, str | None, tuple[tuple[str, str], ...]]
] = [
    (
        [CF, XCR],
        {"X-Client-Region": "ap-northeast", "CF-IPCountry": "US"},
        "us-east",
        CF,
        "US",
        ((CF, "ok"),),
    ),
    (
        [CF, XCR],
        {"X-Client-Region": "ap-northeast", "CF-IPCountry": "XX"},
        "ap-northeast",
        XCR,
        None,
        ((CF, "unknown"), (XCR, "ok")),
    ),
    (
        [CF, XCR],
        {"X-Client-Region": "ap-northeast"},
        "ap-northeast",
        XCR,
        None,
        ((CF, "absent"), (XCR, "ok")),
    ),
    ([CF], {"X-Client-Region": "ap-northeast"}, "eu-west", "default", None, ((CF, "absent"),)),
    ([XCR], {"CF-IPCountry": "US"}, "eu-west", "default", None, ((XCR, "absent"),)),
]


@pytest.mark.parametrize(
    ("sources", "headers", "region", "source", "country", "steps"),
    ORDER_CASES,
    ids=[
        "cf-ipcountry-first-wins-over-client-region",
        "cf-ipcountry-first-unknown-then-client-region",
        "cf-ipcountry-first-absent-then-client-region",
        "client-region-not-listed-is-never-read",
        "cf-ipcountry-not-listed-is-never-read",
    ],
)
def test_region_sources_are_consulted_in_config_order(
    write_config: WriteConfig,
    sources: list[str],
    headers: dict[str, str],
    region: str,
    source: str,
    country: str | None,
    steps: tuple[tuple[str, str], ...],
) -> None:
    topology = topology_of(write_config, region_sources=sources)
    assert topology.config.region_sources == tuple(sources)
    got = resolve(topology, CIMultiDict(headers), True, CLIENT, None)
    assert got == Resolution(region, source, country, CLIENT, steps)


# --- GeoIP --------------------------------------------------------------------------------

EDITIONS = [("City", 4), ("City", 6), ("Country", 4), ("Country", 6)]
EDITION_IDS = ["city-v4", "city-v6", "country-v4", "country-v6"]


class RecordingLookup:
    """A real MaxMind lookup that remembers every address it was asked about."""

    def __init__(self, inner: MaxMindLookup) -> None:
        self.inner = inner
        self.calls: list[IPAddress] = []

    def __call__(self, ip: IPAddress) -> GeoAnswer | None:
        self.calls.append(ip)
        return self.inner(ip)


@pytest.fixture(params=EDITIONS, ids=EDITION_IDS)
def mmdb(request: pytest.FixtureRequest, make_mmdb: MakeMmdb) -> Path:
    edition, version = request.param
    return make_mmdb(edition, version)


@pytest.fixture
def lookup(mmdb: Path) -> Iterator[RecordingLookup]:
    reader = MaxMindLookup(mmdb)
    yield RecordingLookup(reader)
    reader.close()


@pytest.fixture
def geoip_topology(write_config: WriteConfig, mmdb: Path) -> Topology:
    # us-east by default, so that a continent rule (EU -> eu-west) differs from the default.
    return topology_of(write_config, geoip={"database": str(mmdb)}, default_region="us-east")


NO_HEADERS = ((XCR, "absent"), (CF, "absent"))


@pytest.mark.parametrize(
    ("address", "region", "country"),
    [
        ("81.2.69.160", "eu-west", "GB"),
        ("216.160.83.56", "us-east", "US"),
        ("175.16.199.3", "ap-northeast", "CN"),
        ("89.160.20.1", "eu-west", None),
    ],
    ids=[
        "country-override-gb",
        "country-override-us",
        "country-via-its-continent-cn",
        "continent-only-record-uses-continent-rule",
    ],
)
def test_geoip_decides_region_for_ipv4_client(
    geoip_topology: Topology,
    lookup: RecordingLookup,
    address: str,
    region: str,
    country: str | None,
) -> None:
    ip = ip_address(address)
    got = resolve(geoip_topology, CIMultiDict(), True, ip, lookup)
    assert got == Resolution(region, GEO, country, ip, (*NO_HEADERS, (GEO, "ok")))
    assert lookup.calls == [ip]


@pytest.mark.parametrize("edition", ["City", "Country"])
@pytest.mark.parametrize(
    ("address", "region", "country"),
    [("2001:218::1", "ap-northeast", "JP"), ("2a02:cf40::1", "eu-west", "FR")],
    ids=["jp", "fr"],
)
def test_geoip_decides_region_for_ipv6_client_in_ipv6_database(
    write_config: WriteConfig,
    make_mmdb: MakeMmdb,
    edition: str,
    address: str,
    region: str,
    country: str,
) -> None:
    path = make_mmdb(edition, 6)
    topology = topology_of(write_config, geoip={"database": str(path)}, default_region="us-east")
    reader = MaxMindLookup(path)
    try:
        ip = ip_address(address)
        got = resolve(topology, CIMultiDict(), True, ip, reader)
    finally:
        reader.close()
    assert got == Resolution(region, GEO, country, ip, (*NO_HEADERS, (GEO, "ok")))


@pytest.mark.parametrize("edition", ["City", "Country"])
def test_ipv6_client_asked_of_ipv4_database_falls_through_to_default(
    write_config: WriteConfig, make_mmdb: MakeMmdb, edition: str
) -> None:
    path = make_mmdb(edition, 4)
    topology = topology_of(write_config, geoip={"database": str(path)}, default_region="us-east")
    reader = RecordingLookup(MaxMindLookup(path))
    try:
        ip = ip_address("2001:218::1")
        got = resolve(topology, CIMultiDict(), True, ip, reader)
    finally:
        reader.inner.close()
    assert got == Resolution("us-east", "default", None, ip, (*NO_HEADERS, (GEO, "unknown")))
    assert reader.calls == [ip]  # it was asked, and said nothing


def test_address_missing_from_database_falls_to_default(
    geoip_topology: Topology, lookup: RecordingLookup
) -> None:
    ip = ip_address("8.8.8.8")
    got = resolve(geoip_topology, CIMultiDict(), True, ip, lookup)
    assert got == Resolution("us-east", "default", None, ip, (*NO_HEADERS, (GEO, "unknown")))
    assert lookup.calls == [ip]


@pytest.mark.parametrize(
    "address",
    [
        "10.1.2.3",
        "127.0.0.1",
        "::1",
        "192.168.0.9",
        "100.64.0.1",
        "fe80::1",
        "fd00::5",
        "192.0.2.1",
        "2001:db8::1",
    ],
    ids=[
        "rfc1918",
        "loopback-v4",
        "loopback-v6",
        "rfc1918-192",
        "cgnat",
        "link-local-v6",
        "unique-local-v6",
        "documentation-v4",
        "documentation-v6",
    ],
)
def test_non_global_client_falls_through_without_a_lookup(
    geoip_topology: Topology, lookup: RecordingLookup, address: str
) -> None:
    ip = ip_address(address)
    got = resolve(geoip_topology, CIMultiDict(), True, ip, lookup)
    assert got == Resolution("us-east", "default", None, ip, (*NO_HEADERS, (GEO, "unknown")))
    assert lookup.calls == []


@pytest.mark.parametrize(
    ("client", "with_lookup"),
    [(None, True), ("81.2.69.160", False)],
    ids=["no-client-ip", "no-lookup"],
)
def test_geoip_step_is_absent_without_client_ip_or_lookup(
    geoip_topology: Topology, lookup: RecordingLookup, client: str | None, with_lookup: bool
) -> None:
    ip = ip_address(client) if client else None
    got = resolve(geoip_topology, CIMultiDict(), True, ip, lookup if with_lookup else None)
    assert got == Resolution("us-east", "default", None, ip, (*NO_HEADERS, (GEO, "absent")))
    assert lookup.calls == []


def test_headers_from_untrusted_peer_ignored_and_geoip_decides(
    geoip_topology: Topology, lookup: RecordingLookup
) -> None:
    ip = ip_address("81.2.69.160")
    headers = CIMultiDict({"X-Client-Region": "ap-northeast", "CF-IPCountry": "US"})
    got = resolve(geoip_topology, headers, False, ip, lookup)
    assert got == Resolution(
        "eu-west", GEO, "GB", ip, ((XCR, "untrusted"), (CF, "untrusted"), (GEO, "ok"))
    )


def test_trusted_header_decides_before_geoip_is_asked(
    geoip_topology: Topology, lookup: RecordingLookup
) -> None:
    ip = ip_address("81.2.69.160")
    got = resolve(geoip_topology, CIMultiDict({"CF-IPCountry": "JP"}), True, ip, lookup)
    assert got == Resolution("ap-northeast", CF, "JP", ip, ((XCR, "absent"), (CF, "ok")))
    assert lookup.calls == []


def test_garbage_header_falls_through_to_geoip(
    geoip_topology: Topology, lookup: RecordingLookup
) -> None:
    ip = ip_address("175.16.199.3")
    headers = CIMultiDict({"X-Client-Region": "FRé", "CF-IPCountry": "XX"})
    got = resolve(geoip_topology, headers, True, ip, lookup)
    assert got == Resolution(
        "ap-northeast", GEO, "CN", ip, ((XCR, "invalid"), (CF, "unknown"), (GEO, "ok"))
    )


# --- the resolution cache -----------------------------------------------------------------


def test_cache_reuses_a_resolution_for_the_same_client_and_region_headers(
    geoip_topology: Topology, lookup: RecordingLookup
) -> None:
    """A browser's headers change on every request (cookies, request ids), its region
    headers and address do not: the second request is served from the cache (the same
    frozen Resolution, no GeoIP look-up), whatever else it carries."""
    cache = ResolutionCache()
    ip = ip_address("81.2.69.160")
    first = CIMultiDict({"CF-IPCountry": "US", "Cookie": "sid=1", "X-Request-Id": "a"})
    second = CIMultiDict({"CF-IPCountry": "US", "Cookie": "sid=2", "X-Request-Id": "b"})
    got = [
        cache.resolve(geoip_topology, h, True, lambda: ip, lookup, ("81.2.69.160", None))
        for h in (first, second)
    ]
    assert got[0] is got[1]
    assert got[0] == Resolution("us-east", CF, "US", ip, ((XCR, "absent"), (CF, "ok")))


@pytest.mark.parametrize(
    ("second", "key", "trusted", "region"),
    [
        ({"CF-IPCountry": "JP"}, ("81.2.69.160", None), True, "ap-northeast"),
        (
            {"X-Client-Region": "eu-west", "CF-IPCountry": "US"},
            ("81.2.69.160", None),
            True,
            "eu-west",
        ),
        ({"CF-IPCountry": "US"}, ("81.2.69.160", None), False, "eu-west"),
        ({}, ("81.2.69.160", None), True, "eu-west"),
        ({"CF-IPCountry": "US"}, ("81.2.69.160", ("216.160.83.56",)), True, "us-east"),
    ],
    ids=["other-country", "client-region-added", "untrusted", "headers-gone", "other-xff"],
)
def test_cache_resolves_afresh_when_what_decides_the_region_differs(
    geoip_topology: Topology,
    lookup: RecordingLookup,
    second: dict[str, str],
    key: tuple[str, tuple[str, ...] | None],
    trusted: bool,
    region: str,
) -> None:
    cache = ResolutionCache()
    ip = ip_address("81.2.69.160")
    base = ("81.2.69.160", None)
    first = cache.resolve(geoip_topology, CIMultiDict({"CF-IPCountry": "US"}), True,
                          lambda: ip, lookup, base)  # fmt: skip
    got = cache.resolve(geoip_topology, CIMultiDict(second), trusted, lambda: ip, lookup, key)
    assert first.region == "us-east"
    assert got == resolve(geoip_topology, CIMultiDict(second), trusted, ip, lookup)
    assert got.region == region


def test_cache_starts_afresh_when_the_trust_rules_change(
    geoip_topology: Topology, lookup: RecordingLookup
) -> None:
    cache = ResolutionCache()
    ip = ip_address("81.2.69.160")
    headers = CIMultiDict({"CF-IPCountry": "US"})
    old = cache.resolve(geoip_topology, headers, True, lambda: ip, lookup, ("a", None), "old")
    new = cache.resolve(geoip_topology, headers, True, lambda: ip, lookup, ("a", None), "new")
    assert old == new and old is not new


def test_geoip_first_in_region_sources_beats_headers(
    write_config: WriteConfig, make_mmdb: MakeMmdb
) -> None:
    path = make_mmdb("City", 6)
    topology = topology_of(write_config, geoip={"database": str(path)}, region_sources=[GEO, XCR])
    reader = MaxMindLookup(path)
    try:
        ip = ip_address("216.160.83.56")
        got = resolve(topology, CIMultiDict({"X-Client-Region": "eu-west"}), True, ip, reader)
    finally:
        reader.close()
    assert got == Resolution("us-east", GEO, "US", ip, ((GEO, "ok"),))


# --- MaxMindLookup ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "answer"),
    [
        ("81.2.69.160", GeoAnswer("GB", "EU")),
        ("175.16.199.3", GeoAnswer("CN", "AS")),
        ("89.160.20.1", GeoAnswer(None, "EU")),
        ("8.8.8.8", None),
    ],
    ids=["gb", "cn", "continent-only", "not-in-database"],
)
def test_maxmind_lookup_answers_country_and_continent(
    lookup: RecordingLookup, address: str, answer: GeoAnswer | None
) -> None:
    """...and, from a City edition, the record's location and accuracy radius."""
    got = lookup.inner(ip_address(address))
    if answer is None:
        assert got is None
        return
    assert got is not None and (got.country, got.continent) == (answer.country, answer.continent)
    cidr = next(c for c in GEO_LOCATIONS if ip_address(address) in ip_network(c))
    lat, lon, radius = GEO_LOCATIONS[cidr]
    city = lookup.inner.database_type.endswith("City")
    assert (got.location, got.accuracy_radius) == (((lat, lon), radius) if city else (None, None))


def test_maxmind_lookup_reports_database_type(mmdb: Path, lookup: RecordingLookup) -> None:
    edition = "City" if "City" in mmdb.name else "Country"
    assert lookup.inner.database_type == f"GeoLite2-{edition}"


def test_missing_database_raises_geoip_error_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "GeoLite2-City.mmdb"
    with pytest.raises(GeoIPError) as excinfo:
        MaxMindLookup(path)
    assert str(excinfo.value) == f"{path}: GeoIP database not found"


@pytest.mark.parametrize(
    "content",
    [b"", b"this is not a MaxMind database\n" * 100, b"\xab\xcd\xefMaxMind.com" + b"\x00" * 64],
    ids=["empty-file", "text-file", "marker-without-metadata"],
)
def test_garbage_database_raises_geoip_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "GeoLite2-City.mmdb"
    path.write_bytes(content)
    with pytest.raises(GeoIPError) as excinfo:
        MaxMindLookup(path)
    assert str(excinfo.value).startswith(f"{path}: not a readable MaxMind database: ")


def test_truncated_database_raises_geoip_error(tmp_path: Path, make_mmdb: MakeMmdb) -> None:
    good = make_mmdb("City", 6)
    path = tmp_path / "truncated.mmdb"
    path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(GeoIPError) as excinfo:
        MaxMindLookup(path)
    assert str(excinfo.value).startswith(f"{path}: not a readable MaxMind database: ")


def test_directory_instead_of_database_raises_geoip_error(tmp_path: Path) -> None:
    with pytest.raises(GeoIPError) as excinfo:
        MaxMindLookup(tmp_path)
    assert str(excinfo.value).startswith(f"{tmp_path}: not a readable MaxMind database: ")


def test_database_without_country_data_raises_geoip_error(tmp_path: Path) -> None:
    writer = MMDBWriter(
        ip_version=4,
        database_type="GeoLite2-ASN",
        languages=["en"],
        description="geoproxy test ASN database",
    )
    writer.insert_network(
        IPSet(["81.2.69.0/24"]),
        {"autonomous_system_number": 20712, "autonomous_system_organization": "Andrews & Arnold"},
    )
    path = tmp_path / "GeoLite2-ASN.mmdb"
    writer.to_db_file(str(path))
    with pytest.raises(GeoIPError) as excinfo:
        MaxMindLookup(path)
    assert str(excinfo.value) == (
        f"{path}: database type 'GeoLite2-ASN' has no country data "
        "(use a City, Country or Enterprise edition)"
    )


# --- a corrupt database -------------------------------------------------------------------


def test_database_whose_records_do_not_decode_fails_the_probe_at_load(
    make_broken_mmdb: MakeMmdb,
) -> None:
    path = make_broken_mmdb()  # every record broken, as MaxMind's Broken-Double-Format file
    with pytest.raises(GeoIPError) as excinfo:
        MaxMindLookup(path)
    assert str(excinfo.value) == (
        f"{path}: corrupt MaxMind database: Error looking up data while iterating over tree: "
        "The MaxMind DB file's data section contains bad data (unknown data type or corrupt "
        "data)"
    )


@pytest.fixture
def clock() -> list[float]:
    """A settable monotonic clock: ``clock[0]``."""
    return [1000.0]


@pytest.fixture
def partly_broken(make_broken_mmdb: MakeMmdb, clock: list[float]) -> Iterator[MaxMindLookup]:
    """Only FR's record is broken: the last one in address order, past the probe's sample
    (geoip.PROBE_RECORDS), so the database opens and that look-up fails on traffic."""
    reader = MaxMindLookup(make_broken_mmdb(["2a02:cf40::/29"]), clock=lambda: clock[0])
    yield reader
    reader.close()


def test_failed_lookup_is_an_error_result_not_unknown(
    write_config: WriteConfig, partly_broken: MaxMindLookup
) -> None:
    topology = topology_of(write_config, geoip={"database": str(partly_broken.path)})
    broken, absent = ip_address("2a02:cf40::1"), ip_address("8.8.8.8")
    works = partly_broken(ip_address("81.2.69.160"))  # the rest works
    assert works is not None and (works.country, works.continent) == ("GB", "EU")
    with pytest.raises(GeoIPLookupError):
        partly_broken(broken)
    assert resolve(topology, {}, True, broken, partly_broken) == Resolution(
        "eu-west", "default", None, broken, ((XCR, "absent"), (CF, "absent"), (GEO, "error"))
    )
    assert resolve(topology, {}, True, absent, partly_broken) == Resolution(
        "eu-west", "default", None, absent, ((XCR, "absent"), (CF, "absent"), (GEO, "unknown"))
    )


def test_failed_lookups_are_logged_at_most_once_a_minute_with_their_count(
    partly_broken: MaxMindLookup, clock: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    broken = ip_address("2a02:cf40::1")
    for now in (1000.0, 1001.0, 1059.9, 1060.0, 1061.0):
        clock[0] = now
        with pytest.raises(GeoIPLookupError):
            partly_broken(broken)
    assert partly_broken(ip_address("8.8.8.8")) is None  # not in the database: not logged
    lines = [r.getMessage() for r in caplog.records]
    detail = (
        "The MaxMind DB file's data section contains bad data (unknown data type or corrupt data)"
    )
    assert lines == [
        f"{partly_broken.path}: GeoIP look-up failed, the database is corrupt: Error while "
        f"looking up data for 2a02:cf40::1. {detail} ({count} failed look-ups since the last "
        "such message; logged at most every 60s, each counted as "
        'geoproxy_region_resolutions_total{source="geoip",result="error"})'
        for count in (1, 3)
    ]
    assert [r.levelname for r in caplog.records] == ["ERROR", "ERROR"]
