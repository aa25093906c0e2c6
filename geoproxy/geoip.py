"""GeoIP look-up: a protocol the resolver calls, and the MaxMind adapter behind it."""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import geoip2.database
import geoip2.errors
import geoip2.models
import maxminddb

from geoproxy.clientip import IPAddress
from geoproxy.config import Config
from geoproxy.errors import GeoIPError, GeoIPLookupError

log = logging.getLogger("geoproxy")

#: Records decoded and looked up when a database is opened: a corrupt data section
#: (MaxMind's ``GeoIP2-City-Test-Broken-Double-Format.mmdb``) fails here, not on traffic.
#: A sample, not a scan: a database corrupt only further on fails look-ups later.
PROBE_RECORDS = 4
#: A failed look-up is logged at most this often (each one is counted).
ERROR_LOG_INTERVAL = 60.0


@dataclass(frozen=True, slots=True)
class GeoAnswer:
    country: str | None  # ISO 3166-1 alpha-2, upper case
    continent: str | None  # AF AN AS EU NA OC SA


class GeoLookup(Protocol):
    def __call__(self, ip: IPAddress) -> GeoAnswer | None:
        """The answer, or ``None`` when the address is not in the database. Raises
        ``GeoIPLookupError`` when the look-up itself failed (a corrupt record)."""
        ...


def open_geoip(config: Config) -> MaxMindLookup | None:
    """The database ``geoip.database`` names, opened and probed; ``GeoIPError`` names the
    config file and the key, like every config error."""
    if config.geoip_database is None:
        return None
    try:
        return MaxMindLookup(config.geoip_database)
    except GeoIPError as exc:
        raise GeoIPError(f"{config.path}: geoip.database: {exc}") from None


class MaxMindLookup:
    """Reads a MaxMind ``.mmdb`` (GeoIP2/GeoLite2 City or Country edition). Opened once;
    memory-mapped, so workers share the pages."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._clock = clock
        self._logged_at: float | None = None
        self._unlogged = 0  # failed look-ups since the last message
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
        try:
            self._probe()
        except (maxminddb.InvalidDatabaseError, ValueError, TypeError, KeyError) as exc:
            self._reader.close()
            raise GeoIPError(f"{path}: corrupt MaxMind database: {exc}") from None

    def _probe(self) -> None:
        """Decode the first records and look their addresses up as traffic would."""
        with maxminddb.open_database(str(self.path)) as raw:
            for network, _record in itertools.islice(raw, PROBE_RECORDS):
                with contextlib.suppress(geoip2.errors.AddressNotFoundError):  # an alias
                    self._lookup(network.network_address)

    def __call__(self, ip: IPAddress) -> GeoAnswer | None:
        try:
            answer = self._lookup(ip)
        except (geoip2.errors.AddressNotFoundError, ValueError):
            return None  # unknown address, or IPv6 asked of an IPv4-only database
        except maxminddb.InvalidDatabaseError as exc:
            self._failed(exc)  # a corrupt record: the next source decides, never a 500
            raise GeoIPLookupError(str(exc)) from None
        country = answer.country.iso_code
        continent = answer.continent.code
        if country is None and continent is None:
            return None
        return GeoAnswer(country, continent)

    def _failed(self, exc: Exception) -> None:
        self._unlogged += 1
        now = self._clock()
        if self._logged_at is not None and now - self._logged_at < ERROR_LOG_INTERVAL:
            return
        log.error("%s: GeoIP look-up failed, the database is corrupt: %s (%d failed "
                  "look-ups since the last such message; logged at most every %gs, each "
                  "counted as geoproxy_region_resolutions_total{source=\"geoip\","
                  "result=\"error\"})", self.path, exc, self._unlogged,
                  ERROR_LOG_INTERVAL)  # fmt: skip
        self._logged_at = now
        self._unlogged = 0

    def close(self) -> None:
        self._reader.close()
