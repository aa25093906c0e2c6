"""The routing topology derived once from a ``Config``: per-region try orders, the geodes
of each region, and a country index that already folds in the continent defaults, so that a
request does dictionary look-ups only."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from geoproxy.config.access import AccessRules
from geoproxy.config.countries import COUNTRY_CONTINENT
from geoproxy.config.values import Config, Fence, Geode, Region


@dataclass(frozen=True, slots=True)
class Topology:
    config: Config
    region_names: frozenset[str]
    try_orders: Mapping[str, tuple[str, ...]]  # region -> (itself, *fallback)
    geodes_by_region: Mapping[str, tuple[Geode, ...]]
    balances: Mapping[str, str]  # region -> how it picks among its geodes (values.BALANCES)
    country_region: Mapping[str, str]  # ISO country -> region, continent defaults applied
    continent_region: Mapping[str, str]
    access: AccessRules  # the config's access rules, with the verdicts of recent paths
    country_fence: Mapping[str, Fence]  # ISO country -> its residency fence, if any
    continent_fence: Mapping[str, Fence]  # for a client whose country is not known
    located: tuple[Region, ...]  # regions with a location (geoproximity), in config order

    @classmethod
    def build(cls, config: Config) -> Topology:
        by_region: dict[str, list[Geode]] = {r.name: [] for r in config.regions}
        for geode in config.geodes:
            by_region[geode.region].append(geode)
        countries = {
            code: region
            for code, continent in COUNTRY_CONTINENT.items()
            if (region := config.countries.get(code) or config.continents.get(continent))
        }
        listed = {code: f for f in config.fences for code in f.countries}
        by_continent = {code: f for f in config.fences for code in f.continents}
        fenced = {
            code: fence
            for code, continent in COUNTRY_CONTINENT.items()
            if (fence := listed.get(code) or by_continent.get(continent)) is not None
        }
        return cls(
            config=config,
            region_names=frozenset(r.name for r in config.regions),
            try_orders=MappingProxyType({r.name: (r.name, *r.fallback) for r in config.regions}),
            geodes_by_region=MappingProxyType({k: tuple(v) for k, v in by_region.items()}),
            balances=MappingProxyType({r.name: r.balance for r in config.regions}),
            country_region=MappingProxyType(countries),
            continent_region=config.continents,
            access=AccessRules(config.access),
            country_fence=MappingProxyType(fenced),
            continent_fence=MappingProxyType(by_continent),
            located=tuple(r for r in config.regions if r.location is not None),
        )

    def region_of(self, country: str | None, continent: str | None = None) -> str | None:
        """The region for a country (overrides, then its continent), else for a continent."""
        if country and (region := self.country_region.get(country)):
            return region
        return self.continent_region.get(continent) if continent else None

    def fence_of(self, country: str | None, continent: str | None = None) -> Fence | None:
        """The residency fence of a client from this country (else continent), if any."""
        if country is not None:
            return self.country_fence.get(country)
        return self.continent_fence.get(continent) if continent else None

    def unmapped_countries(self) -> list[str]:
        """ISO countries that resolve to no region (they fall to the default region)."""
        return sorted(set(COUNTRY_CONTINENT) - set(self.country_region))
