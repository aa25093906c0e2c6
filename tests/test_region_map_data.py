"""Data checks for geoproxy.countries and the shipped config/region-map.yaml."""

from pathlib import Path
from typing import Any

import pytest
import yaml

from geoproxy.config.countries import CONTINENTS, COUNTRY_CONTINENT

REGION_MAP_PATH = Path(__file__).resolve().parent.parent / "config" / "region-map.yaml"

REGIONS = frozenset(
    {
        "us-east",
        "us-west",
        "sa-east",
        "eu-west",
        "eu-central",
        "ap-northeast",
        "ap-southeast",
    }
)


def _load_region_map() -> dict[str, Any]:
    with REGION_MAP_PATH.open(encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    assert isinstance(data, dict)
    return data


def _resolve(region_map: dict[str, Any], country: str) -> str | None:
    countries: dict[str, str] = region_map["countries"]
    continents: dict[str, str] = region_map["continents"]
    if country in countries:
        return countries[country]
    return continents.get(COUNTRY_CONTINENT[country])


def _is_alpha2(code: object) -> bool:
    return (
        isinstance(code, str)
        and len(code) == 2
        and code.isascii()
        and code.isalpha()
        and code.isupper()
    )


# --- geoproxy.countries -------------------------------------------------------


def test_continents_are_the_seven_maxmind_codes() -> None:
    assert sorted(CONTINENTS) == ["AF", "AN", "AS", "EU", "NA", "OC", "SA"]


def test_country_table_covers_all_assigned_iso_codes() -> None:
    assert len(COUNTRY_CONTINENT) >= 249


def test_every_country_key_is_two_uppercase_ascii_letters() -> None:
    bad = [code for code in COUNTRY_CONTINENT if not _is_alpha2(code)]
    assert bad == []


def test_every_country_maps_to_a_known_continent() -> None:
    bad = {code: c for code, c in COUNTRY_CONTINENT.items() if c not in CONTINENTS}
    assert bad == {}


def test_every_continent_has_countries() -> None:
    assert set(COUNTRY_CONTINENT.values()) == CONTINENTS


def test_country_table_is_read_only() -> None:
    with pytest.raises(TypeError):
        COUNTRY_CONTINENT["ZZ"] = "EU"  # type: ignore[index]


@pytest.mark.parametrize(
    ("country", "continent"),
    [
        ("US", "NA"),
        ("FR", "EU"),
        ("JP", "AS"),
        ("BR", "SA"),
        ("AU", "OC"),
        ("ZA", "AF"),
        ("AQ", "AN"),
        ("RU", "EU"),
        ("TR", "AS"),
        ("EG", "AF"),
        ("XK", "EU"),
    ],
    ids=lambda v: str(v),
)
def test_country_has_maxmind_continent(country: str, continent: str) -> None:
    assert COUNTRY_CONTINENT[country] == continent


# --- config/region-map.yaml ---------------------------------------------------


def test_region_map_has_exactly_continents_and_countries_sections() -> None:
    assert set(_load_region_map()) == {"continents", "countries"}


def test_region_map_lists_every_continent() -> None:
    assert set(_load_region_map()["continents"]) == CONTINENTS


def test_region_map_country_keys_are_known_iso_codes() -> None:
    # A bare NO would load as False under YAML 1.1, so this also catches
    # an unquoted Norway.
    unknown = [c for c in _load_region_map()["countries"] if c not in COUNTRY_CONTINENT]
    assert unknown == []


@pytest.mark.parametrize("section", ["continents", "countries"])
def test_region_map_values_are_known_regions(section: str) -> None:
    entries: dict[str, Any] = _load_region_map()[section]
    bad = {key: value for key, value in entries.items() if value not in REGIONS}
    assert bad == {}


def test_every_iso_country_resolves_to_a_region() -> None:
    region_map = _load_region_map()
    unresolved = [c for c in COUNTRY_CONTINENT if _resolve(region_map, c) not in REGIONS]
    assert unresolved == []


def test_every_region_receives_at_least_one_country() -> None:
    region_map = _load_region_map()
    served = {_resolve(region_map, c) for c in COUNTRY_CONTINENT}
    assert sorted(REGIONS - served) == []


@pytest.mark.parametrize(
    ("country", "region"),
    [
        ("FR", "eu-west"),
        ("DE", "eu-central"),
        ("US", "us-east"),
        ("BR", "sa-east"),
        ("JP", "ap-northeast"),
        ("SG", "ap-southeast"),
        ("AU", "ap-southeast"),
        ("NO", "eu-central"),
    ],
    ids=lambda v: str(v),
)
def test_country_routes_to_expected_region(country: str, region: str) -> None:
    assert _resolve(_load_region_map(), country) == region
