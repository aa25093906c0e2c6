"""The stamp's local SQLite store: items, PN-counters, and the change log.

Every local write commits the item *and* its change-log row in one transaction (WAL mode):
the change log is the durable replication outbox, so a write that was acknowledged is
replicated even if the process dies right after. Remote changes apply last-write-wins by
version, idempotently; every change that altered state is also in the log, in local order,
which is the event log ``GET /events`` serves.

SQLite calls run on the event loop's thread: each is a short local transaction, and one
connection keeps the ordering simple. ``synchronous=FULL`` (default) makes a commit
survive power loss, not only a process kill.

Changes that cannot be applied (a peer sent an invalid one) or that a peer refused for good
go to the ``dead_letters`` table with the reason, instead of blocking replication.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from geoproxy.stamp.hlc import HybridClock, Version

ITEM, COUNTER = "item", "counter"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id TEXT PRIMARY KEY, value TEXT, deleted INTEGER NOT NULL, version TEXT NOT NULL,
    origin TEXT NOT NULL, region TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, id TEXT NOT NULL,
    value TEXT, deleted INTEGER NOT NULL, version TEXT NOT NULL, origin TEXT NOT NULL,
    region TEXT NOT NULL, recorded_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS changes_by_origin ON changes (origin, seq);
CREATE TABLE IF NOT EXISTS counters (
    id TEXT NOT NULL, stamp TEXT NOT NULL, region TEXT NOT NULL, p INTEGER NOT NULL,
    n INTEGER NOT NULL, version TEXT NOT NULL, PRIMARY KEY (id, stamp));
CREATE TABLE IF NOT EXISTS peer_cursors (peer TEXT PRIMARY KEY, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS dead_letters (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, direction TEXT NOT NULL, peer TEXT NOT NULL,
    change TEXT NOT NULL, reason TEXT NOT NULL, recorded_at REAL NOT NULL);
"""
#: A counter slot is a signed 64-bit integer in SQLite (and in most peers' languages).
INT64_MAX = 2**63 - 1
#: What one kept dead letter holds of the raw change (the reason is always whole).
DEAD_LETTER_BYTES = 64 * 1024


class ClockAhead(Exception):
    """The restored clock is further ahead of the wall clock than ``max_clock_skew``."""


class CounterOverflow(ValueError):
    """An increment would take a counter slot past ``INT64_MAX``."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    seq: int
    direction: str  # received: a peer's change we refused; sent: ours a peer refused
    peer: str
    change: str  # the raw change (JSON text, cut at DEAD_LETTER_BYTES)
    reason: str
    recorded_at: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "direction": self.direction,
            "peer": self.peer,
            "change": self.change,
            "reason": self.reason,
            "recorded_at": self.recorded_at,
        }


@dataclass(frozen=True, slots=True)
class Change:
    """One replicated change: an item write or delete, or one stamp's counter slot."""

    kind: str  # item | counter
    id: str
    value: str | None  # JSON text; for a counter {"p": .., "n": ..}; None for a delete
    deleted: bool
    version: Version
    region: str  # the origin stamp's region

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "id": self.id,
            "value": None if self.value is None else json.loads(self.value),
            "deleted": self.deleted,
            "version": self.version.encode(),
            "region": self.region,
        }


@dataclass(frozen=True, slots=True)
class Item:
    id: str
    value: str | None  # JSON text, None when deleted
    deleted: bool
    version: Version
    region: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "value": None if self.value is None else json.loads(self.value),
            "version": self.version.encode(),
            "origin": {"stamp": self.version.origin, "region": self.region},
            "timestamp": self.version.wall / 1000,
        }


@dataclass(frozen=True, slots=True)
class ApplyResult:
    applied: int  # changes that altered state
    ignored: int  # older than, or the same as, what we have (duplicates are harmless)
    conflicts: int  # a concurrent write from another stamp was overruled, either way


class Store:
    def __init__(
        self,
        path: Path,
        stamp: str,
        region: str,
        durable: bool = True,
        max_clock_skew: float = 60.0,
        allow_clock_ahead: bool = True,
    ) -> None:
        """``allow_clock_ahead`` False: refuse (ClockAhead) to resume a clock that the log
        puts more than ``max_clock_skew`` seconds ahead of the wall clock."""
        self.stamp = stamp
        self.region = region
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), isolation_level=None, timeout=5.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        self._db.executescript(_SCHEMA)
        row = self._db.execute(
            "SELECT version FROM changes WHERE origin = ? ORDER BY seq DESC LIMIT 1", (stamp,)
        ).fetchone()
        # After a restart the clock resumes past the last version this stamp issued.
        skew_ms = int(max_clock_skew * 1000)
        try:
            last = Version.decode(row[0]) if row else None
        except ValueError as exc:
            self._db.close()
            raise ClockAhead(
                f"{path}: the last version this stamp issued is unreadable ({exc})"
            ) from None
        self.clock = HybridClock(stamp, last=last, max_drift_ms=skew_ms)
        ahead = self.clock.ahead_ms()
        if last is not None and ahead > skew_ms and not allow_clock_ahead:
            self._db.close()
            raise ClockAhead(
                f"{path}: the last version this stamp issued ({last.encode()}) is "
                f"{ahead / 1000:.0f}s ahead of this machine's clock, more than max_clock_skew "
                f"({max_clock_skew:g}s): fix the clock, or start once with "
                "--allow-clock-ahead to keep issuing versions after that one"
            )

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def ping(self) -> None:
        """Raise if the database cannot be read."""
        self._db.execute("SELECT count(*) FROM changes").fetchone()

    # -- items -----------------------------------------------------------------------

    def get(self, id: str) -> Item | None:
        row = self._db.execute(
            "SELECT id, value, deleted, version, region FROM items WHERE id = ?", (id,)
        ).fetchone()
        return _item(row) if row else None

    def items(self, prefix: str, limit: int, after: str = "") -> list[Item]:
        """Live items whose id starts with ``prefix``, in id order, after ``after``."""
        return self.items_page(prefix, limit, after)[0]

    def items_page(
        self, prefix: str, limit: int, after: str = "", max_bytes: int | None = None
    ) -> tuple[list[Item], bool]:
        """As ``items``, also cut at about ``max_bytes`` of values (never empty when there
        is one): (page, whether more may follow)."""
        rows = self._db.execute(
            "SELECT id, value, deleted, version, region FROM items WHERE deleted = 0 "
            "AND id > ? AND substr(id, 1, ?) = ? ORDER BY id LIMIT ?",
            (after, len(prefix), prefix, limit),
        )
        page, more = _budgeted(rows, limit, max_bytes, value_at=1)
        return [_item(r) for r in page], more

    def count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM items WHERE deleted = 0").fetchone()[0])

    def put(self, id: str, value: str | None) -> Change:
        """A local write (``value`` None: a delete, kept as a tombstone)."""
        with self._tx() as db:
            version = self.clock.now()
            row = db.execute("SELECT version FROM items WHERE id = ?", (id,)).fetchone()
            if row is not None and (current := Version.decode(row[0])) >= version:
                # What we hold is ahead of our clock: from a stamp further ahead than
                # MAX_DRIFT_MS, or observed before a restart. This write follows it, so it
                # must beat it on every stamp, as it does here; else the stamps diverge.
                version = current.successor(self.stamp)
            change = Change(ITEM, id, value, value is None, version, self.region)
            _upsert_item(db, change)
            _log(db, change)
        return change

    # -- counters --------------------------------------------------------------------

    def increment(self, id: str, delta: int) -> Change:
        """Add ``delta`` to this stamp's slot of a PN-counter."""
        with self._tx() as db:
            row = db.execute(
                "SELECT p, n FROM counters WHERE id = ? AND stamp = ?", (id, self.stamp)
            ).fetchone()
            p, n = row if row else (0, 0)
            p, n = (p + delta, n) if delta >= 0 else (p, n - delta)
            if max(p, n) > INT64_MAX:
                raise CounterOverflow(
                    f"counter {id!r}: this stamp's slot would pass "
                    f"{INT64_MAX} (a signed 64-bit integer)"
                )
            change = Change(
                COUNTER, id, json.dumps({"p": p, "n": n}), False, self.clock.now(), self.region
            )
            _upsert_counter(db, change)
            _log(db, change)
        return change

    def counter(self, id: str) -> dict[str, Any] | None:
        rows = self._db.execute(
            "SELECT stamp, region, p, n FROM counters WHERE id = ? ORDER BY stamp", (id,)
        ).fetchall()
        if not rows:
            return None
        slots = [{"stamp": s, "region": r, "increments": p, "decrements": n} for s, r, p, n in rows]
        return {"id": id, "value": sum(p - n for _, _, p, n in rows), "slots": slots}

    # -- replication -----------------------------------------------------------------

    def apply(self, changes: list[Change]) -> ApplyResult:
        """Apply peers' changes in one transaction: last-write-wins for items (a tombstone
        is a write), per-slot maximum for counters. Re-applying a change is a no-op."""
        applied = ignored = conflicts = 0
        with self._tx() as db:
            for change in changes:
                self.clock.observe(change.version)
                if change.kind == COUNTER:
                    changed = _merge_counter(db, change)
                    conflict = False
                else:
                    row = db.execute(
                        "SELECT version FROM items WHERE id = ?", (change.id,)
                    ).fetchone()
                    current = Version.decode(row[0]) if row else None
                    changed = current is None or change.version > current
                    conflict = (
                        current is not None
                        and current != change.version
                        and (current.origin != change.version.origin)
                    )
                    if changed:
                        _upsert_item(db, change)
                if changed:
                    _log(db, change)
                    applied += 1
                else:
                    ignored += 1
                conflicts += conflict
        return ApplyResult(applied, ignored, conflicts)

    def changes_since(
        self, seq: int, limit: int, origin: str | None = None, max_bytes: int | None = None
    ) -> list[tuple[int, Change]]:
        """Logged changes after ``seq`` in local order (only ``origin``'s, if given), cut
        at about ``max_bytes`` of values (never empty when there is one)."""
        where = "seq > ? AND origin = ?" if origin else "seq > ?"
        sql = (
            "SELECT seq, value, kind, id, deleted, version, region FROM changes "
            f"WHERE {where} ORDER BY seq LIMIT ?"
        )
        args: tuple[Any, ...] = (seq, origin, limit) if origin else (seq, limit)
        page, _ = _budgeted(self._db.execute(sql, args), limit, max_bytes, value_at=1)
        return [
            (s, Change(k, i, v, bool(d), Version.decode(ver), r)) for s, v, k, i, d, ver, r in page
        ]

    # -- dead letters ----------------------------------------------------------------

    def quarantine(self, direction: str, peer: str, letters: list[tuple[str, str]]) -> None:
        """Keep changes that could not be applied or delivered, each (raw JSON, why), in
        one transaction."""
        now = time.time()
        rows = [(direction, peer, _cut(raw), reason, now) for raw, reason in letters]
        with self._tx() as db:
            db.executemany(
                "INSERT INTO dead_letters (direction, peer, change, reason, "
                "recorded_at) VALUES (?, ?, ?, ?, ?)",
                rows,
            )

    def dead_letters(self, since: int = 0, limit: int = 100) -> list[DeadLetter]:
        rows = self._db.execute(
            "SELECT seq, direction, peer, change, reason, recorded_at FROM dead_letters "
            "WHERE seq > ? ORDER BY seq LIMIT ?",
            (since, limit),
        ).fetchall()
        return [DeadLetter(*row) for row in rows]

    def cursor(self, peer: str) -> int:
        row = self._db.execute("SELECT seq FROM peer_cursors WHERE peer = ?", (peer,)).fetchone()
        return int(row[0]) if row else 0

    def set_cursor(self, peer: str, seq: int) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO peer_cursors (peer, seq) VALUES (?, ?) ON CONFLICT(peer) "
                "DO UPDATE SET seq = max(seq, excluded.seq)",
                (peer, seq),
            )

    def backlog(self, peer: str) -> tuple[int, float | None]:
        """This stamp's changes a peer has not acknowledged: (count, age of the oldest)."""
        row = self._db.execute(
            "SELECT count(*), min(recorded_at) FROM changes WHERE origin = ? AND seq > ?",
            (self.stamp, self.cursor(peer)),
        ).fetchone()
        count, oldest = int(row[0]), row[1]
        return count, (time.time() - oldest) if oldest is not None else None


def _cut(raw: str) -> str:
    if len(raw) <= DEAD_LETTER_BYTES:
        return raw
    return raw[:DEAD_LETTER_BYTES] + f"... ({len(raw)} characters in all)"


#: What a row costs in a page besides its value (id, version, region, JSON punctuation).
ROW_OVERHEAD = 300


def _budgeted(
    rows: sqlite3.Cursor, limit: int, max_bytes: int | None, value_at: int
) -> tuple[list[tuple[Any, ...]], bool]:
    """Rows up to ``limit``, and up to ``max_bytes`` counting each row's value (at
    ``value_at``) and ROW_OVERHEAD; at least one row. (rows, whether the budget or the
    limit cut the page). Rows past the budget are never read."""
    page: list[tuple[Any, ...]] = []
    size = 0
    try:
        for row in rows:
            size += len(row[value_at] or "") + ROW_OVERHEAD
            if max_bytes is not None and size > max_bytes and page:
                return page, True
            page.append(row)
    finally:
        rows.close()
    return page, len(page) == limit


def _item(row: tuple[Any, ...]) -> Item:
    id, value, deleted, version, region = row
    return Item(id, value, bool(deleted), Version.decode(version), region)


def _log(db: sqlite3.Connection, change: Change) -> None:
    db.execute(
        "INSERT INTO changes (kind, id, value, deleted, version, origin, region, recorded_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            change.kind,
            change.id,
            change.value,
            int(change.deleted),
            change.version.encode(),
            change.version.origin,
            change.region,
            time.time(),
        ),
    )


def _upsert_item(db: sqlite3.Connection, change: Change) -> None:
    db.execute(
        "INSERT INTO items (id, value, deleted, version, origin, region) VALUES (?, ?, ?, ?, ?, ?) "
        "ON CONFLICT(id) DO UPDATE SET value = excluded.value, deleted = excluded.deleted, "
        "version = excluded.version, origin = excluded.origin, region = excluded.region",
        (
            change.id,
            change.value,
            int(change.deleted),
            change.version.encode(),
            change.version.origin,
            change.region,
        ),
    )


def _counter_slot(change: Change) -> tuple[int, int]:
    data = json.loads(change.value or "{}")
    return int(data["p"]), int(data["n"])


def _upsert_counter(db: sqlite3.Connection, change: Change) -> None:
    p, n = _counter_slot(change)
    db.execute(
        "INSERT INTO counters (id, stamp, region, p, n, version) VALUES (?, ?, ?, ?, ?, ?) "
        "ON CONFLICT(id, stamp) DO UPDATE SET p = max(p, excluded.p), n = max(n, excluded.n), "
        "version = max(version, excluded.version)",
        (change.id, change.version.origin, change.region, p, n, change.version.encode()),
    )


def _merge_counter(db: sqlite3.Connection, change: Change) -> bool:
    """Merge one stamp's slot (per-slot maximum: the PN-counter join). True if it grew."""
    row = db.execute(
        "SELECT p, n FROM counters WHERE id = ? AND stamp = ?", (change.id, change.version.origin)
    ).fetchone()
    p, n = _counter_slot(change)
    if row is not None and p <= row[0] and n <= row[1]:
        return False
    _upsert_counter(db, change)
    return True
