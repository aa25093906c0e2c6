"""Exception tree: every error geoproxy raises on purpose, in one place. Imports nothing
of ours, so every layer may raise these. (The reference stamp, a package of its own,
keeps its own errors in geoproxy/stamp/.)

    GeoproxyError
    ├── ConfigError          a config file is unusable (every problem, one line each)
    ├── GeoIPError           the GeoIP database cannot be opened or read
    │   └── GeoIPLookupError one look-up failed (a corrupt record)
    ├── ListenError          a listener could not bind
    ├── ConnectFailed        (also an OSError) no connection to a geode could be opened
    ├── BadResponse          a geode's answer could not be parsed
    └── ClientBodyError      the client's request body ended the exchange
        ├── BodyTooLarge     past limits.max_body_bytes
        └── BodyTimeout      too slow (limits.body_timeout, limits.body_min_rate)
"""

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


class ListenError(GeoproxyError):
    """A listener could not bind."""


class ConnectFailed(GeoproxyError, OSError):
    """No connection could be opened to the geode (nothing was sent). ``tls_reason``:
    when the TLS handshake failed, why, as a metric label (geoproxy/health/tls.py)."""

    def __init__(self, message: str, tls_reason: str | None = None) -> None:
        super().__init__(message)
        self.tls_reason = tls_reason


class BadResponse(GeoproxyError):
    """The geode's response head could not be parsed (or was a 101 nobody asked for)."""


class ClientBodyError(GeoproxyError):
    """The client's request body ended the exchange (not the geode)."""


class BodyTooLarge(ClientBodyError):
    """A chunked request body grew past ``limits.max_body_bytes`` while streaming."""


class BodyTimeout(ClientBodyError):
    """The client paused its request body past ``limits.body_timeout``, or sent it slower
    than ``limits.body_min_rate``."""
