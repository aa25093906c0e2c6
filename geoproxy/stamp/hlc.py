"""Hybrid logical clock versions: last-write-wins that survives clock skew and ties.

A version is (wall milliseconds, logical counter, origin stamp). Versions compare in that
order, so every stamp picks the same winner whatever the arrival order; the origin breaks
exact ties deterministically. A stamp's clock never goes backwards: it moves past every
version it issues or observes (Kulkarni et al., "Logical Physical Clocks", 2014).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass

#: A remote version further ahead of our wall clock than this does not drag our clock
#: forward; the stamp's ``max_clock_skew`` (same default) refuses such changes outright.
MAX_DRIFT_MS = 60_000
#: The largest logical counter: the encoding has six digits for it, so that encoded versions
#: sort like versions. A clock that would pass it moves to the next millisecond instead.
MAX_LOGICAL = 999_999
#: The largest wall time (thirteen digits: the year 2286). Versions are bounded by it, so
#: that every version there is can be encoded, read back, and sorts like its text.
MAX_WALL = 9_999_999_999_999
_ORIGIN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}"
_ORIGIN_RE = re.compile(_ORIGIN, re.ASCII)
_ENCODED = re.compile(rf"(\d{{13}})-(\d{{6}})-({_ORIGIN})", re.ASCII)


class VersionOverflow(ValueError):
    """No version exists past the largest one (wall ``MAX_WALL``, logical ``MAX_LOGICAL``)."""


@dataclass(frozen=True, order=True, slots=True)
class Version:
    wall: int  # milliseconds since the epoch
    logical: int  # orders events within one millisecond
    origin: str  # the stamp that made the change

    def __post_init__(self) -> None:
        # Out-of-range parts could not be encoded (or read back, or sort like their text).
        if not (0 <= self.wall <= MAX_WALL and 0 <= self.logical <= MAX_LOGICAL):
            raise VersionOverflow(
                f"version out of range: wall {self.wall} (0 to {MAX_WALL}), logical "
                f"{self.logical} (0 to {MAX_LOGICAL})"
            )
        if not isinstance(self.origin, str) or not _ORIGIN_RE.fullmatch(self.origin):
            raise ValueError(f"not a stamp name: {str(self.origin)[:80]!r}")

    def encode(self) -> str:
        """Fixed-width text that sorts like the version itself (used as the ETag)."""
        return f"{self.wall:013d}-{self.logical:06d}-{self.origin}"

    @classmethod
    def decode(cls, text: str) -> Version:
        m = _ENCODED.fullmatch(text)
        if m is None:
            raise ValueError(f"not a version: {text[:80]!r}")
        return cls(int(m.group(1)), int(m.group(2)), m.group(3))

    def successor(self, origin: str) -> Version:
        """A version of ``origin`` just after this one (still six logical digits);
        VersionOverflow past the largest version."""
        if self.logical < MAX_LOGICAL:
            return Version(self.wall, self.logical + 1, origin)
        return Version(self.wall + 1, 0, origin)  # VersionOverflow past MAX_WALL


class HybridClock:
    def __init__(
        self,
        origin: str,
        clock: Callable[[], float] = time.time,
        last: Version | None = None,
        max_drift_ms: int = MAX_DRIFT_MS,
    ) -> None:
        self.origin = origin
        self._clock = clock
        self._wall = last.wall if last else 0
        self._logical = last.logical if last else 0
        self.max_drift_ms = max_drift_ms

    def physical(self) -> int:
        """The wall clock now, in milliseconds."""
        return int(self._clock() * 1000)

    def ahead_ms(self) -> int:
        """How far the last version issued or observed is ahead of the wall clock."""
        return self._wall - self.physical()

    def now(self) -> Version:
        """A new version, greater than every version issued or observed so far."""
        pt = self.physical()
        if pt > self._wall:
            self._wall, self._logical = pt, 0
        else:
            last = Version(self._wall, self._logical, self.origin).successor(self.origin)
            self._wall, self._logical = last.wall, last.logical
        return Version(self._wall, self._logical, self.origin)

    def observe(self, remote: Version) -> None:
        """Move past a version received from a peer."""
        pt = self.physical()
        if remote.wall > pt + self.max_drift_ms:
            return
        if remote.wall > self._wall:
            self._wall, self._logical = remote.wall, remote.logical
        elif remote.wall == self._wall:
            self._logical = max(self._logical, remote.logical)
