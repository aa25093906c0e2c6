"""Exception tree. Imports nothing of ours, so every layer may raise these."""

from __future__ import annotations


class GeoproxyError(Exception):
    """Base of every error geoproxy raises on purpose."""


class ConfigError(GeoproxyError):
    """A configuration file is unusable. ``problems`` holds one line per error, each naming
    the file, the path inside the YAML and the bad value."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class GeoIPError(GeoproxyError):
    """The GeoIP database named in the config cannot be opened or read."""


class GeoIPLookupError(GeoIPError):
    """One GeoIP look-up failed (a corrupt record), unlike an address not in the database."""
