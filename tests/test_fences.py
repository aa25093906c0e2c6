"""Residency fences (``fences:``): a fenced client is never routed outside its fence —
not by fallbacks, not by panic mode, not by a header or the default region — and gets the
fence's refusal when nothing inside can serve. Through real sockets, on both request
paths, with geodes that count what reached them."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest
from test_forwarding import mark_unhealthy
from test_observability import access_lines, settled  # noqa: F401  (a fixture)

from geoproxy.config import loader as config_mod
from geoproxy.config.model import Topology
from geoproxy.errors import ConfigError
from geoproxy.process.offline import check_config
from geoproxy.routing.resolver import resolve
from geoproxy.routing.router import FENCED, HOME, candidates

from conftest import FakeGeode, GeodeFactory, Proxy, ProxyFactory, base_config, geode_entry


@pytest.fixture(params=["fast", "coroutine"])
def lane(request: pytest.FixtureRequest) -> str:
    """Every test here runs on both request paths (conftest.py's ``lane``)."""
    return str(request.param)


#: eu-west and eu-central fall back to each other only; us-east may fall back to Europe.
REGIONS = {
    "eu-west": {"fallback": ["eu-central"]},
    "eu-central": {"fallback": ["eu-west"]},
    "us-east": {"fallback": ["eu-west", "ap-northeast"]},
    "ap-northeast": {"fallback": ["us-east"]},
}
EU_FENCE = {"regions": ["eu-west", "eu-central"], "continents": ["EU"]}


def fenced_config(geodes: list[FakeGeode], **overrides: Any) -> dict[str, Any]:
    fences = overrides.pop("fences", {"eu": EU_FENCE})
    return base_config(
        [geode_entry(g) for g in geodes],
        regions=REGIONS,
        default_region="us-east",
        countries={"FR": "eu-west", "DE": "eu-central", "US": "us-east", "JP": "ap-northeast"},
        continents={"EU": "eu-west", "NA": "us-east", "AS": "ap-northeast"},
        fences=fences,
        **overrides,
    )


async def four_geodes(geode_factory: GeodeFactory) -> list[FakeGeode]:
    return [
        await geode_factory("euw-1", "eu-west"),
        await geode_factory("euc-1", "eu-central"),
        await geode_factory("use-1", "us-east"),
        await geode_factory("apne-1", "ap-northeast"),
    ]


def hits(geodes: list[FakeGeode]) -> dict[str, int]:
    return {g.name: g.hits["/whoami"] for g in geodes}


async def get(http: aiohttp.ClientSession, proxy: Proxy, **headers: str) -> tuple[int, Any]:
    async with http.get(f"{proxy.url}/whoami", headers=headers) as resp:
        return resp.status, (await resp.json(), dict(resp.headers))


async def test_fenced_client_falls_back_inside_the_fence_then_gets_503_naming_it(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    geodes = euw, euc, use, apne = await four_geodes(geode_factory)
    proxy = await proxy_factory(fenced_config(geodes))
    await mark_unhealthy(proxy, euw)
    status, (body, _) = await get(http, proxy, **{"CF-IPCountry": "FR"})
    assert (status, body["geode"]) == (200, "euc-1")

    await mark_unhealthy(proxy, euc)
    status, (body, headers) = await get(http, proxy, **{"CF-IPCountry": "FR"})
    assert status == 503
    assert headers["Retry-After"] == "1"
    assert body == {
        "error": {
            "status": 503,
            "code": "fenced",
            "message": "no healthy geode inside residency fence 'eu' (eu-west, eu-central) "
            "can serve this client, and it is never sent outside the fence",
            "fence": "eu",
            "region": "eu-west",
        }
    }
    # us-east and ap-northeast are healthy, yet reached by nobody from the fence.
    assert hits(geodes) == {"euw-1": 0, "euc-1": 1, "use-1": 0, "apne-1": 0}
    await settled(proxy)
    assert proxy.sample("geoproxy_fence_refusals_total", fence="eu", client_region="eu-west") == 1
    decision = {"client_region": "eu-west", "geode": "none", "decision": FENCED}
    assert proxy.sample("geoproxy_routing_decisions_total", **decision) == 1
    # A client outside the fence still falls back across the ocean.
    await mark_unhealthy(proxy, use)
    status, (body, _) = await get(http, proxy, **{"CF-IPCountry": "US"})
    assert (status, body["geode"]) == (200, "apne-1")
    assert apne.hits["/whoami"] == 1


async def test_panic_mode_never_takes_a_fenced_client_outside_the_fence(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    geodes = await four_geodes(geode_factory)
    proxy = await proxy_factory(
        fenced_config(geodes, forwarding={"when_none_healthy": "try_all", "max_attempts": 4})
    )
    await mark_unhealthy(proxy, *geodes)  # alive, only their health checks fail
    status, (body, _) = await get(http, proxy, **{"CF-IPCountry": "DE"})
    # The fence's on_exhausted (reject) decides for its clients, not the proxy's try_all.
    assert status == 503 and body["error"]["code"] == "fenced"
    assert hits(geodes) == {"euw-1": 0, "euc-1": 0, "use-1": 0, "apne-1": 0}
    # Unfenced, the same panic mode reaches every region of the try order.
    status, (body, _) = await get(http, proxy, **{"CF-IPCountry": "US"})
    assert (status, body["geode"]) == (200, "use-1")


async def test_fence_on_exhausted_try_all_is_panic_mode_inside_the_fence_only(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    geodes = euw, euc, _use, _apne = await four_geodes(geode_factory)
    fence = {**EU_FENCE, "on_exhausted": "try_all"}
    proxy = await proxy_factory(
        fenced_config(geodes, fences={"eu": fence}, forwarding={"max_attempts": 4})
    )
    await mark_unhealthy(proxy, *geodes)
    euw.force_status = 503
    status, (body, _) = await get(http, proxy, **{"CF-IPCountry": "FR"})
    assert (status, body["geode"]) == (200, "euc-1")  # unhealthy, tried anyway: in panic
    euc.force_status = 503
    status, _ = await get(http, proxy, **{"CF-IPCountry": "FR"})
    assert status == 503  # the last geode's own 503, relayed: no third region was tried
    assert hits(geodes) == {"euw-1": 2, "euc-1": 2, "use-1": 0, "apne-1": 0}
    # The fence's try_all is not the proxy's: an unfenced client gets the usual 503.
    status, (body, _) = await get(http, proxy, **{"CF-IPCountry": "US"})
    assert (status, body["error"]["code"]) == (503, "no_healthy_geode")


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        ({"CF-IPCountry": "PL"}, "unmapped: default region us-east"),
        ({"X-Client-Region": "us-east", "X-Forwarded-For": "81.2.69.160"}, "a region id"),
        ({"X-Client-Region": "US", "CF-IPCountry": "PL"}, "first source names US"),
    ],
    ids=["default-region", "region-id-and-geoip", "country-header"],
)
async def test_a_region_outside_the_fence_is_replaced_by_the_fence_own_order(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    make_mmdb: Any,
    headers: dict[str, str],
    why: str,
) -> None:
    geodes = await four_geodes(geode_factory)
    data = fenced_config(geodes, geoip={"database": str(make_mmdb("City", 6))})
    data["continents"] = {"NA": "us-east", "AS": "ap-northeast"}  # PL has no region
    proxy = await proxy_factory(data)
    status, (body, _) = await get(http, proxy, **headers)
    expected = "use-1" if why == "first source names US" else "euw-1"  # US is no EU client
    assert (status, body["geode"]) == (200, expected), why


async def test_fenced_refusal_status_is_configurable_and_only_503_has_retry_after(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    geodes = euw, euc, _use, _apne = await four_geodes(geode_factory)
    fence = {**EU_FENCE, "status": 451}
    proxy = await proxy_factory(fenced_config(geodes, fences={"eu": fence}))
    await mark_unhealthy(proxy, euw, euc)
    status, (body, headers) = await get(http, proxy, **{"CF-IPCountry": "DE"})
    assert status == 451 and body["error"]["fence"] == "eu"
    assert "Retry-After" not in headers


async def test_route_and_access_log_explain_a_fenced_refusal(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    access_lines: list[str],  # noqa: F811  (the fixture)
) -> None:
    geodes = euw, euc, _use, _apne = await four_geodes(geode_factory)
    proxy = await proxy_factory(fenced_config(geodes))
    await mark_unhealthy(proxy, euw, euc)
    async with http.get(f"{proxy.admin_url}/route", params={"country": "FR"}) as resp:
        route = await resp.json()
    assert route["decision"] == FENCED and route["chosen"] is None
    assert route["try_order"] == ["eu-west", "eu-central"]
    assert route["fence"] == {
        "name": "eu",
        "regions": ["eu-west", "eu-central"],
        "on_exhausted": "reject",
        "status": 503,
        "kept_out": [],
    }
    assert route["reason"] == (
        "client region eu-west from cf-ipcountry (country FR); held by residency fence eu "
        "(eu-west, eu-central); no healthy geode inside the fence: 503 "
        "(fences.eu.on_exhausted: reject), never sent outside it"
    )
    async with http.get(f"{proxy.admin_url}/route", params={"region": "us-east"}) as resp:
        assert (await resp.json())["fence"] is None  # a region id names no country

    status, _ = await get(http, proxy, **{"CF-IPCountry": "FR"})
    assert status == 503
    await settled(proxy)
    line = json.loads(access_lines[-1])
    assert (line["decision"], line["fence"], line["status"]) == (FENCED, "eu", 503)


def test_candidates_keep_to_the_fence_for_any_region_they_start_from(
    write_config: Any,
) -> None:
    """The one place candidate lists are made: whatever region a caller starts from (a
    header, a home stamp, the default), a fenced client's candidates stay inside."""
    geodes = [
        {"name": n, "region": r, "url": f"http://{n}.test"}
        for n, r in (("euw", "eu-west"), ("euc", "eu-central"), ("use", "us-east"))
    ]
    data = base_config(geodes, regions=REGIONS, default_region="us-east")
    data.update(countries={"FR": "eu-west"}, continents={}, fences={"eu": EU_FENCE})
    topology = Topology.build(config_mod.load(write_config(data)))
    fence = resolve(topology, {"CF-IPCountry": "FR"}, True, None, None).fence
    assert fence is not None and fence.name == "eu"
    every = {"euw", "euc", "use"}
    for region in ("eu-west", "eu-central", "us-east", "ap-northeast"):
        cands, _ = candidates(topology, region, every, 10, fence=fence)
        assert {c.geode.region for c in cands} <= {"eu-west", "eu-central"}, region
    cands, decision = candidates(topology, "us-east", {"use"}, 10, fence=fence)
    assert (cands, decision) == ([], FENCED)
    cands, decision = candidates(topology, "us-east", {"use"}, 10)
    assert ([c.geode.name for c in cands], decision) == (["use"], HOME)


# --- check-config ---------------------------------------------------------------------------

GEODES = [
    {"name": n, "region": r, "url": f"http://{n}.test"}
    for n, r in (("euw", "eu-west"), ("euc", "eu-central"), ("use", "us-east"))
]


def config_with(**overrides: Any) -> dict[str, Any]:
    data = base_config([dict(g) for g in GEODES], regions=REGIONS, default_region="us-east")
    data.update(countries={"FR": "eu-west"}, continents={"EU": "eu-west"}, fences={"eu": EU_FENCE})
    data.update(overrides)
    return data


def problems(write_config: Any, data: dict[str, Any]) -> list[str]:
    path = write_config(data)
    with pytest.raises(ConfigError) as info:
        config_mod.load(path)
    return [line.removeprefix(f"{path}: ") for line in info.value.problems]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            {"regions": {**REGIONS, "eu-central": {"fallback": ["eu-west", "us-east"]}}},
            [
                "regions.eu-central.fallback[1]: 'us-east' leaves fence 'eu' (its regions: "
                "eu-west, eu-central): its clients are never sent there; move the region into "
                "the fence or out of this list"
            ],
        ),
        (
            {"countries": {"FR": "eu-west", "GB": "us-east", "IE": "us-east"}},
            [
                "fences.eu: the region map sends its countries GB IE to 'us-east', outside the "
                "fence (its regions: eu-west, eu-central); map them to a region inside it"
            ],
        ),
        (
            {"fences": {"eu": EU_FENCE, "fr": {"regions": ["eu-west"], "continents": ["eu"]}}},
            ["fences.fr.continents[0]: EU is already in fence 'eu': a client has one fence"],
        ),
        (
            {"fences": {"eu": {"regions": ["eu-wst"], "countries": ["XY"], "status": 302}}},
            [
                "fences.eu.regions[0]: unknown region 'eu-wst' (known: ap-northeast, "
                "eu-central, eu-west, us-east); did you mean 'eu-west'?",
                "fences.eu.countries[0]: unknown country code 'XY' (ISO 3166-1 alpha-2, e.g. FR)",
                "fences.eu.status: must be from 400 to 599, got 302",
            ],
        ),
        (
            {"fences": {"EU": {"regions": ["eu-west"], "on_exhausted": "spill"}}},
            [
                "fences.EU: invalid fence name 'EU' (lowercase letters, digits and '-', e.g. "
                "eu-west)"
            ],
        ),
        (
            {"fences": {"eu": {"regions": [], "on_exhausted": "spill"}}},
            [
                "fences.eu.regions: a fence needs at least one region",
                "fences.eu: a fence needs countries or continents (whose clients it holds)",
                "fences.eu.on_exhausted: unknown value 'spill' (choose from: reject, try_all)",
            ],
        ),
    ],
    ids=[
        "fallback-leaves",
        "map-sends-outside",
        "continent-twice",
        "bad-values",
        "bad-name",
        "empty",
    ],
)
def test_check_config_rejects_a_fence_its_config_would_break(
    write_config: Any, overrides: dict[str, Any], expected: list[str]
) -> None:
    assert problems(write_config, config_with(**overrides)) == expected


def test_check_config_prints_each_fence(write_config: Any, capsys: Any) -> None:
    path = write_config(config_with(fences={"eu": {**EU_FENCE, "countries": ["CH"]}}))
    assert check_config(path) == 0
    out = capsys.readouterr().out
    assert "residency fence eu: EU CH -> only eu-west, eu-central; none healthy: reject (503)" in (
        out
    )


async def test_a_region_id_header_does_not_hide_the_country_header_that_fences_the_client(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    """Without GeoIP, a trusted X-Client-Region naming a region outside the fence decides
    the region, but the client's CF-IPCountry still names its country: it stays fenced."""
    geodes = await four_geodes(geode_factory)
    proxy = await proxy_factory(fenced_config(geodes))
    headers = {"X-Client-Region": "us-east", "CF-IPCountry": "FR"}
    status, (body, _) = await get(http, proxy, **headers)
    assert (status, body["geode"]) == (200, "euw-1")
    assert hits(geodes)["use-1"] == 0
    # Unfenced, the region id is followed as before.
    status, (body, _) = await get(http, proxy, **{**headers, "CF-IPCountry": "US"})
    assert (status, body["geode"]) == (200, "use-1")
