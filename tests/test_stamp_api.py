"""The reference stamp over HTTP: real stamps on loopback ports, each with its own SQLite
file, replicating to each other over real sockets (and one as a real process, killed)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import itertools
import json
import os
import re
import signal
import socket
import sqlite3
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from multidict import CIMultiDictProxy
from prometheus_client import CollectorRegistry
from yarl import URL

from geoproxy.config import loader as config_mod
from geoproxy.config.values import Listener
from geoproxy.errors import ConfigError
from geoproxy.process import demo
from geoproxy.process.server import Bound, serve
from geoproxy.stamp import auth
from geoproxy.stamp import config as stamp_config
from geoproxy.stamp import peer as peer_module
from geoproxy.stamp.app import STATE, StartError, build_stamp_app, stamp_runner
from geoproxy.stamp.config import Peer, Replication, StampConfig
from geoproxy.stamp.hlc import MAX_LOGICAL, MAX_WALL, HybridClock, Version
from geoproxy.stamp.store import COUNTER, ITEM, Change, Store

from conftest import assert_promtool_accepts

REGIONS = ("eu-west", "us-east", "ap-northeast")
FAST = Replication(interval=0.1, batch_size=500, timeout=2.0, min_backoff=0.05, max_backoff=0.5)
MiB = 1024 * 1024
SECRET = b"test-fleet-secret-" + b"0123456789abcdef" * 3  # the test fleet's shared secret


def bound_socket(port: int = 0) -> socket.socket:
    """A loopback socket bound but not listening: connections to it are refused until a
    server listens on it. It reserves the port, so a peer's URL is known before it starts
    and a stopped stamp gets its own port back."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    return sock


class Stamp:
    """One in-process stamp: a real aiohttp server on its own port (and its peer listener
    on another) and SQLite file. Stopping it keeps its ports reserved (refusing
    connections) and its database file."""

    def __init__(self, config: StampConfig, sock: socket.socket, peer_sock: socket.socket) -> None:
        self.config = config
        self._sock: socket.socket | None = sock
        self._peer_sock: socket.socket | None = peer_sock
        self.runner: web.AppRunner | None = None
        self.app: web.Application | None = None
        self.registry = CollectorRegistry()

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.config.port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.config.peer_port}"

    @property
    def store(self) -> Store:
        assert self.app is not None
        store = self.app[STATE].store
        assert store is not None
        return store

    async def start(self) -> None:
        assert self.runner is None and self._sock is not None
        self.registry = CollectorRegistry()  # a fresh process has fresh metrics
        peer_sock, self._peer_sock = self._peer_sock, None
        self.app = build_stamp_app(self.config, self.registry, peer_sock=peer_sock)
        self.runner = stamp_runner(self.app, shutdown_timeout=2.0)
        try:
            await self.runner.setup()
        except BaseException:  # it did not start: its ports stay reserved, as when stopped
            await self.runner.cleanup()
            self.runner, self._peer_sock = None, peer_sock
            raise
        sock, self._sock = self._sock, None
        await web.SockSite(self.runner, sock).start()

    async def stop(self) -> None:
        runner, self.runner = self.runner, None
        assert runner is not None
        await runner.cleanup()
        self._sock = bound_socket(self.config.port)
        self._peer_sock = bound_socket(self.config.peer_port)

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        for sock in (self._sock, self._peer_sock):
            if sock is not None:
                sock.close()
        self._sock = self._peer_sock = None

    def sample(self, name: str, **labels: str) -> float:
        """A metric sample's value; 0 when the labelled series does not exist yet."""
        return self.registry.get_sample_value(name, labels) or 0.0


MeshFactory = Callable[..., Awaitable[list[Stamp]]]


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[MeshFactory]:
    """``await mesh(n)``: n started stamps, each with every other one as a peer."""
    made: list[Stamp] = []

    async def make(
        n: int = 3,
        replication: Replication = FAST,
        start: bool = True,
        also: tuple[str, ...] = (),
        **settings: Any,
    ) -> list[Stamp]:
        """``also``: more peer names each stamp takes signed pushes from (a test plays
        them; their URLs refuse connections). ``settings``: more StampConfig fields."""
        socks = [bound_socket() for _ in range(n)]
        peer_socks = [bound_socket() for _ in range(n)]
        ports = [s.getsockname()[1] for s in socks]
        peer_ports = [s.getsockname()[1] for s in peer_socks]
        names = [f"stamp-{REGIONS[i % 3]}-{len(made) + i}" for i in range(n)]
        stamps = []
        for i, sock in enumerate(socks):
            peers = tuple(
                Peer(names[j], URL(f"http://127.0.0.1:{peer_ports[j]}")) for j in range(n) if j != i
            )
            peers += tuple(Peer(name, URL("http://127.0.0.1:1")) for name in also)
            config = StampConfig(
                path=None,
                name=names[i],
                region=REGIONS[i % 3],
                host="127.0.0.1",
                port=ports[i],
                database=tmp_path / f"{names[i]}.db",
                peers=peers,
                replication=replication,
                peer_port=peer_ports[i],
                secret=SECRET,
                **settings,
            )
            stamps.append(Stamp(config, sock, peer_socks[i]))
        made.extend(stamps)
        if start:
            for stamp in stamps:
                await stamp.start()
        return stamps

    yield make
    for stamp in reversed(made):
        await stamp.close()


async def eventually(
    condition: Callable[[], Awaitable[bool]], what: str, timeout: float = 10.0
) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await condition():
        if loop.time() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.02)


async def call(
    http: aiohttp.ClientSession, method: str, url: str, **kwargs: Any
) -> tuple[int, Any, CIMultiDictProxy[str]]:
    """One request: (status, JSON body or None, headers)."""
    async with http.request(method, url, **kwargs) as resp:
        text = await resp.text()
        body = json.loads(text) if text and resp.content_type == "application/json" else None
        return resp.status, body, resp.headers


async def signed(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    sender: str,
    body: bytes = b"",
    secret: bytes = SECRET,
    now: float | None = None,
) -> tuple[int, Any, CIMultiDictProxy[str]]:
    """One request to a peer listener, signed as peer ``sender``."""
    headers = auth.sign(secret, sender, method, URL(url).raw_path_qs, body, now=now)
    return await call(
        http,
        method,
        url,
        data=io.BytesIO(body),
        headers={**headers, "Content-Type": "application/json"},
    )


async def push_as(
    http: aiohttp.ClientSession, stamp: Stamp, sender: str, changes: list[Any], **kw: Any
) -> tuple[int, Any, CIMultiDictProxy[str]]:
    """Push ``changes`` to ``stamp`` as its peer ``sender`` would."""
    body = json.dumps({"from": sender, "changes": changes}).encode()
    return await signed(http, "POST", f"{stamp.peer_url}/replication/changes", sender, body, **kw)


async def item(http: aiohttp.ClientSession, stamp: Stamp, id: str) -> dict[str, Any] | None:
    status, body, _ = await call(http, "GET", f"{stamp.url}/items/{id}")
    assert status in (200, 404), (status, body)
    return body if status == 200 else None


async def value_of(http: aiohttp.ClientSession, stamp: Stamp, id: str) -> Any:
    got = await item(http, stamp, id)
    assert got is not None, f"{stamp.name} has no item {id!r}"
    return got["value"]


async def put(
    http: aiohttp.ClientSession, stamp: Stamp, id: str, value: Any, expect: int = 201
) -> dict[str, Any]:
    status, body, _ = await call(http, "PUT", f"{stamp.url}/items/{id}", json=value)
    assert status == expect, (status, body)
    return dict(body)


async def events(http: aiohttp.ClientSession, stamp: Stamp) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    since = 0
    while True:
        url = f"{stamp.peer_url}/events?since={since}&limit=1000"
        status, body, _ = await call(http, "GET", url)
        assert status == 200, body
        out.extend(body["events"])
        if not body["events"]:
            return out
        since = body["next_since"]


async def health(http: aiohttp.ClientSession, stamp: Stamp) -> tuple[int, dict[str, Any]]:
    status, body, _ = await call(http, "GET", f"{stamp.url}/health")
    return status, body


def assert_json_error(status: int, body: Any, expect_status: int, code: str) -> None:
    assert status == expect_status, body
    assert set(body) == {"error"}, body
    error = body["error"]
    assert {"status", "code", "message"} <= set(error), body
    assert (error["status"], error["code"]) == (expect_status, code), body
    assert isinstance(error["message"], str) and error["message"], body


def converged_on(
    http: aiohttp.ClientSession, stamps: list[Stamp], id: str, expected: Any
) -> Callable[[], Awaitable[bool]]:
    """A condition: every stamp has ``id`` with ``expected`` as value (None: absent)."""

    async def check() -> bool:
        for stamp in stamps:
            got = await item(http, stamp, id)
            if (None if got is None else got["value"]) != expected:
                return False
        return True

    return check


# -- items API -------------------------------------------------------------------------


async def test_put_creates_with_201_then_replaces_with_200_and_items_carry_version_origin_and_time(
    mesh: MeshFactory, http: aiohttp.ClientSession
) -> None:
    (eu,) = await mesh(1)
    status, created, headers = await call(
        http, "PUT", f"{eu.url}/items/cart-1", json={"lines": [1, 2]}
    )
    assert status == 201
    assert created["id"] == "cart-1" and created["value"] == {"lines": [1, 2]}
    assert created["origin"] == {"stamp": eu.name, "region": "eu-west"}
    assert isinstance(created["timestamp"], float)
    assert abs(created["timestamp"] - time.time()) < 60
    assert created["timestamp"] == int(created["version"][:13]) / 1000
    assert headers["ETag"] == f'"{created["version"]}"'

    status, replaced, headers = await call(http, "PUT", f"{eu.url}/items/cart-1", json=[3])
    assert status == 200
    assert replaced["value"] == [3]
    assert replaced["version"] > created["version"]
    assert headers["ETag"] == f'"{replaced["version"]}"'

    status, got, headers = await call(http, "GET", f"{eu.url}/items/cart-1")
    assert status == 200 and got == replaced
    assert headers["ETag"] == f'"{replaced["version"]}"'


async def test_get_answers_304_when_if_none_match_carries_the_current_etag(
    mesh: MeshFactory, http: aiohttp.ClientSession
) -> None:
    (eu,) = await mesh(1)
    first = await put(http, eu, "profile", {"name": "Ada"})
    etag = f'"{first["version"]}"'
    status, body, headers = await call(
        http, "GET", f"{eu.url}/items/profile", headers={"If-None-Match": etag}
    )
    assert (status, body, headers["ETag"]) == (304, None, etag)
    for header in (f'"0000000000000-000000-old", {etag}', f"W/{etag}", "*"):
        status, _, _ = await call(
            http, "GET", f"{eu.url}/items/profile", headers={"If-None-Match": header}
        )
        assert status == 304, header

    await put(http, eu, "profile", {"name": "Grace"}, expect=200)
    status, body, headers = await call(
        http, "GET", f"{eu.url}/items/profile", headers={"If-None-Match": etag}
    )
    assert status == 200 and body["value"] == {"name": "Grace"}
    assert headers["ETag"] != etag


async def test_delete_leaves_a_tombstone_then_get_and_a_second_delete_answer_404(
    mesh: MeshFactory, http: aiohttp.ClientSession
) -> None:
    (eu,) = await mesh(1)
    created = await put(http, eu, "doomed", 1)
    status, body, headers = await call(http, "DELETE", f"{eu.url}/items/doomed")
    assert status == 200
    assert body["id"] == "doomed" and body["deleted"] is True
    assert body["version"] > created["version"]
    assert headers["ETag"] == f'"{body["version"]}"'

    status, body, _ = await call(http, "GET", f"{eu.url}/items/doomed")
    assert_json_error(status, body, 404, "not_found")
    status, body, _ = await call(http, "DELETE", f"{eu.url}/items/doomed")
    assert_json_error(status, body, 404, "not_found")
    status, body, _ = await call(http, "DELETE", f"{eu.url}/items/never-was")
    assert_json_error(status, body, 404, "not_found")

    log = await events(http, eu)
    assert [(e["id"], e["deleted"], e["value"]) for e in log] == [
        ("doomed", False, 1),
        ("doomed", True, None),
    ]  # the tombstone is a change like any other
    status, listing, _ = await call(http, "GET", f"{eu.url}/items")
    assert listing["items"] == []
    assert (await put(http, eu, "doomed", 2))["value"] == 2  # a new life: 201 again


async def test_list_filters_by_prefix_and_pages_with_limit_and_after(
    mesh: MeshFactory, http: aiohttp.ClientSession
) -> None:
    (eu,) = await mesh(1)
    for id in ("user:3", "user:1", "order:1", "user:2", "user:4", "users"):
        await put(http, eu, id, {"id": id})
    status, body, _ = await call(http, "DELETE", f"{eu.url}/items/user:4")
    assert status == 200

    status, body, _ = await call(http, "GET", f"{eu.url}/items?prefix=user:&limit=2")
    assert status == 200
    assert [i["id"] for i in body["items"]] == ["user:1", "user:2"]
    assert body["next_after"] == "user:2"
    for i in body["items"]:
        assert i["value"] == {"id": i["id"]}
        assert i["origin"] == {"stamp": eu.name, "region": "eu-west"}
        assert {"version", "timestamp"} <= set(i)

    status, body, _ = await call(http, "GET", f"{eu.url}/items?prefix=user:&limit=2&after=user:2")
    assert [i["id"] for i in body["items"]] == ["user:3"]  # user:4 is deleted
    assert body["next_after"] is None

    status, body, _ = await call(http, "GET", f"{eu.url}/items")
    assert [i["id"] for i in body["items"]] == ["order:1", "user:1", "user:2", "user:3", "users"]


async def test_health_reports_name_region_store_and_backlog_per_peer(
    mesh: MeshFactory, http: aiohttp.ClientSession
) -> None:
    eu, us = await mesh(2)
    status, body = await health(http, eu)
    assert status == 200
    assert body["name"] == eu.name and body["region"] == "eu-west"
    assert body["store"] == "ok"
    assert body["replication"] == {us.name: {"backlog": 0, "lag_seconds": 0.0}}

    await us.stop()
    for i in range(3):
        await put(http, eu, f"k{i}", i)

    async def backlog_of_three() -> bool:
        status, body = await health(http, eu)
        return status == 200 and body["replication"][us.name]["backlog"] == 3

    await eventually(backlog_of_three, "eu's backlog towards the stopped us is 3")
    _, body = await health(http, eu)
    assert body["replication"][us.name]["lag_seconds"] > 0


async def test_health_answers_503_json_when_the_store_is_unusable(
    mesh: MeshFactory, http: aiohttp.ClientSession
) -> None:
    (eu,) = await mesh(1)
    eu.store.close()  # as if the database file went away under the stamp
    status, body = await health(http, eu)
    assert status == 503
    assert body["name"] == eu.name and body["region"] == "eu-west"
    assert body["status"] == "unavailable"
    assert body["store"] != "ok"
    # Writes and reads answer the JSON error shape, and /metrics still answers.
    async with http.put(f"{eu.url}/items/k", json={"v": 1}) as resp:
        assert resp.status == 503
        assert (await resp.json())["error"]["code"] == "store_unavailable"
    async with http.get(f"{eu.peer_url}/metrics") as resp:
        assert resp.status == 200
        assert "stamp_writes_total" in await resp.text()


async def test_metrics_expose_items_backlog_lag_conflicts_and_apply_errors(
    mesh: MeshFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    eu, us = await mesh(2)
    await put(http, eu, "a", 1)
    await put(http, eu, "b", 2)
    await eventually(lambda: all_backlogs_empty(http, [eu]), "a and b reach us")
    status, _, _ = await signed(
        http, "POST", f"{us.peer_url}/replication/changes", eu.name, b'{"x": 1}'
    )
    assert status == 400

    async with http.get(f"{us.peer_url}/metrics") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/plain"
        text = await resp.text()
    assert re.search(r"^stamp_items 2\.0$", text, re.M), text
    assert re.search(rf'^stamp_replication_backlog\{{peer="{eu.name}"\}} 0\.0$', text, re.M)
    assert re.search(rf'^stamp_replication_lag_seconds\{{peer="{eu.name}"\}} 0\.0$', text, re.M)
    assert re.search(r"^stamp_conflicts_resolved_total 0\.0$", text, re.M), text
    assert re.search(r"^stamp_apply_errors_total 1\.0$", text, re.M), text

    await us.stop()
    await put(http, eu, "c", 3)

    async def lagging() -> bool:
        return (
            eu.sample("stamp_replication_backlog", peer=us.name) == 1
            and eu.sample("stamp_replication_lag_seconds", peer=us.name) > 0
        )

    await eventually(lagging, "eu shows a backlog of 1 and some lag towards stopped us")
    assert eu.sample("stamp_items") == 3

    async with http.get(f"{eu.peer_url}/metrics") as resp:
        exposition = await resp.read()
    await assert_promtool_accepts(exposition)


# -- bad input -------------------------------------------------------------------------

BAD_REQUESTS = [
    pytest.param("PUT", "/items/k", b"{not json", {}, 400, "bad_json", id="invalid-json"),
    pytest.param("PUT", "/items/k", b"\xff\xfe", {}, 400, "bad_json", id="not-utf8"),
    pytest.param("PUT", "/items/k", b"", {}, 400, "bad_json", id="empty-body"),
    pytest.param("PUT", "/items/" + "x" * 1000, b"1", {}, 400, "bad_id", id="huge-id"),
    pytest.param("PUT", "/items/" + "x" * 201, b"1", {}, 400, "bad_id", id="id-of-201"),
    pytest.param("PUT", "/items/a%20b", b"1", {}, 400, "bad_id", id="id-with-space"),
    pytest.param("PUT", "/items/%C3%A9t%C3%A9", b"1", {}, 400, "bad_id", id="non-ascii-id"),
    pytest.param("PUT", "/items/a%22b", b"1", {}, 400, "bad_id", id="id-with-quote"),
    pytest.param(
        "PUT",
        "/items/k",
        json.dumps("x" * MiB).encode(),
        {},
        413,
        "too_large",
        id="value-over-1MiB",
    ),
    pytest.param(
        "PUT",
        "/items/k?consistency=eventual",
        b"1",
        {},
        400,
        "bad_consistency",
        id="bad-consistency-query",
    ),
    pytest.param(
        "PUT",
        "/items/k",
        b"1",
        {"X-Consistency": "strong"},
        400,
        "bad_consistency",
        id="bad-consistency-header",
    ),
    pytest.param(
        "DELETE",
        "/items/seed?consistency=maybe",
        b"",
        {},
        400,
        "bad_consistency",
        id="delete-bad-consistency",
    ),
    pytest.param("DELETE", "/items/" + "x" * 1000, b"", {}, 400, "bad_id", id="delete-huge-id"),
    pytest.param("GET", "/items?limit=abc", b"", {}, 400, "bad_query", id="limit-abc"),
    pytest.param("GET", "/items?limit=0", b"", {}, 400, "bad_query", id="limit-0"),
    pytest.param("GET", "/items?limit=1001", b"", {}, 400, "bad_query", id="limit-1001"),
    pytest.param(
        "GET", "/items?prefix=" + "p" * 201, b"", {}, 400, "bad_query", id="prefix-too-long"
    ),
    pytest.param("POST", "/counters/c", b'{"delta": "1"}', {}, 400, "bad_delta", id="delta-string"),
    pytest.param("POST", "/counters/c", b'{"delta": true}', {}, 400, "bad_delta", id="delta-bool"),
    pytest.param("POST", "/counters/c", b'{"delta": 1.5}', {}, 400, "bad_delta", id="delta-float"),
    pytest.param("POST", "/counters/c", b'{"delta": null}', {}, 400, "bad_delta", id="delta-null"),
    pytest.param("POST", "/counters/c", b"{}", {}, 400, "bad_delta", id="delta-missing"),
    pytest.param("POST", "/counters/c", b"[1]", {}, 400, "bad_delta", id="delta-not-object"),
    pytest.param(
        "POST", "/counters/c", b'{"delta": 1000000000001}', {}, 400, "bad_delta", id="delta-too-big"
    ),
    pytest.param("POST", "/counters/c", b"{", {}, 400, "bad_json", id="counter-invalid-json"),
    pytest.param(
        "POST", "/counters/" + "c" * 1000, b'{"delta": 1}', {}, 400, "bad_id", id="counter-huge-id"
    ),
    pytest.param("POST", "/items/k", b"1", {}, 405, "method_not_allowed", id="wrong-method"),
]


@pytest.mark.parametrize(("method", "path", "data", "headers", "status", "code"), BAD_REQUESTS)
async def test_bad_input_gets_a_4xx_json_error_and_changes_nothing(
    mesh: MeshFactory,
    http: aiohttp.ClientSession,
    method: str,
    path: str,
    data: bytes,
    headers: dict[str, str],
    status: int,
    code: str,
) -> None:
    eu, us = await mesh(2)
    await put(http, eu, "seed", {"v": 1})
    status_, _, _ = await call(http, "POST", f"{eu.url}/counters/c", json={"delta": 5})
    assert status_ == 200
    await eventually(lambda: all_backlogs_empty(http, [eu]), "us has taken eu's writes")
    before = (await events(http, eu), await events(http, us))
    assert len(before[1]) == 2

    got, body, _ = await call(
        http,
        method,
        eu.url + path,
        data=io.BytesIO(data),
        headers={"Content-Type": "application/json", **headers},
    )
    assert_json_error(got, body, status, code)

    assert await value_of(http, eu, "seed") == {"v": 1}
    assert await item(http, eu, "k") is None
    _, counter, _ = await call(http, "GET", f"{eu.url}/counters/c")
    assert counter["value"] == 5
    _, listing, _ = await call(http, "GET", f"{eu.url}/items")
    assert [i["id"] for i in listing["items"]] == ["seed"]
    # nothing was logged, so nothing replicates: the peer's log is unchanged too
    assert (await events(http, eu), await events(http, us)) == before
    assert await all_backlogs_empty(http, [eu])


async def _backlog_empty(http: aiohttp.ClientSession, stamp: Stamp) -> bool:
    _, body = await health(http, stamp)
    return all(p["backlog"] == 0 for p in body["replication"].values())


def wire_change(
    id: str, value: Any, version: str, region: str = "us-east", kind: str = "item"
) -> dict[str, Any]:
    return {
        "kind": kind,
        "id": id,
        "value": value,
        "deleted": value is None and kind == "item",
        "version": version,
        "region": region,
    }


def version(wall: int, logical: int = 0, origin: str = "stamp-far") -> str:
    return f"{wall:013d}-{logical:06d}-{origin}"


GOOD_WALL = 1_700_000_000_000

BAD_CHANGES = [
    pytest.param({"version": "yesterday"}, id="bad-version"),
    pytest.param({"version": 17}, id="version-not-string"),
    pytest.param({"id": "x" * 1000}, id="huge-id"),
    pytest.param({"id": "a b"}, id="bad-id-chars"),
    pytest.param({"id": 7}, id="id-not-string"),
    pytest.param({"kind": "gauge"}, id="unknown-kind"),
    pytest.param({"deleted": "no"}, id="deleted-not-bool"),
    pytest.param({"deleted": True}, id="deleted-with-value"),
    pytest.param({"region": ""}, id="empty-region"),
    pytest.param({"region": None}, id="region-null"),
    pytest.param({"kind": "counter", "value": {"p": -1, "n": 0}}, id="counter-negative"),
    pytest.param({"kind": "counter", "value": {"p": "1", "n": 0}}, id="counter-string"),
    pytest.param({"kind": "counter", "value": {"p": True, "n": 0}}, id="counter-bool"),
    pytest.param({"kind": "counter", "value": {"p": 1}}, id="counter-missing-n"),
    pytest.param({"__drop__": "version"}, id="missing-version"),
    pytest.param({"__drop__": "value"}, id="missing-value"),
    pytest.param({"__replace__": "not a change"}, id="change-not-object"),
]


@pytest.mark.parametrize("bad", BAD_CHANGES)
async def test_a_malformed_change_is_quarantined_and_the_rest_of_its_batch_applies(
    mesh: MeshFactory, http: aiohttp.ClientSession, bad: dict[str, Any]
) -> None:
    (eu,) = await mesh(1, also=("stamp-far",))
    changes: list[Any] = [wire_change(f"ok-{i}", i, version(GOOD_WALL + i)) for i in range(4)]
    broken: Any = {**wire_change("bad", 9, version(GOOD_WALL + 9)), **bad}
    if "__drop__" in bad:
        broken = {k: v for k, v in broken.items() if k not in ("__drop__", bad["__drop__"])}
    if "__replace__" in bad:
        broken = bad["__replace__"]
    changes.insert(2, broken)

    status, body, _ = await push_as(http, eu, "stamp-far", changes)
    assert status == 200, body
    assert body == {"applied": 4, "ignored": 0, "conflicts": 0, "quarantined": 1}
    for i in range(4):
        assert await value_of(http, eu, f"ok-{i}") == i
    assert await item(http, eu, "bad") is None
    assert [e["id"] for e in await events(http, eu)] == [f"ok-{i}" for i in range(4)]
    assert eu.sample("stamp_quarantined_changes_total", direction="received", reason="invalid") == 1
    _, letters, _ = await call(http, "GET", f"{eu.peer_url}/dead-letters")
    (letter,) = letters["dead_letters"]
    assert letter["direction"] == "received" and letter["peer"] == "stamp-far"
    assert letter["reason"].startswith("changes[2]: invalid change"), letter
    assert json.loads(letter["change"]) == broken


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"{", id="invalid-json"),
        pytest.param(b"[]", id="not-an-object"),
        pytest.param(b'{"from": "x"}', id="no-changes"),
        pytest.param(b'{"from": "x", "changes": {"a": 1}}', id="changes-not-a-list"),
    ],
)
async def test_a_malformed_batch_body_gets_400_and_counts_an_apply_error(
    mesh: MeshFactory, http: aiohttp.ClientSession, body: bytes
) -> None:
    (eu,) = await mesh(1, also=("stamp-far",))
    status, answer, _ = await signed(
        http, "POST", f"{eu.peer_url}/replication/changes", "stamp-far", body
    )
    assert status == 400 and answer["error"]["code"] in ("bad_json", "bad_batch")
    assert eu.sample("stamp_apply_errors_total") == 1
    assert await events(http, eu) == []


# -- replication -----------------------------------------------------------------------


async def test_writes_in_different_regions_converge_on_every_stamp(
    mesh: MeshFactory, http: aiohttp.ClientSession
) -> None:
    stamps = await mesh(3)
    written = {}
    for stamp in stamps:
        for i in range(5):
            id = f"{stamp.config.region}-{i}"
            written[id] = await put(http, stamp, id, {"from": stamp.config.region, "i": i})

    async def all_everywhere() -> bool:
        for stamp in stamps:
            _, body, _ = await call(http, "GET", f"{stamp.url}/items?limit=1000")
            if len(body["items"]) != len(written):
                return False
        return True

    await eventually(all_everywhere, "all 15 items on all 3 stamps")
    for stamp in stamps:
        _, body, _ = await call(http, "GET", f"{stamp.url}/items?limit=1000")
        # the very same item everywhere: value, version, origin stamp and region, timestamp
        assert {i["id"]: i for i in body["items"]} == written
    await eventually(lambda: all_backlogs_empty(http, stamps), "every backlog drains")


async def all_backlogs_empty(http: aiohttp.ClientSession, stamps: list[Stamp]) -> bool:
    for stamp in stamps:
        if not await _backlog_empty(http, stamp):
            return False
    return True


async def test_concurrent_conflicting_writes_converge_to_the_highest_version_everywhere(
    mesh: MeshFactory, http: aiohttp.ClientSession
) -> None:
    stamps = await mesh(3)
    for round in range(5):
        id = f"contested-{round}"
        answers = await asyncio.gather(
            *(call(http, "PUT", f"{s.url}/items/{id}", json={"by": s.name}) for s in stamps)
        )
        assert all(status in (200, 201) for status, _, _ in answers), answers
        winner = max((body for _, body, _ in answers), key=lambda b: b["version"])

        async def settled(id: str = id, winner: dict[str, Any] = winner) -> bool:
            return all([await item(http, s, id) == winner for s in stamps])

        await eventually(settled, f"every stamp holds {winner['version']} for {id}")
    await eventually(lambda: all_backlogs_empty(http, stamps), "every backlog drains")
    # the losers' writes were overruled somewhere, and counted
    assert sum(s.sample("stamp_conflicts_resolved_total") for s in stamps) > 0


async def test_conflicting_changes_resolve_to_the_same_winner_whatever_the_delivery_order(
    mesh: MeshFactory, http: aiohttp.ClientSession
) -> None:
    """Property-style: every order of delivery of four conflicting changes (an exact
    wall/logical tie broken by stamp name, a tombstone among them) ends on the maximum."""
    (receiver,) = await mesh(1, also=("stamp-a", "stamp-b", "stamp-c", "stamp-0"))
    changes = [
        wire_change("k", "late", version(GOOD_WALL + 5, 0, "stamp-a"), "eu-west"),
        wire_change("k", None, version(GOOD_WALL + 5, 0, "stamp-b"), "us-east"),
        wire_change("k", "early-but-many", version(GOOD_WALL, 999, "stamp-c"), "ap-northeast"),
        wire_change("k", "later", version(GOOD_WALL + 5, 1, "stamp-0"), "sa-east"),
    ]
    for n, order in enumerate(itertools.permutations(changes)):
        id = f"k{n}"
        for change in order:  # one push per change: each arrives on its own
            sender = change["version"].split("-", 2)[2]  # each stamp sends its own
            status, _, _ = await push_as(http, receiver, sender, [{**change, "id": id}])
            assert status == 200
        got = await item(http, receiver, id)
        assert got is not None, order
        assert got["value"] == "later" and got["version"] == version(GOOD_WALL + 5, 1, "stamp-0")
        assert got["origin"] == {"stamp": "stamp-0", "region": "sa-east"}

    ties = [changes[0], changes[1]]
    for n, order in enumerate(itertools.permutations(ties)):
        id = f"tie{n}"
        for change in order:
            sender = change["version"].split("-", 2)[2]
            await push_as(http, receiver, sender, [{**change, "id": id}])
        # stamp-b's tombstone beats stamp-a's write at the exact same (wall, logical)
        assert await item(http, receiver, id) is None
        _, listing, _ = await call(http, "GET", f"{receiver.url}/items?prefix=tie")
        assert listing["items"] == []


async def test_deletes_replicate_as_tombstones_to_every_stamp(
    mesh: MeshFactory, http: aiohttp.ClientSession
) -> None:
    eu, us, ap = await mesh(3)
    await put(http, eu, "gone", {"x": 1})
    await eventually(converged_on(http, [eu, us, ap], "gone", {"x": 1}), "gone everywhere")
    status, _, _ = await call(http, "DELETE", f"{ap.url}/items/gone")  # from another region
    assert status == 200
    await eventually(converged_on(http, [eu, us, ap], "gone", None), "deleted everywhere")
    for stamp in (eu, us, ap):
        status, _, _ = await call(http, "DELETE", f"{stamp.url}/items/gone")
        assert status == 404
        log = await events(http, stamp)
        assert [(e["id"], e["deleted"]) for e in log] == [("gone", False), ("gone", True)]
        assert log[-1]["version"].endswith(ap.name)


async def test_duplicate_delivery_of_a_batch_is_ignored_the_second_time(
    mesh: MeshFactory, http: aiohttp.ClientSession
) -> None:
    (eu,) = await mesh(1, also=("stamp-far",))
    batch = [
        wire_change("a", 1, version(GOOD_WALL)),
        wire_change("b", {"x": [1, 2]}, version(GOOD_WALL + 1)),
        wire_change("a", None, version(GOOD_WALL + 2)),
        wire_change("c", {"p": 3, "n": 1}, version(GOOD_WALL + 3), kind="counter"),
    ]
    status, first, _ = await push_as(http, eu, "stamp-far", batch)
    assert status == 200
    assert first == {"applied": 4, "ignored": 0, "conflicts": 0, "quarantined": 0}
    state = (await events(http, eu), await item(http, eu, "b"))
    status, second, _ = await push_as(http, eu, "stamp-far", batch)
    assert status == 200
    assert second == {"applied": 0, "ignored": 4, "conflicts": 0, "quarantined": 0}
    assert (await events(http, eu), await item(http, eu, "b")) == state
    assert await item(http, eu, "a") is None
    _, counter, _ = await call(http, "GET", f"{eu.url}/counters/c")
    assert counter["value"] == 2
    assert eu.sample("stamp_changes_applied_total", result="ignored") == 4


async def test_pull_returns_the_changes_after_a_cursor(
    mesh: MeshFactory, http: aiohttp.ClientSession
) -> None:
    eu, us = await mesh(2)
    for i in range(3):
        await put(http, eu, f"eu-{i}", i)
    await put(http, us, "us-0", 0)
    await eventually(converged_on(http, [eu], "us-0", 0), "us-0 reaches eu")
    url = f"{eu.peer_url}/replication/changes"

    status, body, _ = await signed(http, "GET", f"{url}?since=0&limit=2", us.name)
    assert status == 200
    assert [c["id"] for c in body["changes"]] == ["eu-0", "eu-1"]
    status, body, _ = await signed(http, "GET", f"{url}?since={body['next_since']}", us.name)
    assert [c["id"] for c in body["changes"]] == ["eu-2", "us-0"]
    cursor = body["next_since"]
    status, body, _ = await signed(http, "GET", f"{url}?since={cursor}", us.name)
    assert body == {"changes": [], "next_since": cursor}

    status, body, _ = await signed(http, "GET", f"{url}?since=0&origin={us.name}", us.name)
    assert [(c["id"], c["region"]) for c in body["changes"]] == [("us-0", "us-east")]
    change = body["changes"][0]
    assert change["kind"] == "item" and change["value"] == 0 and change["deleted"] is False
    assert change["version"].endswith(us.name)


async def test_events_is_the_ordered_change_log_with_a_cursor(
    mesh: MeshFactory, http: aiohttp.ClientSession
) -> None:
    eu, us = await mesh(2)
    await put(http, eu, "x", 1)
    await put(http, eu, "x", 2, expect=200)
    await call(http, "POST", f"{eu.url}/counters/hits", json={"delta": 3})
    await call(http, "DELETE", f"{eu.url}/items/x")
    await put(http, us, "y", "from us")
    await eventually(converged_on(http, [eu], "y", "from us"), "y reaches eu")

    status, body, _ = await call(http, "GET", f"{eu.peer_url}/events?limit=2")
    assert status == 200
    assert [(e["seq"], e["id"]) for e in body["events"]] == [(1, "x"), (2, "x")]
    rest = await call(http, "GET", f"{eu.peer_url}/events?since={body['next_since']}")
    log = body["events"] + rest[1]["events"]
    assert [(e["kind"], e["id"], e["value"], e["deleted"]) for e in log] == [
        ("item", "x", 1, False),
        ("item", "x", 2, False),
        ("counter", "hits", {"p": 3, "n": 0}, False),
        ("item", "x", None, True),
        ("item", "y", "from us", False),
    ]
    assert [e["seq"] for e in log] == sorted(e["seq"] for e in log)
    own = [e["version"] for e in log if e["version"].endswith(eu.name)]
    assert own == sorted(own)  # this stamp's versions only grow
    assert log[-1]["region"] == "us-east"


async def test_a_json_null_value_replicates_and_does_not_block_later_writes(
    mesh: MeshFactory, http: aiohttp.ClientSession
) -> None:
    eu, us = await mesh(2)
    status, created, _ = await call(http, "PUT", f"{eu.url}/items/nothing", data=b"null")
    assert status == 201 and created["value"] is None
    await put(http, eu, "after", 1)
    await eventually(converged_on(http, [us], "after", 1), "the write after the null reaches us")
    assert await item(http, us, "nothing") == created


async def test_a_value_of_up_to_1_mib_is_read_whole_however_it_arrives(
    mesh: MeshFactory, http: aiohttp.ClientSession
) -> None:
    (eu,) = await mesh(1)
    value = {"blob": "z" * (MiB - 20)}
    encoded = json.dumps(value).encode()
    assert len(encoded) <= MiB
    created = await put(http, eu, "whole", value)  # with a Content-Length, many segments
    assert created["value"] == value

    async def in_pieces() -> AsyncIterator[bytes]:  # chunked, with pauses between pieces
        for start in range(0, len(encoded), 256 * 1024):
            yield encoded[start : start + 256 * 1024]
            await asyncio.sleep(0.01)

    status, body, _ = await call(http, "PUT", f"{eu.url}/items/pieces", data=in_pieces())
    assert status == 201, body
    assert await value_of(http, eu, "pieces") == value

    async def too_much() -> AsyncIterator[bytes]:
        yield encoded
        yield b" " * 64

    status, body, _ = await call(http, "PUT", f"{eu.url}/items/over", data=too_much())
    assert_json_error(status, body, 413, "too_large")
    assert await item(http, eu, "over") is None


async def test_a_backlog_of_large_values_beyond_one_push_reaches_a_returning_peer(
    mesh: MeshFactory, http: aiohttp.ClientSession
) -> None:
    """70 values of ~1 MiB: more than a peer takes in one request (64 MiB), so the backlog
    must go over in several pushes, none of them refused."""
    eu, us = await mesh(2)
    await us.stop()
    big = "b" * (MiB - 64)
    for i in range(70):
        await put(http, eu, f"big-{i}", [i, big])
    await us.start()
    await eventually(lambda: all_backlogs_empty(http, [eu]), "eu's backlog drains", timeout=20)
    assert us.sample("stamp_items") == 70
    assert eu.sample("stamp_replication_pushes_total", peer=us.name, result="ok") >= 2
    assert us.sample("stamp_apply_errors_total") == 0
    got = await item(http, us, "big-69")
    assert got is not None and got["value"] == [69, big]


# -- a peer that was away --------------------------------------------------------------


async def test_a_stopped_stamp_catches_up_with_every_write_when_restarted_on_its_port(
    mesh: MeshFactory, http: aiohttp.ClientSession
) -> None:
    eu, us, ap = await mesh(3)
    await put(http, eu, "before", 0)
    await eventually(lambda: all_backlogs_empty(http, [eu, us, ap]), "before reaches all")
    await us.stop()  # its database file stays; its port refuses connections

    writes = 40
    for i in range(writes):
        await asyncio.gather(put(http, eu, f"eu-{i}", i), put(http, ap, f"ap-{i}", i))
    await call(http, "DELETE", f"{eu.url}/items/before")

    async def backlog_grew() -> bool:
        for stamp, n in ((eu, writes + 1), (ap, writes)):
            _, body = await health(http, stamp)
            if body["replication"][us.name]["backlog"] != n:
                return False
        return True

    await eventually(backlog_grew, "eu and ap each hold every write for the stopped us")
    _, body = await health(http, eu)
    assert body["replication"][ap.name]["backlog"] == 0  # the others kept replicating

    await us.start()  # same port, same database

    async def caught_up() -> bool:
        _, body, _ = await call(http, "GET", f"{us.url}/items?limit=1000")
        return len(body["items"]) == 2 * writes

    await eventually(caught_up, "us holds all 80 writes")
    _, body, _ = await call(http, "GET", f"{us.url}/items?limit=1000")
    assert {i["id"]: i["value"] for i in body["items"]} == {
        **{f"eu-{i}": i for i in range(writes)},
        **{f"ap-{i}": i for i in range(writes)},
    }
    assert await item(http, us, "before") is None
    await eventually(lambda: all_backlogs_empty(http, [eu, us, ap]), "every backlog is 0")


async def test_a_write_acknowledged_just_before_sigkill_replicates_after_restart(
    mesh: MeshFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    (peer,) = await mesh(1, start=False, also=("stamp-killed",))  # nothing listens there yet
    config = tmp_path / "killed.yaml"
    (tmp_path / "fleet.secret").write_bytes(SECRET + b"\n")
    config.write_text(
        yaml.safe_dump(
            {
                "name": "stamp-killed",
                "region": "us-east",
                "listen": {
                    "host": "127.0.0.1",
                    "port": 0,
                    "peer": {"host": "127.0.0.1", "port": 0},
                },
                "database": "killed.db",
                "peers": [{"name": peer.name, "url": peer.peer_url}],
                "peer_auth": {"secret_file": "fleet.secret"},
                "replication": {
                    "interval": "100ms",
                    "min_backoff": "50ms",
                    "max_backoff": "500ms",
                    "timeout": "2s",
                },
            }
        )
    )

    async with stamp_process(config) as first:
        url = await first.listening()
        status, body, _ = await call(
            http, "PUT", f"{url}/items/last-words", json={"said": "before the kill"}
        )
        first.proc.send_signal(signal.SIGKILL)  # right after the acknowledgement
        assert status == 201, body
        assert await first.proc.wait() == -signal.SIGKILL
    assert (tmp_path / "killed.db").exists()

    await peer.start()
    assert await item(http, peer, "last-words") is None  # it could not have replicated
    async with stamp_process(config) as second:
        await second.listening()
        await eventually(
            converged_on(http, [peer], "last-words", {"said": "before the kill"}),
            "the killed stamp's acknowledged write reaches its peer",
        )
        got = await item(http, peer, "last-words")
        assert got is not None and got["origin"] == {"stamp": "stamp-killed", "region": "us-east"}
        assert got["version"] == body["version"]
        second.proc.send_signal(signal.SIGTERM)
        assert await second.proc.wait() == 0


class StampProcess:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.output: list[str] = []

    async def listening(self, timeout: float = 20) -> str:
        """Read output until the stamp says where it listens; its URL."""
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.proc.stdout.readline()
                if not raw:
                    raise AssertionError("stamp process ended:\n" + "".join(self.output))
                self.output.append(raw.decode())
                if m := re.search(r"listening on (http://\S+)", self.output[-1]):
                    return m.group(1)


@contextlib.asynccontextmanager
async def stamp_process(config: Path, *more: str) -> AsyncIterator[StampProcess]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "geoproxy",
        "stamp",
        "--config",
        str(config),
        *more,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        yield StampProcess(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


# -- sync writes -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "how",
    [
        pytest.param({"params": {"consistency": "sync"}}, id="query"),
        pytest.param({"headers": {"X-Consistency": "sync"}}, id="header"),
    ],
)
async def test_a_sync_write_answers_once_every_peer_has_it(
    mesh: MeshFactory, http: aiohttp.ClientSession, how: dict[str, Any]
) -> None:
    eu, us, ap = await mesh(3)
    for n, expect in ((1, 201), (2, 200)):
        status, body, _ = await call(http, "PUT", f"{eu.url}/items/order", json={"n": n}, **how)
        assert status == expect, body
        # no polling: the peers had applied it before the answer came
        assert await item(http, us, "order") == body
        assert await item(http, ap, "order") == body
    status, body, _ = await call(http, "DELETE", f"{eu.url}/items/order", **how)
    assert status == 200, body
    assert await item(http, us, "order") is None and await item(http, ap, "order") is None
    assert eu.sample("stamp_sync_writes_total", result="confirmed") == 3


async def test_a_sync_write_with_a_peer_down_answers_503_naming_it_and_replicates_later(
    mesh: MeshFactory, http: aiohttp.ClientSession
) -> None:
    eu, us, ap = await mesh(3)
    await ap.stop()
    status, body, _ = await call(
        http, "PUT", f"{eu.url}/items/must-confirm", params={"consistency": "sync"}, json="v"
    )
    assert_json_error(status, body, 503, "sync_not_confirmed")
    failed = re.search(r"\(([^()]*) failed\)", body["error"]["message"])
    assert failed is not None and failed.group(1) == ap.name, body
    assert eu.sample("stamp_sync_writes_total", result="unconfirmed") == 1
    # the local write is kept (not rolled back) and the live peer has it already
    assert await value_of(http, eu, "must-confirm") == "v"
    assert await value_of(http, us, "must-confirm") == "v"

    await ap.start()
    await eventually(converged_on(http, [ap], "must-confirm", "v"), "the write reaches ap")


async def test_a_sync_write_with_quorum_one_succeeds_with_one_of_two_peers_down(
    mesh: MeshFactory, http: aiohttp.ClientSession
) -> None:
    quorum = Replication(
        interval=0.1, min_backoff=0.05, max_backoff=0.5, timeout=2.0, sync_quorum=1
    )
    eu, us, ap = await mesh(3, replication=quorum)
    await ap.stop()
    status, body, _ = await call(
        http, "PUT", f"{eu.url}/items/q", json=1, headers={"X-Consistency": "sync"}
    )
    assert status == 201, body
    assert await item(http, us, "q") == body
    await ap.start()
    await eventually(converged_on(http, [ap], "q", 1), "the write reaches ap once it is back")


# -- PN-counters -----------------------------------------------------------------------


async def test_concurrent_counter_updates_on_every_stamp_converge_to_the_exact_total(
    mesh: MeshFactory, http: aiohttp.ClientSession
) -> None:
    stamps = await mesh(3)
    deltas = {s.name: [1] * 20 + [-2] * 3 + [7] for s in stamps}

    async def bump(stamp: Stamp, delta: int) -> None:
        status, body, _ = await call(
            http, "POST", f"{stamp.url}/counters/likes", json={"delta": delta}
        )
        assert status == 200, body

    await asyncio.gather(*(bump(s, d) for s in stamps for d in deltas[s.name]))
    total = sum(sum(d) for d in deltas.values())

    async def converged() -> bool:
        for stamp in stamps:
            status, body, _ = await call(http, "GET", f"{stamp.url}/counters/likes")
            if status != 200 or body["value"] != total:
                return False
        return True

    await eventually(converged, f"every stamp counts {total}")
    _, body, _ = await call(http, "GET", f"{stamps[0].url}/counters/likes")
    assert {s["stamp"]: (s["increments"], s["decrements"]) for s in body["slots"]} == {
        s.name: (27, 6) for s in stamps
    }
    status, body, _ = await call(http, "GET", f"{stamps[0].url}/counters/unknown")
    assert_json_error(status, body, 404, "not_found")


# -- hardening: the security review's findings (issue 13) --------------------------------
# Each test below failed on the code before the fix it pins.


def deep(levels: int) -> Any:
    """A JSON value nesting ``levels`` arrays: [[[...0...]]]."""
    value: Any = 0
    for _ in range(levels):
        value = [value]
    return value


def deep_text(levels: int) -> str:
    return "[" * levels + "0" + "]" * levels


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/replication/changes"),
        ("GET", "/replication/changes?since=0"),
        ("GET", "/events?since=0"),
        ("GET", "/metrics"),
        ("GET", "/dead-letters"),
    ],
)
async def test_the_public_listener_serves_no_replication_change_log_or_metrics(
    mesh: MeshFactory, http: aiohttp.ClientSession, method: str, path: str
) -> None:
    """Finding 1: the public API handed out the whole log and took pushes from anyone."""
    eu, us = await mesh(2)
    await put(http, eu, "secret-ish", {"v": 1})
    body = json.dumps(
        {
            "from": us.name,
            "changes": [
                wire_change("secret-ish", None, version(GOOD_WALL * 2, 0, eu.name), "eu-west"),
            ],
        }
    ).encode()
    status, answer, _ = await call(
        http, method, eu.url + path, data=body, headers={"Content-Type": "application/json"}
    )
    assert_json_error(status, answer, 404, "not_found")
    assert await value_of(http, eu, "secret-ish") == {"v": 1}


@pytest.mark.parametrize(
    "forgery",
    [
        pytest.param({"headers": {}}, id="unsigned"),
        pytest.param({"secret": b"not-the-fleet-secret-" * 3}, id="wrong-secret"),
        pytest.param({"sender": "stamp-stranger"}, id="unknown-peer"),
        pytest.param({"age": 120}, id="replayed-after-the-window"),
        pytest.param({"age": -120}, id="from-the-future"),
        pytest.param({"tamper": True}, id="body-changed-after-signing"),
        pytest.param({"path": "/replication/changes?since=0"}, id="signed-for-another-path"),
    ],
)
async def test_a_push_not_signed_by_a_peer_now_is_refused_401_counted_and_logged_without_secret(
    mesh: MeshFactory,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    forgery: dict[str, Any],
) -> None:
    """Finding 1: a forged change (claiming the receiver itself as origin) was applied and
    re-replicated everywhere."""
    eu, us, ap = await mesh(3)
    await put(http, eu, "k", "real")
    await eventually(converged_on(http, [eu, us, ap], "k", "real"), "k everywhere")
    sender = forgery.get("sender", us.name)
    forged = [wire_change("k", "forged", version(GOOD_WALL * 2, 0, sender), "us-east")]
    body = json.dumps({"from": sender, "changes": forged}).encode()
    url = f"{eu.peer_url}/replication/changes"
    headers = auth.sign(
        forgery.get("secret", SECRET),
        sender,
        "POST",
        forgery.get("path", "/replication/changes"),
        body,
        now=time.time() - forgery.get("age", 0),
    )
    if "headers" in forgery:
        headers = forgery["headers"]
    if forgery.get("tamper"):
        body = body.replace(b"forged", b"FORGED")
    status, answer, _ = await call(http, "POST", url, data=body, headers=headers)
    assert_json_error(status, answer, 401, "unauthenticated")
    assert (
        sum(
            eu.sample("stamp_peer_auth_failures_total", reason=r)
            for r in ("unsigned", "unknown_peer", "bad_signature", "expired", "bad_digest")
        )
        == 1
    )
    assert [r for r in caplog.records if "not an authenticated peer" in r.getMessage()]
    assert SECRET.decode() not in caplog.text and SECRET.decode() not in json.dumps(answer)
    await asyncio.sleep(0.3)  # time enough to replicate, had it been applied
    for stamp in (eu, us, ap):
        assert await value_of(http, stamp, "k") == "real"


async def test_a_peer_cannot_push_changes_of_another_origin_forged_tombstones_included(
    mesh: MeshFactory, http: aiohttp.ClientSession
) -> None:
    """Finding 1 (a forged tombstone deleted an item everywhere) and 5 (a counter slot of
    any stamp could be set, e.g. visits to -999,995 everywhere)."""
    eu, us, ap = await mesh(3)
    await put(http, eu, "precious", {"keep": True})
    status, _, _ = await call(http, "POST", f"{eu.url}/counters/visits", json={"delta": 5})
    assert status == 200
    await eventually(converged_on(http, [eu, us, ap], "precious", {"keep": True}), "replicated")
    later = version(int(time.time() * 1000), 0, eu.name)  # eu's own name, from us
    forged = [
        wire_change("precious", None, later, "eu-west"),
        {**wire_change("visits", {"p": 0, "n": 1_000_000}, later, "eu-west", "counter")},
        wire_change("planted", "x", version(int(time.time() * 1000), 0, ap.name), "ap"),
    ]
    status, body, _ = await push_as(http, us, ap.name, forged)
    assert status == 200, body
    assert body["applied"] == 1 and body["quarantined"] == 2  # only ap's own change
    assert (
        us.sample("stamp_quarantined_changes_total", direction="received", reason="wrong_origin")
        == 2
    )
    await asyncio.sleep(0.3)
    for stamp in (eu, us, ap):
        assert await value_of(http, stamp, "precious") == {"keep": True}
        _, counter, _ = await call(http, "GET", f"{stamp.url}/counters/visits")
        assert counter["value"] == 5
    _, letters, _ = await call(http, "GET", f"{us.peer_url}/dead-letters")
    reasons = [d["reason"] for d in letters["dead_letters"]]
    assert len(reasons) == 2 and all("is not the sending peer" in r for r in reasons)


async def test_a_far_future_version_is_refused_and_later_writes_reads_and_restarts_work(
    mesh: MeshFactory, http: aiohttp.ClientSession
) -> None:
    """Finding 2: version 9999999999999-999999-x then a PUT made 10000000000000-..., which
    nothing could read back: GET, /items and /events answered 500, replication looped on
    'not a version', and the stamp could not start again."""
    eu, us = await mesh(2)
    last = f"9999999999999-999999-{us.name}"
    status, body, _ = await push_as(http, eu, us.name, [wire_change("doom", "x", last)])
    assert status == 200 and body["quarantined"] == 1, body
    assert (
        eu.sample("stamp_quarantined_changes_total", direction="received", reason="clock_skew") == 1
    )
    written = await put(http, eu, "doom", "after")
    assert written["version"].startswith(str(int(time.time()))[:8])  # today, not year 2286
    assert await value_of(http, eu, "doom") == "after"
    status, _, _ = await call(http, "GET", f"{eu.url}/items")
    assert status == 200 and len(await events(http, eu)) == 1
    await eventually(converged_on(http, [us], "doom", "after"), "doom replicates")
    await eu.stop()
    await eu.start()
    assert await value_of(http, eu, "doom") == "after"


async def test_an_item_holding_the_largest_version_answers_409_to_a_write_never_500(
    mesh: MeshFactory, http: aiohttp.ClientSession
) -> None:
    """Finding 2, however the largest version got into the store: the write that cannot
    follow it is refused, and every read still works."""
    (eu,) = await mesh(1)
    eu.store.apply(
        [
            Change(
                ITEM, "end", '"of time"', False, Version(MAX_WALL, MAX_LOGICAL, "stamp-far"), "far"
            )
        ]
    )
    status, body, _ = await call(http, "PUT", f"{eu.url}/items/end", json="more")
    assert_json_error(status, body, 409, "version_exhausted")
    status, _, _ = await call(http, "DELETE", f"{eu.url}/items/end")
    assert status == 409
    assert await value_of(http, eu, "end") == "of time"
    status, listing, _ = await call(http, "GET", f"{eu.url}/items")
    assert status == 200 and [i["id"] for i in listing["items"]] == ["end"]
    assert len(await events(http, eu)) == 1


@pytest.mark.parametrize("levels", [33, 100, 982, 983, 5000])
async def test_a_value_nesting_deeper_than_32_levels_is_refused_400_and_nothing_is_written(
    mesh: MeshFactory, http: aiohttp.ClientSession, levels: int
) -> None:
    """Finding 3: a 1,965-byte PUT nesting 982 deep answered 201, then broke replication
    for every later write; at 983+ the PUT answered 500 but was committed."""
    eu, us = await mesh(2)
    status, body, _ = await call(
        http,
        "PUT",
        f"{eu.url}/items/deep",
        data=deep_text(levels),
        headers={"Content-Type": "application/json"},
    )
    assert_json_error(status, body, 400, "too_deep")
    assert "32" in body["error"]["message"]
    assert await item(http, eu, "deep") is None and await events(http, eu) == []
    await put(http, eu, "after", 1)
    await eventually(converged_on(http, [us], "after", 1), "a later write replicates")


async def test_a_value_nesting_32_levels_is_taken_and_replicates(
    mesh: MeshFactory, http: aiohttp.ClientSession
) -> None:
    eu, us = await mesh(2)
    await put(http, eu, "deep", deep(32))
    await eventually(converged_on(http, [us], "deep", deep(32)), "the 32-deep value replicates")


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity", '{"x": [1e999]}', "-1e400"])
async def test_nan_and_infinity_are_refused_400(
    mesh: MeshFactory, http: aiohttp.ClientSession, text: str
) -> None:
    (eu,) = await mesh(1)
    status, body, _ = await call(
        http, "PUT", f"{eu.url}/items/n", data=text, headers={"Content-Type": "application/json"}
    )
    assert status == 400, body
    assert body["error"]["code"] in ("bad_json", "bad_number")
    assert re.search(r"NaN|Infinity|finite", body["error"]["message"]), body
    assert await item(http, eu, "n") is None


async def test_poison_changes_are_parked_by_sender_and_receiver_and_the_rest_flows(
    mesh: MeshFactory, http: aiohttp.ClientSession
) -> None:
    """Finding 3's aftermath: one change a peer cannot parse was retried forever and every
    later write stopped replicating, while /health stayed 200. Now the receiver
    quarantines what it can parse but not take (a value 40 deep), the sender parks what no
    peer can parse (5,000 deep: even the sender cannot encode it), and the rest flows."""
    eu, us = await mesh(2)
    eu.store.put("before", "1")
    eu.store.put("too-deep", json.dumps(deep(40)))  # as if written before the bound
    eu.store.put("unencodable", deep_text(5000))
    eu.store.put("after", "2")
    assert eu.app is not None and eu.app[STATE].replicator is not None
    eu.app[STATE].replicator.notify()
    await eventually(converged_on(http, [us], "after", 2), "the change after the poison")
    assert await value_of(http, us, "before") == 1
    assert await item(http, us, "too-deep") is None and await item(http, us, "unencodable") is None
    await eventually(lambda: all_backlogs_empty(http, [eu]), "eu's backlog drains")
    assert us.sample("stamp_quarantined_changes_total", direction="received", reason="invalid") == 1
    assert eu.sample("stamp_quarantined_changes_total", direction="sent", reason="refused") == 1
    _, sent, _ = await call(http, "GET", f"{eu.peer_url}/dead-letters")
    (letter,) = sent["dead_letters"]
    assert letter["direction"] == "sent" and letter["peer"] == us.name
    assert "cannot encode" in letter["reason"]


async def test_a_push_body_too_deep_to_parse_is_400_never_500(
    mesh: MeshFactory, http: aiohttp.ClientSession
) -> None:
    (eu,) = await mesh(1, also=("stamp-far",))
    change = wire_change("x", "VALUE", version(GOOD_WALL))
    body = (
        json.dumps({"from": "stamp-far", "changes": [change]})
        .replace('"VALUE"', deep_text(5000))
        .encode()
    )
    status, answer, _ = await signed(
        http, "POST", f"{eu.peer_url}/replication/changes", "stamp-far", body
    )
    assert_json_error(status, answer, 400, "too_deep")
    assert eu.sample("stamp_apply_errors_total") == 1


async def test_counter_slots_stay_within_int64_increments_past_it_are_400_never_500(
    mesh: MeshFactory, http: aiohttp.ClientSession
) -> None:
    """Finding 5: p = 2**63 - 1 in a stamp's own slot made every later increment there
    answer 500; a slot past int64 was taken from any peer."""
    eu, us = await mesh(2)
    now = int(time.time() * 1000)
    eu.store.apply(
        [
            Change(
                COUNTER,
                "big",
                json.dumps({"p": 2**63 - 1, "n": 0}),
                False,
                Version(now, 0, eu.name),
                "eu-west",
            )
        ]
    )
    status, body, _ = await call(http, "POST", f"{eu.url}/counters/big", json={"delta": 1})
    assert_json_error(status, body, 400, "counter_overflow")
    assert str(2**63 - 1) in body["error"]["message"]
    status, body, _ = await call(http, "POST", f"{eu.url}/counters/big", json={"delta": -5})
    assert status == 200 and body["value"] == 2**63 - 1 - 5

    over = [
        wire_change("big2", {"p": 2**63, "n": 0}, version(now, 0, us.name), kind="counter"),
        wire_change("ok", {"p": 2**63 - 1, "n": 0}, version(now, 1, us.name), kind="counter"),
    ]
    status, body, _ = await push_as(http, eu, us.name, over)
    assert status == 200 and (body["applied"], body["quarantined"]) == (1, 1), body
    status, _, _ = await call(http, "GET", f"{eu.url}/counters/big2")
    assert status == 404


async def test_a_change_ahead_by_more_than_max_clock_skew_is_quarantined_within_it_applies(
    mesh: MeshFactory, http: aiohttp.ClientSession
) -> None:
    """Finding 4: a far-future version stayed forever (later legitimate writes lost)."""
    eu, us = await mesh(2, max_clock_skew=60.0)
    now = int(time.time() * 1000)
    changes = [
        wire_change("ahead", "a", version(now + 120_000, 0, us.name)),
        wire_change("near", "n", version(now + 20_000, 0, us.name)),
    ]
    status, body, _ = await push_as(http, eu, us.name, changes)
    assert status == 200 and (body["applied"], body["quarantined"]) == (1, 1), body
    assert await item(http, eu, "ahead") is None and await value_of(http, eu, "near") == "n"
    _, letters, _ = await call(http, "GET", f"{eu.peer_url}/dead-letters")
    assert "more than max_clock_skew (60s)" in letters["dead_letters"][0]["reason"]
    await put(http, eu, "ahead", "legit")  # nothing from the future beats it
    assert await value_of(http, eu, "ahead") == "legit"


async def test_a_stamp_whose_restored_clock_is_far_ahead_refuses_to_start_unless_told(
    mesh: MeshFactory, http: aiohttp.ClientSession
) -> None:
    """Finding 4: a far-future own-origin version, then a restart, made every new write of
    that stamp carry year 2286."""
    (eu,) = await mesh(1)
    await put(http, eu, "a", 1)
    await eu.stop()
    db = sqlite3.connect(eu.config.database)
    future = version(int(time.time() * 1000) + 3_600_000, 0, eu.name)  # an hour ahead
    with db:
        db.execute("UPDATE changes SET version = ?", (future,))
    db.close()
    with pytest.raises(StartError, match=r"3600s ahead of this machine's clock.*max_clock_skew"):
        await eu.start()
    eu.config = dataclasses.replace(eu.config, allow_clock_ahead=True)
    await eu.start()
    assert (await put(http, eu, "b", 2))["version"] > future


async def test_the_stamp_command_refuses_a_clock_far_ahead_and_names_the_override(
    tmp_path: Path,
) -> None:
    config = tmp_path / "ahead.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "stamp-ahead",
                "region": "eu-west",
                "listen": {"port": 0, "peer": {"port": 0}},
                "database": "ahead.db",
            }
        )
    )
    store = Store(tmp_path / "ahead.db", "stamp-ahead", "eu-west")
    store.clock = HybridClock("stamp-ahead", clock=lambda: time.time() + 7200)
    store.put("a", "1")
    store.close()
    async with stamp_process(config) as proc:
        assert await proc.proc.wait() == 1
        assert proc.proc.stdout is not None
        out = (await proc.proc.stdout.read()).decode()
    assert "ahead of this machine's clock" in out and "--allow-clock-ahead" in out, out
    assert "Traceback" not in out
    async with stamp_process(config, "--allow-clock-ahead") as proc:
        await proc.listening()
        proc.proc.send_signal(signal.SIGTERM)
        assert await proc.proc.wait() == 0


# -- listener limits, error text ---------------------------------------------------------


@pytest.mark.parametrize("listener", ["public", "peer"])
async def test_a_half_sent_request_head_gets_408_and_the_connection_closes(
    mesh: MeshFactory, listener: str
) -> None:
    """Finding 7: the stamp kept a half-sent request head open indefinitely (slowloris)."""
    (eu,) = await mesh(1, header_timeout=0.5)
    url = URL(eu.url if listener == "public" else eu.peer_url)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # never the blank line
        await writer.drain()
        started = time.monotonic()
        async with asyncio.timeout(5):
            answer = await reader.read()  # to EOF: the stamp closes the connection
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert b'"request_timeout"' in answer
        assert 0.4 < time.monotonic() - started < 3
    finally:
        writer.close()


async def test_an_idle_kept_alive_connection_is_closed_after_keepalive_timeout(
    mesh: MeshFactory,
) -> None:
    (eu,) = await mesh(1, keepalive_timeout=0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", eu.config.port)
    try:
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
        await reader.readexactly(length)
        async with asyncio.timeout(5):
            assert await reader.read() == b""  # closed by the stamp once idle
    finally:
        writer.close()


async def test_errors_name_no_sqlite_or_exception_text(
    mesh: MeshFactory, http: aiohttp.ClientSession
) -> None:
    """Finding 7: error bodies echoed SQLite and exception text."""
    (eu,) = await mesh(1)
    eu.store.close()
    answers = [
        await call(http, "GET", f"{eu.url}/health"),
        await call(http, "PUT", f"{eu.url}/items/k", json=1),
        await call(http, "GET", f"{eu.url}/items"),
        await call(http, "GET", f"{eu.peer_url}/events"),
    ]
    for status, body, _ in answers:
        assert status == 503, body
        assert "database" not in json.dumps(body).lower(), body
        assert "sqlite" not in json.dumps(body).lower(), body


# -- bounded pages, large pushes ---------------------------------------------------------


async def test_lists_events_and_pulls_are_cut_by_bytes_and_page_through_everything(
    mesh: MeshFactory, http: aiohttp.ClientSession
) -> None:
    """Finding 6: /items?limit=1000, /events and pulls built whole answers in memory (30
    items of 1 MiB: a 31 MB answer)."""
    eu, us = await mesh(2)
    value = "v" * (MiB - 100)
    for i in range(12):
        await put(http, eu, f"big-{i:02d}", value)
    seen: list[str] = []
    after = ""
    while True:
        async with http.get(f"{eu.url}/items", params={"limit": "1000", "after": after}) as r:
            raw = await r.read()
        assert len(raw) < 4.5 * MiB
        body = json.loads(raw)
        seen += [i["id"] for i in body["items"]]
        if body["next_after"] is None:
            break
        after = body["next_after"]
    assert seen == [f"big-{i:02d}" for i in range(12)]

    async with http.get(f"{eu.peer_url}/events", params={"limit": "1000"}) as r:
        raw = await r.read()
    assert 3 * MiB < len(raw) < 4.5 * MiB and len(json.loads(raw)["events"]) < 12
    assert [e["id"] for e in await events(http, eu)] == seen  # the helper pages to the end

    status, body, _ = await signed(
        http, "GET", f"{eu.peer_url}/replication/changes?since=0&limit=10000", us.name
    )
    assert status == 200 and 0 < len(body["changes"]) < 12
    await eventually(converged_on(http, [us], "big-11", value), "every big value replicates")


async def test_a_large_push_is_parsed_off_the_event_loop(
    mesh: MeshFactory, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    (eu,) = await mesh(1, also=("stamp-far",))
    threads: list[str] = []
    real = peer_module.parse_batch

    def recording(*args: Any) -> Any:
        threads.append(threading.current_thread().name)
        return real(*args)

    monkeypatch.setattr(peer_module, "parse_batch", recording)
    small = [wire_change("small", 1, version(GOOD_WALL))]
    large = [wire_change(f"l{i}", "x" * 300_000, version(GOOD_WALL + i)) for i in range(8)]
    for changes in (small, large):  # the large one applies in three slices
        status, body, _ = await push_as(http, eu, "stamp-far", changes)
        assert status == 200 and body["applied"] == len(changes), body
    assert threads[0] == threading.main_thread().name
    assert threads[1] != threading.main_thread().name
    assert await value_of(http, eu, "l7") == "x" * 300_000
    status, body, _ = await push_as(http, eu, "stamp-far", large)
    assert body == {"applied": 0, "ignored": 8, "conflicts": 0, "quarantined": 0}


# -- replication lag in /health ----------------------------------------------------------


async def test_health_turns_503_while_replication_lags_past_the_bound_when_one_is_set(
    mesh: MeshFactory, http: aiohttp.ClientSession
) -> None:
    eu, us = await mesh(2, max_replication_lag=0.3)
    plain, _ = await mesh(2)
    await us.stop()
    await put(http, eu, "waiting", 1)
    await put(http, plain, "waiting", 1)

    async def lagging() -> bool:
        status, body = await health(http, eu)
        return status == 503 and body["status"] == "lagging" and body["lagging"] == [us.name]

    await eventually(lagging, "eu reports lagging towards stopped us")
    await asyncio.sleep(0.4)
    assert (await health(http, plain))[0] == 200  # off by default
    await us.start()
    await eventually(lambda: _healthy(http, eu), "eu healthy again once us has caught up")


async def _healthy(http: aiohttp.ClientSession, stamp: Stamp) -> bool:
    return (await health(http, stamp))[0] == 200


# -- the demo: forged pushes ---------------------------------------------------------------


async def test_a_forged_push_through_the_demo_proxy_or_to_a_stamp_is_refused(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """The review's attack, on `geoproxy demo` as it runs: a forged tombstone pushed through
    the proxy port, to a stamp's public port, and unsigned to its peer listener."""
    cfg = config_mod.load(demo.demo_config_path())
    cfg = dataclasses.replace(
        cfg,
        proxy=Listener("127.0.0.1", 0),
        admin=Listener("127.0.0.1", 0),
        geodes=tuple(dataclasses.replace(g, url=g.url.with_port(0)) for g in cfg.geodes),
    )
    live, runners = await demo.start_geodes(cfg, demo.stamp_apps(tmp_path))
    stop = asyncio.Event()
    ready: asyncio.Future[Bound] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(live, stop, on_ready=ready.set_result))
    try:
        proxy = (await asyncio.wait_for(ready, 20)).proxy_url
        fr = {"CF-IPCountry": "FR"}
        async with http.put(f"{proxy}/items/hello", json="bonjour", headers=fr) as r:
            assert r.status == 201
        eu = next(g for g in live.geodes if g.region == "eu-west")
        peer_listeners = demo.peer_listeners(runners)  # what the demo prints
        assert sorted(peer_listeners) == sorted(g.name for g in live.geodes)
        async with http.get(f"{peer_listeners[eu.name]}/metrics") as r:
            assert r.status == 200 and "stamp_items" in await r.text()
        forged = json.dumps(
            {
                "from": eu.name,
                "changes": [
                    wire_change(
                        "hello", None, version(int(time.time() * 1000), 5, eu.name), "eu-west"
                    )
                ],
            }
        )
        targets = [
            f"{proxy}/replication/changes",
            f"{eu.url}/replication/changes",
            f"{peer_listeners[eu.name]}/replication/changes",
        ]
        for url in targets:
            async with http.post(
                url, data=forged, headers={**fr, "Content-Type": "application/json"}
            ) as r:
                assert r.status in (401, 403, 404), (url, r.status)
        await asyncio.sleep(1.0)  # the demo replicates every 0.5 s
        for region in ("FR", "JP", "US"):
            async with http.get(f"{proxy}/items/hello", headers={"CF-IPCountry": region}) as r:
                assert r.status == 200 and (await r.json())["value"] == "bonjour", region
    finally:
        stop.set()
        await task
        for runner in runners:
            await runner.cleanup()


# -- deploy: the stamp's alert rules -------------------------------------------------------


async def test_the_stamp_alert_rules_name_only_metrics_a_stamp_exports(
    mesh: MeshFactory, http: aiohttp.ClientSession
) -> None:
    (eu,) = await mesh(1)
    async with http.get(f"{eu.peer_url}/metrics") as resp:
        text = await resp.text()
    exported = set(re.findall(r"^# TYPE (\S+) (\S+)", text, re.M))
    names = {n for n, _ in exported} | {f"{n}_total" for n, t in exported if t == "counter"}
    rules = yaml.safe_load(
        (
            Path(__file__).resolve().parent.parent / "deploy" / "prometheus" / "alerts.yml"
        ).read_text()
    )
    stamp_rules = [r for g in rules["groups"] for r in g["rules"] if "stamp_" in r["expr"]]
    assert {r["alert"] for r in stamp_rules} >= {
        "StampReplicationLagging",
        "StampChangesQuarantined",
        "StampPeerAuthFailures",
    }
    for rule in stamp_rules:
        used = set(re.findall(r"\bstamp_[a-z_]+\b", rule["expr"]))
        assert used <= names, (rule["alert"], used - names)


# -- the secret: from a file or the environment, never inline ------------------------------


@pytest.mark.parametrize(
    ("auth_node", "error"),
    [
        pytest.param(None, "peer_auth: required with peers", id="missing"),
        pytest.param({"secret": "x" * 64}, "peer_auth.secret: never inline", id="inline"),
        pytest.param(
            {"secret_file": "fleet.secret", "secret_env": "GP_TEST_SECRET"},
            "peer_auth: give exactly one of secret_file and secret_env",
            id="both",
        ),
        pytest.param(
            {"secret_file": "absent.secret"},
            "peer_auth.secret_file: cannot read the secret file 'absent.secret'",
            id="file-missing",
        ),
        pytest.param(
            {"secret_env": "GP_TEST_UNSET"},
            "peer_auth.secret_env: environment variable 'GP_TEST_UNSET' is not set",
            id="env-unset",
        ),
        pytest.param(
            {"secret_file": "short.secret"},
            "peer_auth.secret_file: the secret must be at least 32 bytes, got 5",
            id="too-short",
        ),
        pytest.param(
            {"secret_file": "fleet.secret", "window": "soon"},
            "peer_auth.window: not a duration",
            id="bad-window",
        ),
    ],
)
def test_the_peer_secret_comes_from_a_file_or_the_environment_and_errors_name_the_key(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    auth_node: dict[str, str] | None,
    error: str,
) -> None:
    (tmp_path / "fleet.secret").write_bytes(SECRET + b"\n")
    (tmp_path / "short.secret").write_text("short\n")
    monkeypatch.setenv("GP_TEST_SECRET", SECRET.decode())
    monkeypatch.delenv("GP_TEST_UNSET", raising=False)
    data: dict[str, Any] = {
        "name": "stamp-a",
        "region": "eu-west",
        "database": "a.db",
        "peers": [{"name": "stamp-b", "url": "http://127.0.0.1:9102"}],
    }
    if auth_node is not None:
        data["peer_auth"] = auth_node
    path = tmp_path / "a.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as caught:
        stamp_config.load(path)
    assert f"{path}: {error}" in str(caught.value)
    assert SECRET.decode() not in str(caught.value)


@pytest.mark.parametrize("source", ["file", "env"])
def test_a_secret_from_a_file_or_env_loads_and_never_shows_in_the_config_repr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str
) -> None:
    (tmp_path / "fleet.secret").write_bytes(SECRET + b"\n")
    monkeypatch.setenv("GP_TEST_SECRET", SECRET.decode())
    path = tmp_path / "a.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "stamp-a",
                "region": "eu-west",
                "database": "a.db",
                "listen": {"peer": {"host": "10.0.0.5", "port": 9201}},
                "peers": [{"name": "stamp-b", "url": "http://10.0.0.6:9201"}],
                "peer_auth": {"secret_file": "fleet.secret"}
                if source == "file"
                else {"secret_env": "GP_TEST_SECRET"},
                "max_clock_skew": "30s",
                "health": {"max_replication_lag": "2m"},
            }
        )
    )
    config = stamp_config.load(path)
    assert config.secret == SECRET
    assert (config.peer_host, config.peer_port) == ("10.0.0.5", 9201)
    assert (config.max_clock_skew, config.max_replication_lag) == (30.0, 120.0)
    assert SECRET.decode() not in repr(config)


async def test_a_stamp_with_peers_but_no_secret_refuses_to_start(tmp_path: Path) -> None:
    config = StampConfig(
        path=None,
        name="stamp-a",
        region="eu-west",
        host="127.0.0.1",
        port=0,
        database=tmp_path / "a.db",
        peer_port=0,
        peers=(Peer("stamp-b", URL("http://127.0.0.1:1")),),
    )
    runner = stamp_runner(build_stamp_app(config))
    with pytest.raises(StartError, match="peers need the fleet's shared secret"):
        await runner.setup()
    await runner.cleanup()
