"""The config loader (``geoproxy.config.load``) and ``geoproxy check-config``.

Error tests assert whole lines, ``FILE: YAML.PATH: MESSAGE``, with the file as given. Most
start from ``base_config`` and apply a table of edits keyed by YAML path
(``{"geodes[0].region": "eu-wst"}``); ``DELETE`` removes a key.
"""

from __future__ import annotations

import copy
import dataclasses
import ipaddress
import re
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from yarl import URL

from geoproxy.config import loader as config_mod
from geoproxy.config.countries import COUNTRY_CONTINENT
from geoproxy.config.model import Topology
from geoproxy.config.values import Forwarding, HealthCheck, Listener, Region
from geoproxy.errors import ConfigError

from conftest import base_config

REPO = Path(__file__).resolve().parent.parent
WriteConfig = Callable[..., Path]
DELETE = object()  # as an edit value: remove the key

GEODES: list[dict[str, Any]] = [
    {"name": "euw-1", "region": "eu-west", "url": "http://euw-1.test"},
    {"name": "use-1", "region": "us-east", "url": "http://use-1.test"},
    {"name": "apne-1", "region": "ap-northeast", "url": "http://apne-1.test"},
]
KNOWN = "(known: ap-northeast, eu-west, us-east)"


def edited(changes: Mapping[str, Any] = {}, **overrides: Any) -> dict[str, Any]:
    """``base_config`` with the three ``GEODES``, then each ``path: value`` edit applied."""
    data = copy.deepcopy(base_config(copy.deepcopy(GEODES), **overrides))
    for path, value in changes.items():
        *parents, last = [int(i) if i else k for i, k in re.findall(r"\[(\d+)\]|([^.\[\]]+)", path)]
        target: Any = data
        for step in parents:
            target = target[step]
        if value is DELETE:
            del target[last]
        else:
            target[last] = value
    return data


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config_mod.load(path)
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def check_errors(write_config: WriteConfig, data: dict[str, Any], expected: list[str]) -> None:
    path = write_config(data)
    assert problems_of(path) == [f"{path}: {line}" for line in expected]


# --- a valid config -------------------------------------------------------------------------


def test_valid_config_loads_every_section(write_config: WriteConfig) -> None:
    data = edited(
        {
            "listen.proxy": {"host": "::", "port": 8443},
            "listen.admin": DELETE,
            "trusted_proxies": ["127.0.0.1/32", "10.0.0.0/8", "::1/128", "2001:db8::/32"],
            "geodes[0].url": "https://euw-1.test/api/v1/",
            "geodes[0].weight": 5,
            "forwarding": {
                "connect_timeout": "250ms",
                "failover_timeout": "1m",
                "max_attempts": 2,
                "when_none_healthy": "try_all",
                "preserve_host": False,
            },
        }
    )
    cfg = config_mod.load(write_config(data))

    assert cfg.proxy == Listener("::", 8443)
    assert cfg.admin == Listener("127.0.0.1", 9901)  # the default when omitted
    assert cfg.trusted_proxies == (
        ipaddress.IPv4Network("127.0.0.1/32"),
        ipaddress.IPv4Network("10.0.0.0/8"),
        ipaddress.IPv6Network("::1/128"),
        ipaddress.IPv6Network("2001:db8::/32"),
    )
    assert cfg.default_region == "eu-west"
    assert cfg.regions == (
        Region("eu-west", ("us-east", "ap-northeast")),
        Region("us-east", ("eu-west", "ap-northeast")),
        Region("ap-northeast", ("us-east", "eu-west")),
    )
    assert [(g.name, g.region, str(g.url), g.weight) for g in cfg.geodes] == [
        ("euw-1", "eu-west", "https://euw-1.test/api/v1", 5),
        ("use-1", "us-east", "http://use-1.test", 1),
        ("apne-1", "ap-northeast", "http://apne-1.test", 1),
    ]
    assert cfg.countries == {
        "FR": "eu-west",
        "GB": "eu-west",
        "US": "us-east",
        "JP": "ap-northeast",
    }
    assert cfg.continents["AN"] == "us-east"
    fwd = cfg.forwarding
    assert (fwd.connect_timeout, fwd.response_timeout, fwd.failover_timeout) == (0.25, 30.0, 60.0)
    assert (fwd.max_attempts, fwd.when_none_healthy, fwd.preserve_host) == (2, "try_all", False)


def test_omitted_sections_take_documented_defaults(write_config: WriteConfig) -> None:
    data = edited(
        {"listen": DELETE, "trusted_proxies": DELETE, "health_check": DELETE, "forwarding": DELETE}
    )
    cfg = config_mod.load(write_config(data))
    assert cfg.proxy == Listener("0.0.0.0", 8080)
    assert cfg.admin == Listener("127.0.0.1", 9901)
    assert cfg.trusted_proxies == ()
    assert cfg.health_check == HealthCheck()
    assert cfg.health_check.expected_statuses == frozenset(range(200, 300))
    assert cfg.forwarding == Forwarding()


def test_loaded_config_is_frozen(write_config: WriteConfig) -> None:
    cfg = config_mod.load(write_config(edited()))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.default_region = "us-east"  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.countries["FR"] = "us-east"  # type: ignore[index]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        pytest.param({}, ("x-client-region", "cf-ipcountry"), id="without-geoip-database"),
        pytest.param(
            {"geoip": {"database": "x.mmdb"}},
            ("x-client-region", "cf-ipcountry", "geoip"),
            id="with-geoip-database",
        ),
        pytest.param(
            {"geoip": {"database": "x.mmdb"}, "region_sources": ["geoip", "cf-ipcountry"]},
            ("geoip", "cf-ipcountry"),
            id="explicit-order-kept",
        ),
        pytest.param(
            {"region_sources": ["CF-IPCountry"]}, ("cf-ipcountry",), id="case-insensitive"
        ),
    ],
)
def test_region_sources(
    write_config: WriteConfig, overrides: dict[str, Any], expected: tuple[str, ...]
) -> None:
    assert config_mod.load(write_config(edited(**overrides))).region_sources == expected


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        pytest.param("250ms", 0.25, id="milliseconds"),
        pytest.param("5s", 5.0, id="seconds"),
        pytest.param("1m", 60.0, id="minutes"),
        pytest.param("1.5m", 90.0, id="fractional"),
        pytest.param("1h", 3600.0, id="hours"),
        pytest.param(" 2 s ", 2.0, id="spaces"),
    ],
)
def test_duration_strings_are_parsed_to_seconds(
    write_config: WriteConfig, text: str, seconds: float
) -> None:
    cfg = config_mod.load(write_config(edited({"forwarding.response_timeout": text})))
    assert cfg.forwarding.response_timeout == seconds


def test_health_check_fields_are_parsed(write_config: WriteConfig) -> None:
    health = {
        "path": "/ready",
        "interval": "1m",
        "timeout": "5s",
        "jitter": "250ms",
        "healthy_threshold": 1,
        "unhealthy_threshold": 100,
        "expected_statuses": [200, 204, "300-302", " 404 - 404 "],
    }
    cfg = config_mod.load(write_config(edited(health_check=health)))
    assert cfg.health_check == HealthCheck(
        path="/ready",
        interval=60.0,
        timeout=5.0,
        jitter=0.25,
        healthy_threshold=1,
        unhealthy_threshold=100,
        expected_statuses=frozenset({200, 204, 300, 301, 302, 404}),
    )
    assert all(g.health == cfg.health_check for g in cfg.geodes)


def test_zero_jitter_is_allowed(write_config: WriteConfig) -> None:
    cfg = config_mod.load(write_config(edited({"health_check.jitter": "0ms"})))
    assert cfg.health_check.jitter == 0.0


def test_geode_health_override_inherits_other_fields_from_health_check(
    write_config: WriteConfig,
) -> None:
    data = edited({"geodes[1].health": {"path": "/ready", "timeout": "250ms"}})
    cfg = config_mod.load(write_config(data))
    base = cfg.health_check
    assert base.interval == 1.0  # from base_config: the geode inherits it
    assert cfg.geodes[1].health == dataclasses.replace(base, path="/ready", timeout=0.25)
    assert cfg.geodes[0].health == base
    assert cfg.geodes[2].health == base


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        pytest.param("http://euw-1.test/", "http://euw-1.test", id="root-slash"),
        pytest.param("https://euw-1.test/api/", "https://euw-1.test/api", id="base-path"),
        pytest.param(
            "http://euw-1.test:8080/a/b//", "http://euw-1.test:8080/a/b", id="port-and-slashes"
        ),
        pytest.param("http://[::1]:8101", "http://[::1]:8101", id="ipv6-host"),
    ],
)
def test_geode_url_base_path_loses_trailing_slash(
    write_config: WriteConfig, url: str, expected: str
) -> None:
    cfg = config_mod.load(write_config(edited({"geodes[0].url": url})))
    assert cfg.geodes[0].url == URL(expected)


def test_region_without_geode_is_served_through_its_fallback(write_config: WriteConfig) -> None:
    data = edited({"geodes[2].region": "us-east", "regions.sa-east": {"fallback": ["us-east"]}})
    cfg = config_mod.load(write_config(data))
    assert [r.name for r in cfg.regions] == ["eu-west", "us-east", "ap-northeast", "sa-east"]


# --- errors, one table per subject ----------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        pytest.param(
            {"geodez": []}, ["geodez: unknown key (did you mean 'geodes'?)"], id="top-level-typo"
        ),
        pytest.param(
            {"health_check.intreval": "5s"},
            ["health_check.intreval: unknown key (did you mean 'interval'?)"],
            id="health-check-typo",
        ),
        pytest.param(
            {"geodes[1].wieght": 2},
            ["geodes[1].wieght: unknown key (did you mean 'weight'?)"],
            id="geode-typo",
        ),
        pytest.param(
            {"geodes[1].health": {"tiemout": "1s"}},
            ["geodes[1].health.tiemout: unknown key (did you mean 'timeout'?)"],
            id="geode-health-typo",
        ),
        pytest.param(
            {"listen.proxy.bind": "0.0.0.0"},
            ["listen.proxy.bind: unknown key (known: host, port, tls, hsts)"],
            id="no-close-match",
        ),
        pytest.param(
            {"colour": "blue"},
            [
                "colour: unknown key (known: listen, trusted_proxies, region_sources, "
                "geoip, default_region, regions, region_map, countries, continents, "
                "geodes, health_check, forwarding, access_log, limits, "
                "outlier_detection, reload, shutdown, access, fences, proximity, "
                "home_affinity)"
            ],
            id="top-level-no-close-match",
        ),
    ],
)
def test_unknown_key_is_rejected(
    write_config: WriteConfig, changes: dict[str, Any], expected: list[str]
) -> None:
    check_errors(write_config, edited(changes), expected)


@pytest.mark.parametrize(
    ("cidr", "expected"),
    [
        pytest.param(
            "10.0.0.0/33",
            "'10.0.0.0/33' does not appear to be an IPv4 or IPv6 network",
            id="prefix-too-long",
        ),
        pytest.param("10.0.0.1/8", "10.0.0.1/8 has host bits set", id="host-bits-v4"),
        pytest.param("2001:db8::1/32", "2001:db8::1/32 has host bits set", id="host-bits-v6"),
        pytest.param(
            "localhost", "'localhost' does not appear to be an IPv4 or IPv6 network", id="hostname"
        ),
    ],
)
def test_invalid_trusted_cidr_is_rejected(
    write_config: WriteConfig, cidr: str, expected: str
) -> None:
    data = edited({"trusted_proxies": ["127.0.0.1/32", cidr]})
    check_errors(write_config, data, [f"trusted_proxies[1]: invalid CIDR {cidr!r}: {expected}"])


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        pytest.param(
            {"geodes[0].region": "eu-wst"},
            [f"geodes[0].region: unknown region 'eu-wst' {KNOWN}; did you mean 'eu-west'?"],
            id="geode-region-typo",
        ),
        pytest.param(
            {"geodes[0].region": "mars"},
            [f"geodes[0].region: unknown region 'mars' {KNOWN}"],
            id="geode-region",
        ),
        pytest.param(
            {"default_region": "mars"},
            [f"default_region: unknown region 'mars' {KNOWN}"],
            id="default-region",
        ),
        pytest.param(
            {"default_region": "us-eats"},
            [f"default_region: unknown region 'us-eats' {KNOWN}; did you mean 'us-east'?"],
            id="default-region-typo",
        ),
        pytest.param(
            {"regions.eu-west.fallback": ["us-east", "mars"]},
            [f"regions.eu-west.fallback[1]: unknown region 'mars' {KNOWN}"],
            id="fallback-undeclared",
        ),
        pytest.param(
            {"regions.eu-west.fallback": ["eu-west"]},
            ["regions.eu-west.fallback[0]: region 'eu-west' cannot fall back to itself"],
            id="fallback-to-itself",
        ),
        pytest.param(
            {"regions.eu-west.fallback": ["us-east", "us-east"]},
            ["regions.eu-west.fallback[1]: 'us-east' is listed twice"],
            id="fallback-twice",
        ),
        pytest.param(
            {"regions.EU_West": {"fallback": ["eu-west"]}},
            [
                "regions.EU_West: invalid region id 'EU_West' (lowercase letters, digits "
                "and '-', e.g. eu-west)"
            ],
            id="invalid-region-id",
        ),
    ],
)
def test_bad_region_reference_is_rejected(
    write_config: WriteConfig, changes: dict[str, Any], expected: list[str]
) -> None:
    check_errors(write_config, edited(changes), expected)


def test_duplicate_geode_name_names_first_occurrence(write_config: WriteConfig) -> None:
    data = edited({"geodes[2].name": "use-1"})
    check_errors(
        write_config, data, ["geodes[2].name: duplicate geode name 'use-1' (first at geodes[1])"]
    )


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        pytest.param(
            {"regions.sa-east": None},
            [
                "regions.sa-east: no geode can serve region 'sa-east': it has no geode and "
                "none of its fallback regions (none) has one"
            ],
            id="no-geode-no-fallback",
        ),
        pytest.param(
            {
                "regions.sa-east": {"fallback": ["sa-west"]},
                "regions.sa-west": {"fallback": ["sa-east"]},
            },
            [
                "regions.sa-east: no geode can serve region 'sa-east': it has no geode and "
                "none of its fallback regions (sa-west) has one",
                "regions.sa-west: no geode can serve region 'sa-west': it has no geode and "
                "none of its fallback regions (sa-east) has one",
            ],
            id="fallbacks-without-geodes",
        ),
    ],
)
def test_region_no_geode_can_serve_is_rejected(
    write_config: WriteConfig, changes: dict[str, Any], expected: list[str]
) -> None:
    check_errors(write_config, edited(changes), expected)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        pytest.param(
            "euw-1.test", "URL scheme must be http or https: 'euw-1.test'", id="no-scheme"
        ),
        pytest.param(
            "ftp://euw-1.test", "URL scheme must be http or https: 'ftp://euw-1.test'", id="ftp"
        ),
        pytest.param("http://", "URL has no host: 'http://'", id="no-host"),
        pytest.param(
            "http://user:secret@euw-1.test",
            "URL must not carry credentials: 'http://user:secret@euw-1.test'",
            id="credentials",
        ),
        pytest.param(
            "http://euw-1.test/?region=eu",
            "URL must not have a query or fragment: 'http://euw-1.test/?region=eu'",
            id="query",
        ),
        pytest.param(
            "http://euw-1.test/#top",
            "URL must not have a query or fragment: 'http://euw-1.test/#top'",
            id="fragment",
        ),
        pytest.param(
            "http://euw-1.test:99999",
            "malformed URL 'http://euw-1.test:99999': Port out of range 0-65535",
            id="port-out-of-range",
        ),
        pytest.param(
            "http://euw-1.test:web",
            "malformed URL 'http://euw-1.test:web': Invalid URL: port can't be "
            "converted to integer",
            id="port-not-a-number",
        ),
        pytest.param(8080, "must be a non-empty string, got 8080", id="not-a-string"),
        pytest.param("  ", "must be a non-empty string, got '  '", id="blank"),
    ],
)
def test_malformed_geode_url_is_rejected(
    write_config: WriteConfig, url: object, message: str
) -> None:
    check_errors(write_config, edited({"geodes[0].url": url}), [f"geodes[0].url: {message}"])


LONG_LABEL = "a" * 64
LONG_NAME = ("a" * 63 + ".") * 4 + "test"  # 260 bytes


@pytest.mark.parametrize(
    ("url", "why"),
    [
        pytest.param(
            f"http://{LONG_LABEL}.test", "a label of 64 bytes, at most 63", id="label-over-63-bytes"
        ),
        pytest.param(
            "http://euw-1..test", "an empty label: '..' or a leading dot", id="empty-label"
        ),
        pytest.param(
            "https://.euw-1.test:8443", "an empty label: '..' or a leading dot", id="leading-dot"
        ),
        pytest.param(
            f"http://{LONG_NAME}/api", "a name of 260 bytes, at most 253", id="name-over-253-bytes"
        ),
    ],
)
def test_geode_host_that_can_never_resolve_is_rejected(
    write_config: WriteConfig, url: str, why: str
) -> None:
    expected = f"geodes[1].url: URL host can never resolve in DNS ({why}): {url!r}"
    check_errors(write_config, edited({"geodes[1].url": url}), [expected])


@pytest.mark.parametrize(
    "host",
    ["a" * 63 + ".test", "euw-1.test.", ("a" * 63 + ".") * 3 + "a" * 61, "10.0.0.1", "[::1]"],
    ids=["label-of-63-bytes", "trailing-dot", "name-of-253-bytes", "ipv4", "ipv6"],
)
def test_geode_host_at_the_dns_limits_is_accepted(write_config: WriteConfig, host: str) -> None:
    cfg = config_mod.load(write_config(edited({"geodes[1].url": f"http://{host}:8080"})))
    assert cfg.geodes[1].url.raw_host == host.strip("[]")


@pytest.mark.parametrize(
    ("proxy", "admin", "why"),
    [
        pytest.param(
            "127.0.0.1", "127.0.0.1", "both bind port 8080 on 127.0.0.1", id="same-address"
        ),
        pytest.param(
            "0.0.0.0",
            "127.0.0.1",
            "0.0.0.0 binds port 8080 on every IPv4 address",
            id="any-ipv4-and-loopback",
        ),
        pytest.param(
            "10.1.2.3",
            "0.0.0.0",
            "0.0.0.0 binds port 8080 on every IPv4 address",
            id="address-and-any-ipv4",
        ),
        pytest.param("::", "::1", ":: binds port 8080 on every IPv6 address", id="any-ipv6"),
        pytest.param("::1", "localhost", "both bind port 8080 on ::1", id="localhost"),
    ],
)
def test_proxy_and_admin_listeners_that_collide_are_rejected(
    write_config: WriteConfig, proxy: str, admin: str, why: str
) -> None:
    data = edited(
        {
            "listen.proxy": {"host": proxy, "port": 8080},
            "listen.admin": {"host": admin, "port": 8080},
        }
    )
    check_errors(
        write_config,
        data,
        [
            f"listen.admin: {admin}:8080 collides with the proxy listener {proxy}:8080 ({why}); "
            "give them different ports"
        ],
    )


@pytest.mark.parametrize(
    ("proxy", "admin"),
    [
        (("127.0.0.1", 8080), ("127.0.0.1", 9901)),
        (("127.0.0.1", 0), ("127.0.0.1", 0)),
        (("0.0.0.0", 8080), ("::1", 8080)),
        (("::", 8080), ("127.0.0.1", 8080)),
    ],
    ids=["other-port", "both-any-free-port", "ipv4-any-and-ipv6", "ipv6-any-and-ipv4"],
)
def test_listeners_that_do_not_collide_are_accepted(
    write_config: WriteConfig, proxy: tuple[str, int], admin: tuple[str, int]
) -> None:
    data = edited(
        {
            "listen.proxy": {"host": proxy[0], "port": proxy[1]},
            "listen.admin": {"host": admin[0], "port": admin[1]},
        }
    )
    cfg = config_mod.load(write_config(data))
    assert (cfg.proxy, cfg.admin) == (Listener(*proxy), Listener(*admin))


def test_listeners_the_config_says_collide_really_cannot_both_bind() -> None:
    """The rule above, against the kernel: 0.0.0.0 and 127.0.0.1 on one port."""
    import socket

    with socket.socket() as first:
        first.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        first.bind(("0.0.0.0", 0))
        first.listen()
        with socket.socket() as second:
            second.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            with pytest.raises(OSError, match="Address already in use"):
                second.bind(("127.0.0.1", first.getsockname()[1]))


LONG_REGION = "r" * 64


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        pytest.param(
            {f"regions.{LONG_REGION}": {"fallback": ["eu-west"]}},
            [
                f"regions.{LONG_REGION}: invalid region id '{LONG_REGION}' (64 characters, "
                "at most 63)"
            ],
            id="over-the-length-limit",
        ),
        pytest.param(
            {"regions.eu-wést": {"fallback": ["eu-west"]}},
            [
                "regions.eu-wést: invalid region id 'eu-wést' (not ASCII: lowercase ASCII "
                "letters, digits and '-', e.g. eu-west)"
            ],
            id="not-ascii",
        ),
        pytest.param(
            {
                "regions.EU_West": {"fallback": ["eu-west"]},
                "geodes[0].region": "mars",
                "geodes[1].region": "EU_West",
            },
            [
                "regions.EU_West: invalid region id 'EU_West' (lowercase letters, digits "
                "and '-', e.g. eu-west)",
                f"geodes[0].region: unknown region 'mars' {KNOWN}",
            ],
            id="known-lists-only-valid-ids",
        ),
    ],
)
def test_invalid_region_id_message_names_the_rule_it_breaks(
    write_config: WriteConfig, changes: dict[str, Any], expected: list[str]
) -> None:
    check_errors(write_config, edited(changes), expected)


def test_trusting_every_address_or_one_stamp_in_two_regions_is_a_warning_not_an_error(
    write_config: WriteConfig,
) -> None:
    data = edited(
        {
            "trusted_proxies": ["10.0.0.0/8", "0.0.0.0/0", "::/0"],
            "geodes[2].url": "HTTP://use-1.test:80/",
        }
    )
    path = write_config(data)
    cfg = config_mod.load(path)
    assert cfg.warnings == (
        f"{path}: trusted_proxies[1]: 0.0.0.0/0 trusts every IPv4 client: any client can pick "
        "its region (X-Client-Region, CF-IPCountry) and its address (X-Forwarded-For)",
        f"{path}: trusted_proxies[2]: ::/0 trusts every IPv6 client: any client can pick "
        "its region (X-Client-Region, CF-IPCountry) and its address (X-Forwarded-For)",
        f"{path}: geodes[2].url: same URL as geodes[1] (use-1, region us-east): one stamp "
        "would serve regions us-east and ap-northeast",
    )


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"geodes[2].url": "http://use-1.test:8080"},
        {"geodes[2].url": "https://use-1.test"},
        {"geodes[2].url": "http://use-1.test/other"},
        {"geodes[2].url": "http://use-1.test", "geodes[2].region": "us-east"},
    ],
    ids=["base", "other-port", "other-scheme", "other-base-path", "same-region"],
)
def test_config_without_doubtful_settings_has_no_warnings(
    write_config: WriteConfig, changes: dict[str, Any]
) -> None:
    assert config_mod.load(write_config(edited(changes))).warnings == ()


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        pytest.param(
            {"health_check.timeout": "1s"},
            ["health_check.timeout: timeout (1s) must be shorter than interval (1s)"],
            id="timeout-equals-interval",
        ),
        pytest.param(
            {"health_check.timeout": "2s"},
            ["health_check.timeout: timeout (2s) must be shorter than interval (1s)"],
            id="timeout-above-interval",
        ),
        pytest.param(
            {"geodes[0].health": {"timeout": "1500ms"}},
            ["geodes[0].health.timeout: timeout (1.5s) must be shorter than interval (1s)"],
            id="geode-override-vs-inherited-interval",
        ),
        pytest.param(
            {"health_check.interval": 5},
            ["health_check.interval: a duration needs a unit: 5 (e.g. '5s' or '5ms')"],
            id="number-without-unit",
        ),
        pytest.param(
            {"health_check.interval": "5"},
            ["health_check.interval: not a duration: '5' (e.g. 250ms, 5s, 1m)"],
            id="string-without-unit",
        ),
        pytest.param(
            {"forwarding.connect_timeout": "2 seconds"},
            ["forwarding.connect_timeout: not a duration: '2 seconds' (e.g. 250ms, 5s, 1m)"],
            id="spelled-unit",
        ),
        pytest.param(
            {"forwarding.connect_timeout": "-1s"},
            ["forwarding.connect_timeout: not a duration: '-1s' (e.g. 250ms, 5s, 1m)"],
            id="negative",
        ),
        pytest.param(
            {"forwarding.connect_timeout": "1d"},
            ["forwarding.connect_timeout: not a duration: '1d' (e.g. 250ms, 5s, 1m)"],
            id="unknown-unit",
        ),
        pytest.param(
            {"forwarding.response_timeout": "0s"},
            ["forwarding.response_timeout: must be longer than zero, got '0s'"],
            id="zero",
        ),
        pytest.param(
            {"forwarding.failover_timeout": "25h"},
            ["forwarding.failover_timeout: must be at most 24h, got '25h'"],
            id="over-a-day",
        ),
        pytest.param(
            {"health_check.jitter": None},
            ["health_check.jitter: not a duration: null (e.g. 250ms, 5s, 1m)"],
            id="null",
        ),
    ],
)
def test_bad_duration_is_rejected(
    write_config: WriteConfig, changes: dict[str, Any], expected: list[str]
) -> None:
    check_errors(write_config, edited(changes), expected)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        pytest.param(
            {"health_check.healthy_threshold": 0},
            ["health_check.healthy_threshold: must be from 1 to 100, got 0"],
            id="healthy-threshold-zero",
        ),
        pytest.param(
            {"health_check.unhealthy_threshold": 101},
            ["health_check.unhealthy_threshold: must be from 1 to 100, got 101"],
            id="unhealthy-threshold-too-high",
        ),
        pytest.param(
            {"health_check.healthy_threshold": "2"},
            ["health_check.healthy_threshold: must be a whole number from 1 to 100, got '2'"],
            id="threshold-string",
        ),
        pytest.param(
            {"health_check.healthy_threshold": True},
            ["health_check.healthy_threshold: must be a whole number from 1 to 100, got True"],
            id="threshold-boolean",
        ),
        pytest.param(
            {"listen.proxy.port": 65536},
            ["listen.proxy.port: must be from 0 to 65535, got 65536"],
            id="port-too-high",
        ),
        pytest.param(
            {"listen.admin.port": -1},
            ["listen.admin.port: must be from 0 to 65535, got -1"],
            id="port-negative",
        ),
        pytest.param(
            {"listen.admin.port": 80.5},
            ["listen.admin.port: must be a whole number from 0 to 65535, got 80.5"],
            id="port-fraction",
        ),
        pytest.param(
            {"geodes[0].weight": 0},
            ["geodes[0].weight: must be from 1 to 1000, got 0"],
            id="weight-zero",
        ),
        pytest.param(
            {"geodes[0].weight": 1001},
            ["geodes[0].weight: must be from 1 to 1000, got 1001"],
            id="weight-too-high",
        ),
        pytest.param(
            {"forwarding.max_attempts": 0},
            ["forwarding.max_attempts: must be from 1 to 20, got 0"],
            id="max-attempts-zero",
        ),
    ],
)
def test_out_of_range_number_is_rejected(
    write_config: WriteConfig, changes: dict[str, Any], expected: list[str]
) -> None:
    check_errors(write_config, edited(changes), expected)


@pytest.mark.parametrize(
    ("statuses", "expected"),
    [
        pytest.param(
            ["300-200"],
            ["[0]: not an HTTP status or range: '300-200' (e.g. 200 or '200-299')"],
            id="reversed-range",
        ),
        pytest.param(
            [200, "2xx"],
            ["[1]: not an HTTP status or range: '2xx' (e.g. 200 or '200-299')"],
            id="wildcard",
        ),
        pytest.param(
            [99], ["[0]: not an HTTP status or range: 99 (e.g. 200 or '200-299')"], id="below-100"
        ),
        pytest.param(
            ["500-600"],
            ["[0]: not an HTTP status or range: '500-600' (e.g. 200 or '200-299')"],
            id="above-599",
        ),
        pytest.param([], [": must list at least one status"], id="empty"),
        pytest.param("200-299", [": must be a list, got '200-299'"], id="not-a-list"),
    ],
)
def test_bad_expected_statuses_are_rejected(
    write_config: WriteConfig, statuses: object, expected: list[str]
) -> None:
    data = edited({"health_check.expected_statuses": statuses})
    check_errors(write_config, data, [f"health_check.expected_statuses{e}" for e in expected])


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        pytest.param(
            {"health_check.path": "health"},
            ["health_check.path: must start with '/': 'health'"],
            id="check-path",
        ),
        pytest.param(
            {"listen.admin.host": "admin.example.com"},
            ["listen.admin.host: not an IP address: 'admin.example.com' (e.g. 127.0.0.1, ::)"],
            id="listener-hostname",
        ),
        pytest.param(
            {"forwarding.when_none_healthy": "panic"},
            ["forwarding.when_none_healthy: unknown value 'panic' (choose from: reject, try_all)"],
            id="when-none-healthy",
        ),
        pytest.param(
            {"forwarding.preserve_host": "yes"},
            ["forwarding.preserve_host: must be true or false, got 'yes'"],
            id="boolean-as-string",
        ),
        pytest.param(
            {"geodes[0].name": "eu west"},
            [
                "geodes[0].name: invalid geode name 'eu west' (letters, digits, '.', '_', "
                "'-'; up to 63)"
            ],
            id="geode-name",
        ),
    ],
)
def test_bad_scalar_value_is_rejected(
    write_config: WriteConfig, changes: dict[str, Any], expected: list[str]
) -> None:
    check_errors(write_config, edited(changes), expected)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        pytest.param(
            {"region_sources": ["x-client-region", "maxmind"]},
            [
                "region_sources[1]: unknown value 'maxmind' "
                "(choose from: x-client-region, cf-ipcountry, geoip)"
            ],
            id="unknown",
        ),
        pytest.param(
            {"region_sources": ["cf-ipcountry", "geoip"]},
            ["region_sources[1]: 'geoip' is listed but geoip.database is not set"],
            id="geoip-without-database",
        ),
        pytest.param(
            {"region_sources": ["geoip"], "geoip": {}},
            ["region_sources[0]: 'geoip' is listed but geoip.database is not set"],
            id="geoip-with-empty-section",
        ),
        pytest.param(
            {"region_sources": ["cf-ipcountry", "cf-ipcountry"]},
            ["region_sources[1]: 'cf-ipcountry' is listed twice"],
            id="twice",
        ),
        pytest.param(
            {"region_sources": "cf-ipcountry"},
            ["region_sources: must be a list, got 'cf-ipcountry'"],
            id="not-a-list",
        ),
    ],
)
def test_bad_region_sources_are_rejected(
    write_config: WriteConfig, overrides: dict[str, Any], expected: list[str]
) -> None:
    check_errors(write_config, edited(**overrides), expected)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        pytest.param(
            {"countries.ZZ": "eu-west"},
            ["countries.ZZ: unknown country code 'ZZ' (ISO 3166-1 alpha-2, e.g. FR)"],
            id="unknown-country",
        ),
        pytest.param(
            {"countries.FRA": "eu-west"},
            ["countries.FRA: unknown country code 'FRA' (ISO 3166-1 alpha-2, e.g. FR)"],
            id="alpha-3-country",
        ),
        pytest.param(
            {"continents.EA": "eu-west"},
            ["continents.EA: unknown continent code 'EA' (known: AF, AN, AS, EU, NA, OC, SA)"],
            id="unknown-continent",
        ),
        pytest.param(
            {"countries.DE": "eu-wst"},
            [f"countries.DE: unknown region 'eu-wst' {KNOWN}; did you mean 'eu-west'?"],
            id="unknown-region",
        ),
        pytest.param(
            {"countries": ["FR"]}, ["countries: must be a mapping, got ['FR']"], id="not-a-mapping"
        ),
    ],
)
def test_bad_region_map_entry_is_rejected(
    write_config: WriteConfig, changes: dict[str, Any], expected: list[str]
) -> None:
    check_errors(write_config, edited(changes), expected)


def test_country_codes_are_case_insensitive(write_config: WriteConfig) -> None:
    cfg = config_mod.load(
        write_config(edited({"countries.de": "us-east", "continents.oc": "eu-west"}))
    )
    assert (cfg.countries["DE"], cfg.continents["OC"]) == ("us-east", "eu-west")


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        pytest.param({"geodes": []}, ["geodes: at least one geode is required"], id="no-geodes"),
        pytest.param({"geodes": DELETE}, ["geodes: is required"], id="geodes-missing"),
        pytest.param(
            {"default_region": DELETE}, ["default_region: is required"], id="default-region-missing"
        ),
        pytest.param(
            {"geodes": {"name": "euw-1"}},
            ["geodes: must be a list, got {'name': 'euw-1'}"],
            id="geodes-not-a-list",
        ),
        pytest.param(
            {"geodes[0]": "euw-1"},
            ["geodes[0]: must be a mapping, got 'euw-1'"],
            id="geode-not-a-mapping",
        ),
        pytest.param(
            {"geodes[0].name": DELETE, "geodes[0].url": DELETE},
            ["geodes[0].name: is required", "geodes[0].url: is required"],
            id="geode-keys-missing",
        ),
        pytest.param(
            {"health_check": "fast"},
            ["health_check: must be a mapping, got 'fast'"],
            id="section-not-a-mapping",
        ),
        pytest.param(
            {"regions.eu-west": {"fallback": "us-east"}},
            ["regions.eu-west.fallback: must be a list, got 'us-east'"],
            id="fallback-not-a-list",
        ),
    ],
)
def test_missing_or_misshapen_section_is_rejected(
    write_config: WriteConfig, changes: dict[str, Any], expected: list[str]
) -> None:
    check_errors(write_config, edited(changes), expected)


def test_empty_mapping_reports_every_required_key(write_config: WriteConfig) -> None:
    expected = ["regions: is required", "default_region: is required", "geodes: is required"]
    check_errors(write_config, {}, expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "- regions\n- geodes\n", "must be a mapping, got ['regions', 'geodes']", id="list"
        ),
        pytest.param("just text\n", "must be a mapping, got 'just text'", id="scalar"),
        pytest.param("", "must be a mapping, got null", id="empty-file"),
        pytest.param(
            "regions: {eu-west: null\ngeodes: []\n",
            "line 2, column 7: invalid YAML: expected ',' or '}', but got ':'",
            id="unclosed-flow-mapping",
        ),
        pytest.param(
            "default_region: eu-west\n  regions: {}\n",
            "line 2, column 10: invalid YAML: mapping values are not allowed here",
            id="bad-indentation",
        ),
        pytest.param(
            "geodes:\n\t- {}\n",
            "line 2, column 1: invalid YAML: found character '\\t' that cannot start any token",
            id="tab",
        ),
    ],
)
def test_unusable_file_is_one_error_naming_the_file(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = tmp_path / "geoproxy.yaml"
    path.write_text(text)
    assert problems_of(path) == [f"{path}: {expected}"]


def test_missing_file_is_named_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert problems_of(Path("etc/nope.yaml")) == [
        "etc/nope.yaml: cannot read: No such file or directory"
    ]


def test_file_that_is_not_utf8_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "geoproxy.yaml"
    path.write_bytes(b"default_region: \xff\xfe\n")
    assert problems_of(path) == [f"{path}: not UTF-8 text: invalid start byte"]


def test_several_errors_are_reported_together_in_file_order(write_config: WriteConfig) -> None:
    data = edited(
        {
            "geodez": [],
            "trusted_proxies": ["10.0.0.1/8"],
            "default_region": "mars",
            "health_check.intreval": "5s",
            "geodes[0].region": "eu-wst",
            "geodes[1].url": "ftp://use-1.test",
            "forwarding.connect_timeout": "5",
        }
    )
    check_errors(
        write_config,
        data,
        [
            "geodez: unknown key (did you mean 'geodes'?)",
            "trusted_proxies[0]: invalid CIDR '10.0.0.1/8': 10.0.0.1/8 has host bits set",
            f"default_region: unknown region 'mars' {KNOWN}",
            "health_check.intreval: unknown key (did you mean 'interval'?)",
            f"geodes[0].region: unknown region 'eu-wst' {KNOWN}; did you mean 'eu-west'?",
            "geodes[1].url: URL scheme must be http or https: 'ftp://use-1.test'",
            "forwarding.connect_timeout: not a duration: '5' (e.g. 250ms, 5s, 1m)",
        ],
    )


# --- relative paths and the region map file --------------------------------------------------


@pytest.fixture
def etc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The config's folder; the cwd is a sibling folder holding decoy files."""
    folder = tmp_path / "etc"
    (folder / "maps").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "maps").mkdir(parents=True)
    (elsewhere / "maps" / "regions.yaml").write_text("countries: {FR: ap-northeast}\n")
    monkeypatch.chdir(elsewhere)
    return folder


def test_region_map_resolves_against_config_folder_not_cwd(
    write_config: WriteConfig, etc: Path
) -> None:
    (etc / "maps" / "regions.yaml").write_text(
        "continents: {EU: us-east, OC: us-east}\ncountries: {FR: us-east, DE: us-east}\n"
    )
    data = edited(
        region_map="maps/regions.yaml",
        countries={"DE": "eu-west"},
        continents={"EU": "ap-northeast"},
    )
    cfg = config_mod.load(write_config(data, "etc/geoproxy.yaml"))
    assert cfg.countries == {"FR": "us-east", "DE": "eu-west"}  # inline DE wins over the file
    assert cfg.continents == {"EU": "ap-northeast", "OC": "us-east"}


def test_config_rebuilt_from_its_sources_equals_it_whatever_the_files_now_say(
    write_config: WriteConfig, etc: Path
) -> None:
    """What a ``--workers`` worker does with the bytes its supervisor sends."""
    (etc / "maps" / "regions.yaml").write_text("countries: {DE: us-east}\n")
    path = write_config(edited(region_map="maps/regions.yaml"), "etc/geoproxy.yaml")
    cfg = config_mod.load(path)
    assert set(cfg.sources()) == {str(path), str(etc / "maps" / "regions.yaml")}
    path.write_text("geodes: [broken\n")
    (etc / "maps" / "regions.yaml").unlink()
    again = config_mod.load(path, cfg.sources())
    assert again == cfg
    assert again.countries["DE"] == "us-east"
    assert again.fingerprint == cfg.fingerprint
    with pytest.raises(ConfigError, match="invalid YAML"):
        config_mod.load(path)  # without them: the files as they are now


def test_geoip_database_resolves_against_config_folder(
    write_config: WriteConfig, etc: Path
) -> None:
    cfg = config_mod.load(
        write_config(edited(geoip={"database": "data/x.mmdb"}), "etc/geoproxy.yaml")
    )
    assert cfg.geoip_database == etc / "data" / "x.mmdb"


def test_absolute_geoip_database_path_is_kept(write_config: WriteConfig, tmp_path: Path) -> None:
    database = tmp_path / "srv" / "GeoLite2-City.mmdb"
    cfg = config_mod.load(write_config(edited(geoip={"database": str(database)})))
    assert cfg.geoip_database == database


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "countries: {ZZ: eu-west}\n",
            "countries.ZZ: unknown country code 'ZZ' (ISO 3166-1 alpha-2, e.g. FR)",
            id="unknown-country",
        ),
        pytest.param(
            "continents: {EU: eu-wst}\n",
            f"continents.EU: unknown region 'eu-wst' {KNOWN}; did you mean 'eu-west'?",
            id="unknown-region",
        ),
        pytest.param(
            "countriez: {FR: eu-west}\n",
            "countriez: unknown key (did you mean 'countries'?)",
            id="unknown-key",
        ),
        pytest.param("- FR\n", "must be a mapping, got ['FR']", id="not-a-mapping"),
        pytest.param(
            "countries: [\n",
            "line 2, column 1: invalid YAML: expected the node content, but found '<stream end>'",
            id="invalid-yaml",
        ),
    ],
)
def test_error_in_region_map_file_names_map_file_and_path_inside_it(
    write_config: WriteConfig, etc: Path, text: str, expected: str
) -> None:
    (etc / "maps" / "regions.yaml").write_text(text)
    path = write_config(edited(region_map="maps/regions.yaml"), "etc/geoproxy.yaml")
    map_path = etc / "maps" / "regions.yaml"
    assert problems_of(path) == [f"{path}: region_map: {map_path}: {expected}"]


def test_missing_region_map_file_names_resolved_path(write_config: WriteConfig, etc: Path) -> None:
    path = write_config(edited(region_map="maps/nope.yaml"), "etc/geoproxy.yaml")
    assert problems_of(path) == [
        f"{path}: region_map: {etc / 'maps' / 'nope.yaml'}: cannot read: No such file or directory"
    ]


# --- YAML 1.1 booleans ----------------------------------------------------------------------


def test_bare_no_in_region_map_file_is_norway(write_config: WriteConfig, etc: Path) -> None:
    (etc / "maps" / "regions.yaml").write_text("countries:\n  NO: eu-west\n  SE: us-east\n")
    cfg = config_mod.load(
        write_config(edited(region_map="maps/regions.yaml", countries={}), "etc/geoproxy.yaml")
    )
    assert cfg.countries == {"NO": "eu-west", "SE": "us-east"}


def test_yaml_11_words_are_strings_and_only_true_false_are_booleans(tmp_path: Path) -> None:
    data = edited({"countries": DELETE, "forwarding.preserve_host": "PLACEHOLDER"})
    text = yaml.safe_dump(data, sort_keys=False)
    path = tmp_path / "geoproxy.yaml"

    path.write_text(text.replace("PLACEHOLDER", "false") + "countries: {NO: us-east, ON: x}\n")
    assert problems_of(path) == [  # ON is a string key (Ontario is no country), not True
        f"{path}: countries.ON: unknown country code 'ON' (ISO 3166-1 alpha-2, e.g. FR)"
    ]

    path.write_text(text.replace("PLACEHOLDER", "no"))
    assert problems_of(path) == [
        f"{path}: forwarding.preserve_host: must be true or false, got 'no'"
    ]

    path.write_text(text.replace("PLACEHOLDER", "false") + "countries: {NO: us-east}\n")
    cfg = config_mod.load(path)
    assert cfg.forwarding.preserve_host is False
    assert cfg.countries == {"NO": "us-east"}


# --- the shipped files ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["geoproxy.yaml", "demo.yaml"])
def test_shipped_config_loads(name: str) -> None:
    cfg = config_mod.load(REPO / "config" / name)
    assert cfg.geodes
    assert {g.region for g in cfg.geodes} <= {r.name for r in cfg.regions}


def test_shipped_example_overrides_one_geode_health_check() -> None:
    cfg = config_mod.load(REPO / "config" / "geoproxy.yaml")
    by_name = {g.name: g for g in cfg.geodes}
    assert by_name["apne1-a"].health == dataclasses.replace(
        cfg.health_check, path="/ready", timeout=1.0
    )
    assert by_name["euw1-a"].health == cfg.health_check


@pytest.mark.parametrize("name", ["geoproxy.yaml", "demo.yaml"])
def test_shipped_region_map_gives_every_iso_country_a_region(name: str) -> None:
    topology = Topology.build(config_mod.load(REPO / "config" / name))
    assert set(topology.country_region) == set(COUNTRY_CONTINENT)
    assert topology.unmapped_countries() == []
    assert topology.country_region["NO"] == "eu-central"  # the quoted "NO" in the map


# --- geoproxy check-config ------------------------------------------------------------------


def check_config(path: Path | str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "geoproxy", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        check=False,
    )


def test_check_config_prints_topology_and_exits_0_on_valid_file(
    write_config: WriteConfig, tmp_path: Path
) -> None:
    data = edited(
        {"geodes[2].region": "us-east", "geodes[1].weight": 3},
        countries={"FR": "eu-west", "US": "us-east"},
        continents={},
    )
    path = write_config(data)
    result = check_config(path, tmp_path)

    assert (result.returncode, result.stderr) == (0, "")
    lines = result.stdout.splitlines()
    geodes = lines.index("geodes:")
    assert [line.split() for line in lines[geodes + 1 : geodes + 4]] == [
        ["euw-1", "eu-west", "http://euw-1.test", "weight=1", "check=/health", "every", "1s"],
        ["use-1", "us-east", "http://use-1.test", "weight=3", "check=/health", "every", "1s"],
        ["apne-1", "us-east", "http://apne-1.test", "weight=1", "check=/health", "every", "1s"],
    ]
    regions = lines.index("regions (try order; geodes per region):")
    assert [line.split() for line in lines[regions + 1 : regions + 4]] == [
        ["eu-west", "eu-west(1),", "us-east(2),", "ap-northeast(0)", "countries:", "1"],
        ["us-east", "us-east(2),", "eu-west(1),", "ap-northeast(0)", "countries:", "1"],
        ["ap-northeast", "ap-northeast(0),", "us-east(2),", "eu-west(1)", "countries:", "0"],
    ]
    assert "region sources: x-client-region -> cf-ipcountry -> default (eu-west)" in lines
    assert lines[-1] == f"{path}: configuration is valid"


def test_check_config_accepts_a_real_geoip_database(
    write_config: WriteConfig, tmp_path: Path, make_mmdb: Callable[..., Path]
) -> None:
    database = make_mmdb("Country")
    path = write_config(edited(geoip={"database": database.name}))
    result = check_config(path, REPO)
    assert (result.returncode, result.stderr) == (0, "")
    lines = result.stdout.splitlines()
    day = time.strftime("%Y-%m-%d", time.gmtime())
    assert f"geoip database: {database} (GeoLite2-Country, built {day})" in lines
    assert "region sources: x-client-region -> cf-ipcountry -> geoip -> default (eu-west)" in lines
    assert lines[-1] == f"{path}: configuration is valid"


def test_check_config_reports_every_error_and_exits_1_on_invalid_file(
    write_config: WriteConfig, tmp_path: Path
) -> None:
    data = edited(
        {"geodes[0].region": "eu-wst", "health_check.intreval": "5s", "listen.admin.port": 70000}
    )
    path = write_config(data)
    result = check_config(path, tmp_path)

    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.splitlines() == [
        f"{path}: configuration is invalid",
        f"{path}: listen.admin.port: must be from 0 to 65535, got 70000",
        f"{path}: health_check.intreval: unknown key (did you mean 'interval'?)",
        f"{path}: geodes[0].region: unknown region 'eu-wst' {KNOWN}; did you mean 'eu-west'?",
    ]


def test_check_config_on_missing_file_exits_1_naming_it(tmp_path: Path) -> None:
    result = check_config("nope.yaml", tmp_path)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.splitlines() == [
        "nope.yaml: configuration is invalid",
        "nope.yaml: cannot read: No such file or directory",
    ]


def test_check_config_on_missing_geoip_database_names_resolved_path(
    write_config: WriteConfig, etc: Path
) -> None:
    path = write_config(edited(geoip={"database": "missing.mmdb"}), "etc/geoproxy.yaml")
    result = check_config(path, etc.parent / "elsewhere")
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.splitlines() == [
        f"{path}: configuration is invalid",
        f"{path}: geoip.database: {etc / 'missing.mmdb'}: GeoIP database not found",
    ]


def test_check_config_rejects_a_corrupt_geoip_database_it_probed(
    write_config: WriteConfig, tmp_path: Path, make_broken_mmdb: Callable[..., Path]
) -> None:
    """Metadata that reads, records that do not (MaxMind's Broken-Double-Format file): a
    look-up of the first addresses in it fails at load, not on traffic."""
    database = make_broken_mmdb()
    path = write_config(edited(geoip={"database": database.name}))
    result = check_config(path, tmp_path)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.splitlines() == [
        f"{path}: configuration is invalid",
        f"{path}: geoip.database: {database}: corrupt MaxMind database: Error looking up data "
        "while iterating over tree: The MaxMind DB file's data section contains bad data "
        "(unknown data type or corrupt data)",
    ]


def test_check_config_prints_warnings_and_still_exits_0(
    write_config: WriteConfig, tmp_path: Path
) -> None:
    path = write_config(edited({"trusted_proxies": ["::/0"]}))
    result = check_config(path, tmp_path)
    assert result.returncode == 0
    assert result.stdout.splitlines()[-1] == f"{path}: configuration is valid"
    assert result.stderr.splitlines() == [
        f"warning: {path}: trusted_proxies[0]: ::/0 trusts every IPv6 client: any client can "
        "pick its region (X-Client-Region, CF-IPCountry) and its address (X-Forwarded-For)"
    ]


def test_check_config_on_file_that_is_not_mmdb_exits_1_with_clear_message(
    write_config: WriteConfig, tmp_path: Path
) -> None:
    database = tmp_path / "GeoLite2-City.mmdb"
    database.write_bytes(b"\x00garbage, not a MaxMind database\xff" * 64)
    path = write_config(edited(geoip={"database": database.name}))
    result = check_config(path, tmp_path)

    assert (result.returncode, result.stdout) == (1, "")
    lines = result.stderr.splitlines()
    assert lines[0] == f"{path}: configuration is invalid"
    assert lines[1].startswith(
        f"{path}: geoip.database: {database}: not a readable MaxMind database: "
    )
    assert len(lines) == 2
    assert "Traceback" not in result.stderr


def test_duplicate_yaml_key_is_an_error_not_a_silent_override(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text(
        "regions:\n  eu-west: {}\n  us-east: {}\n  eu-west: {fallback: [us-east]}\n"
        "default_region: eu-west\ngeodes: []\n"
    )
    with pytest.raises(ConfigError) as err:
        config_mod.load(path)
    assert err.value.problems == [
        f"{path}: line 4, column 3: invalid YAML: duplicate key 'eu-west'"
    ]


def test_broken_regions_do_not_flood_every_reference_with_unknown_region(
    tmp_path: Path,
) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(
        "regions: [eu-west]\ndefault_region: eu-west\n"
        "geodes: [{name: a, region: eu-west, url: 'http://127.0.0.1:1'}]\n"
        "countries: {FR: eu-west}\n"
    )
    with pytest.raises(ConfigError) as err:
        config_mod.load(path)
    assert err.value.problems == [f"{path}: regions: must be a mapping, got ['eu-west']"]


def test_limits_outlier_detection_reload_and_shutdown_sections(write_config: WriteConfig) -> None:
    cfg = config_mod.load(
        write_config(
            base_config(
                [{"name": "a", "region": "eu-west", "url": "http://127.0.0.1:1"}],
                limits={
                    "header_timeout": "5s",
                    "max_header_bytes": "16KiB",
                    "max_body_bytes": "2GiB",
                },
                outlier_detection={"consecutive_failures": 0},
                reload={"poll_interval": "0s"},
                shutdown={"drain_timeout": "30s"},
            )
        )
    )
    assert cfg.limits.header_timeout == 5.0
    assert cfg.limits.max_header_bytes == 16 * 1024
    assert cfg.limits.max_body_bytes == 2 * 1024**3
    assert cfg.limits.keepalive_timeout == 60.0  # default kept
    assert cfg.outlier_detection.consecutive_failures == 0
    assert cfg.outlier_detection.base_ejection_time == 30.0
    assert cfg.lifecycle.reload_poll_interval == 0.0
    assert cfg.lifecycle.drain_timeout == 30.0


@pytest.mark.parametrize(
    ("section", "value", "message"),
    [
        (
            "limits",
            {"max_body_bytes": "10MB"},
            "limits.max_body_bytes: not a size: '10MB' (e.g. 64KiB, 100MiB, 2GiB)",
        ),
        (
            "limits",
            {"max_header_bytes": "0KiB"},
            "limits.max_header_bytes: must be larger than zero, got '0KiB'",
        ),
        (
            "outlier_detection",
            {"consecutive_failure": 3},
            "outlier_detection.consecutive_failure: unknown key (did you mean "
            "'consecutive_failures'?)",
        ),
        (
            "shutdown",
            {"drain_timeout": 10},
            "shutdown.drain_timeout: a duration needs a unit: 10 (e.g. '10s' or '10ms')",
        ),
    ],
    ids=["size-unit", "zero-size", "typo", "duration-unit"],
)
def test_new_section_errors_name_path_and_value(
    write_config: WriteConfig, section: str, value: dict[str, Any], message: str
) -> None:
    path = write_config(
        base_config(
            [{"name": "a", "region": "eu-west", "url": "http://127.0.0.1:1"}], **{section: value}
        )
    )
    with pytest.raises(ConfigError) as err:
        config_mod.load(path)
    assert err.value.problems == [f"{path}: {message}"]
