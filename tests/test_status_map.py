"""The world map on /status: countries coloured by the region that serves them, geodes as
markers coloured by state, each region's share of recent traffic.

Checked as SVG rather than in a browser: the page is server-rendered, static markup with
no script, so what a browser draws is fully determined by the markup. The tests check that
it is well-formed SVG (parsed as XML), that every outline is plain path data inside the
viewBox, and the colour, class and text each country, geode and region gets."""

from __future__ import annotations

import asyncio
import re
import xml.etree.ElementTree as ET

import aiohttp
from test_forwarding import mark_unhealthy, start

from geoproxy.surfaces.status_page import PALETTE, region_colours

from conftest import GeodeFactory, ProxyFactory

SVG = "{http://www.w3.org/2000/svg}"
PATH_DATA = re.compile(r"(M\d+ \d+(L\d+ \d+)*Z)+")


async def map_of(http: aiohttp.ClientSession, admin_url: str) -> tuple[ET.Element, str]:
    async with http.get(f"{admin_url}/status") as resp:
        assert resp.status == 200
        page = await resp.text()
    found = re.search(r'<svg class="map" .*?</svg>', page, re.S)
    assert found, page
    svg = found.group(0).replace("<svg ", '<svg xmlns="http://www.w3.org/2000/svg" ', 1)
    return ET.fromstring(svg), page  # well-formed, or this raises


async def test_the_map_colours_countries_by_region_and_geodes_by_state(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
) -> None:
    eu = await geode_factory("eu-1", "eu-west")
    us = await geode_factory("us-1", "us-east")
    proxy = await start(
        proxy_factory,
        [eu, us],
        countries={"FR": "eu-west", "JP": "us-east"},
        continents={"EU": "eu-west", "NA": "us-east"},
    )
    await mark_unhealthy(proxy, us)
    svg, page = await map_of(http, proxy.admin_url)
    assert svg.get("viewBox") == "0 0 720 360"
    colours = region_colours(proxy.gateway.runtime.topology.region_names)  # type: ignore[union-attr]
    countries = {p.get("data-country"): p for p in svg.iter(f"{SVG}path")}
    assert len(countries) > 170  # Natural Earth 1:110m: every country but small islands
    for code, path in countries.items():
        assert PATH_DATA.fullmatch(path.get("d") or ""), code
        numbers = [int(n) for n in re.findall(r"\d+", path.get("d") or "")]
        assert max(numbers[0::2]) <= 720 and max(numbers[1::2]) <= 360, code
    assert countries["FR"].get("fill") == countries["DE"].get("fill") == colours["eu-west"]
    assert countries["JP"].get("fill") == countries["US"].get("fill") == colours["us-east"]
    assert countries["BR"].get("fill") == "#d8d8d8"  # SA maps to no region: the default's
    title = countries["FR"].find(f"{SVG}title")
    assert title is not None and title.text == "FR France → eu-west"
    markers = {c.get("data-geode"): c for c in svg.iter(f"{SVG}circle")}
    assert (markers["eu-1"].get("class"), markers["us-1"].get("class")) == ("up", "down")
    # eu-1 sits on the largest country eu-west serves (Russia: continent EU), us-1 on the
    # largest us-east serves (Canada): inside the map, apart.
    assert markers["eu-1"].get("cx") != markers["us-1"].get("cx")
    assert set(colours.values()) <= set(PALETTE)
    assert 'data-region="eu-west"' in page and "no traffic history yet" in page


async def test_the_legend_gives_each_region_its_share_of_recent_requests(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
) -> None:
    eu = await geode_factory("eu-1", "eu-west")
    us = await geode_factory("us-1", "us-east")
    proxy = await start(proxy_factory, [eu, us], countries={"FR": "eu-west", "US": "us-east"})
    await map_of(http, proxy.admin_url)  # the traffic history starts
    await asyncio.sleep(1.1)
    for country in ("FR", "FR", "FR", "US"):
        async with http.get(f"{proxy.url}/whoami", headers={"CF-IPCountry": country}) as resp:
            assert resp.status == 200
    _, page = await map_of(http, proxy.admin_url)
    shares = dict(
        re.findall(
            r'data-region="([\w-]+)"><span class=swatch[^>]*></span>'
            r"[\w-]+ (\d+ %|-)</span>",
            page,
        )
    )
    assert shares == {"eu-west": "75 %", "us-east": "25 %", "ap-northeast": "0 %"}
