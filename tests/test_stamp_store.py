"""The stamp's data layer in-process: hybrid logical clock versions, the SQLite store
(items, tombstones, PN-counters, the change log and cursors) and convergence of
last-write-wins whatever the order, duplication or batching of delivery.

Real SQLite files in ``tmp_path``; no HTTP. Expected states are computed here from the
generated changes (plain tuples and sums), never by asking a store.
"""

from __future__ import annotations

import itertools
import json
import random
import sqlite3
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from geoproxy.stamp.hlc import (
    MAX_DRIFT_MS,
    MAX_LOGICAL,
    MAX_WALL,
    HybridClock,
    Version,
    VersionOverflow,
)
from geoproxy.stamp.store import COUNTER, ITEM, Change, ClockAhead, Store

T0 = 1_700_000_000_000  # a wall time in milliseconds (Nov 2023)
EU, US, AP = "eu-west", "us-east", "ap-northeast"  # stamp names; as origins AP < EU < US
REGIONS = {EU: "europe", US: "north-america", AP: "asia"}


class FakeClock:
    """A wall clock the test moves by hand; ``ms`` is what the stamp should read."""

    def __init__(self, ms: int = T0) -> None:
        self.ms = ms

    def __call__(self) -> float:
        # Half a millisecond in: float seconds never truncate to the previous millisecond.
        return (self.ms + 0.5) / 1000


def open_store(path: Path, stamp: str = EU, *, durable: bool = True) -> Store:
    return Store(path, stamp, REGIONS.get(stamp, "test-region"), durable=durable)


def fresh_store(path: Path, stamp: str, clock: FakeClock, *, durable: bool = True) -> Store:
    """A new store whose clock reads ``clock`` (only for a new file: no clock to resume)."""
    store = open_store(path, stamp, durable=durable)
    store.clock = HybridClock(stamp, clock=clock)
    return store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = fresh_store(tmp_path / "eu.db", EU, FakeClock())
    yield s
    s.close()


def item_change(
    id: str, wall: int, logical: int, origin: str, value: Any = None, *, deleted: bool = False
) -> Change:
    text = None if deleted else json.dumps(value)
    return Change(ITEM, id, text, deleted, Version(wall, logical, origin), REGIONS[origin])


def counter_change(id: str, wall: int, logical: int, origin: str, p: int, n: int) -> Change:
    value = json.dumps({"p": p, "n": n})
    return Change(COUNTER, id, value, False, Version(wall, logical, origin), REGIONS[origin])


def log_of(store: Store, origin: str | None = None) -> list[Change]:
    return [c for _, c in store.changes_since(0, 1_000_000, origin=origin)]


# -- hybrid logical clock ----------------------------------------------------------------


@pytest.mark.parametrize(
    "wall_steps_ms",
    [
        pytest.param([1, 1, 1, 1, 1, 1], id="advancing"),
        pytest.param([0, 0, 0, 0, 0, 0], id="standing-still"),
        pytest.param([-1, -5, -1000, -60_000, -1, 0], id="going-backwards"),
        pytest.param([5, -10, 0, 3, -3_600_000, 2, 3_600_000, 0], id="jumping-both-ways"),
    ],
)
def test_versions_strictly_increase_whatever_the_wall_clock_does(
    wall_steps_ms: list[int],
) -> None:
    clock = FakeClock()
    hlc = HybridClock(EU, clock=clock)
    issued = [hlc.now()]
    latest_wall = clock.ms
    for step in wall_steps_ms:
        clock.ms += step
        latest_wall = max(latest_wall, clock.ms)
        issued.append(hlc.now())
        issued.append(hlc.now())  # twice within the same millisecond, too
    assert all(a < b for a, b in itertools.pairwise(issued)), issued
    assert all(v.origin == EU for v in issued)
    assert max(v.wall for v in issued) == latest_wall  # never ahead of any reading


def test_versions_follow_the_wall_clock_while_it_advances() -> None:
    clock = FakeClock()
    hlc = HybridClock(EU, clock=clock)
    first = hlc.now()
    clock.ms += 250
    assert (first, hlc.now()) == (Version(T0, 0, EU), Version(T0 + 250, 0, EU))


def test_clock_stays_fixed_width_past_a_million_versions_in_one_millisecond() -> None:
    # The encoding has six digits of logical counter; the clock must never need a seventh,
    # or encoded versions (ETags, SQL max()) stop sorting like versions.
    clock = FakeClock()
    hlc = HybridClock(EU, clock=clock, last=Version(T0, 999_998, EU))
    issued = [hlc.now() for _ in range(3)]
    assert all(a < b for a, b in itertools.pairwise(issued))
    encoded = [v.encode() for v in issued]
    assert encoded == sorted(encoded)
    assert [Version.decode(e) for e in encoded] == issued


@pytest.mark.parametrize(
    ("remote", "label"),
    [
        pytest.param(Version(T0 + 5_000, 7, US), "wall ahead", id="wall-ahead"),
        pytest.param(Version(T0, 42, US), "same wall, logical ahead", id="logical-ahead"),
        pytest.param(Version(T0 + MAX_DRIFT_MS, 3, US), "at the drift limit", id="at-drift-limit"),
        pytest.param(Version(T0, 999_999, US), "logical at its maximum", id="logical-max"),
    ],
)
def test_observing_a_remote_version_ahead_moves_the_clock_past_it(
    remote: Version, label: str
) -> None:
    clock = FakeClock()
    hlc = HybridClock(EU, clock=clock)
    before = hlc.now()
    hlc.observe(remote)
    after = hlc.now()
    assert before < remote < after, label
    assert Version.decode(after.encode()) == after, label


def test_observing_an_older_remote_version_does_not_move_the_clock_backwards() -> None:
    clock = FakeClock()
    hlc = HybridClock(EU, clock=clock)
    clock.ms += 10_000
    mine = hlc.now()
    hlc.observe(Version(T0, 500, US))
    assert hlc.now() == Version(mine.wall, 1, EU)


def test_same_millisecond_remote_with_a_lower_counter_never_moves_the_clock_back() -> None:
    clock = FakeClock()  # never moves: every version is of the same millisecond
    hlc = HybridClock(EU, clock=clock)
    mine = [hlc.now() for _ in range(5)]
    assert mine[-1] == Version(T0, 4, EU)
    hlc.observe(Version(T0, 1, US))  # same wall time, a lower counter
    after = hlc.now()
    assert after > mine[-1]
    assert after == Version(T0, 5, EU)


@pytest.mark.parametrize(
    "ahead_ms",
    [
        pytest.param(MAX_DRIFT_MS + 1, id="1ms-beyond-limit"),
        pytest.param(MAX_DRIFT_MS * 100, id="far-beyond-limit"),
    ],
)
def test_remote_version_beyond_max_drift_does_not_drag_the_clock(ahead_ms: int) -> None:
    clock = FakeClock()
    hlc = HybridClock(EU, clock=clock)
    hlc.observe(Version(T0 + ahead_ms, 0, US))
    assert hlc.now() == Version(T0, 0, EU)


@pytest.mark.parametrize(
    "version",
    [
        pytest.param(Version(T0, 0, EU), id="plain"),
        pytest.param(Version(0, 0, "a"), id="epoch-one-char-origin"),
        pytest.param(Version(9_999_999_999_999, 999_999, "Z" * 63), id="maximal"),
        pytest.param(Version(T0, 12, "stamp_1.eu-west"), id="origin-with-punctuation"),
    ],
)
def test_version_encoding_round_trips(version: Version) -> None:
    assert Version.decode(version.encode()) == version


def test_encoded_versions_sort_like_versions() -> None:
    rng = random.Random(7)
    origins = ["a", "a-b", "a.b", "a_b", "ab", "A", "Z", "9", EU, US, AP, "eu-west-2"]
    versions = {Version(T0, 0, o) for o in origins}  # exact ties broken by origin only
    versions |= {Version(w, lo, "x") for w in (0, 9, 10, T0 - 1, T0) for lo in (0, 9, 10, 99_999)}
    versions |= {
        Version(T0 + rng.randrange(1000), rng.randrange(1_000_000), rng.choice(origins))
        for _ in range(500)
    }
    by_version = sorted(versions)
    assert sorted(versions, key=Version.encode) == by_version


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("not-a-version", id="words"),
        pytest.param("1700000000000-000000", id="no-origin"),
        pytest.param("1700000000000-000000-", id="empty-origin"),
        pytest.param("170000000000-000000-eu", id="short-wall"),
        pytest.param("17000000000000-000000-eu", id="long-wall"),
        pytest.param("1700000000000-00000-eu", id="short-logical"),
        pytest.param("1700000000000-1000000-eu", id="logical-past-six-digits"),
        pytest.param("-700000000000-000000-eu", id="negative-wall"),
        pytest.param("1700000000000-000000-eu west", id="space-in-origin"),
        pytest.param("1700000000000-000000--eu", id="origin-starts-with-dash"),
        pytest.param("1700000000000-000000-" + "a" * 64, id="origin-too-long"),
        pytest.param("1700000000000-000000-éu", id="non-ascii-origin"),
        pytest.param("1700000000000-000000-eu\n", id="trailing-newline"),
        pytest.param(" 1700000000000-000000-eu", id="leading-space"),
        pytest.param("\u0661\u0667" + "\u0660" * 11 + "-000000-eu", id="non-ascii-digits"),
    ],
)
def test_decode_rejects_text_that_is_not_an_encoded_version(text: str) -> None:
    with pytest.raises(ValueError, match="not a version"):
        Version.decode(text)


def test_reopened_store_resumes_its_clock_past_its_last_version_after_the_clock_went_back(
    tmp_path: Path,
) -> None:
    path = tmp_path / "eu.db"
    future = FakeClock(4_102_444_800_000)  # 2100-01-01: the real clock is far behind it
    first = fresh_store(path, EU, future)
    issued = [first.put("a", '"1"').version, first.put("a", '"2"').version]
    issued.append(first.increment("hits", 1).version)
    issued.append(first.put("b", None).version)
    first.close()

    again = open_store(path, EU)  # the real wall clock: decades back
    issued += [again.put("c", '"3"').version, again.increment("hits", 1).version]
    again.close()
    assert all(a < b for a, b in itertools.pairwise(issued)), issued
    assert len({v.encode() for v in issued}) == len(issued)


# -- items -------------------------------------------------------------------------------


def test_put_then_get_returns_the_value_with_its_version_and_region(store: Store) -> None:
    change = store.put("fr/paris", '{"pop":2102650}')
    item = store.get("fr/paris")
    assert item is not None
    assert (item.id, item.value, item.deleted, item.version, item.region) == (
        "fr/paris",
        '{"pop":2102650}',
        False,
        change.version,
        "europe",
    )
    assert (change.kind, change.id, change.value, change.deleted) == (
        ITEM,
        "fr/paris",
        '{"pop":2102650}',
        False,
    )
    assert item.as_dict() == {
        "id": "fr/paris",
        "value": {"pop": 2102650},
        "version": change.version.encode(),
        "origin": {"stamp": EU, "region": "europe"},
        "timestamp": change.version.wall / 1000,
    }


def test_get_of_an_unknown_id_is_none(store: Store) -> None:
    assert store.get("nope") is None


def test_overwrite_replaces_value_and_raises_version(store: Store) -> None:
    first = store.put("k", '"one"')
    second = store.put("k", '"two"')
    item = store.get("k")
    assert item is not None
    assert (item.value, item.version) == ('"two"', second.version)
    assert second.version > first.version


def test_delete_leaves_a_tombstone_that_hides_the_item(store: Store) -> None:
    store.put("k", '"v"')
    store.put("other", '"w"')
    gone = store.put("k", None)
    item = store.get("k")
    assert item is not None
    assert (item.value, item.deleted, item.version) == (None, True, gone.version)
    assert (gone.value, gone.deleted) == (None, True)
    assert [i.id for i in store.items("", 10)] == ["other"]
    assert store.count() == 1


def test_write_after_delete_revives_the_item(store: Store) -> None:
    store.put("k", '"v"')
    store.put("k", None)
    back = store.put("k", '"again"')
    item = store.get("k")
    assert item is not None
    assert (item.value, item.deleted, item.version) == ('"again"', False, back.version)
    assert store.count() == 1


_IDS = ["a/1", "a/2", "a/3", "a/4", "a_x", "a%y", "ab", "b/1", "é/1"]


@pytest.fixture
def listed(store: Store) -> Store:
    for id in _IDS:
        store.put(id, json.dumps(id))
    store.put("a/3", None)  # a tombstone never lists
    store.put("zz", None)
    return store


@pytest.mark.parametrize(
    ("prefix", "limit", "after", "expected"),
    [
        pytest.param(
            "",
            100,
            "",
            ["a%y", "a/1", "a/2", "a/4", "a_x", "ab", "b/1", "é/1"],
            id="everything-in-id-order",
        ),
        pytest.param("a/", 100, "", ["a/1", "a/2", "a/4"], id="prefix"),
        pytest.param("a/", 2, "", ["a/1", "a/2"], id="first-page"),
        pytest.param("a/", 2, "a/2", ["a/4"], id="next-page-skips-tombstone"),
        pytest.param("a/", 2, "a/4", [], id="past-the-end"),
        pytest.param("a_", 100, "", ["a_x"], id="underscore-is-literal"),
        pytest.param("a%", 100, "", ["a%y"], id="percent-is-literal"),
        pytest.param("a", 3, "a/2", ["a/4", "a_x", "ab"], id="after-within-prefix"),
        pytest.param("é", 100, "", ["é/1"], id="non-ascii-prefix"),
        pytest.param("a/3", 100, "", [], id="only-a-tombstone"),
        pytest.param("c", 100, "", [], id="no-match"),
    ],
)
def test_items_lists_live_items_by_prefix_with_limit_and_after(
    listed: Store, prefix: str, limit: int, after: str, expected: list[str]
) -> None:
    got = listed.items(prefix, limit, after)
    assert [i.id for i in got] == expected
    assert all(i.value == json.dumps(i.id) and not i.deleted for i in got)


def test_paging_with_after_visits_every_live_item_once(listed: Store) -> None:
    seen: list[str] = []
    after = ""
    while page := listed.items("", 3, after):
        seen += [i.id for i in page]
        after = page[-1].id
    assert seen == sorted(set(_IDS) - {"a/3"})
    assert listed.count() == len(seen)


def test_count_counts_live_items_only(store: Store) -> None:
    assert store.count() == 0
    for id in ("a", "b", "c"):
        store.put(id, "1")
    store.put("b", None)
    store.put("never-lived", None)
    store.apply([item_change("remote", T0 - 5, 0, US, 1)])
    store.apply([item_change("remote-gone", T0 - 5, 0, US, deleted=True)])
    assert store.count() == 3


@pytest.mark.parametrize(
    "write",
    [
        pytest.param(lambda s: s.put("k", '"v"'), id="put"),
        pytest.param(lambda s: s.put("k", None), id="delete"),
        pytest.param(lambda s: s.increment("c", 3), id="increment"),
        pytest.param(lambda s: s.increment("c", -2), id="decrement"),
    ],
)
def test_every_local_write_logs_exactly_the_change_it_returns(store: Store, write: Any) -> None:
    store.put("k", '"before"')
    store.increment("c", 1)
    (last_seq, _) = store.changes_since(0, 100)[-1]
    change = write(store)
    assert store.changes_since(last_seq, 100) == [(last_seq + 1, change)]
    assert store.changes_since(last_seq, 100, origin=EU) == [(last_seq + 1, change)]


def _poison_change_log(path: Path, id: str) -> None:
    """Make every change-log insert for ``id`` fail, from another connection."""
    db = sqlite3.connect(path)
    db.execute(
        f"CREATE TRIGGER poison BEFORE INSERT ON changes WHEN NEW.id = '{id}' "
        "BEGIN SELECT RAISE(ABORT, 'change log refused'); END"
    )
    db.commit()
    db.close()


@pytest.mark.parametrize(
    "write",
    [
        pytest.param(lambda s: s.put("bad", '"new"'), id="put"),
        pytest.param(lambda s: s.put("bad", None), id="delete"),
        pytest.param(lambda s: s.increment("bad", 5), id="increment"),
        pytest.param(
            lambda s: s.apply(
                [item_change("ok", T0 + 9, 0, US, 1), item_change("bad", T0 + 9, 0, US, 2)]
            ),
            id="apply-batch",
        ),
    ],
)
def test_write_whose_change_cannot_be_logged_leaves_no_trace(tmp_path: Path, write: Any) -> None:
    path = tmp_path / "eu.db"
    store = fresh_store(path, EU, FakeClock())
    store.put("bad", '"old"')
    store.increment("bad", 1)
    before_items = [store.get("bad"), store.get("ok"), store.counter("bad")]
    before_log = store.changes_since(0, 100)
    _poison_change_log(path, "bad")
    with pytest.raises(sqlite3.DatabaseError, match="change log refused"):
        write(store)
    assert [store.get("bad"), store.get("ok"), store.counter("bad")] == before_items
    assert store.changes_since(0, 100) == before_log
    store.close()


# -- apply: last-write-wins ---------------------------------------------------------------


def _state(store: Store, id: str) -> tuple[str | None, bool, Version] | None:
    item = store.get(id)
    return None if item is None else (item.value, item.deleted, item.version)


@pytest.mark.parametrize(
    ("held", "incoming", "wins", "conflicts"),
    [
        pytest.param(None, item_change("k", T0, 0, US, "us"), True, 0, id="new-id"),
        pytest.param(
            item_change("k", T0, 0, US, "old"),
            item_change("k", T0 + 1, 0, US, "new"),
            True,
            0,
            id="newer-same-origin",
        ),
        pytest.param(
            item_change("k", T0, 5, US, "us"),
            item_change("k", T0, 6, AP, "ap"),
            True,
            1,
            id="newer-logical-other-origin",
        ),
        pytest.param(
            item_change("k", T0 + 1, 0, US, "us"),
            item_change("k", T0, 9, AP, "ap"),
            False,
            1,
            id="older-other-origin",
        ),
        pytest.param(
            item_change("k", T0, 1, US, "new"),
            item_change("k", T0, 0, US, "old"),
            False,
            0,
            id="older-same-origin",
        ),
        pytest.param(
            item_change("k", T0, 0, AP, "ap"),
            item_change("k", T0, 0, US, "us"),
            True,
            1,
            id="exact-tie-higher-origin-wins",
        ),
        pytest.param(
            item_change("k", T0, 0, US, "us"),
            item_change("k", T0, 0, AP, "ap"),
            False,
            1,
            id="exact-tie-lower-origin-loses",
        ),
        pytest.param(
            item_change("k", T0, 0, US, "us"),
            item_change("k", T0, 0, US, "us"),
            False,
            0,
            id="duplicate",
        ),
        pytest.param(
            item_change("k", T0, 0, US, "us"),
            item_change("k", T0 + 1, 0, AP, deleted=True),
            True,
            1,
            id="tombstone-beats-older-write",
        ),
        pytest.param(
            item_change("k", T0 + 1, 0, US, "us"),
            item_change("k", T0, 0, AP, deleted=True),
            False,
            1,
            id="tombstone-loses-to-newer-write",
        ),
        pytest.param(
            item_change("k", T0, 0, AP, deleted=True),
            item_change("k", T0 + 1, 0, US, "back"),
            True,
            1,
            id="newer-write-revives-tombstone",
        ),
        pytest.param(
            item_change("k", T0 + 1, 0, AP, deleted=True),
            item_change("k", T0, 0, US, "stale"),
            False,
            1,
            id="older-write-stays-deleted",
        ),
    ],
)
def test_apply_keeps_the_highest_version(
    store: Store, held: Change | None, incoming: Change, wins: bool, conflicts: int
) -> None:
    if held is not None:
        store.apply([held])
    log_before = store.changes_since(0, 100)
    result = store.apply([incoming])
    winner = incoming if wins else held
    assert winner is not None
    assert _state(store, "k") == (winner.value, winner.deleted, winner.version)
    assert (result.applied, result.ignored, result.conflicts) == (
        int(wins),
        int(not wins),
        conflicts,
    )
    # Only a change that altered state joins the log (the event log), exactly as received.
    new_log = [c for _, c in store.changes_since(0, 100)][len(log_before) :]
    assert new_log == ([incoming] if wins else [])
    assert store.count() == int(not winner.deleted)


def test_applying_the_same_batch_twice_changes_nothing_the_second_time(store: Store) -> None:
    store.put("mine", '"eu"')
    batch = [
        item_change("k", T0 + 3, 0, US, "us"),
        item_change("k", T0 + 2, 0, AP, "ap"),
        item_change("k2", T0 + 1, 0, AP, deleted=True),
        item_change("mine", T0 + 7, 0, US, "overruled"),
        counter_change("hits", T0 + 1, 0, US, 4, 1),
        counter_change("hits", T0 + 2, 0, AP, 2, 0),
    ]
    first = store.apply(batch)
    assert (first.applied, first.ignored) == (5, 1)
    snapshot = _snapshot(store, ["k", "k2", "mine"], ["hits"])
    log = store.changes_since(0, 100)
    second = store.apply(batch)
    assert (second.applied, second.ignored) == (0, len(batch))
    assert _snapshot(store, ["k", "k2", "mine"], ["hits"]) == snapshot
    assert store.changes_since(0, 100) == log


def test_apply_moves_the_clock_past_what_it_received(store: Store) -> None:
    remote = item_change("r", T0 + 30_000, 12, US, "us")
    store.apply([remote])
    assert store.put("next", '"x"').version > remote.version


@pytest.mark.parametrize(
    "ahead_ms",
    [
        pytest.param(30_000, id="within-drift"),
        pytest.param(MAX_DRIFT_MS + 60_000, id="beyond-drift"),
    ],
)
def test_local_write_over_a_remote_version_ahead_of_the_clock_wins_everywhere(
    tmp_path: Path, ahead_ms: int
) -> None:
    # The remote version is ahead of this stamp's wall clock: within the drift limit it is
    # observed and then forgotten by a restart; beyond it, it is never observed. Either way
    # a local write made on top of it must beat it on every stamp, or the stamps diverge.
    clock = FakeClock()
    eu_path = tmp_path / "eu.db"
    eu = fresh_store(eu_path, EU, clock)
    us = fresh_store(tmp_path / "us.db", US, clock)
    remote = item_change("k", T0 + ahead_ms, 3, US, "from the future")
    us.apply([remote])
    eu.apply([remote])
    eu.close()
    eu = open_store(eu_path, EU)  # a restart: no version of its own to resume from
    eu.clock = HybridClock(EU, clock=clock)
    clock.ms += 1_000
    local = eu.put("k", '"local, later"')
    assert local.version > remote.version
    result = us.apply(log_of(eu, origin=EU))
    assert result.applied == 1
    assert _snapshot(eu, ["k"], []) == _snapshot(us, ["k"], [])
    assert _state(us, "k") == ('"local, later"', False, local.version)
    eu.close()
    us.close()


# -- PN-counters -------------------------------------------------------------------------


def test_own_increments_accumulate_in_this_stamps_slot(store: Store) -> None:
    assert store.counter("hits") is None
    changes = [store.increment("hits", d) for d in (3, 2, -4, 0, -1)]
    assert [json.loads(c.value or "") for c in changes] == [
        {"p": 3, "n": 0},
        {"p": 5, "n": 0},
        {"p": 5, "n": 4},
        {"p": 5, "n": 4},
        {"p": 5, "n": 5},
    ]
    assert all(c.kind == COUNTER and not c.deleted for c in changes)
    assert all(a.version < b.version for a, b in itertools.pairwise(changes))
    assert store.counter("hits") == {
        "id": "hits",
        "value": 0,
        "slots": [{"stamp": EU, "region": "europe", "increments": 5, "decrements": 5}],
    }
    assert store.counter("other") is None


@pytest.mark.parametrize(
    ("later", "slot", "applied"),
    [
        pytest.param((3, 1), (5, 2), False, id="older-state-ignored"),
        pytest.param((5, 2), (5, 2), False, id="same-state-ignored"),
        pytest.param((6, 2), (6, 2), True, id="more-increments"),
        pytest.param((5, 9), (5, 9), True, id="more-decrements"),
        pytest.param((4, 3), (5, 3), True, id="mixed-takes-max-of-each"),
        pytest.param((0, 0), (5, 2), False, id="zero-state-ignored"),
    ],
)
def test_merging_a_slot_state_never_lowers_it(
    store: Store, later: tuple[int, int], slot: tuple[int, int], applied: bool
) -> None:
    store.increment("hits", 10)
    store.apply([counter_change("hits", T0 + 5, 0, US, 5, 2)])
    result = store.apply([counter_change("hits", T0 + 1, 0, US, *later)])
    assert (result.applied, result.ignored, result.conflicts) == (int(applied), int(not applied), 0)
    counter = store.counter("hits")
    assert counter is not None
    assert counter["slots"] == [
        {"stamp": EU, "region": "europe", "increments": 10, "decrements": 0},
        {"stamp": US, "region": "north-america", "increments": slot[0], "decrements": slot[1]},
    ]
    assert counter["value"] == 10 + slot[0] - slot[1]


def test_counter_totals_equal_all_increments_whatever_the_merge_order(tmp_path: Path) -> None:
    clock = FakeClock()
    stamps = {name: fresh_store(tmp_path / f"{name}.db", name, clock) for name in (EU, US, AP)}
    deltas = {EU: [5, -2, 1], US: [-7, 3], AP: [10, 10, -1, -1]}
    rng = random.Random(5)
    for name, ds in deltas.items():
        for d in ds:
            stamps[name].increment("hits", d)
            clock.ms += rng.choice([0, 1])
    changes = [c for s in stamps.values() for c in log_of(s)]
    expected = sum(sum(ds) for ds in deltas.values())
    orders = [changes[::-1]] + [rng.sample(changes, len(changes)) for _ in range(40)]
    for n, order in enumerate(orders):
        target = open_store(tmp_path / "targets" / f"{n}.db", "target", durable=False)
        for change in order:
            target.apply([change])
        counter = target.counter("hits")
        assert counter is not None
        assert counter["value"] == expected, order
        assert {s["stamp"]: (s["increments"], s["decrements"]) for s in counter["slots"]} == {
            name: (sum(d for d in ds if d > 0), -sum(d for d in ds if d < 0))
            for name, ds in deltas.items()
        }
        target.close()
    for s in stamps.values():
        s.close()


# -- convergence: any delivery order, any duplication ------------------------------------

Snapshot = tuple[
    dict[str, tuple[str | None, bool, str] | None],
    dict[str, tuple[int, dict[str, tuple[int, int]]]],
]


def _snapshot(store: Store, ids: Iterable[str], counter_ids: Iterable[str]) -> Snapshot:
    items: dict[str, tuple[str | None, bool, str] | None] = {}
    for id in ids:
        item = store.get(id)
        items[id] = None if item is None else (item.value, item.deleted, item.version.encode())
    counters: dict[str, tuple[int, dict[str, tuple[int, int]]]] = {}
    for id in counter_ids:
        counter = store.counter(id)
        assert counter is not None, id
        slots = {s["stamp"]: (s["increments"], s["decrements"]) for s in counter["slots"]}
        counters[id] = (counter["value"], slots)
    assert [i.id for i in store.items("", 10_000)] == sorted(
        id for id, state in items.items() if state is not None and not state[1]
    )
    return items, counters


def _expected(changes: Iterable[Change]) -> Snapshot:
    """The winner of every id, from the changes alone: highest (wall, logical, origin)."""
    best: dict[str, tuple[tuple[int, int, str], Change]] = {}
    slots: dict[str, dict[str, tuple[int, int]]] = {}
    for c in changes:
        key = (c.version.wall, c.version.logical, c.version.origin)
        if c.kind == ITEM:
            if c.id not in best or key > best[c.id][0]:
                best[c.id] = (key, c)
        else:
            data = json.loads(c.value or "")
            p, n = slots.setdefault(c.id, {}).get(c.version.origin, (0, 0))
            slots[c.id][c.version.origin] = (max(p, data["p"]), max(n, data["n"]))
    items: dict[str, tuple[str | None, bool, str] | None] = {
        id: (c.value, c.deleted, f"{w:013d}-{lo:06d}-{o}") for id, ((w, lo, o), c) in best.items()
    }
    counters = {id: (sum(p - n for p, n in s.values()), s) for id, s in slots.items()}
    return items, counters


def _ids(changes: Iterable[Change]) -> tuple[list[str], list[str]]:
    changes = list(changes)
    items = sorted({c.id for c in changes if c.kind == ITEM})
    return items, sorted({c.id for c in changes if c.kind == COUNTER})


SMALL_SETS = [
    pytest.param(
        [
            item_change("k", T0, 0, EU, "eu"),
            item_change("k", T0, 0, US, "us"),
            item_change("k", T0, 0, AP, "ap"),
            item_change("k", T0 - 1, 9, US, "older"),
        ],
        {"k": ('"us"', False)},
        {},
        id="exact-wall-clock-tie-broken-by-origin",
    ),
    pytest.param(
        [
            item_change("k", T0, 0, EU, "eu"),
            item_change("k", T0, 1, AP, deleted=True),
            item_change("k", T0, 1, EU, "eu-again"),
            item_change("j", T0, 0, AP, deleted=True),
            item_change("j", T0 - 1, 0, US, "us"),
        ],
        {"k": ('"eu-again"', False), "j": (None, True)},
        {},
        id="deletes-against-writes",
    ),
    pytest.param(
        [
            counter_change("c", T0, 0, EU, 1, 0),
            counter_change("c", T0, 1, EU, 1, 2),
            counter_change("c", T0, 0, US, 5, 0),
            counter_change("c", T0 + 1, 0, US, 7, 1),
            counter_change("c", T0, 0, AP, 0, 3),
        ],
        {},
        {"c": 1 + 7 - 2 - 1 - 3},
        id="counter-slots",
    ),
    pytest.param(
        [
            item_change("k", T0 + 2, 0, AP, "ap"),
            item_change("k", T0 + 2, 0, EU, deleted=True),
            counter_change("k", T0 + 2, 0, US, 2, 0),
            counter_change("k", T0 + 3, 0, US, 3, 0),
            item_change("m", T0 + 2, 0, US, "us"),
        ],
        {"k": (None, True), "m": ('"us"', False)},
        {"k": 3},
        id="items-and-counters-sharing-an-id",
    ),
]


@pytest.mark.parametrize(("changes", "winners", "totals"), SMALL_SETS)
def test_every_delivery_order_of_a_small_set_converges_on_the_same_winner(
    tmp_path: Path,
    changes: list[Change],
    winners: dict[str, tuple[str | None, bool]],
    totals: dict[str, int],
) -> None:
    ids, counter_ids = _ids(changes)
    expected = _expected(changes)
    # The hand-written winners agree with the independent computation.
    assert {id: s[:2] for id, s in expected[0].items() if s} == winners
    assert {id: total for id, (total, _) in expected[1].items()} == totals
    for n, order in enumerate(itertools.permutations(changes)):
        target = open_store(tmp_path / f"{n}.db", "target", durable=False)
        for change in order:
            target.apply([change])
        assert _snapshot(target, ids, counter_ids) == expected, order
        target.close()


def _history(tmp_path: Path, seed: int, steps: int) -> tuple[list[Change], dict[str, int]]:
    """Concurrent writes at three stamps sharing a wall clock (so exact ties happen),
    one of them skewed behind, with occasional exchanges (causal writes). Returns every
    stamp's own changes and the true sum of increments per counter."""
    rng = random.Random(seed)
    wall = FakeClock()
    skewed = FakeClock()
    names = [EU, US, AP]
    stamps = {
        name: fresh_store(
            tmp_path / f"history-{seed}" / f"{name}.db",
            name,
            skewed if name == AP else wall,
            durable=False,
        )
        for name in names
    }
    sums: dict[str, int] = {}
    stamps[EU].put("k1", '"eu first"')  # an exact tie: both clocks read the same
    stamps[US].put("k1", '"us first"')
    for step in range(steps):
        name = rng.choice(names)
        stamp = stamps[name]
        op = rng.random()
        id = rng.choice(["k1", "k2", "k3", "k4"])
        if op < 0.5:
            stamp.put(id, json.dumps({"by": name, "step": step}))
        elif op < 0.65:
            stamp.put(id, None)
        else:
            cid = rng.choice(["c1", "c2"])
            delta = rng.choice([-3, -1, 1, 2, 5])
            stamp.increment(cid, delta)
            sums[cid] = sums.get(cid, 0) + delta
        wall.ms += rng.choice([0, 0, 0, 1, 2, -1])  # ties, progress, and a clock stepping back
        skewed.ms = wall.ms - 3
        if rng.random() < 0.1:  # one stamp catches up with another's writes
            src, dst = rng.sample(names, 2)
            stamps[dst].apply(log_of(stamps[src], origin=src))
    changes = [c for name in names for c in log_of(stamps[name], origin=name)]
    for s in stamps.values():
        s.close()
    return changes, sums


def _deliver(target: Store, changes: list[Change], rng: random.Random) -> None:
    """All of ``changes`` in a shuffled order, in random batches, with duplicates inside
    batches and whole batches delivered again."""
    order = changes[:]
    rng.shuffle(order)
    sent: list[list[Change]] = []
    while order:
        size = rng.randint(1, 6)
        batch, order = order[:size], order[size:]
        if rng.random() < 0.3:
            batch.insert(rng.randrange(len(batch) + 1), rng.choice(batch))
        target.apply(batch)
        sent.append(batch)
        if rng.random() < 0.2:
            target.apply(rng.choice(sent))


@pytest.mark.parametrize(("seed", "steps"), [(1, 40), (2, 80), (3, 25)])
def test_shuffled_duplicated_delivery_converges_on_the_highest_version(
    tmp_path: Path, seed: int, steps: int
) -> None:
    changes, sums = _history(tmp_path, seed, steps)
    ids, counter_ids = _ids(changes)
    expected = _expected(changes)
    assert {id: total for id, (total, _) in expected[1].items()} == sums
    assert len({c.version for c in changes}) == len(changes)  # no stamp reused a version
    assert any(  # the history has exact wall-clock ties between stamps on one id
        a.kind == b.kind == ITEM
        and a.id == b.id
        and a.version.origin != b.version.origin
        and (a.version.wall, a.version.logical) == (b.version.wall, b.version.logical)
        for a, b in itertools.combinations(changes, 2)
    )
    rng = random.Random(seed * 1000)
    shuffles = 200 if seed == 1 else 40
    for n in range(shuffles):
        target = open_store(tmp_path / "targets" / f"{n}.db", f"target{n}", durable=False)
        _deliver(target, changes, rng)
        assert _snapshot(target, ids, counter_ids) == expected, f"shuffle {n}"
        again = changes[:]
        rng.shuffle(again)
        result = target.apply(again)
        assert (result.applied, result.ignored) == (0, len(changes))
        target.close()


def test_stamps_exchanging_their_logs_converge_with_fresh_replicas(tmp_path: Path) -> None:
    clock = FakeClock()
    names = [EU, US, AP]
    stamps = {n: fresh_store(tmp_path / f"{n}.db", n, clock) for n in names}
    rng = random.Random(11)
    sums = 0
    for _ in range(30):
        name = rng.choice(names)
        if rng.random() < 0.3:
            delta = rng.choice([-2, 1, 4])
            stamps[name].increment("c", delta)
            sums += delta
        else:
            stamps[name].put(rng.choice("ab"), json.dumps(name) if rng.random() < 0.8 else None)
        clock.ms += rng.choice([0, 1])
    own = {n: log_of(stamps[n], origin=n) for n in names}
    all_changes = [c for cs in own.values() for c in cs]
    expected = _expected(all_changes)
    for dst in names:
        for src in rng.sample(names, len(names)):
            if src != dst:
                stamps[dst].apply(own[src])
    ids, counter_ids = _ids(all_changes)
    assert {n: _snapshot(s, ids, counter_ids) for n, s in stamps.items()} == {
        n: expected for n in names
    }
    assert expected[1]["c"][0] == sums
    for s in stamps.values():
        s.close()


# -- durability, cursors, backlog --------------------------------------------------------


@pytest.mark.parametrize(
    "closed", [pytest.param(True, id="closed"), pytest.param(False, id="abandoned-open")]
)
def test_acknowledged_write_survives_a_new_store_on_the_same_file(
    tmp_path: Path, closed: bool
) -> None:
    path = tmp_path / "data" / "eu.db"
    first = open_store(path, EU)
    put = first.put("k", '"kept"')
    gone = first.put("d", None)
    inc = first.increment("c", 4)
    first.apply([item_change("r", T0, 0, US, "remote")])
    if closed:
        first.close()
    again = open_store(path, EU)
    assert _state(again, "k") == ('"kept"', False, put.version)
    assert _state(again, "d") == (None, True, gone.version)
    assert again.counter("c") == {
        "id": "c",
        "value": 4,
        "slots": [{"stamp": EU, "region": "europe", "increments": 4, "decrements": 0}],
    }
    # Still in the outbox: a peer that never got it receives it after the restart.
    assert log_of(again, origin=EU) == [put, gone, inc]
    assert [c.id for c in log_of(again)] == ["k", "d", "c", "r"]
    assert again.backlog(US)[0] == 3
    again.close()
    if not closed:
        first.close()


def test_cursor_starts_at_zero_and_never_moves_backwards(tmp_path: Path) -> None:
    path = tmp_path / "eu.db"
    store = open_store(path, EU)
    assert (store.cursor(US), store.cursor(AP)) == (0, 0)
    for seq, expected in [(5, 5), (3, 5), (5, 5), (9, 9), (0, 9)]:
        store.set_cursor(US, seq)
        assert store.cursor(US) == expected, seq
    assert store.cursor(AP) == 0
    store.close()
    again = open_store(path, EU)
    assert (again.cursor(US), again.cursor(AP)) == (9, 0)
    again.close()


def _age_change(path: Path, seq: int, seconds: float) -> None:
    """Make a logged change look ``seconds`` older (from another connection)."""
    db = sqlite3.connect(path)
    db.execute("UPDATE changes SET recorded_at = recorded_at - ? WHERE seq = ?", (seconds, seq))
    db.commit()
    db.close()


def test_backlog_counts_own_changes_past_the_peers_cursor_and_ages_the_oldest(
    store: Store,
) -> None:
    assert store.backlog(US) == (0, None)
    start = time.time()
    for id in ("a", "b", "c"):
        store.put(id, "1")
    store.apply([item_change("remote", T0, 0, US, 1)])  # a peer's change is not ours to push
    seqs = [seq for seq, _ in store.changes_since(0, 100, origin=EU)]
    _age_change(store.path, seqs[0], 300)
    _age_change(store.path, seqs[1], 200)

    def age_within(age: float | None, low: float) -> bool:
        return age is not None and low <= age <= low + time.time() - start

    count, age = store.backlog(US)
    assert count == 3 and age_within(age, 300), (count, age)
    store.set_cursor(US, seqs[0])
    count, age = store.backlog(US)
    assert count == 2 and age_within(age, 200), (count, age)
    store.set_cursor(US, seqs[1])
    count, age = store.backlog(US)
    assert count == 1 and age_within(age, 0), (count, age)
    assert store.backlog(AP)[0] == 3  # cursors are per peer
    store.set_cursor(US, seqs[0])  # a stale acknowledgement does not resend anything
    assert store.backlog(US)[0] == 1
    store.set_cursor(US, seqs[-1])
    assert store.backlog(US) == (0, None)


def test_changes_since_pages_the_log_in_local_order(store: Store) -> None:
    writes = [store.put(f"k{i}", str(i)) for i in range(5)]
    store.apply([item_change("r", T0, 0, US, 1)])
    first = store.changes_since(0, 2)
    rest = store.changes_since(first[-1][0], 100)
    assert [c for _, c in first + rest] == [*writes, item_change("r", T0, 0, US, 1)]
    seqs = [s for s, _ in first + rest]
    assert seqs == sorted(seqs) and len(set(seqs)) == 6
    assert [c for _, c in store.changes_since(0, 100, origin=US)] == [
        item_change("r", T0, 0, US, 1)
    ]
    assert store.changes_since(seqs[-1], 100) == []


# -- hardening (issue 13) -----------------------------------------------------------------


def _sample_versions(rng: random.Random, n: int) -> Iterator[Version]:
    """Versions from the whole domain, its edges weighted in: property-style."""
    walls = [0, 1, 9, 10, T0, MAX_WALL - 1, MAX_WALL]
    logicals = [0, 1, 9, 10, MAX_LOGICAL - 1, MAX_LOGICAL]
    alphabet = "abcxyzABCZ0189._-"
    for _ in range(n):
        wall = rng.choice(walls) if rng.random() < 0.3 else rng.randrange(MAX_WALL + 1)
        logical = rng.choice(logicals) if rng.random() < 0.3 else rng.randrange(MAX_LOGICAL + 1)
        origin = rng.choice("aZ9") + "".join(rng.choice(alphabet) for _ in range(rng.randrange(63)))
        yield Version(wall, logical, origin)


def test_every_version_there_is_round_trips_and_sorts_like_its_text() -> None:
    """Finding 2 of issue 13: the clock made 10000000000000-..., which the parser could not
    read. Every Version that can exist encodes, decodes to itself, and sorts as its text
    does, so anything a clock or a successor makes can be read back."""
    rng = random.Random(13)
    versions = list(_sample_versions(rng, 20_000))
    for v in versions:
        assert Version.decode(v.encode()) == v
        try:
            after = v.successor("z")
        except VersionOverflow:
            assert (v.wall, v.logical) == (MAX_WALL, MAX_LOGICAL)
            continue
        assert after > v and Version.decode(after.encode()) == after
    assert sorted(versions, key=Version.encode) == sorted(versions)


@pytest.mark.parametrize(
    "parts",
    [
        pytest.param((MAX_WALL + 1, 0, EU), id="wall-past-13-digits"),
        pytest.param((-1, 0, EU), id="negative-wall"),
        pytest.param((T0, MAX_LOGICAL + 1, EU), id="logical-past-6-digits"),
        pytest.param((T0, -1, EU), id="negative-logical"),
        pytest.param((T0, 0, "eu west"), id="origin-not-a-name"),
        pytest.param((T0, 0, ""), id="empty-origin"),
    ],
)
def test_a_version_that_could_not_be_encoded_cannot_be_made(parts: tuple[int, int, str]) -> None:
    with pytest.raises(ValueError, match=r"out of range|not a stamp name"):
        Version(*parts)


def test_the_clock_at_the_largest_version_refuses_rather_than_overflow() -> None:
    clock = FakeClock(MAX_WALL)
    hlc = HybridClock(EU, clock=clock, last=Version(MAX_WALL, MAX_LOGICAL - 1, EU))
    assert hlc.now() == Version(MAX_WALL, MAX_LOGICAL, EU)
    with pytest.raises(VersionOverflow):
        hlc.now()


def test_a_store_refuses_to_reopen_when_its_own_clock_is_far_ahead(tmp_path: Path) -> None:
    """Finding 4 of issue 13: an own-origin version in 2100 made every later write carry it
    (the running drift guard was bypassed at start-up). Refuse, naming the override."""
    path = tmp_path / "eu.db"
    first = fresh_store(path, EU, FakeClock(4_102_444_800_000))  # 2100-01-01
    first.put("a", '"1"')
    first.close()
    with pytest.raises(ClockAhead, match=r"ahead of this machine's clock.*--allow-clock-ahead"):
        Store(path, EU, "europe", max_clock_skew=60, allow_clock_ahead=False)
    again = Store(path, EU, "europe", max_clock_skew=60, allow_clock_ahead=True)
    assert again.put("b", '"2"').version.wall >= 4_102_444_800_000  # still ahead, as asked
    again.close()


def test_a_store_whose_clock_is_within_the_skew_reopens(tmp_path: Path) -> None:
    path = tmp_path / "eu.db"
    first = fresh_store(path, EU, FakeClock(int(time.time() * 1000) + 30_000))  # 30 s ahead
    first.put("a", '"1"')
    first.close()
    Store(path, EU, "europe", max_clock_skew=60, allow_clock_ahead=False).close()


def test_pages_stop_at_the_byte_budget_but_never_come_back_empty(store: Store) -> None:
    big = json.dumps("x" * 1000)
    for i in range(10):
        store.put(f"k{i}", big)
    items, more = store.items_page("", 100, max_bytes=4000)  # 1,302 bytes a row
    assert [i.id for i in items] == ["k0", "k1", "k2"] and more
    items, more = store.items_page("", 100, after="k8", max_bytes=4000)
    assert [i.id for i in items] == ["k9"] and not more
    items, more = store.items_page("", 1, max_bytes=10)  # one row over budget still comes
    assert len(items) == 1 and more
    assert [s for s, _ in store.changes_since(0, 100, max_bytes=2700)] == [1, 2]


def test_dead_letters_keep_the_reason_whole_and_the_raw_change_cut_at_64_kib(store: Store) -> None:
    store.quarantine("received", US, [('{"id": "a"}', "why a"), ("x" * 100_000, "why b")])
    first, second = store.dead_letters()
    assert (first.direction, first.peer, first.change, first.reason) == (
        "received",
        US,
        '{"id": "a"}',
        "why a",
    )
    assert second.change.startswith("x" * 65_536) and "(100000 characters in all)" in second.change
    assert second.reason == "why b" and second.seq > first.seq
    assert store.dead_letters(since=first.seq) == [second]
