"""Geoproximity (``regions.<id>.location``, ``bias``, ``proximity.prefer_over_continent``):
a client the region map does not place goes to the nearest located region by its GeoIP
coordinates. Through real sockets on both request paths, with generated City databases
whose records carry coordinates and an accuracy radius (conftest.py's ``GEO_LOCATIONS``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from test_observability import access_lines, settled  # noqa: F401  (a fixture)

from geoproxy.config import loader as config_mod
from geoproxy.config.values import Region
from geoproxy.errors import ConfigError
from geoproxy.process.offline import check_config, route_cmd
from geoproxy.routing.proximity import distance_km, nearest
from geoproxy.routing.router import PROXIMITY

from conftest import FakeGeode, GeodeFactory, Proxy, ProxyFactory, base_config, geode_entry


@pytest.fixture(params=["fast", "coroutine"])
def lane(request: pytest.FixtureRequest) -> str:
    """Every test here runs on both request paths (conftest.py's ``lane``)."""
    return str(request.param)


FRANKFURT, VIRGINIA, SINGAPORE, DUBLIN = (
    (50.11, 8.68),
    (38.95, -77.45),
    (1.35, 103.82),
    (
        53.35,
        -6.26,
    ),
)
ISRAEL = "2a02:cf80::1"  # MaxMind's test data: IL, continent AS, at 31.5, 34.75 (±100 km)
GERMANY = "2a02:d180::1"  # DE, continent EU, at Germany's centre (±1000 km)


def located(lat_lon: tuple[float, float], **extra: Any) -> dict[str, Any]:
    return {"location": {"lat": lat_lon[0], "lon": lat_lon[1]}, **extra}


REGIONS: dict[str, Any] = {
    "eu-central": {**located(FRANKFURT), "fallback": ["us-east"]},
    "us-east": {**located(VIRGINIA), "fallback": ["eu-central"]},
    "ap-southeast": {**located(SINGAPORE), "fallback": ["eu-central"]},
}
CONTINENTS = {"EU": "eu-central", "NA": "us-east", "AS": "ap-southeast"}


def proximity_config(
    geodes: list[FakeGeode], database: Path | None, **overrides: Any
) -> dict[str, Any]:
    data = base_config(
        [geode_entry(g) for g in geodes],
        regions=REGIONS,
        default_region="us-east",
        countries={},
        continents=CONTINENTS,
    )
    if database is not None:
        data["geoip"] = {"database": str(database)}
    data.update(overrides)
    return data


async def three_geodes(geode_factory: GeodeFactory) -> list[FakeGeode]:
    return [
        await geode_factory("fra-1", "eu-central"),
        await geode_factory("iad-1", "us-east"),
        await geode_factory("sin-1", "ap-southeast"),
    ]


async def served_by(http: aiohttp.ClientSession, proxy: Proxy, client: str) -> str:
    async with http.get(f"{proxy.url}/whoami", headers={"X-Forwarded-For": client}) as resp:
        assert resp.status == 200
        return str((await resp.json())["geode"])


# --- through the proxy ----------------------------------------------------------------------


async def test_israel_goes_to_frankfurt_by_distance_not_to_singapore_by_continent(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    make_mmdb: Any,
    access_lines: list[str],  # noqa: F811  (the fixture)
) -> None:
    geodes = fra, _iad, sin = await three_geodes(geode_factory)
    proxy = await proxy_factory(
        proximity_config(geodes, make_mmdb("City"), proximity={"prefer_over_continent": True})
    )
    assert await served_by(http, proxy, ISRAEL) == "fra-1"
    assert (fra.hits["/whoami"], sin.hits["/whoami"]) == (1, 0)
    await settled(proxy)
    labels = {"client_region": "eu-central", "geode": "fra-1", "decision": PROXIMITY}
    assert proxy.sample("geoproxy_routing_decisions_total", **labels) == 1
    line = json.loads(access_lines[-1])
    assert (line["client_region"], line["region_source"], line["decision"]) == (
        "eu-central",
        "geoip",
        PROXIMITY,
    )
    # A country listed under `countries` is never overruled by distance.
    data = proximity_config(geodes, make_mmdb("City"), proximity={"prefer_over_continent": True})
    data["countries"] = {"IL": "ap-southeast"}
    listed = await proxy_factory(data)
    assert await served_by(http, listed, ISRAEL) == "sin-1"


@pytest.mark.parametrize(
    ("continents", "prefer", "edition", "expected"),
    [
        (CONTINENTS, False, "City", "sin-1"),  # the continent entry places it: today's way
        ({"EU": "eu-central", "NA": "us-east"}, False, "City", "fra-1"),  # unplaced: nearest
        ({"EU": "eu-central", "NA": "us-east"}, False, "Country", "iad-1"),  # no coordinates
        (CONTINENTS, True, "Country", "sin-1"),  # no coordinates: the continent entry
    ],
    ids=["continent-entry", "unplaced-nearest", "unplaced-country-db", "prefer-country-db"],
)
async def test_distance_decides_only_for_unplaced_countries_unless_preferred(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    make_mmdb: Any,
    continents: dict[str, str],
    prefer: bool,
    edition: str,
    expected: str,
) -> None:
    geodes = await three_geodes(geode_factory)
    data = proximity_config(
        geodes,
        make_mmdb(edition),
        continents=continents,
        proximity={"prefer_over_continent": prefer},
    )
    proxy = await proxy_factory(data)
    assert await served_by(http, proxy, ISRAEL) == expected


async def test_positive_bias_draws_clients_from_further_away(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    make_mmdb: Any,
) -> None:
    geodes = await three_geodes(geode_factory)
    regions = {**REGIONS, "ap-southeast": {**REGIONS["ap-southeast"], "bias": 70}}
    data = proximity_config(geodes, make_mmdb("City"), regions=regions, continents={})
    proxy = await proxy_factory(data)
    # Israel: 2,990 km from Frankfurt, 7,950 km from Singapore; x (1 - 0.70) = 2,390 km.
    assert await served_by(http, proxy, ISRAEL) == "sin-1"


async def test_an_uncertain_location_keeps_the_continent_region_a_precise_one_overrules_it(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    make_mmdb: Any,
) -> None:
    geodes = [await geode_factory("dub-1", "eu-west"), await geode_factory("fra-1", "eu-central")]
    regions = {
        "eu-west": {**located(DUBLIN), "fallback": ["eu-central"]},
        "eu-central": {**located(FRANKFURT), "fallback": ["eu-west"]},
    }
    overrides = {
        "regions": regions,
        "default_region": "eu-west",
        "continents": {"EU": "eu-west"},
        "proximity": {"prefer_over_continent": True},
    }
    # Germany's centre is ~140 km from Frankfurt and ~1,090 km from Dublin: ~950 km apart,
    # less than the 2 x 1,000 km a country-level record may be off by.
    coarse = await proxy_factory(proximity_config(geodes, make_mmdb("City"), **overrides))
    assert await served_by(http, coarse, GERMANY) == "dub-1"
    precise_db = make_mmdb(
        "City", name="precise.mmdb", locations={"2a02:d180::/29": (51.3, 9.49, 50)}
    )
    precise = await proxy_factory(proximity_config(geodes, precise_db, **overrides))
    assert await served_by(http, precise, GERMANY) == "fra-1"


async def test_geoproximity_stays_inside_the_client_fence(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    make_mmdb: Any,
) -> None:
    geodes = fra, _iad, _sin = await three_geodes(geode_factory)
    data = proximity_config(
        geodes,
        make_mmdb("City"),
        regions={**REGIONS, "ap-southeast": {**located(SINGAPORE)}},
        continents={"EU": "eu-central", "NA": "us-east"},
        fences={"asia": {"regions": ["ap-southeast"], "continents": ["AS"]}},
    )
    proxy = await proxy_factory(data)
    assert await served_by(http, proxy, ISRAEL) == "sin-1"  # Frankfurt is outside the fence
    assert fra.hits["/whoami"] == 0


async def test_route_explains_the_distances_and_the_decision(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    make_mmdb: Any,
) -> None:
    geodes = await three_geodes(geode_factory)
    proxy = await proxy_factory(
        proximity_config(geodes, make_mmdb("City"), proximity={"prefer_over_continent": True})
    )
    async with http.get(f"{proxy.admin_url}/route", params={"ip": ISRAEL}) as resp:
        route = await resp.json()
    assert (route["decision"], route["chosen"]) == (PROXIMITY, "fra-1")
    near = route["proximity"]
    assert near["location"] == {"lat": 31.5, "lon": 34.75}
    assert near["accuracy_radius_km"] == 100
    assert [r["region"] for r in near["ranking"]] == ["eu-central", "ap-southeast", "us-east"]
    assert (near["region"], near["decided"]) == ("eu-central", True)
    assert 2900 < near["ranking"][0]["distance_km"] < 3050
    assert route["reason"].startswith(
        "client region eu-central from geoip (country IL) by geoproximity: nearest is "
        "eu-central (2,9"
    )


# --- pure: distances and the choice ---------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "km"),
    [
        (FRANKFURT, SINGAPORE, 10_260),
        (FRANKFURT, VIRGINIA, 6_550),
        ((31.5, 34.75), FRANKFURT, 2_990),
        ((0.0, 0.0), (0.0, 180.0), 20_015),  # half the equator
        (FRANKFURT, FRANKFURT, 0),
    ],
    ids=["fra-sin", "fra-iad", "israel-fra", "antipodes", "same"],
)
def test_great_circle_distance(a: tuple[float, float], b: tuple[float, float], km: int) -> None:
    assert distance_km(a, b) == pytest.approx(km, rel=0.01, abs=1)


def test_nearest_ignores_regions_without_a_location_and_breaks_ties_by_config_order() -> None:
    regions = [
        Region("nowhere", ()),
        Region("east", (), (0.0, 10.0)),
        Region("west", (), (0.0, -10.0)),
    ]
    near = nearest(regions, (0.0, 0.0), None)
    assert near is not None and (near.region, near.decided) == ("east", True)
    assert [r.region for r in near.ranking] == ["east", "west"]
    assert nearest(regions[:1], (0.0, 0.0), 10) is None


# --- config ---------------------------------------------------------------------------------


def problems(write_config: Any, data: dict[str, Any]) -> list[str]:
    path = write_config(data)
    with pytest.raises(ConfigError) as info:
        config_mod.load(path)
    return [line.removeprefix(f"{path}: ") for line in info.value.problems]


GEODES = [{"name": "fra", "region": "eu-central", "url": "http://fra.test"}]


@pytest.mark.parametrize(
    ("regions", "proximity", "expected"),
    [
        (
            {"eu-central": {"location": {"lat": 95, "lon": "east"}, "bias": 100}},
            None,
            [
                "regions.eu-central.location.lat: must be from -90 to 90, got 95",
                "regions.eu-central.location.lon: must be a number of degrees from -180 to "
                "180, got 'east'",
                "regions.eu-central.bias: must be from -99 to 99, got 100",
            ],
        ),
        (
            {"eu-central": {"location": {"lat": 50.1, "long": 8.7}}},
            None,
            [
                "regions.eu-central.location.long: unknown key (did you mean 'lon'?)",
                "regions.eu-central.location.lon: is required",
            ],
        ),
        (
            {"eu-central": None},
            {"prefer_over_continent": True},
            [
                "proximity.prefer_over_continent: is true, but no region has a location "
                "(regions.<id>.location: {lat, lon})"
            ],
        ),
    ],
    ids=["out-of-range", "misspelt", "prefer-without-locations"],
)
def test_check_config_rejects_bad_locations(
    write_config: Any,
    regions: dict[str, Any],
    proximity: dict[str, Any] | None,
    expected: list[str],
) -> None:
    data = base_config([dict(g) for g in GEODES], regions=regions, default_region="eu-central")
    data.update(countries={}, continents={})
    if proximity is not None:
        data["proximity"] = proximity
    assert problems(write_config, data) == expected


def test_check_config_prints_locations_and_whether_geoproximity_can_apply(
    write_config: Any, make_mmdb: Any, capsys: Any
) -> None:
    regions = {"eu-central": located(FRANKFURT, bias=-20)}
    data = base_config([dict(g) for g in GEODES], regions=regions, default_region="eu-central")
    data.update(countries={}, continents={})
    assert check_config(write_config(data)) == 0
    out = capsys.readouterr().out
    assert "at 50.11,8.68 bias -20" in out
    assert (
        "geoproximity: 1 regions located; not used: no geoip.database (a City edition gives "
        "clients coordinates)"
    ) in out
    data["geoip"] = {"database": str(make_mmdb("City"))}
    assert check_config(write_config(data)) == 0
    assert (
        "geoproximity: 1 regions located; used for clients of countries the map does not place"
    ) in capsys.readouterr().out


def test_geoproxy_route_shows_the_ranking(write_config: Any, make_mmdb: Any, capsys: Any) -> None:
    data = base_config(
        [{"name": "fra", "region": "eu-central", "url": "http://fra.test"}],
        regions=REGIONS,
        default_region="us-east",
        countries={},
        continents={},
        geoip={"database": str(make_mmdb("City"))},
    )
    assert route_cmd(write_config(data), ISRAEL, None, None, False) == 0
    out = capsys.readouterr().out
    assert "geoproximity: eu-central 2,9" in out
    assert "(chose eu-central)" in out
    assert "chosen geode: fra (proximity)" in out
