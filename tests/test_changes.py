"""What a reload changed (changes.py), as the reload log line and /status say it, and the
command line's help."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from geoproxy.config import changes
from geoproxy.config import loader as config_mod

from conftest import base_config

WriteConfig = Callable[..., Path]


def _geodes() -> list[dict[str, Any]]:
    return [
        {"name": "eu-1", "region": "eu-west", "url": "http://127.0.0.1:9001"},
        {"name": "us-1", "region": "us-east", "url": "http://127.0.0.1:9002"},
    ]


def _edit(data: dict[str, Any], change: str) -> None:
    if change == "nothing":
        return
    if change == "geode-added":
        data["geodes"].append(
            {"name": "ap-1", "region": "ap-northeast", "url": "http://127.0.0.1:9003"}
        )
    elif change == "geode-removed":
        data["geodes"].pop()
    elif change == "geode-moved-and-reweighted":
        data["geodes"][1].update(region="ap-northeast", weight=3)
    elif change == "country-moved":
        data["countries"]["FR"] = "us-east"
    elif change == "listener-and-drain":
        data["listen"]["admin"] = {"host": "127.0.0.1", "port": 9901}
        data["shutdown"] = {"drain_timeout": "30s"}
    elif change == "health-check-default":
        data["health_check"]["interval"] = "3s"
    elif change == "located-and-fenced":
        data["regions"] = {**data["regions"], "eu-west": {"location": {"lat": 53.35, "lon": -6.3}}}
        data["regions"]["us-east"] = {"location": {"lat": 38.95, "lon": -77.45}, "bias": 10}
        data["proximity"] = {"prefer_over_continent": True}
        data["fences"] = {"eu": {"regions": ["eu-west"], "continents": ["EU"], "countries": ["CH"]}}


@pytest.mark.parametrize(
    ("change", "said"),
    [
        ("nothing", []),
        ("geode-added", ["1 geode added: ap-1 (ap-northeast)"]),
        ("geode-removed", ["1 geode removed: us-1 (us-east)"]),
        (
            "geode-moved-and-reweighted",
            ["1 geode changed: us-1 (region us-east -> ap-northeast, weight 1 -> 3)"],
        ),
        ("country-moved", ["countries moved: FR eu-west -> us-east"]),
        (
            "listener-and-drain",
            [
                "settings: listen.admin 127.0.0.1:0 -> 127.0.0.1:9901 (takes effect after a "
                "restart), shutdown.drain_timeout 10 -> 30"
            ],
        ),
        ("health-check-default", ["settings: health_check.interval 1 -> 3"]),
        (
            "located-and-fenced",
            [
                "regions: eu-west[]@53.35,-6.3 us-east[]@38.95,-77.45+10 "
                "ap-northeast[us-east,eu-west]",
                "fences: eu(EU CH -> eu-west; reject 503)",
                "settings: proximity.prefer_over_continent False -> True",
            ],
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_describe_says_what_a_reload_changed(
    write_config: WriteConfig, change: str, said: list[str]
) -> None:
    data = base_config(_geodes())
    old = config_mod.load(write_config(data))
    _edit(data, change)
    new = config_mod.load(write_config(data))
    assert changes.describe(old, new) == said


def test_describe_names_at_most_a_dozen_countries_per_move(write_config: WriteConfig) -> None:
    data = base_config(_geodes())
    old = config_mod.load(write_config(data))
    data["continents"]["EU"] = "us-east"  # every European country without an override
    new = config_mod.load(write_config(data))
    [said] = changes.describe(old, new)
    assert said.startswith("countries moved: AD AL AT ")
    assert said.endswith(" more) eu-west -> us-east"), said


@pytest.mark.parametrize(("count", "said"), [(0, "0 geodes"), (1, "1 geode"), (2, "2 geodes")])
def test_plural(count: int, said: str) -> None:
    assert changes.plural(count, "geode") == said


def _help(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "geoproxy", *args, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout


def test_help_lists_the_commands_without_markup_or_the_internal_worker() -> None:
    text = _help()
    assert "``" not in text and "worker" not in text
    assert "{run,check-config,route,stamp,demo}" in text


@pytest.mark.parametrize("command", ["run", "check-config", "route"])
def test_config_help_says_the_default_is_relative_to_the_current_directory(
    command: str,
) -> None:
    text = " ".join(_help(command).split())
    assert (
        "config file (default: config/geoproxy.yaml, relative to the current directory)"
    ) in text
