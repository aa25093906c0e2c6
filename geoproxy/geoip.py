"""GeoIP look-up: a protocol the resolver calls, and the MaxMind adapter behind it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import geoip2.database
import geoip2.errors
import geoip2.models
import maxminddb

from geoproxy.clientip import IPAddress
from geoproxy.errors import GeoIPError


@dataclass(frozen=True, slots=True)
class GeoAnswer:
    country: str | None  # ISO 3166-1 alpha-2, upper case
    continent: str | None  # AF AN AS EU NA OC SA


class GeoLookup(Protocol):
    def __call__(self, ip: IPAddress) -> GeoAnswer | None: ...


class MaxMindLookup:
    """Reads a MaxMind ``.mmdb`` (GeoIP2/GeoLite2 City or Country edition). Opened once;
    memory-mapped, so workers share the pages."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._reader = geoip2.database.Reader(str(path))
        except FileNotFoundError:
            raise GeoIPError(f"{path}: GeoIP database not found") from None
        except (OSError, ValueError, maxminddb.InvalidDatabaseError) as exc:
            raise GeoIPError(f"{path}: not a readable MaxMind database: {exc}") from None
        kind = self._reader.metadata().database_type
        if not any(edition in kind for edition in ("City", "Country", "Enterprise")):
            self._reader.close()
            raise GeoIPError(
                f"{path}: database type {kind!r} has no country data (use a City, Country or "
                "Enterprise edition)"
            )
        self.database_type = kind
        # geoip2 binds each method to its edition; a City record holds country data too.
        self._lookup: Callable[[IPAddress], geoip2.models.Country]  # City is a Country
        if "Enterprise" in kind:
            self._lookup = self._reader.enterprise
        elif "City" in kind:
            self._lookup = self._reader.city
        else:
            self._lookup = self._reader.country

    def __call__(self, ip: IPAddress) -> GeoAnswer | None:
        try:
            answer = self._lookup(ip)
        except (geoip2.errors.AddressNotFoundError, ValueError):
            return None  # unknown address, or IPv6 asked of an IPv4-only database
        except maxminddb.InvalidDatabaseError:
            return None  # a corrupt record: fall through to the next source, never a 500
        country = answer.country.iso_code
        continent = answer.continent.code
        if country is None and continent is None:
            return None
        return GeoAnswer(country, continent)

    def close(self) -> None:
        self._reader.close()
