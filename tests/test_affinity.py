"""Home-stamp affinity (issue 17, item 2): a stamp names its user's home region with
``Geoproxy-Home``; the edge turns it into a signed cookie, and later requests carrying it
go home wherever they come from. Tenant keys mapped to a home region are the other
source. Through real sockets on both request paths, with geodes that record what reached
them."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from test_stamp_api import MeshFactory, mesh  # noqa: F401  (a fixture)

from geoproxy.config import loader as config_mod
from geoproxy.config.affinity import key_id
from geoproxy.config.loader import files_fingerprint
from geoproxy.config.values import HomeCookie
from geoproxy.errors import ConfigError
from geoproxy.proxy.homecookie import without_cookie
from geoproxy.routing import affinity
from geoproxy.routing.affinity import Home, make_cookie, verify

from conftest import FakeGeode, GeodeFactory, Proxy, ProxyFactory, base_config, geode_entry

KEY_A = "a" * 32 + "-first-signing-key"
KEY_B = "b" * 32 + "-the-older-key"
REGIONS = frozenset({"eu-west", "us-east", "ap-northeast"})
NOW = 1_800_000_000.0


@pytest.fixture(params=["fast", "coroutine"])
def lane(request: pytest.FixtureRequest) -> str:
    """Every proxy test here runs on both request paths (conftest.py's ``lane``)."""
    return str(request.param)


def cookie_config(*keys: str, **extra: Any) -> HomeCookie:
    return HomeCookie(keys=tuple((key_id(k.encode()), k.encode()) for k in keys), **extra)


# -- the cookie, pure -------------------------------------------------------------------


def _tampered(value: str) -> str:
    _, expires, kid, sig = value.split(".")
    return f"us-east.{expires}.{kid}.{sig}"


@pytest.mark.parametrize(
    ("signed_with", "accepted", "at", "change", "expected"),
    [
        ((KEY_A,), (KEY_A,), NOW, None, Home("ap-northeast", "cookie", "ok", int(NOW) + 3600)),
        ((KEY_B,), (KEY_A, KEY_B), NOW, None, Home("ap-northeast", "cookie", "ok", 1800003600)),
        ((KEY_B,), (KEY_A,), NOW, None, Home(None, "cookie", "unknown_key")),
        ((KEY_A,), (KEY_A,), NOW, _tampered, Home(None, "cookie", "forged")),
        ((KEY_A,), (KEY_A,), NOW + 3600, None, Home(None, "cookie", "expired", 1800003600)),
        ((KEY_A,), (KEY_A,), NOW, lambda v: v[:-1], Home(None, "cookie", "malformed")),
        ((KEY_A,), (KEY_A,), NOW, lambda v: "ap-northeast", Home(None, "cookie", "malformed")),
    ],
    ids=["ok", "rotated-older-key", "unknown-key", "forged-region", "expired", "cut", "bare"],
)
def test_home_cookie_is_believed_only_when_signed_by_a_configured_key_and_unexpired(
    signed_with: tuple[str, ...],
    accepted: tuple[str, ...],
    at: float,
    change: Any,
    expected: Home,
) -> None:
    value = make_cookie(cookie_config(*signed_with, max_age=3600.0), "ap-northeast", NOW)
    if change is not None:
        value = change(value)
    assert verify(cookie_config(*accepted), value, REGIONS, at) == expected


def test_a_cookie_for_a_region_the_config_no_longer_declares_is_ignored() -> None:
    value = make_cookie(cookie_config(KEY_A), "ap-northeast", NOW)
    home = verify(cookie_config(KEY_A), value, frozenset({"eu-west"}), NOW)
    assert (home.region, home.result) == (None, "unknown_region")


@pytest.mark.parametrize(
    ("kept", "expected"),
    [
        (b"Cookie: geoproxy_home=x.1.k.s\r\n", b""),
        (b"Cookie: a=1; geoproxy_home=x; b=2\r\nX: y\r\n", b"Cookie: a=1; b=2\r\nX: y\r\n"),
        (b"cookie: geoproxy_homes=1\r\n", b"cookie: geoproxy_homes=1\r\n"),
        (b"X-Note: geoproxy_home=1\r\n", b"X-Note: geoproxy_home=1\r\n"),
    ],
    ids=["alone", "among-others", "longer-name-kept", "not-a-cookie-line"],
)
def test_the_home_cookie_is_taken_out_of_the_cookie_lines_a_geode_gets(
    kept: bytes, expected: bytes
) -> None:
    assert without_cookie(kept, "geoproxy_home") == expected


# -- config -----------------------------------------------------------------------------


def load(tmp_path: Path, homes: dict[str, Any], **files: str) -> Any:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    geodes = [{"name": "eu-1", "region": "eu-west", "url": "http://127.0.0.1:1"}]
    path = tmp_path / "geoproxy.yaml"
    path.write_text(json.dumps(base_config(geodes, home_affinity=homes)))
    return config_mod.load(path)


def test_keys_come_from_a_file_first_signs_and_the_files_are_watched(tmp_path: Path) -> None:
    keys = f"# rotated 2026-12\n{KEY_A}\n\n{KEY_B}\n"
    tenants = "homes: {acme: ap-northeast}\n"
    cfg = load(
        tmp_path,
        {
            "cookie": {"keys_file": "home-keys", "max_age": "7d"},
            "tenants": {"header": "X-Tenant", "map": "tenants.yaml", "homes": {"beta": "us-east"}},
        },
        **{"home-keys": keys, "tenants.yaml": tenants},
    )
    homes = cfg.home_affinity
    assert [k for _, k in homes.cookie.keys] == [KEY_A.encode(), KEY_B.encode()]
    assert homes.cookie.max_age == 7 * 86400
    assert dict(homes.tenants.homes) == {"acme": "ap-northeast", "beta": "us-east"}
    assert [p.name for p in cfg.files] == ["geoproxy.yaml", "home-keys", "tenants.yaml"]
    again = config_mod.load(cfg.path, given=cfg.sources())  # a worker of --workers
    assert again.home_affinity == homes


def test_keys_come_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GEOPROXY_TEST_HOME_KEYS", f"{KEY_A}, {KEY_B}")
    cfg = load(tmp_path, {"cookie": {"keys_env": "GEOPROXY_TEST_HOME_KEYS"}})
    assert [k for _, k in cfg.home_affinity.cookie.keys] == [KEY_A.encode(), KEY_B.encode()]


@pytest.mark.parametrize(
    ("homes", "files", "message"),
    [
        ({}, {}, "home_affinity: names no source of a home region: set cookie, tenants or both"),
        ({"cookie": {}}, {}, "home_affinity.cookie: needs signing keys: set keys_file or keys_env"),
        (
            {"cookie": {"keys_file": "k"}},
            {"k": "short\n"},
            "home_affinity.cookie.keys_file: key 1 has 5 bytes, at least 32 are needed "
            "(e.g. openssl rand -hex 32)",
        ),
        (
            {"cookie": {"keys_env": "GEOPROXY_TEST_UNSET_VARIABLE"}},
            {},
            "home_affinity.cookie.keys_env: environment variable GEOPROXY_TEST_UNSET_VARIABLE "
            "is not set",
        ),
        (
            {"cookie": {"keys_file": "k", "keys_env": "X"}},
            {"k": KEY_A},
            "home_affinity.cookie.keys_env: set keys_file or keys_env, not both",
        ),
        (
            {"cookie": {"keys_file": "k", "max_age": "500d"}},
            {"k": KEY_A},
            "home_affinity.cookie.max_age: must be from 1m to 400d, got '500d'",
        ),
        (
            {"cookie": {"keys_file": "k", "secure": "sometimes"}},
            {"k": KEY_A},
            "home_affinity.cookie.secure: unknown value 'sometimes' "
            "(choose from: auto, always, never)",
        ),
        (
            {"tenants": {"header": "X-Tenant", "cookie": "t"}},
            {},
            "home_affinity.tenants: names where the tenant key is: exactly one of header, "
            "cookie, path_prefix (got header, cookie)",
        ),
        (
            {"tenants": {"path_prefix": "/t", "homes": {}}},
            {},
            "home_affinity.tenants.path_prefix: must start and end with '/': '/t' (e.g. /t/)",
        ),
        (
            {"tenants": {"header": "X-Tenant", "homes": {"acme": "eu-wst"}}},
            {},
            "home_affinity.tenants.homes.acme: unknown region 'eu-wst' (known: ap-northeast, "
            "eu-west, us-east); did you mean 'eu-west'?",
        ),
        (
            {"tenants": {"header": "X-Tenant", "map": "t.yaml"}},
            {"t.yaml": "homes: {acme: mars}\n"},
            "home_affinity.tenants.map: {dir}/t.yaml: homes.acme: unknown region 'mars' "
            "(known: ap-northeast, eu-west, us-east)",
        ),
        (
            {"cookie": {"keys_file": "k", "intervall": 1}},
            {"k": KEY_A},
            "home_affinity.cookie.intervall: unknown key (known: name, max_age, keys_file, "
            "keys_env, secure, domain, forward)",
        ),
    ],
    ids=[
        "no-source",
        "no-keys",
        "short-key",
        "env-unset",
        "file-and-env",
        "max-age",
        "secure",
        "two-tenant-sources",
        "prefix-without-slash",
        "tenant-unknown-region",
        "tenant-map-file",
        "unknown-key",
    ],
)
def test_config_errors_name_the_path_and_the_bad_value(
    tmp_path: Path, homes: dict[str, Any], files: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        load(tmp_path, homes, **files)
    path = tmp_path / "geoproxy.yaml"
    assert raised.value.problems == [f"{path}: " + message.format(dir=tmp_path)]


def test_check_config_names_the_key_ids_never_the_keys(tmp_path: Path) -> None:
    (tmp_path / "k").write_text(f"{KEY_A}\n{KEY_B}\n")
    geodes = [{"name": "eu-1", "region": "eu-west", "url": "http://127.0.0.1:1"}]
    path = tmp_path / "geoproxy.yaml"
    homes = {"cookie": {"keys_file": "k"}, "on_unavailable": "reject"}
    path.write_text(json.dumps(base_config(geodes, home_affinity=homes)))
    done = subprocess.run(
        [sys.executable, "-m", "geoproxy", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert KEY_A not in done.stdout and KEY_B not in done.stdout
    lines = done.stdout.splitlines()
    assert "home affinity: tenant map first, then the cookie; on_unavailable: reject" in lines
    kid_a, kid_b = key_id(KEY_A.encode()), key_id(KEY_B.encode())
    assert (
        "  cookie geoproxy_home: max_age 30d, secure auto, not forwarded to geodes; "
        f"signing key {kid_a}, also accepted: {kid_b}"
    ) in lines


# -- through the proxy ------------------------------------------------------------------


async def three(geode_factory: GeodeFactory) -> tuple[FakeGeode, FakeGeode, FakeGeode]:
    return (
        await geode_factory("eu-1", "eu-west"),
        await geode_factory("us-1", "us-east"),
        await geode_factory("ap-1", "ap-northeast"),
    )


async def start(
    proxy_factory: ProxyFactory,
    tmp_path: Path,
    geodes: tuple[FakeGeode, ...],
    homes: dict[str, Any] | None = None,
    **overrides: Any,
) -> Proxy:
    (tmp_path / "home-keys").write_text(f"{KEY_A}\n{KEY_B}\n")
    homes = homes or {"cookie": {"keys_file": "home-keys"}}
    data = base_config([geode_entry(g) for g in geodes], home_affinity=homes, **overrides)
    return await proxy_factory(data)


def home_cookie(proxy: Proxy, region: str, key: str = KEY_A) -> str:
    cookie = proxy.gateway.config.home_affinity.cookie
    assert cookie is not None
    signer = cookie_config(key, max_age=cookie.max_age)
    return f"{cookie.name}={make_cookie(signer, region, time.time())}"


async def get(
    http: aiohttp.ClientSession, url: str, **headers: str
) -> tuple[int, str | None, aiohttp.ClientResponse]:
    async with http.get(url, headers=headers) as resp:
        body = await resp.json()
        return resp.status, body.get("geode"), resp


async def test_a_stamp_home_header_becomes_a_signed_httponly_cookie_and_never_reaches_the_client(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    geodes = await three(geode_factory)
    proxy = await start(proxy_factory, tmp_path, geodes)
    status, geode, resp = await get(
        http, f"{proxy.url}/home/ap-northeast", **{"CF-IPCountry": "FR"}
    )
    assert (status, geode) == (200, "eu-1")
    assert "Geoproxy-Home" not in resp.headers
    (line,) = resp.headers.getall("Set-Cookie")
    name_value, *attrs = line.split("; ")
    assert attrs == [f"Max-Age={30 * 86400}", "Path=/", "HttpOnly", "SameSite=Lax"]
    name, _, value = name_value.partition("=")
    assert name == "geoproxy_home"
    cookie = proxy.gateway.config.home_affinity.cookie
    assert verify(cookie, value, REGIONS, time.time()).region == "ap-northeast"
    # Behind a trusted TLS terminator (X-Forwarded-Proto: https) the cookie is Secure.
    _, _, resp = await get(http, f"{proxy.url}/home/us-east", **{"X-Forwarded-Proto": "https"})
    assert "Secure" in resp.headers["Set-Cookie"].split("; ")
    assert proxy.sample("geoproxy_home_stamps_total", result="set") == 2


async def test_a_valid_home_cookie_sends_a_client_home_wherever_it_comes_from(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    *_, ap = geodes = await three(geode_factory)
    proxy = await start(proxy_factory, tmp_path, geodes)
    cookie = home_cookie(proxy, "ap-northeast")
    headers = {"CF-IPCountry": "FR", "Cookie": f"session=s1; {cookie}; theme=dark"}
    status, geode, _ = await get(http, f"{proxy.url}/whoami", **headers)
    assert (status, geode) == (200, "ap-1")
    # The cookie is the edge's: the geode gets the client's other cookies, not it.
    assert ap.last_headers["cookie"] == ["session=s1; theme=dark"]
    assert (
        proxy.sample(
            "geoproxy_routing_decisions_total",
            client_region="eu-west",
            geode="ap-1",
            decision="affinity",
        )
        == 1
    )
    assert proxy.sample("geoproxy_home_affinity_total", source="cookie", result="ok") == 1
    # Signed with the older key of the list (rotation): still believed.
    older = home_cookie(proxy, "us-east", key=KEY_B)
    assert (await get(http, f"{proxy.url}/whoami", Cookie=older))[1] == "us-1"


@pytest.mark.parametrize(
    ("spoil", "result"),
    [
        (lambda c: c.replace("ap-northeast", "us-east", 1), "forged"),
        (lambda c: c[:-3], "malformed"),
        (lambda c: c.replace(key_id(KEY_A.encode()), "0" * 8), "unknown_key"),
    ],
    ids=["forged", "malformed", "unknown-key"],
)
async def test_a_forged_or_unknown_key_cookie_is_ignored_and_counted(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    spoil: Any,
    result: str,
) -> None:
    geodes = await three(geode_factory)
    proxy = await start(proxy_factory, tmp_path, geodes)
    cookie = spoil(home_cookie(proxy, "ap-northeast"))
    status, geode, _ = await get(
        http, f"{proxy.url}/whoami", **{"CF-IPCountry": "FR", "Cookie": cookie}
    )
    assert (status, geode) == (200, "eu-1")
    assert proxy.sample("geoproxy_home_affinity_total", source="cookie", result=result) == 1


async def test_a_changing_cookie_on_one_kept_alive_connection_is_read_afresh_each_time(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    """The fast lane memoises what a connection's repeated header lines decided: a new
    cookie, a forged one or none must not inherit the last request's home."""
    geodes = await three(geode_factory)
    proxy = await start(proxy_factory, tmp_path, geodes)
    home = home_cookie(proxy, "ap-northeast")
    sequence = [
        (home, "ap-1"),
        (home, "ap-1"),
        (home_cookie(proxy, "us-east"), "us-1"),
        (home.replace("ap-northeast", "us-east", 1), "eu-1"),
        (None, "eu-1"),
        (home, "ap-1"),
    ]
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as one:
        for cookie, expected in sequence:
            headers = {"CF-IPCountry": "FR", **({"Cookie": cookie} if cookie else {})}
            assert (await get(one, f"{proxy.url}/whoami", **headers))[1] == expected
    if proxy.gateway.config.forwarding.fast_lane:
        assert proxy.sample("geoproxy_fast_lane_requests_total", outcome="answered") == 6


async def test_a_cookie_that_expires_while_its_connection_lives_stops_sending_home(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    geodes = await three(geode_factory)
    proxy = await start(proxy_factory, tmp_path, geodes)
    signer = cookie_config(KEY_A, max_age=1.0)
    cookie = f"geoproxy_home={make_cookie(signer, 'ap-northeast', time.time())}"
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as one:
        assert (await get(one, f"{proxy.url}/whoami", Cookie=cookie))[1] == "ap-1"
        await asyncio.sleep(1.2)
        assert (await get(one, f"{proxy.url}/whoami", Cookie=cookie))[1] == "eu-1"
    assert proxy.sample("geoproxy_home_affinity_total", source="cookie", result="expired") == 1


async def test_the_home_regions_own_fallbacks_apply_when_it_has_no_healthy_geode_or_503_by_policy(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    *_, ap = geodes = await three(geode_factory)
    proxy = await start(proxy_factory, tmp_path, geodes)
    ap.health_status = 500
    checker = proxy.gateway.checker
    assert checker is not None
    for _ in range(2):
        await checker.check_once()
    cookie = home_cookie(proxy, "ap-northeast")
    # ap-northeast falls back to us-east first (conftest's REGIONS), not to the client's eu-west
    status, geode, _ = await get(
        http, f"{proxy.url}/whoami", **{"CF-IPCountry": "FR", "Cookie": cookie}
    )
    assert (status, geode) == (200, "us-1")
    assert (
        proxy.sample(
            "geoproxy_routing_decisions_total",
            client_region="eu-west",
            geode="us-1",
            decision="affinity_fallback",
        )
        == 1
    )

    strict = await start(
        proxy_factory,
        tmp_path,
        geodes,
        {"cookie": {"keys_file": "home-keys"}, "on_unavailable": "reject"},
    )
    strict_checker = strict.gateway.checker
    assert strict_checker is not None
    for _ in range(2):
        await strict_checker.check_once()
    async with http.get(f"{strict.url}/whoami", headers={"Cookie": cookie}) as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "1"
        assert (await resp.json())["error"] == {
            "status": 503,
            "code": "home_unavailable",
            "message": "no healthy geode in the home region 'ap-northeast' "
            "(home_affinity.on_unavailable: reject)",
            "region": "ap-northeast",
        }
    assert (
        strict.sample(
            "geoproxy_routing_decisions_total",
            client_region="eu-west",
            geode="none",
            decision="affinity_rejected",
        )
        == 1
    )


@pytest.mark.parametrize(
    ("tenants", "request_path", "headers", "expected", "result"),
    [
        ({"header": "X-Tenant"}, "/whoami", {"X-Tenant": "acme"}, "ap-1", "ok"),
        ({"cookie": "tenant"}, "/whoami", {"Cookie": "a=1; tenant=acme"}, "ap-1", "ok"),
        ({"path_prefix": "/t/"}, "/t/acme/orders?x=1", {}, "ap-1", "ok"),
        ({"path_prefix": "/t/"}, "/t/nobody/orders", {}, "eu-1", "unknown_tenant"),
        ({"header": "X-Tenant"}, "/whoami", {"X-Tenant": "nobody"}, "eu-1", "unknown_tenant"),
    ],
    ids=["header", "cookie", "path-prefix", "path-unknown", "header-unknown"],
)
async def test_a_tenant_key_mapped_to_a_home_region_beats_geography(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    tenants: dict[str, str],
    request_path: str,
    headers: dict[str, str],
    expected: str,
    result: str,
) -> None:
    geodes = await three(geode_factory)
    homes = {"tenants": {**tenants, "homes": {"acme": "ap-northeast"}}}
    proxy = await start(proxy_factory, tmp_path, geodes, homes)
    status, geode, _ = await get(
        http, proxy.url + request_path, **{"CF-IPCountry": "FR", **headers}
    )
    assert (status, geode) == (200, expected)
    assert proxy.sample("geoproxy_home_affinity_total", source="tenant", result=result) == 1


async def test_a_tenant_header_from_an_untrusted_peer_is_ignored(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    geodes = await three(geode_factory)
    homes = {"tenants": {"header": "X-Tenant", "homes": {"acme": "ap-northeast"}}}
    proxy = await start(proxy_factory, tmp_path, geodes, homes, trusted_proxies=[])
    status, geode, _ = await get(http, f"{proxy.url}/whoami", **{"X-Tenant": "acme"})
    assert (status, geode) == (200, "eu-1")
    assert proxy.sample("geoproxy_home_affinity_total", source="tenant", result="untrusted") == 1


async def test_route_and_the_access_log_explain_a_home_decision(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    geodes = await three(geode_factory)
    proxy = await start(proxy_factory, tmp_path, geodes)
    cookie = home_cookie(proxy, "ap-northeast")
    async with http.get(f"{proxy.admin_url}/route", headers={"Cookie": cookie}) as resp:
        header_form = await resp.json()
    value = cookie.partition("=")[2]
    async with http.get(
        f"{proxy.admin_url}/route", params={"country": "FR", "home_cookie": value}
    ) as resp:
        query_form = await resp.json()
    for answer in (header_form, query_form):
        assert answer["decision"] == "affinity"
        assert answer["chosen"] == "ap-1"
        assert answer["home"]["region"] == "ap-northeast"
        assert answer["home"]["result"] == "ok"
        assert answer["reason"].startswith(
            "home region ap-northeast from a signed home cookie (home affinity beats client "
            "region eu-west from "
        )
    async with http.get(
        f"{proxy.admin_url}/route", params={"country": "FR", "home_cookie": value[:-1] + "x"}
    ) as resp:
        forged = await resp.json()
    assert forged["decision"] == "home" and forged["chosen"] == "eu-1"
    assert "a home cookie was ignored (forged)" in forged["reason"]

    caplog.set_level("INFO", logger="geoproxy.access")
    await get(http, f"{proxy.url}/home/us-east", Cookie=cookie)
    await asyncio.sleep(0.05)
    (line,) = [json.loads(r.getMessage()) for r in caplog.records if r.name == "geoproxy.access"]
    assert {k: line[k] for k in ("geode", "decision", "home", "home_source", "home_result")} == {
        "geode": "ap-1",
        "decision": "affinity",
        "home": "ap-northeast",
        "home_source": "cookie",
        "home_result": "ok",
    }
    assert line["home_stamp"] == "set"


def test_route_cli_explains_a_home_cookie(tmp_path: Path) -> None:
    (tmp_path / "k").write_text(KEY_A)
    geodes = [
        {"name": "eu-1", "region": "eu-west", "url": "http://127.0.0.1:1"},
        {"name": "ap-1", "region": "ap-northeast", "url": "http://127.0.0.1:2"},
    ]
    path = tmp_path / "geoproxy.yaml"
    path.write_text(json.dumps(base_config(geodes, home_affinity={"cookie": {"keys_file": "k"}})))
    value = make_cookie(cookie_config(KEY_A), "ap-northeast", time.time())
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "geoproxy",
            "route",
            "--config",
            str(path),
            "--country",
            "FR",
            "--home-cookie",
            value,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "home region: ap-northeast (cookie: ok)" in lines
    assert "chosen geode: ap-1 (affinity)" in lines


def test_home_of_asks_the_tenant_map_before_the_cookie() -> None:
    from geoproxy.config.values import HomeAffinity, Tenants

    tenants = Tenants("header", "X-Tenant", {"acme": "us-east"})
    homes = HomeAffinity(cookie_config(KEY_A), tenants)
    value = make_cookie(cookie_config(KEY_A), "ap-northeast", NOW)
    headers = {"X-Tenant": "acme", "Cookie": f"geoproxy_home={value}"}
    assert affinity.home_of(homes, headers, True, REGIONS, NOW) == Home("us-east", "tenant", "ok")
    del headers["X-Tenant"]
    found = affinity.home_of(homes, headers, True, REGIONS, NOW)
    assert found is not None and found.region == "ap-northeast"


async def test_a_fenced_client_with_a_foreign_home_cookie_stays_in_its_fence(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """Home affinity never takes a client out of its residency fence: a French client
    (fence eu) whose cookie names ap-northeast stays in Europe; one whose home is inside
    the fence goes there; an unfenced client follows its foreign home."""
    eu, us, ap = geodes = await three(geode_factory)
    euc = await geode_factory("euc-1", "eu-central")
    regions = {
        "eu-west": {"fallback": ["eu-central"]},
        "eu-central": {"fallback": ["eu-west"]},
        "us-east": {"fallback": ["eu-west", "ap-northeast"]},
        "ap-northeast": {"fallback": ["us-east"]},
    }
    fences = {"eu": {"regions": ["eu-west", "eu-central"], "continents": ["EU"]}}
    proxy = await start(proxy_factory, tmp_path, (*geodes, euc), regions=regions, fences=fences)
    fr = {"CF-IPCountry": "FR"}
    foreign = home_cookie(proxy, "ap-northeast")
    assert (await get(http, f"{proxy.url}/whoami", **fr, Cookie=foreign))[1] == "eu-1"
    assert ap.hits["/whoami"] == 0
    assert proxy.sample("geoproxy_home_affinity_total", source="cookie", result="fenced") == 1
    inside = home_cookie(proxy, "eu-central")
    assert (await get(http, f"{proxy.url}/whoami", **fr, Cookie=inside))[1] == "euc-1"
    # ...and with eu-west down too, a foreign home still never lets it out: 503 naming the fence.
    eu.health_status = euc.health_status = 500
    checker = proxy.gateway.checker
    assert checker is not None
    for _ in range(2):
        await checker.check_once()
    async with http.get(f"{proxy.url}/whoami", headers={**fr, "Cookie": foreign}) as resp:
        assert resp.status == 503
        assert (await resp.json())["error"]["fence"] == "eu"
    assert us.hits["/whoami"] == ap.hits["/whoami"] == 0
    async with http.get(
        f"{proxy.admin_url}/route",
        params={"country": "FR", "home_cookie": foreign.partition("=")[2]},
    ) as resp:
        answer = await resp.json()
    assert answer["home"]["result"] == "fenced" and answer["decision"] == "fenced"
    # An unfenced (US) client with the same cookie goes home.
    us_client = {"CF-IPCountry": "US", "Cookie": foreign}
    assert (await get(http, f"{proxy.url}/whoami", **us_client))[1] == "ap-1"


async def test_the_reference_stamp_names_its_region_on_writes_and_the_writer_comes_back_to_it(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    mesh: MeshFactory,  # noqa: F811  (the fixture)
) -> None:
    """``home_header: true``: a write through the edge sets the home cookie; the same
    user reading from Japan is sent to the stamp that has the write."""
    (stamp,) = await mesh(1, home_header=True)
    assert stamp.config.region == "eu-west"
    us = await geode_factory("us-1", "us-east")
    ap = await geode_factory("ap-1", "ap-northeast")
    (tmp_path / "home-keys").write_text(KEY_A)
    geodes = [{"name": stamp.name, "region": "eu-west", "url": stamp.url}]
    geodes += [geode_entry(us), geode_entry(ap)]
    proxy = await proxy_factory(
        base_config(geodes, home_affinity={"cookie": {"keys_file": "home-keys"}})
    )
    async with http.put(
        f"{proxy.url}/items/greeting", json={"hi": "bonjour"}, headers={"CF-IPCountry": "FR"}
    ) as resp:
        assert resp.status == 201
        assert "Geoproxy-Home" not in resp.headers
        cookie = resp.headers["Set-Cookie"].split(";")[0]
    async with http.get(
        f"{proxy.url}/items/greeting", headers={"CF-IPCountry": "JP", "Cookie": cookie}
    ) as resp:
        assert resp.status == 200
        assert resp.headers["X-Geoproxy-Geode"] == stamp.name
        assert "Set-Cookie" not in resp.headers  # a read names no home
    async with http.put(f"{stamp.url}/items/bad", data=b"{not json") as resp:
        assert resp.status == 400
        assert "Geoproxy-Home" not in resp.headers  # only a successful write
    assert ap.hits["/items/greeting"] == 0


async def test_the_tenant_map_and_the_keys_reload_with_the_config(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """Both files are watched like the region map: an edit changes the fingerprint the
    poll compares, and the reload moves the tenant and retires a dropped key."""
    geodes = await three(geode_factory)
    (tmp_path / "tenants.yaml").write_text("homes: {acme: ap-northeast}\n")
    homes = {
        "cookie": {"keys_file": "home-keys"},
        "tenants": {"header": "X-Tenant", "map": "tenants.yaml"},
    }
    proxy = await start(proxy_factory, tmp_path, geodes, homes)
    gateway = proxy.gateway
    cookie = home_cookie(proxy, "us-east", key=KEY_A)
    assert (await get(http, f"{proxy.url}/whoami", **{"X-Tenant": "acme"}))[1] == "ap-1"
    assert (await get(http, f"{proxy.url}/whoami", Cookie=cookie))[1] == "us-1"

    (tmp_path / "tenants.yaml").write_text("homes: {acme: us-east}\n")
    (tmp_path / "home-keys").write_text(f"{KEY_B}\n")  # KEY_A retired
    assert files_fingerprint(gateway.config.files) != gateway.config.fingerprint
    assert await gateway.reload_from_file("test")
    assert gateway.last_reload is not None
    assert "home affinity:" in gateway.last_reload.detail
    assert KEY_B not in gateway.last_reload.detail  # key ids, never keys
    assert (await get(http, f"{proxy.url}/whoami", **{"X-Tenant": "acme"}))[1] == "us-1"
    assert (await get(http, f"{proxy.url}/whoami", Cookie=cookie))[1] == "eu-1"
    assert proxy.sample("geoproxy_home_affinity_total", source="cookie", result="unknown_key") == 1


def test_the_status_page_counts_a_home_regions_fallback_as_served_outside_its_region() -> None:
    from geoproxy.surfaces.traffic import Traffic, TrafficHistory

    history = TrafficHistory()
    history.note(0.0, Traffic())
    now = Traffic(decisions={"affinity": 2.0, "affinity_fallback": 1.0, "home": 1.0})
    rates = history.rates(10.0, now)
    assert rates is not None and rates.off_region == 0.25


async def test_a_tenant_header_from_an_untrusted_peer_never_reaches_the_geode(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """The edge did not believe it, so no geode may: an auth gateway's tenant header is
    dropped from a peer that is not a trusted proxy, as X-Client-Region is."""
    geodes = await three(geode_factory)
    homes = {"tenants": {"header": "X-Tenant", "homes": {"acme": "ap-northeast"}}}
    proxy = await start(proxy_factory, tmp_path, geodes, homes, trusted_proxies=[])
    headers = {"x-tenant": "acme", "X-Request-Id": "r1"}
    async with http.get(f"{proxy.url}/echo", headers=headers) as resp:
        seen = (await resp.json())["headers"]
    assert "x-tenant" not in seen and seen["x-request-id"] == ["r1"]
    trusting = await start(proxy_factory, tmp_path, geodes, homes)
    async with http.get(f"{trusting.url}/echo", headers=headers) as resp:
        assert (await resp.json())["headers"]["x-tenant"] == ["acme"]


async def test_the_home_cookie_is_secure_when_a_chain_of_trusted_proxies_names_https(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """A CDN then a load balancer, each adding its hop's scheme: never a cookie without
    Secure for a client that came over HTTPS (it would then go out in clear text)."""
    geodes = await three(geode_factory)
    proxy = await start(proxy_factory, tmp_path, geodes)
    for proto in ("https, https", "https, http", "HTTPS"):
        _, _, resp = await get(http, f"{proxy.url}/home/us-east", **{"X-Forwarded-Proto": proto})
        assert "Secure" in resp.headers["Set-Cookie"].split("; "), proto
    _, _, resp = await get(http, f"{proxy.url}/home/us-east", **{"X-Forwarded-Proto": "http"})
    assert "Secure" not in resp.headers["Set-Cookie"].split("; ")
