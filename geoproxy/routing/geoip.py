"""GeoIP look-up: a protocol the resolver calls, and the MaxMind adapter behind it.

A ``MaxMindLookup`` remembers the identity of the file it opened (device, inode, mtime,
size): ``geoipupdate`` writes a new file and renames it over the old one, so a changed
identity is a new database to open (``Gateway.refresh_geoip``), while the old one,
memory-mapped, keeps answering until the swap."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import geoip2.database
import geoip2.errors
import geoip2.models
import maxminddb

from geoproxy.config.values import Config
from geoproxy.errors import GeoIPError, GeoIPLookupError
from geoproxy.routing.clientip import IPAddress

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
    location: tuple[float, float] | None = None  # (latitude, longitude): City editions
    accuracy_radius: int | None = None  # km around ``location`` (MaxMind: 67 % confidence)


@dataclass(frozen=True, slots=True)
class FileIdentity:
    """Which file a path names, and which version of it: a rename over it (a new inode)
    or a rewrite in place (mtime, size) changes it."""

    device: int
    inode: int
    mtime_ns: int
    size: int

    @classmethod
    def of(cls, path: Path) -> FileIdentity | None:
        """The identity of the file at ``path`` now (None: there is none)."""
        try:
            st = os.stat(path)
        except OSError:
            return None
        return cls(st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)

    def as_list(self) -> list[int]:
        return [self.device, self.inode, self.mtime_ns, self.size]


class GeoLookup(Protocol):
    def __call__(self, ip: IPAddress) -> GeoAnswer | None:
        """The answer, or ``None`` when the address is not in the database. Raises
        ``GeoIPLookupError`` when the look-up itself failed (a corrupt record)."""
        ...


def open_geoip(config: Config, source: str | None = None) -> MaxMindLookup | None:
    """The database ``geoip.database`` names (or ``source``, its inherited descriptor),
    opened and probed; ``GeoIPError`` names the config file and the key, like every
    config error."""
    if config.geoip_database is None:
        return None
    try:
        return MaxMindLookup(config.geoip_database, source=source)
    except GeoIPError as exc:
        raise GeoIPError(f"{config.path}: geoip.database: {exc}") from None


class MaxMindLookup:
    """Reads a MaxMind ``.mmdb`` (GeoIP2/GeoLite2 City or Country edition). Memory-mapped,
    so workers share the pages. ``source``: the file to open when it is not ``path``
    itself (a worker of ``--workers`` opens the supervisor's inherited descriptor)."""

    def __init__(
        self, path: Path, clock: Callable[[], float] = time.monotonic, source: str | None = None
    ) -> None:
        self.path = path
        self._clock = clock
        self._logged_at: float | None = None
        self._unlogged = 0  # failed look-ups since the last message
        # A descriptor held open while the database is in use: the identity is of the
        # very file read (a rename between a stat and an open cannot mix two versions),
        # and a worker of --workers inherits it (one truth: the database the supervisor
        # validated, whatever the path names by then).
        try:
            self.fd = os.open(source or path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise GeoIPError(f"{path}: GeoIP database not found") from None
        except OSError as exc:
            raise GeoIPError(f"{path}: cannot open the GeoIP database: {exc.strerror}") from None
        st = os.fstat(self.fd)
        self.identity = FileIdentity(st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
        try:
            self._open(fd_path(self.fd))
        except BaseException:
            os.close(self.fd)
            raise

    def _open(self, path: str) -> None:
        try:
            self._reader = geoip2.database.Reader(path)
        except FileNotFoundError:
            raise GeoIPError(f"{self.path}: GeoIP database not found") from None
        except (OSError, ValueError, maxminddb.InvalidDatabaseError) as exc:
            raise GeoIPError(
                f"{self.path}: not a readable MaxMind database: "
                f"{str(exc).replace(path, str(self.path))}"
            ) from None
        metadata = self._reader.metadata()
        kind = metadata.database_type
        #: When MaxMind built it (seconds since the epoch): its age is what goes stale.
        self.build_epoch = int(metadata.build_epoch)
        if not any(edition in kind for edition in ("City", "Country", "Enterprise")):
            self._reader.close()
            raise GeoIPError(
                f"{self.path}: database type {kind!r} has no country data (use a City, Country or "
                "Enterprise edition)"
            )
        self.database_type = kind
        # geoip2 binds each method to its edition; a City record holds country data too.
        self._lookup: Callable[[IPAddress], geoip2.models.Country]  # City is a Country
        self._located = "Country" not in kind  # City and Enterprise records have a location
        if "Enterprise" in kind:
            self._lookup = self._reader.enterprise
        elif "City" in kind:
            self._lookup = self._reader.city
        else:
            self._lookup = self._reader.country
        try:
            self._probe(path)
        except (maxminddb.InvalidDatabaseError, ValueError, TypeError, KeyError) as exc:
            self._reader.close()
            raise GeoIPError(f"{self.path}: corrupt MaxMind database: {exc}") from None

    def _probe(self, path: str) -> None:
        """Decode the first records and look their addresses up as traffic would."""
        with maxminddb.open_database(path) as raw:
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
        if self._located:
            place = answer.location  # type: ignore[attr-defined]  # a City record's
            lat, lon = place.latitude, place.longitude
            if lat is not None and lon is not None:
                return GeoAnswer(country, continent, (lat, lon), place.accuracy_radius)
        return GeoAnswer(country, continent)

    def _failed(self, exc: Exception) -> None:
        self._unlogged += 1
        now = self._clock()
        if self._logged_at is not None and now - self._logged_at < ERROR_LOG_INTERVAL:
            return
        log.error(
            "%s: GeoIP look-up failed, the database is corrupt: %s (%d failed "
            "look-ups since the last such message; logged at most every %gs, each "
            'counted as geoproxy_region_resolutions_total{source="geoip",'
            'result="error"})',
            self.path,
            exc,
            self._unlogged,
            ERROR_LOG_INTERVAL,
        )
        self._logged_at = now
        self._unlogged = 0

    def close(self) -> None:
        self._reader.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)


def fd_path(fd: int) -> str:
    """A path that opens the file behind ``fd`` (Linux, and the BSDs' /dev/fd)."""
    for folder in ("/proc/self/fd", "/dev/fd"):
        if os.path.isdir(folder):
            return f"{folder}/{fd}"
    raise GeoIPError("cannot re-open a file descriptor on this system (no /proc/self/fd)")
