"""``geoproxy run --workers N`` as real processes: one port shared with SO_REUSEPORT, health
checked once by the supervisor and handed to every worker, metrics summed across workers,
reloads reaching every worker, a killed worker started again, graceful stop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from geoproxy.process import fleet
from geoproxy.process.server import DRAIN_MARGIN

from conftest import (
    FakeGeode,
    GeodeFactory,
    assert_promtool_accepts,
    base_config,
    geode_entry,
)

READY = r"proxying on (https?://\S+) with (\d+) workers \(pids ([\d ]+)\), admin on (http://\S+)"


class Supervised:
    """A ``geoproxy run --workers`` process; its merged output is read all along (so
    that no pipe fills up) and searched by ``wait_for``."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._new = asyncio.Event()
        self._reader = asyncio.create_task(self._read())
        self.proxy_url = self.admin_url = ""
        self.pids: list[int] = []

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while raw := await self.proc.stdout.readline():
            self.lines.append(raw.decode())
            self._new.set()
        self._new.set()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    async def wait_for(self, pattern: str, count: int = 1, timeout: float = 20) -> re.Match[str]:
        """The ``count``-th line matching ``pattern`` (waiting for it)."""
        regex = re.compile(pattern)
        async with asyncio.timeout(timeout):
            while True:
                found = [m for line in self.lines if (m := regex.search(line))]
                if len(found) >= count:
                    return found[count - 1]
                if self._reader.done():
                    raise AssertionError(f"process ended:\n{self.output}")
                self._new.clear()
                await self._new.wait()

    async def started(self) -> None:
        m = await self.wait_for(READY)
        self.proxy_url, self.admin_url = m.group(1), m.group(4)
        self.pids = [int(p) for p in m.group(3).split()]

    async def stop(self, sig: int | None = signal.SIGTERM, timeout: float = 20) -> int:
        """Send ``sig`` (None: one was sent already) and wait for the exit code."""
        if sig is not None and self.proc.returncode is None:
            self.proc.send_signal(sig)
        async with asyncio.timeout(timeout):
            code = await self.proc.wait()
            await self._reader
        return code

    async def metrics(self, http: aiohttp.ClientSession) -> dict[tuple[str, frozenset[Any]], float]:
        async with http.get(f"{self.admin_url}/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
        return {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }


def total(samples: dict[tuple[str, frozenset[Any]], float], name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (the supervisor's workers)."""
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def is_worker(pid: int) -> bool:
    """Whether ``pid`` runs ``geoproxy worker`` yet. Stopping a child between fork and
    exec would freeze its parent, which waits for the exec (vfork)."""
    try:
        return b"worker" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False


@contextlib.asynccontextmanager
async def supervised(
    config: Path, workers: int = 2, env: dict[str, str] | None = None
) -> AsyncIterator[Supervised]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "geoproxy",
        "run",
        "--config",
        str(config),
        "--workers",
        str(workers),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    running = Supervised(proc)
    try:
        await running.started()
        yield running
    finally:
        left = children(proc.pid)  # the workers now, restarted ones too
        if proc.returncode is None:
            proc.kill()  # the kernel then kills the workers (PR_SET_PDEATHSIG)
        for pid in left:  # and those that did not get as far as asking for that
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await proc.wait()  # which waits for its output pipe, shared with the workers
        running._reader.cancel()


@contextlib.asynccontextmanager
async def spawned(config: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """``geoproxy run --workers 2`` that is expected to end by itself: killed (and with it
    its workers, PR_SET_PDEATHSIG) if the test leaves before it does."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "geoproxy",
        "run",
        "--config",
        str(config),
        "--workers",
        "2",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is a process that has ended but was not reaped yet.
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    return False


async def get_fresh(http: aiohttp.ClientSession, url: str, n: int) -> list[tuple[int, str]]:
    """``n`` GETs, each on a new connection (so that the kernel spreads them over the
    workers), as (status, serving geode)."""
    out = []
    for _ in range(n):
        async with http.get(url, headers={"Connection": "close"}) as resp:
            body = await resp.json()
            out.append((resp.status, body.get("geode", "")))
    return out


async def until_only(http: aiohttp.ClientSession, url: str, geode: str) -> None:
    """Until 20 requests in a row (new connections) are served by ``geode``: the
    supervisor's word reaches the workers a moment after it logs it."""
    async with asyncio.timeout(5):
        while await get_fresh(http, url, 20) != [(200, geode)] * 20:  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def in_flight(proxy_url: str, geode: FakeGeode, n: int) -> list[asyncio.Task[int]]:
    """``n`` requests of 1 s each on their own connections, once all have reached the
    geode: each task gives the status in the end."""

    async def slow() -> int:
        url = f"{proxy_url}/slow?delay=1"
        async with aiohttp.ClientSession() as own, own.get(url) as resp:
            await resp.read()
            return resp.status

    before = geode.hits["/slow"]
    requests = [asyncio.create_task(slow()) for _ in range(n)]
    async with asyncio.timeout(10):
        while geode.hits["/slow"] < before + n:  # noqa: ASYNC110 -- a bounded poll
            await asyncio.sleep(0.02)
    return requests


async def until_workers_serve(proxy: Supervised, http: aiohttp.ClientSession, n: int) -> None:
    """Until ``geoproxy_workers`` reads ``n``: a restarted worker counts once it is ready."""
    async with asyncio.timeout(10):
        while total(await proxy.metrics(http), "geoproxy_workers") != n:  # noqa: ASYNC110
            await asyncio.sleep(0.05)


def one_region(geodes: list[FakeGeode], **overrides: Any) -> dict[str, Any]:
    data = base_config(
        [geode_entry(g) for g in geodes],
        regions={"eu-west": None},
        countries={},
        continents={},
        access_log="off",
    )
    data.update(overrides)
    return data


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_workers_share_one_port_and_their_counts_are_summed_exactly(
    geode_factory: GeodeFactory, write_config: Callable[..., Path], http: aiohttp.ClientSession
) -> None:
    eu = await geode_factory("eu-1", "eu-west")
    async with supervised(write_config(one_region([eu])), workers=2) as proxy:
        assert len(proxy.pids) == 2 and all(alive(p) for p in proxy.pids)
        results = await get_fresh(http, f"{proxy.proxy_url}/whoami", 200)
        assert results == [(200, "eu-1")] * 200
        m = await proxy.metrics(http)
        assert total(m, "geoproxy_requests_total", geode="eu-1", code_class="2xx") == 200
        assert total(m, "geoproxy_upstream_attempts_total", geode="eu-1") == 200
        assert total(m, "geoproxy_request_duration_seconds_count", geode="eu-1") == 200
        per_worker = [total(m, "geoproxy_worker_requests_total", worker=str(i)) for i in (0, 1)]
        assert sum(per_worker) == 200
        assert min(per_worker) > 0, f"one worker got every connection: {per_worker}"
        assert total(m, "geoproxy_workers") == 2
        assert eu.hits["/whoami"] == 200
        async with http.get(f"{proxy.admin_url}/metrics") as resp:  # the merged exposition
            await assert_promtool_accepts(await resp.read())
        async with http.get(f"{proxy.admin_url}/status") as resp:  # the fleet's counts too
            assert resp.status == 200
            assert "<td>eu-1</td>" in (page := await resp.text())
            assert "<td class=num>200</td>" in page
        assert await proxy.stop() == 0
    assert not any(alive(p) for p in proxy.pids)


@contextlib.asynccontextmanager
async def run(path: Path, workers: int) -> AsyncIterator[tuple[Supervised, str, str]]:
    """``geoproxy run --workers N`` (N = 1: one process): the process, proxy and admin
    URLs; killed with its workers if the test leaves before it ends."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "geoproxy",
        "run",
        "--config",
        str(path),
        "--workers",
        str(workers),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    running = Supervised(proc)
    try:
        found = await running.wait_for(r"proxying on (http://[\d.:]+).* admin on (\S+)")
        yield running, found.group(1), found.group(2)
    finally:
        left = children(proc.pid)
        if proc.returncode is None:
            proc.kill()
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await proc.wait()
        running._reader.cancel()


def _families_with_samples(text: str) -> set[str]:
    return {f.name for f in text_string_to_metric_families(text) if f.samples}


async def test_a_fleet_exposes_every_family_one_process_exposes(
    geode_factory: GeodeFactory, write_config: Callable[..., Path], http: aiohttp.ClientSession
) -> None:
    """The same traffic through one process and through two workers: /metrics has the
    same families with samples, plus the fleet's own (workers, restarts, per worker)."""
    eu = await geode_factory("eu-1", "eu-west")
    path = write_config(one_region([eu]))
    exposed = {}
    for workers in (1, 2):
        async with run(path, workers) as (running, proxy_url, admin_url):
            assert await get_fresh(http, f"{proxy_url}/whoami", 20) == [(200, "eu-1")] * 20
            async with http.get(f"{admin_url}/metrics") as resp:
                exposed[workers] = _families_with_samples(await resp.text())
            assert await running.stop() == 0
    fleet_only = {n for n in exposed[2] if n.startswith(("geoproxy_worker_", "geoproxy_workers"))}
    assert "geoproxy_fast_lane_requests" in exposed[1]
    assert sorted(exposed[2] - fleet_only) == sorted(exposed[1])
    assert fleet_only >= {
        "geoproxy_workers",
        "geoproxy_worker_restarts",
        "geoproxy_worker_requests",
    }


async def test_geodes_are_health_checked_by_the_supervisor_only(
    geode_factory: GeodeFactory, write_config: Callable[..., Path], http: aiohttp.ClientSession
) -> None:
    eu = await geode_factory("eu-1", "eu-west")
    # A long interval: only the first round runs while the test looks.
    data = one_region([eu], health_check={"interval": "60s", "timeout": "500ms", "jitter": "0s"})
    async with supervised(write_config(data), workers=3) as proxy:
        assert await get_fresh(http, f"{proxy.proxy_url}/whoami", 30) == [(200, "eu-1")] * 30
        # No wait needed: a process's first round is part of its start-up, and the
        # supervisor reports ready only once every worker is.
        assert eu.hits["/health"] == 1  # not 1 per worker
        m = await proxy.metrics(http)
        assert total(m, "geoproxy_health_checks_total", geode="eu-1") == 1


async def test_a_geode_failing_its_checks_leaves_every_workers_rotation(
    geode_factory: GeodeFactory, write_config: Callable[..., Path], http: aiohttp.ClientSession
) -> None:
    a = await geode_factory("eu-a", "eu-west")
    b = await geode_factory("eu-b", "eu-west")
    data = one_region(
        [a, b],
        health_check={
            "interval": "200ms",
            "timeout": "150ms",
            "jitter": "0s",
            "unhealthy_threshold": 1,
        },
    )
    async with supervised(write_config(data), workers=2) as proxy:
        served = {geode for _, geode in await get_fresh(http, f"{proxy.proxy_url}/whoami", 40)}
        assert served == {"eu-a", "eu-b"}
        a.health_status = 503  # /whoami still answers: only health tells the workers
        await proxy.wait_for(r"geode eu-a \(eu-west\) is out of rotation")
        await until_only(http, f"{proxy.proxy_url}/whoami", "eu-b")  # the news travels
        before = a.hits["/whoami"]
        results = await get_fresh(http, f"{proxy.proxy_url}/whoami", 100)
        assert results == [(200, "eu-b")] * 100
        assert a.hits["/whoami"] == before
        a.health_status = 200
        await proxy.wait_for(r"geode eu-a \(eu-west\) takes traffic", count=2)
        served = {geode for _, geode in await get_fresh(http, f"{proxy.proxy_url}/whoami", 60)}
        assert served == {"eu-a", "eu-b"}


async def test_a_killed_worker_is_started_again_and_counts_do_not_go_backwards(
    geode_factory: GeodeFactory, write_config: Callable[..., Path], http: aiohttp.ClientSession
) -> None:
    eu = await geode_factory("eu-1", "eu-west")
    async with supervised(write_config(one_region([eu])), workers=2) as proxy:
        assert await get_fresh(http, f"{proxy.proxy_url}/whoami", 50) == [(200, "eu-1")] * 50
        assert total(await proxy.metrics(http), "geoproxy_requests_total") == 50
        os.kill(proxy.pids[0], signal.SIGKILL)
        await proxy.wait_for(r"worker 0 \(pid \d+\) exited unexpectedly \(killed by SIGKILL\)")
        # Connections that reach the dead worker's socket wait in its backlog until the
        # new worker takes them: none fails.
        assert await get_fresh(http, f"{proxy.proxy_url}/whoami", 50) == [(200, "eu-1")] * 50
        again = await proxy.wait_for(r"worker 0 started again \(pid (\d+)\)")
        assert int(again.group(1)) in children(proxy.proc.pid)
        assert int(again.group(1)) != proxy.pids[0]
        m = await proxy.metrics(http)
        assert total(m, "geoproxy_requests_total") == 100
        assert total(m, "geoproxy_worker_restarts_total") == 1
        assert total(m, "geoproxy_workers") == 2
        assert total(m, "geoproxy_worker_requests_total") == 100
        assert await proxy.stop() == 0


async def test_a_reload_reaches_every_worker(
    geode_factory: GeodeFactory, write_config: Callable[..., Path], http: aiohttp.ClientSession
) -> None:
    old = await geode_factory("eu-old", "eu-west")
    new = await geode_factory("eu-new", "eu-west")
    path = write_config(one_region([old], reload={"poll_interval": "0s"}))
    async with supervised(path, workers=2) as proxy:
        assert await get_fresh(http, f"{proxy.proxy_url}/whoami", 20) == [(200, "eu-old")] * 20
        path.write_text(yaml.safe_dump(one_region([new], reload={"poll_interval": "0s"})))
        proxy.proc.send_signal(signal.SIGHUP)
        for i in (0, 1):
            await proxy.wait_for(rf"\[worker-{i}\] geoproxy: .*config reloaded")
        assert await get_fresh(http, f"{proxy.proxy_url}/whoami", 60) == [(200, "eu-new")] * 60
        m = await proxy.metrics(http)
        assert total(m, "geoproxy_config_reloads_total", result="success") == 1


async def test_sigterm_lets_every_worker_finish_its_in_flight_requests(
    geode_factory: GeodeFactory, write_config: Callable[..., Path], http: aiohttp.ClientSession
) -> None:
    eu = await geode_factory("eu-1", "eu-west")
    async with supervised(write_config(one_region([eu])), workers=2) as proxy:
        requests = await in_flight(proxy.proxy_url, eu, 12)
        proxy.proc.send_signal(signal.SIGTERM)
        await proxy.wait_for("shutting down")
        assert await asyncio.gather(*requests) == [200] * 12
        assert await proxy.stop(None) == 0
    assert not any(alive(p) for p in proxy.pids)
    assert "Traceback" not in proxy.output


@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "two-workers"])
async def test_sigterm_exits_within_the_drain_timeout_and_logs_the_requests_it_cut(
    geode_factory: GeodeFactory, write_config: Callable[..., Path], workers: int
) -> None:
    """shutdown.drain_timeout 2s, one 0.5 s request and three 6 s requests in flight: the
    short one is drained, the long ones are cut off at 2 s and logged as such (503, cut,
    on their geode), and the process exits within drain_timeout + DRAIN_MARGIN of the
    SIGTERM (aiohttp's own shutdown took 4 s)."""
    eu = await geode_factory("eu-1", "eu-west")
    path = write_config(
        one_region(
            [eu],
            access_log="json",
            shutdown={"drain_timeout": "2s"},
            forwarding={"response_timeout": "60s"},
        )
    )

    async def get(url: str) -> int | str:
        try:
            async with aiohttp.ClientSession() as own, own.get(url) as resp:
                await resp.read()
                return resp.status
        except aiohttp.ClientError:
            return "cut"

    loop = asyncio.get_running_loop()
    async with run(path, workers) as (proxy, proxy_url, _):
        delays = (0.5, 6, 6, 6)
        requests = [asyncio.create_task(get(f"{proxy_url}/slow?delay={d}")) for d in delays]
        async with asyncio.timeout(10):
            while eu.hits["/slow"] < len(delays):  # noqa: ASYNC110 -- a bounded poll
                await asyncio.sleep(0.01)
        signalled = loop.time()
        proxy.proc.send_signal(signal.SIGTERM)
        assert await proxy.stop(None, timeout=15) == 0
        took = loop.time() - signalled
        assert await asyncio.gather(*requests) == [200, "cut", "cut", "cut"]
    assert 2.0 <= took < 2.0 + DRAIN_MARGIN, f"exited {took:.2f}s after SIGTERM"
    out = proxy.output
    cut = [json.loads(line[line.index("{") :]) for line in proxy.lines if '"cut":' in line]
    assert [(c["status"], c["geode"], c["attempts"], c["cut"]) for c in cut] == [
        (503, "eu-1", 1, "drain_timeout")
    ] * 3
    warned = re.findall(
        r"WARNING.*shutdown.drain_timeout \(2s\) is over: cutting off (\d+) "
        r"requests? still in flight",
        out,
    )
    assert sum(map(int, warned)) == 3
    assert re.search(
        r"geoproxy: geoproxy stopped: 1 request drained, 3 cut off by "
        r"shutdown.drain_timeout",
        out,
    ), out
    assert '"status":499' not in out and "Traceback" not in out
    assert "first health round over 1 geode\n" in out  # not "1 geodes"


async def test_killing_the_supervisor_takes_its_workers_down(
    geode_factory: GeodeFactory, write_config: Callable[..., Path]
) -> None:
    eu = await geode_factory("eu-1", "eu-west")
    async with supervised(write_config(one_region([eu])), workers=2) as proxy:
        proxy.proc.kill()
        await proxy.proc.wait()
        async with asyncio.timeout(5):
            while any(alive(p) for p in proxy.pids):  # noqa: ASYNC110 -- bounded poll
                await asyncio.sleep(0.05)


@pytest.mark.parametrize("value", ["0", "-1", "many", "257", "1.5"])
async def test_a_bad_workers_value_is_rejected_with_the_choices(
    value: str, write_config: Callable[..., Path]
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "geoproxy",
        "run",
        "--config",
        "x.yaml",
        f"--workers={value}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 2
    assert (
        f"argument --workers: expected a whole number from 1 to 256, or 'auto'; got '{value}'"
    ) in out.decode()


async def test_a_taken_port_fails_start_up_with_the_address(
    geode_factory: GeodeFactory, write_config: Callable[..., Path]
) -> None:
    eu = await geode_factory("eu-1", "eu-west")
    assert eu.server is not None
    taken = eu.server.port  # a listener without SO_REUSEPORT: nobody may share it
    data = one_region([eu])
    data["listen"]["proxy"]["port"] = taken
    async with spawned(write_config(data)) as proc, asyncio.timeout(20):
        out, _ = await proc.communicate()
    assert proc.returncode == 1
    assert f"cannot listen for proxy on 127.0.0.1:{taken}: Address already in use" in out.decode()
    assert "Traceback" not in out.decode()


# -- merging the workers' counts (fleet.py), without processes -----------------------------


class _Families(Collector):
    def __init__(self, families: list[Any]) -> None:
        self.families = families

    def collect(self) -> Any:
        return iter(self.families)


def _worker_snapshot(requests: float, ejected: float, inflight: float) -> list[fleet.Family]:
    reqs = CounterMetricFamily("geoproxy_requests", "r", labels=["geode", "code_class"])
    reqs.add_metric(["eu-1", "2xx"], requests)
    dur = HistogramMetricFamily("geoproxy_request_duration_seconds", "d", labels=["geode"])
    dur.add_metric(["eu-1"], [("0.1", requests), ("+Inf", requests)], requests * 0.01)
    ej = GaugeMetricFamily("geoproxy_geode_ejected", "e", labels=["geode", "region"])
    ej.add_metric(["eu-1", "eu-west"], ejected)
    inf = GaugeMetricFamily("geoproxy_inflight_requests", "i")
    inf.add_metric([], inflight)
    other = GaugeMetricFamily("geoproxy_geode_up", "u", labels=["geode", "region"])
    other.add_metric(["eu-1", "eu-west"], 0)  # not a worker family: never sent
    registry = CollectorRegistry()
    registry.register(_Families([reqs, dur, ej, inf, other]))
    return fleet.snapshot(registry)


def _own() -> CollectorRegistry:
    """The supervisor's registry: the same families, with nothing counted, and geode_up."""
    own = CollectorRegistry()
    up = GaugeMetricFamily("geoproxy_geode_up", "u", labels=["geode", "region"])
    up.add_metric(["eu-1", "eu-west"], 1)
    ej = GaugeMetricFamily("geoproxy_geode_ejected", "e", labels=["geode", "region"])
    ej.add_metric(["eu-1", "eu-west"], 0)
    own.register(
        _Families(
            [
                up,
                ej,
                CounterMetricFamily("geoproxy_requests", "r", labels=["geode", "code_class"]),
                HistogramMetricFamily("geoproxy_request_duration_seconds", "d", labels=["geode"]),
                GaugeMetricFamily("geoproxy_inflight_requests", "i", value=0),
            ]
        )
    )
    return own


def _exposed(merged: fleet.Fleet) -> dict[tuple[str, frozenset[Any]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in merged.collect()
        for s in family.samples
    }


def test_fleet_sums_counters_and_histograms_and_takes_the_max_of_ejection() -> None:
    merged = fleet.Fleet(_own())
    merged.update(0, _worker_snapshot(requests=7, ejected=0, inflight=2))
    merged.update(1, _worker_snapshot(requests=5, ejected=1, inflight=3))
    m = _exposed(merged)
    assert total(m, "geoproxy_requests_total") == 12
    assert total(m, "geoproxy_request_duration_seconds_bucket", le="+Inf") == 12
    assert total(m, "geoproxy_request_duration_seconds_sum") == pytest.approx(0.12)
    assert total(m, "geoproxy_geode_ejected") == 1  # ejected by one worker: ejected
    assert total(m, "geoproxy_inflight_requests") == 5
    assert total(m, "geoproxy_geode_up") == 0  # ejected by a worker: up 1 only if serving
    assert total(m, "geoproxy_worker_requests_total", worker="0") == 7
    assert total(m, "geoproxy_worker_requests_total", worker="1") == 5


def test_fleet_keeps_what_an_exited_worker_counted_but_not_its_gauges() -> None:
    merged = fleet.Fleet(_own())
    merged.update(0, _worker_snapshot(requests=7, ejected=1, inflight=2))
    merged.update(1, _worker_snapshot(requests=5, ejected=0, inflight=3))
    merged.retire(0)
    m = _exposed(merged)
    assert total(m, "geoproxy_requests_total") == 12
    assert total(m, "geoproxy_geode_ejected") == 0
    assert total(m, "geoproxy_geode_up") == 1  # the supervisor's own, not the workers'
    assert total(m, "geoproxy_inflight_requests") == 3
    merged.update(0, _worker_snapshot(requests=4, ejected=0, inflight=0))  # its successor
    m = _exposed(merged)
    assert total(m, "geoproxy_requests_total") == 16
    assert total(m, "geoproxy_worker_requests_total", worker="0") == 11
    assert merged.request_counts() == {("eu-1", "2xx"): 16}


async def test_a_worker_failing_at_start_up_fails_the_start_with_its_reason(
    geode_factory: GeodeFactory,
    write_config: Callable[..., Path],
    make_mmdb: Callable[..., Path],
) -> None:
    eu = await geode_factory("eu-1", "eu-west")
    mmdb = make_mmdb()
    # The supervisor opens the GeoIP database, then runs a first health round of 1 s: time
    # to spoil the database before the workers (which open the supervisor's file, not the
    # path) start. Written over in place, not replaced: the file they inherit is empty.
    data = one_region(
        [eu],
        geoip={"database": str(mmdb)},
        health_check={"path": "/slow?delay=1", "timeout": "3s", "interval": "5s"},
    )
    path = write_config(data)
    async with spawned(path) as proc, asyncio.timeout(20):
        assert proc.stdout is not None
        while eu.hits["/slow"] == 0:  # noqa: ASYNC110 -- a bounded poll of a counter
            await asyncio.sleep(0.01)
        mmdb.write_bytes(b"")
        out = (await proc.stdout.read()).decode()
        assert await proc.wait() == 1
    reason = f"{path}: geoip.database: {mmdb}: not a readable MaxMind database"
    assert re.search(rf"geoproxy worker \d: {re.escape(reason)}", out), out
    assert re.search(r"worker \d exited during start-up \(exit code 1\)", out), out
    assert "proxying on" not in out
    assert "Traceback" not in out


async def test_new_connections_are_refused_not_dropped_once_draining_begins(
    geode_factory: GeodeFactory, write_config: Callable[..., Path], http: aiohttp.ClientSession
) -> None:
    eu = await geode_factory("eu-1", "eu-west")
    async with supervised(write_config(one_region([eu])), workers=2) as proxy:
        slow = asyncio.create_task(http.get(f"{proxy.proxy_url}/slow?delay=1.8"))  # < 2 s timeout
        async with asyncio.timeout(10):
            while eu.hits["/slow"] == 0:  # noqa: ASYNC110 -- a bounded poll of a counter
                await asyncio.sleep(0.02)
        proxy.proc.send_signal(signal.SIGTERM)
        await proxy.wait_for("the supervisor says stop", count=2)  # both workers got word
        host, port = proxy.proxy_url.removeprefix("http://").rsplit(":", 1)
        with pytest.raises(ConnectionRefusedError):
            async with asyncio.timeout(5):
                while True:  # until each worker has closed its listener
                    _, writer = await asyncio.open_connection(host, int(port))
                    writer.close()
                    with contextlib.suppress(ConnectionResetError):  # queued, then dropped
                        await writer.wait_closed()
                    await asyncio.sleep(0.02)
        assert not slow.done()
        async with await slow as resp:  # while the request in flight completes
            assert resp.status == 200
        assert await proxy.stop(None) == 0


@pytest.mark.parametrize("order", ["at once", "workers after the supervisor's word"])
async def test_sigterm_to_every_process_still_drains(
    order: str, geode_factory: GeodeFactory, write_config: Callable[..., Path]
) -> None:
    """What systemd's default KillMode=control-group does: SIGTERM to the supervisor and
    to every worker. A worker must not take the supervisor's word as a first signal and
    its own SIGTERM as a second one ("stop at once"), whichever reaches it first."""
    eu = await geode_factory("eu-1", "eu-west")
    async with supervised(write_config(one_region([eu])), workers=2) as proxy:
        requests = await in_flight(proxy.proxy_url, eu, 8)
        os.kill(proxy.proc.pid, signal.SIGTERM)
        if order != "at once":
            await proxy.wait_for("the supervisor says stop", count=2)  # both began to drain
        for pid in proxy.pids:
            os.kill(pid, signal.SIGTERM)
        assert await asyncio.gather(*requests) == [200] * 8
        assert await proxy.stop(None) == 0
    assert "second signal" not in proxy.output


@pytest.mark.parametrize("change", ["broken", "other geode"])
async def test_a_restarted_worker_serves_the_supervisors_config_not_the_files(
    change: str,
    geode_factory: GeodeFactory,
    write_config: Callable[..., Path],
    http: aiohttp.ClientSession,
) -> None:
    old = await geode_factory("eu-old", "eu-west")
    other = await geode_factory("eu-other", "eu-west")
    no_polling = {"poll_interval": "0s"}  # only SIGHUP reloads: the file just sits there
    path = write_config(one_region([old], reload=no_polling))
    async with supervised(path, workers=2) as proxy:
        if change == "broken":
            path.write_text("geodes: [unclosed\n")
        else:
            path.write_text(yaml.safe_dump(one_region([other], reload=no_polling)))
        os.kill(proxy.pids[0], signal.SIGKILL)
        await proxy.wait_for(r"worker 0 \(pid \d+\) exited unexpectedly")
        await until_workers_serve(proxy, http, 2)  # started again after 0.5 s
        assert await get_fresh(http, f"{proxy.proxy_url}/whoami", 40) == [(200, "eu-old")] * 40
        assert "invalid" not in proxy.output


async def test_an_active_pass_readmits_a_geode_a_worker_ejected(
    geode_factory: GeodeFactory, write_config: Callable[..., Path], http: aiohttp.ClientSession
) -> None:
    a = await geode_factory("eu-a", "eu-west")
    b = await geode_factory("eu-b", "eu-west")
    data = one_region(
        [a, b],
        health_check={"interval": "200ms", "timeout": "150ms", "jitter": "0s"},
        outlier_detection={"consecutive_failures": 1, "base_ejection_time": "60s"},
    )
    async with supervised(write_config(data), workers=2) as proxy:
        a.force_status = 503  # live traffic fails on eu-a while its /health passes
        assert await get_fresh(http, f"{proxy.proxy_url}/whoami", 40) == [(200, "eu-b")] * 40
        assert total(await proxy.metrics(http), "geoproxy_geode_ejections_total") >= 1
        a.force_status = None
        url = f"{proxy.proxy_url}/whoami"
        async with asyncio.timeout(10):  # a check every 200 ms; the ejection lasts 60 s
            while "eu-a" not in {g for _, g in await get_fresh(http, url, 20)}:  # noqa: ASYNC110
                await asyncio.sleep(0.05)


async def test_status_geodes_and_metrics_agree_on_a_geode_a_worker_ejected(
    geode_factory: GeodeFactory, write_config: Callable[..., Path], http: aiohttp.ClientSession
) -> None:
    """The supervisor checks health but does not see passive ejection: /status, /geodes
    and geode_up take it from the workers' counts, as one process would show it."""
    a = await geode_factory("eu-a", "eu-west")
    b = await geode_factory("eu-b", "eu-west")
    data = one_region(
        [a, b],
        health_check={"interval": "1h", "timeout": "500ms"},
        outlier_detection={"consecutive_failures": 1, "base_ejection_time": "60s"},
    )
    async with supervised(write_config(data), workers=2) as proxy:
        a.force_status = 503  # live traffic fails on eu-a; no active check re-admits it
        assert await get_fresh(http, f"{proxy.proxy_url}/whoami", 40) == [(200, "eu-b")] * 40
        m = await proxy.metrics(http)
        assert total(m, "geoproxy_geode_ejected", geode="eu-a") == 1
        assert total(m, "geoproxy_geode_up", geode="eu-a") == 0
        assert total(m, "geoproxy_geode_up", geode="eu-b") == 1
        async with http.get(f"{proxy.admin_url}/geodes") as resp:
            listed = {g["name"]: g for g in (await resp.json())["geodes"]}
        assert (listed["eu-a"]["state"], listed["eu-a"]["takes_traffic"]) == ("ejected", False)
        assert listed["eu-b"]["state"] == "up"
        async with http.get(f"{proxy.admin_url}/status") as resp:
            page = await resp.text()
        assert re.search(
            r"<tr class=ejected><td>eu-a</td><td>eu-west</td><td>EJECTED by a "
            r"worker</td><td>-</td>",
            page,
        ), page
        assert "1 of 2 geodes take traffic" in page


async def test_a_second_instance_on_the_same_port_fails_before_starting_workers(
    geode_factory: GeodeFactory, write_config: Callable[..., Path], tmp_path: Path
) -> None:
    eu = await geode_factory("eu-1", "eu-west")
    async with supervised(write_config(one_region([eu])), workers=2) as first:
        port = int(first.proxy_url.rsplit(":", 1)[1])
        data = one_region([eu])
        data["listen"]["proxy"]["port"] = port  # the admin port stays free (0)
        second = write_config(data, name="second.yaml")
        async with spawned(second) as proc, asyncio.timeout(20):
            out = (await proc.communicate())[0].decode()
        assert proc.returncode == 1
        assert f"cannot listen for proxy on 127.0.0.1:{port}: Address already in use" in out
        assert "starting 2 workers" not in out


async def test_a_hung_worker_is_killed_and_started_again(
    geode_factory: GeodeFactory, write_config: Callable[..., Path], http: aiohttp.ClientSession
) -> None:
    eu = await geode_factory("eu-1", "eu-west")
    async with supervised(write_config(one_region([eu])), workers=2) as proxy:
        os.kill(proxy.pids[1], signal.SIGSTOP)
        for _ in range(3):  # each scrape waits its 2 s for the stopped worker
            await proxy.metrics(http)
        await proxy.wait_for(r"worker 1 \(pid \d+\) has not answered for 3 rounds; killing it")
        await proxy.wait_for(r"worker 1 \(pid \d+\) exited unexpectedly \(killed by SIGKILL\)")
        await until_workers_serve(proxy, http, 2)
        assert await get_fresh(http, f"{proxy.proxy_url}/whoami", 40) == [(200, "eu-1")] * 40
        assert total(await proxy.metrics(http), "geoproxy_workers") == 2


# -- stop races (systemd's KillMode=control-group signals every process) -----------------


@pytest.mark.parametrize("order", ["at once", "workers first"])
async def test_an_idle_fleet_signalled_together_stops_cleanly(
    order: str, geode_factory: GeodeFactory, write_config: Callable[..., Path]
) -> None:
    """Idle workers drain in a moment and close their channel before the supervisor
    tells them to stop: it must not send them a SIGTERM then (their second signal). And a
    worker that exits on its own SIGTERM just before the supervisor gets its own is no
    crash: not logged as one, not restarted."""
    eu = await geode_factory("eu-1", "eu-west")
    path = write_config(one_region([eu]))
    for _ in range(3 if order == "at once" else 1):  # the race took 8 runs in 10
        async with supervised(path, workers=2) as proxy:
            if order == "at once":
                for pid in (proxy.proc.pid, *proxy.pids):
                    with contextlib.suppress(ProcessLookupError):  # gone already: fine too
                        os.kill(pid, signal.SIGTERM)
            else:
                for pid in proxy.pids:
                    os.kill(pid, signal.SIGTERM)
                async with asyncio.timeout(10):
                    while any(alive(pid) for pid in proxy.pids):  # noqa: ASYNC110
                        await asyncio.sleep(0.005)
                proxy.proc.send_signal(signal.SIGTERM)
            assert await proxy.stop(None) == 0
        for said in ("second signal", "stopped with", "exited unexpectedly", "Traceback"):
            assert said not in proxy.output, proxy.output


async def test_a_stop_during_start_up_is_a_clean_stop(
    geode_factory: GeodeFactory, write_config: Callable[..., Path]
) -> None:
    """SIGTERM to the supervisor and its workers while the workers are still starting:
    exit code 0 and no error (a worker's exit or its closed channel is the stop's doing)."""
    eu = await geode_factory("eu-1", "eu-west")
    path = write_config(one_region([eu]))
    for _ in range(3):
        async with spawned(path) as proc, asyncio.timeout(20):
            assert proc.stdout is not None
            while b"starting 2 workers" not in await proc.stdout.readline():
                pass
            while len(kids := children(proc.pid)) < 2:  # noqa: ASYNC110 -- bounded above
                await asyncio.sleep(0.005)
            for pid in (proc.pid, *kids):
                with contextlib.suppress(ProcessLookupError):  # gone already: fine too
                    os.kill(pid, signal.SIGTERM)
            out = (await proc.communicate())[0].decode()
        assert proc.returncode == 0, out
        for said in (" ERROR ", "control channel broken", "Traceback"):
            assert said not in out, out


async def test_a_restarted_worker_that_never_gets_ready_is_killed_and_started_again(
    geode_factory: GeodeFactory, write_config: Callable[..., Path], http: aiohttp.ClientSession
) -> None:
    eu = await geode_factory("eu-1", "eu-west")
    env = {"GEOPROXY_WORKER_START_TIMEOUT": "5"}  # the first start too: not too short
    async with supervised(write_config(one_region([eu])), workers=2, env=env) as proxy:
        os.kill(proxy.pids[0], signal.SIGKILL)

        def replacement() -> list[int]:
            return [p for p in children(proxy.proc.pid) if p not in proxy.pids and is_worker(p)]

        async with asyncio.timeout(10):
            while not (new := replacement()):  # noqa: ASYNC110 -- a bounded poll
                await asyncio.sleep(0.002)
        (hung,) = new
        os.kill(hung, signal.SIGSTOP)  # before it could say it is ready
        await proxy.wait_for(rf"worker 0 \(pid {hung}\) did not start within 5s; killing it")
        await proxy.wait_for("worker 0 .* exited unexpectedly", count=2)
        async with asyncio.timeout(10):
            while len(set(children(proxy.proc.pid)) - {hung, *proxy.pids}) < 1:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        url = f"{proxy.proxy_url}/whoami"
        async with asyncio.timeout(10):
            while await get_fresh(http, url, 20) != [(200, "eu-1")] * 20:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        assert not alive(hung)
        assert await proxy.stop() == 0
