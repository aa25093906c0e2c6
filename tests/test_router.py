"""Candidate ordering: home region first, fallbacks in order, health, limits, panic mode and
weighted order (statistically, with a seeded RNG)."""

from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from yarl import URL

from geoproxy.config import loader as config_mod
from geoproxy.config.model import Topology
from geoproxy.config.values import Geode, HealthCheck
from geoproxy.routing.router import FALLBACK, HOME, NONE_HEALTHY, PANIC, candidates, weighted_order

from conftest import base_config

WriteConfig = Callable[..., Path]

# Try orders (conftest REGIONS): eu-west -> us-east -> ap-northeast;
# us-east -> eu-west -> ap-northeast; ap-northeast -> us-east -> eu-west.
GEODES: list[dict[str, Any]] = [
    {"name": "eu-1", "region": "eu-west", "url": "http://127.0.0.1:9101", "weight": 3},
    {"name": "eu-2", "region": "eu-west", "url": "http://127.0.0.1:9102"},
    {"name": "us-1", "region": "us-east", "url": "http://127.0.0.1:9201"},
    {"name": "ap-1", "region": "ap-northeast", "url": "http://127.0.0.1:9301"},
    {"name": "ap-2", "region": "ap-northeast", "url": "http://127.0.0.1:9302"},
]
ALL = frozenset(g["name"] for g in GEODES)
EU = {"eu-1", "eu-2"}
US = {"us-1"}
AP = {"ap-1", "ap-2"}


def topology_of(write_config: WriteConfig, when_none_healthy: str = "reject") -> Topology:
    data = base_config(GEODES)
    data["forwarding"]["when_none_healthy"] = when_none_healthy
    return Topology.build(config_mod.load(write_config(data)))


@pytest.fixture
def topology(write_config: WriteConfig) -> Topology:
    return topology_of(write_config)


@pytest.fixture
def panic_topology(write_config: WriteConfig) -> Topology:
    return topology_of(write_config, "try_all")


# (region, healthy, limit, per position: (names allowed there, decision), overall decision)
Expected = list[tuple[set[str], str]]
CASES: list[tuple[str, frozenset[str], int, Expected, str]] = [
    (
        "eu-west",
        ALL,
        10,
        [(EU, HOME), (EU, HOME), (US, FALLBACK), (AP, FALLBACK), (AP, FALLBACK)],
        HOME,
    ),
    (
        "us-east",
        ALL,
        10,
        [(US, HOME), (EU, FALLBACK), (EU, FALLBACK), (AP, FALLBACK), (AP, FALLBACK)],
        HOME,
    ),
    (
        "ap-northeast",
        ALL,
        10,
        [(AP, HOME), (AP, HOME), (US, FALLBACK), (EU, FALLBACK), (EU, FALLBACK)],
        HOME,
    ),
    ("eu-west", ALL, 3, [(EU, HOME), (EU, HOME), (US, FALLBACK)], HOME),
    ("eu-west", ALL, 1, [(EU, HOME)], HOME),
    ("eu-west", ALL - {"eu-1"}, 3, [({"eu-2"}, HOME), (US, FALLBACK), (AP, FALLBACK)], HOME),
    ("eu-west", ALL - EU, 10, [(US, FALLBACK), (AP, FALLBACK), (AP, FALLBACK)], FALLBACK),
    ("eu-west", ALL - EU - US, 10, [(AP, FALLBACK), (AP, FALLBACK)], FALLBACK),
    ("eu-west", frozenset({"ap-2"}), 3, [({"ap-2"}, FALLBACK)], FALLBACK),
    ("us-east", ALL - US - {"eu-2"}, 2, [({"eu-1"}, FALLBACK), (AP, FALLBACK)], FALLBACK),
    ("eu-west", frozenset(), 3, [], NONE_HEALTHY),
    ("eu-west", frozenset({"not-a-geode"}), 3, [], NONE_HEALTHY),
]


@pytest.mark.parametrize(
    ("region", "healthy", "limit", "expected", "decision"),
    CASES,
    ids=[
        "eu-home-then-fallbacks-in-order",
        "us-home-then-fallbacks-in-order",
        "ap-home-then-fallbacks-in-order",
        "limit-cuts-inside-the-fallbacks",
        "limit-one-is-home-only",
        "unhealthy-home-geode-skipped",
        "home-region-all-unhealthy-first-fallback",
        "first-fallback-all-unhealthy-second-fallback",
        "only-one-healthy-geode-anywhere",
        "unhealthy-skipped-inside-a-fallback-region",
        "none-healthy-rejects",
        "healthy-set-names-no-geode-of-topology",
    ],
)
def test_candidates_follow_try_order_over_healthy_geodes(
    topology: Topology,
    region: str,
    healthy: frozenset[str],
    limit: int,
    expected: Expected,
    decision: str,
) -> None:
    for seed in range(20):  # positions must hold whatever order the weights draw
        got, got_decision = candidates(topology, region, healthy, limit, random.Random(seed).random)
        names = [c.geode.name for c in got]
        assert got_decision == decision
        assert len(got) == len(expected), names
        for cand, (allowed, cand_decision) in zip(got, expected, strict=True):
            assert cand.geode.name in allowed, names
            assert cand.decision == cand_decision, names
        assert len(set(names)) == len(names)


PANIC_CASES: list[tuple[str, int, Expected]] = [
    ("eu-west", 10, [(EU, PANIC), (EU, PANIC), (US, PANIC), (AP, PANIC), (AP, PANIC)]),
    ("us-east", 10, [(US, PANIC), (EU, PANIC), (EU, PANIC), (AP, PANIC), (AP, PANIC)]),
    ("eu-west", 3, [(EU, PANIC), (EU, PANIC), (US, PANIC)]),
    ("ap-northeast", 1, [(AP, PANIC)]),
]


@pytest.mark.parametrize(
    ("region", "limit", "expected"),
    PANIC_CASES,
    ids=["eu-all-geodes", "us-all-geodes", "limit-respected", "limit-one"],
)
def test_panic_mode_tries_every_geode_in_try_order_when_none_healthy(
    panic_topology: Topology, region: str, limit: int, expected: Expected
) -> None:
    for seed in range(20):
        got, decision = candidates(panic_topology, region, set(), limit, random.Random(seed).random)
        names = [c.geode.name for c in got]
        assert decision == PANIC
        assert len(got) == len(expected), names
        for cand, (allowed, cand_decision) in zip(got, expected, strict=True):
            assert cand.geode.name in allowed, names
            assert cand.decision == cand_decision, names
        assert len(set(names)) == len(names)


def test_panic_mode_is_not_used_while_any_geode_is_healthy(panic_topology: Topology) -> None:
    got, decision = candidates(panic_topology, "eu-west", {"ap-1"}, 5)
    assert decision == FALLBACK
    assert [(c.geode.name, c.decision) for c in got] == [("ap-1", FALLBACK)]


@pytest.mark.parametrize("mode", ["reject", "try_all"])
def test_candidate_lists_never_repeat_a_geode_and_hold_only_healthy_unless_panic(
    write_config: WriteConfig, mode: str
) -> None:
    topology = topology_of(write_config, mode)
    rng = random.Random(7)
    names = sorted(ALL)
    for size in range(len(names) + 1):
        for healthy in itertools.combinations(names, size):
            for region, limit in itertools.product(topology.region_names, range(1, 7)):
                got, decision = candidates(topology, region, set(healthy), limit, rng.random)
                picked = [c.geode.name for c in got]
                assert len(set(picked)) == len(picked), (region, healthy, limit, picked)
                assert len(picked) <= limit
                if healthy:
                    assert set(picked) <= set(healthy)
                    assert len(picked) == min(limit, len(healthy))
                    assert decision == got[0].decision
                elif mode == "try_all":
                    assert decision == PANIC
                    assert len(picked) == min(limit, len(ALL))
                else:
                    assert (picked, decision) == ([], NONE_HEALTHY)


# --- weighted order -----------------------------------------------------------------------


def geode(name: str, weight: int) -> Geode:
    return Geode(name, "eu-west", URL(f"http://{name}.test"), weight, HealthCheck())


DRAWS = 4000


@pytest.mark.parametrize(
    "weights",
    [{"a": 3, "b": 1}, {"a": 1, "b": 1}, {"a": 1, "b": 2, "c": 7}, {"a": 1, "b": 1000}],
    ids=["three-to-one", "equal", "one-two-seven", "one-to-thousand"],
)
def test_weighted_order_puts_a_geode_first_in_proportion_to_its_weight(
    weights: dict[str, int],
) -> None:
    geodes = [geode(n, w) for n, w in weights.items()]
    rand = random.Random(20240601).random
    firsts = Counter(weighted_order(geodes, rand)[0].name for _ in range(DRAWS))
    total = sum(weights.values())
    for name, weight in weights.items():
        share = firsts[name] / DRAWS
        assert share == pytest.approx(weight / total, abs=0.03), (name, firsts)


def test_candidates_put_heavier_home_geode_first_about_three_quarters_of_the_time(
    topology: Topology,
) -> None:
    rand = random.Random(99).random
    firsts = Counter(
        candidates(topology, "eu-west", ALL, 3, rand)[0][0].geode.name for _ in range(DRAWS)
    )
    assert firsts.keys() == EU
    assert firsts["eu-1"] / DRAWS == pytest.approx(0.75, abs=0.03)


@pytest.mark.parametrize("seed", range(10))
def test_weighted_order_is_a_permutation(seed: int) -> None:
    geodes = [geode(f"g{i}", w) for i, w in enumerate([1, 5, 2, 9, 1, 3])]
    got = weighted_order(geodes, random.Random(seed).random)
    assert sorted(g.name for g in got) == sorted(g.name for g in geodes)


@pytest.mark.parametrize("count", [0, 1], ids=["no-geodes", "one-geode"])
def test_weighted_order_of_fewer_than_two_geodes_draws_nothing(count: int) -> None:
    geodes = [geode("solo", 4)][:count]

    def rand() -> float:
        raise AssertionError("no draw needed")

    assert weighted_order(geodes, rand) == geodes


def test_candidate_cache_memoises_only_deterministic_answers_until_health_changes(
    topology: Topology,
) -> None:
    from geoproxy.routing.router import CandidateCache

    cache = CandidateCache()
    healthy = {"eu-1", "us-1", "ap-1"}  # one healthy geode per region: no random draw
    first = cache.candidates(topology, "us-east", healthy, 1, 3)
    assert cache.candidates(topology, "us-east", healthy, 1, 3) is not None
    assert cache.candidates(topology, "us-east", healthy, 1, 3)[0] is first[0]  # memoised
    healthy.discard("us-1")  # health changed: the board bumps its version
    cands, decision = cache.candidates(topology, "us-east", healthy, 2, 3)
    assert [c.geode.name for c in cands] == ["eu-1", "ap-1"] and decision == FALLBACK
    # Two healthy geodes in a region: a weighted draw per request, never memoised.
    both = {"eu-1", "eu-2"}
    draws = {
        cache.candidates(topology, "eu-west", both, 3, 3, random.Random(i).random)[0][0].geode.name
        for i in range(50)
    }
    assert draws == {"eu-1", "eu-2"}
