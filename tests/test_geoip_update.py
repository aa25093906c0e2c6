"""GeoIP database updates without a restart: ``geoipupdate`` writes a new ``.mmdb`` next to
the old one and renames it over it; the proxy (one process, or a ``--workers`` fleet)
opens the new file at its next poll and swaps it in with no request failing, keeps the old
database when the new file is broken, and shows the database's build date."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import ssl
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from test_workers import supervised, total, until_workers_serve

from geoproxy.process.server import watch_config

from conftest import GEO_NETWORKS, GeodeFactory, ProxyFactory, base_config, geode_entry

#: A client in 81.2.69.0/24: GB (eu-west) in the test database, US (us-east) in the update.
CLIENT = {"X-Forwarded-For": "81.2.69.10"}
MOVED = {**GEO_NETWORKS, "81.2.69.0/24": ("US", "NA")}
POLL = "100ms"
DAY = 86400.0


def geoip_config(geodes: list[dict[str, Any]], database: Path) -> dict[str, Any]:
    return base_config(
        geodes,
        geoip={"database": str(database)},
        region_sources=["geoip"],
        reload={"poll_interval": POLL},
        access_log="off",
    )


def replace(new: Path, database: Path) -> None:
    """What geoipupdate does: the new file is complete before one rename puts it in place."""
    os.replace(new, database)


class Load:
    """A bounded loop of requests from ``CLIENT`` (or with ``headers``) through the proxy,
    on ``clients`` concurrent connections (new ones each time with ``fresh``): every status
    and serving geode, in the order they were sent."""

    def __init__(
        self,
        url: str,
        clients: int = 6,
        fresh: bool = False,
        limit: int = 50000,
        headers: dict[str, str] | None = None,
        ssl: ssl.SSLContext | None = None,
    ) -> None:
        self.url, self.clients, self.fresh, self.limit = url, clients, fresh, limit
        self.ssl = ssl  # what an https:// URL's certificate is verified with
        self.headers = CLIENT if headers is None else headers
        self.results: list[tuple[int, str]] = []
        self.errors: list[str] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def _client(self) -> None:
        headers = {**self.headers, **({"Connection": "close"} if self.fresh else {})}
        connector = aiohttp.TCPConnector(ssl=self.ssl) if self.ssl else None
        async with aiohttp.ClientSession(connector=connector) as http:
            while not self._stop.is_set() and len(self.results) < self.limit:
                try:
                    async with http.get(self.url, headers=headers) as resp:
                        body = await resp.json()
                        self.results.append((resp.status, body.get("geode", "")))
                except (aiohttp.ClientError, ValueError) as exc:
                    self.errors.append(repr(exc))

    def served_by(self, geode: str, last: int) -> bool:
        tail = self.results[-last:]
        return len(tail) == last and all(r == (200, geode) for r in tail)

    async def until(self, geode: str, last: int = 30, timeout: float = 10) -> None:
        """Until the last ``last`` answers all came from ``geode``."""
        async with asyncio.timeout(timeout):
            while not self.served_by(geode, last):  # noqa: ASYNC110 -- a bounded poll
                await asyncio.sleep(0.02)

    async def more(self, n: int, timeout: float = 10) -> None:
        """Until ``n`` more answers came in."""
        want = len(self.results) + n
        async with asyncio.timeout(timeout):
            while len(self.results) < min(want, self.limit):  # noqa: ASYNC110
                await asyncio.sleep(0.02)

    async def __aenter__(self) -> Load:
        self._tasks = [asyncio.create_task(self._client()) for _ in range(self.clients)]
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self._stop.set()
        async with asyncio.timeout(10):
            await asyncio.gather(*self._tasks)

    def failed(self) -> list[Any]:
        return [*self.errors, *(r for r in self.results if r[0] != 200)]


@contextlib.asynccontextmanager
async def watching(proxy: Any) -> AsyncIterator[None]:
    """The config watcher ``geoproxy run`` runs (which looks at the GeoIP file too)."""
    task = asyncio.create_task(watch_config(proxy.gateway, asyncio.Event()))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def two_regions(geode_factory: GeodeFactory) -> list[dict[str, Any]]:
    eu = await geode_factory("eu-1", "eu-west")
    us = await geode_factory("us-1", "us-east")
    return [geode_entry(eu), geode_entry(us)]


async def test_a_geoipupdate_swap_under_load_fails_no_request_and_the_new_database_decides(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    make_mmdb: Callable[..., Path],
) -> None:
    old_build = time.time() - 40 * DAY
    database = make_mmdb(built=old_build)
    proxy = await proxy_factory(geoip_config(await two_regions(geode_factory), database))
    built = "geoproxy_geoip_database_build_timestamp_seconds"
    assert proxy.sample(built, database_type="GeoLite2-City") == int(old_build)
    async with watching(proxy), Load(f"{proxy.url}/whoami") as load:
        await load.until("eu-1")
        replace(make_mmdb(networks=MOVED, name="next.mmdb"), database)
        await load.until("us-1")
        await load.more(200)
    assert load.failed() == []
    first_us = load.results.index((200, "us-1"))
    # Once the new database decides, it alone does (requests overlap the swap by at most
    # one per connection).
    assert set(load.results[first_us + load.clients :]) == {(200, "us-1")}
    assert proxy.sample("geoproxy_geoip_reloads_total", result="success") == 1
    assert abs(proxy.sample(built, database_type="GeoLite2-City") - time.time()) < 60


async def test_a_broken_new_file_keeps_the_old_database_logged_once_and_counted(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    make_mmdb: Callable[..., Path],
    make_broken_mmdb: Callable[..., Path],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    database = make_mmdb()
    proxy = await proxy_factory(geoip_config(await two_regions(geode_factory), database))
    failures = "geoproxy_geoip_reloads_total"
    async with watching(proxy), Load(f"{proxy.url}/whoami") as load:
        await load.until("eu-1")
        garbage = tmp_path / "truncated.mmdb"
        garbage.write_bytes(make_mmdb(networks=MOVED, name="whole.mmdb").read_bytes()[:300])
        with caplog.at_level(logging.ERROR, "geoproxy"):
            replace(garbage, database)
            await asyncio.sleep(0.6)  # several polls
        assert proxy.sample(failures, result="failure") == 1
        logged = [r for r in caplog.records if "cannot be used" in r.getMessage()]
        assert len(logged) == 1, logged
        assert str(database) in logged[0].getMessage()
        await load.more(100)
        assert load.served_by("eu-1", 100)
        replace(make_broken_mmdb(), database)  # reads, but fails the probe
        await asyncio.sleep(0.5)
        assert proxy.sample(failures, result="failure") == 2
        replace(make_mmdb(networks=MOVED, name="next.mmdb"), database)  # fixed upstream
        await load.until("us-1")
    assert load.failed() == []
    assert proxy.sample(failures, result="success") == 1


async def test_status_shows_the_build_date_and_a_stale_database(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    make_mmdb: Callable[..., Path],
    http: aiohttp.ClientSession,
) -> None:
    old = time.time() - 45 * DAY
    database = make_mmdb(built=old)
    proxy = await proxy_factory(geoip_config(await two_regions(geode_factory), database))
    async with http.get(f"{proxy.admin_url}/status") as resp:
        page = await resp.text()
    day = time.strftime("%Y-%m-%d", time.gmtime(old))
    assert f"GeoLite2-City, <span class=bad>built {day}, 45 days ago: stale" in page
    async with watching(proxy):
        replace(make_mmdb(name="next.mmdb"), database)
        async with asyncio.timeout(5):
            while proxy.sample("geoproxy_geoip_reloads_total", result="success") < 1:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    async with http.get(f"{proxy.admin_url}/status") as resp:
        page = await resp.text()
    today = time.strftime("%Y-%m-%d", time.gmtime())
    assert f"GeoLite2-City, built {today}, 0 days ago)" in page


async def test_a_workers_fleet_swaps_under_load_and_restarts_from_the_validated_file(
    geode_factory: GeodeFactory,
    write_config: Callable[..., Path],
    make_mmdb: Callable[..., Path],
    tmp_path: Path,
) -> None:
    database = make_mmdb()
    path = write_config(geoip_config(await two_regions(geode_factory), database))
    async with supervised(path, workers=2) as proxy, aiohttp.ClientSession() as http:
        async with Load(f"{proxy.proxy_url}/whoami", fresh=True) as load:
            await load.until("eu-1")
            replace(make_mmdb(networks=MOVED, name="next.mmdb"), database)
            await proxy.wait_for(r"GeoIP database re-opened")
            await load.until("us-1", last=60)
            await load.more(100)
        assert load.failed() == []
        first_us = load.results.index((200, "us-1"))
        assert set(load.results[first_us:]) - {(200, "eu-1"), (200, "us-1")} == set()
        m = await proxy.metrics(http)
        assert total(m, "geoproxy_geoip_reloads_total", result="success") == 1
        # A broken file on disk: the supervisor keeps its database, and a worker that
        # starts again now serves that one (the descriptor it inherits), not the file.
        garbage = tmp_path / "garbage.mmdb"
        garbage.write_bytes(b"not a database")
        replace(garbage, database)
        await proxy.wait_for(r"cannot be used; the one opened before keeps answering")
        os.kill(proxy.pids[0], signal.SIGKILL)
        await proxy.wait_for(r"worker 0 \(pid \d+\) exited unexpectedly")
        await until_workers_serve(proxy, http, 2)
        async with Load(f"{proxy.proxy_url}/whoami", fresh=True, limit=60) as load:
            await load.more(60)
        assert set(load.results) == {(200, "us-1")} and len(load.results) >= 60
        assert "exited during start-up" not in proxy.output
        assert await proxy.stop() == 0


def test_check_config_names_the_database_type_and_build_date(
    make_mmdb: Callable[..., Path],
    write_config: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    from geoproxy.process.offline import check_config

    built = time.time() - 3 * DAY
    geode = {"name": "eu-1", "region": "eu-west", "url": "http://127.0.0.1:9"}
    path = write_config(geoip_config([geode], make_mmdb(built=built)))
    assert check_config(path) == 0
    day = time.strftime("%Y-%m-%d", time.gmtime(built))
    assert f"test-City-v6.mmdb (GeoLite2-City, built {day})" in capsys.readouterr().out
