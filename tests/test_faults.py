"""Fault injection under load: real geode processes (tests/geode_server.py) that a test
kills, stops and restarts, a real ``geoproxy run`` process, and an async client sending a
bounded load over loopback (a few hundred requests per second for a few seconds).

Each test measures what happened (requests sent, failed, by status, detection and recovery
times), asserts the properties, and prints one line starting with ``FIGURES:``; see them
with ``pytest -s -k faults``. Assertions depend on timing only through generous bounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import statistics
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

GEODE_SCRIPT = Path(__file__).with_name("geode_server.py")
PROXY_READY = r"proxying on (http://\S+), admin on (http://\S+)"
GEODE_READY = r"geode \S+ ready on (http://\S+)"
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=10)

#: Fast active health checks: a dead geode is noticed after two failed checks (~0.2-0.6 s).
FAST_HEALTH = {
    "interval": "200ms",
    "timeout": "150ms",
    "jitter": "0s",
    "healthy_threshold": 2,
    "unhealthy_threshold": 2,
}
TWO_REGIONS = {"eu-west": {"fallback": ["us-east"]}, "us-east": {"fallback": ["eu-west"]}}
TWO_COUNTRIES = {"FR": "eu-west", "US": "us-east"}


@pytest.fixture(params=["fast", "coroutine", "public"])
def lane(request: pytest.FixtureRequest) -> str:
    """Every test here runs on both request paths (conftest.py's ``lane``)."""
    return str(request.param)


def now() -> float:
    return asyncio.get_running_loop().time()


def figures(test: str, **values: object) -> None:
    print(f"FIGURES: {test}: " + ", ".join(f"{k}={v}" for k, v in values.items()), flush=True)


def ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.0f}ms"


# -- processes ---------------------------------------------------------------------------


class Child:
    """A child process whose merged output is read all along (a full pipe would block it:
    the proxy logs every failed attempt)."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process) -> None:
        self.name = name
        self.proc = proc
        self.lines: list[str] = []
        self._more = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while raw := await self.proc.stdout.readline():
            self.lines.append(raw.decode(errors="replace"))
            self._more.set()
        self._more.set()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    async def wait_for(self, pattern: str, timeout: float = 20, since: int = 0) -> re.Match[str]:
        """The first output line from index ``since`` on that matches ``pattern``."""
        regex = re.compile(pattern)
        seen = since
        async with asyncio.timeout(timeout):
            while True:
                while seen < len(self.lines):
                    if m := regex.search(self.lines[seen]):
                        return m
                    seen += 1
                if self._reader.done():
                    raise AssertionError(f"{self.name} ended:\n{self.output[-4000:]}")
                self._more.clear()
                await self._more.wait()

    def send(self, sig: int) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(sig)

    async def wait(self, timeout: float = 15) -> int:
        async with asyncio.timeout(timeout):
            code = await self.proc.wait()
            await self._reader
        return code

    async def kill(self) -> None:
        self.send(signal.SIGKILL)
        await self.wait()


@dataclass
class GeodeProc:
    name: str
    region: str
    port: int
    post_log: Path
    child: Child

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def post_ids(self) -> Counter[str]:
        text = self.post_log.read_text() if self.post_log.exists() else ""
        return Counter(text.split())


@dataclass
class ProxyProc:
    url: str
    admin_url: str
    child: Child
    config: Path

    async def geodes(self, http: aiohttp.ClientSession) -> dict[str, dict[str, Any]]:
        async with http.get(self.admin_url + "/geodes") as resp:
            return {g["name"]: g for g in (await resp.json())["geodes"]}

    async def metric(self, http: aiohttp.ClientSession, name: str, **labels: str) -> float:
        async with http.get(self.admin_url + "/metrics") as resp:
            text = await resp.text()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return float(sample.value)
        return 0.0

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])


class Rig:
    """Starts geode and proxy processes; the fixture kills whatever is still running."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.children: list[Child] = []

    async def _spawn(self, name: str, *args: str) -> Child:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        child = Child(name, proc)
        self.children.append(child)
        return child

    async def geode(self, name: str, region: str, port: int = 0) -> GeodeProc:
        post_log = self.tmp_path / f"{name}.posts"
        child = await self._spawn(name, str(GEODE_SCRIPT), name, str(port), str(post_log))
        url = (await child.wait_for(GEODE_READY)).group(1)
        return GeodeProc(name, region, int(url.rsplit(":", 1)[1]), post_log, child)

    async def geodes(self, *specs: tuple[str, str]) -> list[GeodeProc]:
        return list(await asyncio.gather(*(self.geode(n, r) for n, r in specs)))

    async def restart(self, geode: GeodeProc) -> GeodeProc:
        """The same geode again, on the port its killed predecessor held."""
        return await self.geode(geode.name, geode.region, geode.port)

    async def proxy(self, data: dict[str, Any]) -> ProxyProc:
        path = self.tmp_path / "geoproxy.yaml"
        write_atomically(path, data)
        child = await self._spawn("geoproxy", "-m", "geoproxy", "run", "--config", str(path))
        m = await child.wait_for(PROXY_READY)
        return ProxyProc(m.group(1), m.group(2), child, path)

    async def close(self) -> None:
        for child in self.children:
            child.send(signal.SIGKILL)  # also ends a SIGSTOPped process
            with contextlib.suppress(TimeoutError):
                await child.wait(5)


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    rig = Rig(tmp_path)
    try:
        yield rig
    finally:
        await rig.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """The load client: no pool limit (the load bounds concurrency itself)."""
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=CLIENT_TIMEOUT
    ) as session:
        yield session


def proxy_config(
    geodes: Iterable[GeodeProc],
    regions: dict[str, Any] | None = None,
    countries: dict[str, str] | None = None,
    **sections: Any,
) -> dict[str, Any]:
    regions = TWO_REGIONS if regions is None else regions
    data: dict[str, Any] = {
        "listen": {
            "proxy": {"host": "127.0.0.1", "port": 0},
            "admin": {"host": "127.0.0.1", "port": 0},
        },
        "trusted_proxies": ["127.0.0.1/32"],
        "region_sources": ["cf-ipcountry"],
        "default_region": next(iter(regions)),
        "regions": regions,
        "countries": TWO_COUNTRIES if countries is None else countries,
        "geodes": [{"name": g.name, "region": g.region, "url": g.url} for g in geodes],
        "health_check": FAST_HEALTH,
        "forwarding": {"connect_timeout": "500ms", "response_timeout": "2s"},
        "access_log": "off",
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


def write_atomically(path: Path, data: dict[str, Any] | str) -> None:
    """Write a whole new file and rename it into place, as a deploy tool would."""
    text = data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# -- load --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Result:
    kind: str
    start: float  # loop time the request was sent
    end: float
    status: int | None  # None: no response head at all
    geode: str | None  # X-Geoproxy-Geode
    error: str | None  # the client's exception, if any (also after a response head)
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None

    @property
    def latency(self) -> float:
        return self.end - self.start

    @property
    def outcome(self) -> str:
        return self.error or str(self.status)


async def fetch(
    http: aiohttp.ClientSession,
    kind: str,
    method: str,
    url: str,
    headers: dict[str, str] | None = None,
    data: bytes | None = None,
) -> Result:
    start = now()
    status = geode = error = None
    body = b""
    got: dict[str, str] = {}
    try:
        async with http.request(method, url, headers=headers, data=data) as resp:
            status = resp.status
            geode = resp.headers.get("X-Geoproxy-Geode")
            got = {k: resp.headers[k] for k in ("Retry-After", "Content-Type") if k in resp.headers}
            body = await resp.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        error = type(exc).__name__
    return Result(kind, start, now(), status, geode, error, body, got)


def get_whoami(
    proxy: ProxyProc, *countries: str
) -> Callable[[aiohttp.ClientSession, int], Awaitable[Result]]:
    """GET /whoami as a client from each of ``countries`` in turn."""

    def send(http: aiohttp.ClientSession, i: int) -> Awaitable[Result]:
        country = countries[i % len(countries)]
        return fetch(http, country, "GET", proxy.url + "/whoami", headers={"CF-IPCountry": country})

    return send


class Load:
    """Requests at a steady ``rate`` from ``concurrency`` workers, at most ``limit`` of them
    and none started after ``seconds``; ``stop()`` ends it early."""

    def __init__(
        self,
        http: aiohttp.ClientSession,
        send: Callable[[aiohttp.ClientSession, int], Awaitable[Result]],
        rate: float,
        limit: int,
        seconds: float,
        concurrency: int = 20,
    ) -> None:
        self.http, self.send = http, send
        self.rate, self.limit, self.seconds, self.concurrency = rate, limit, seconds, concurrency
        self.results: list[Result] = []
        self._next = 0
        self._stopped = False
        self._workers: list[asyncio.Task[None]] = []
        self.t0 = 0.0

    def start(self) -> Load:
        self.t0 = now()
        self._workers = [asyncio.create_task(self._work()) for _ in range(self.concurrency)]
        return self

    async def _work(self) -> None:
        while not self._stopped and self._next < self.limit:
            i = self._next
            self._next += 1
            due = self.t0 + i / self.rate
            if due > self.t0 + self.seconds:
                return
            if due > now():
                await asyncio.sleep(due - now())
            if self._stopped:
                return
            self.results.append(await self.send(self.http, i))

    def stop(self) -> None:
        self._stopped = True

    async def done(self) -> list[Result]:
        async with asyncio.timeout(self.seconds + 15):
            await asyncio.gather(*self._workers)
        return sorted(self.results, key=lambda r: r.start)


async def run_until(t: float) -> None:
    if t > now():
        await asyncio.sleep(t - now())


async def eventually(
    check: Callable[[], Awaitable[bool] | bool], timeout: float = 10, interval: float = 0.01
) -> float:
    """Poll ``check`` until it holds; the loop time when it was first seen to hold."""
    async with asyncio.timeout(timeout):
        while True:
            result = check()
            if not isinstance(result, bool):
                result = await result
            if result:
                return now()
            await asyncio.sleep(interval)


def by_outcome(results: Iterable[Result]) -> dict[str, int]:
    return dict(sorted(Counter(r.outcome for r in results).items()))


def percentile(values: list[float], q: int) -> float:
    if len(values) < 2:
        return values[0] if values else 0.0
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


# -- scenarios ---------------------------------------------------------------------------


async def test_get_never_fails_and_no_post_reaches_two_geodes_when_a_geode_is_killed(
    rig: Rig, http: aiohttp.ClientSession
) -> None:
    """eu-1 is SIGKILLed under load. French GETs fail over to us-1 (a refused connect is
    always retried; so is an idempotent request whose connection died): none fails.
    French POSTs carry unique ids that the geodes log on arrival: none reaches two geodes."""
    eu, us = await rig.geodes(("eu-1", "eu-west"), ("us-1", "us-east"))
    proxy = await rig.proxy(proxy_config([eu, us]))

    def post(session: aiohttp.ClientSession, i: int) -> Awaitable[Result]:
        return fetch(
            session,
            f"post-{i}",
            "POST",
            f"{proxy.url}/echo?id=p{i}",
            headers={"CF-IPCountry": "FR"},
            data=b"x" * 512,
        )

    gets = Load(http, get_whoami(proxy, "FR"), rate=250, limit=1000, seconds=6).start()
    posts = Load(http, post, rate=50, limit=200, seconds=6, concurrency=5).start()
    await run_until(gets.t0 + 1.5)
    assert any(r.geode == "eu-1" for r in gets.results)
    killed = now()
    await eu.child.kill()

    async def state() -> dict[str, Any]:
        return (await proxy.geodes(http))["eu-1"]

    out_of_rotation = await eventually(lambda: _false(state(), "takes_traffic"), 5) - killed
    unhealthy = await eventually(lambda: _false(state(), "healthy"), 5) - killed
    get_results, post_results = await gets.done(), await posts.done()

    get_failed = [r for r in get_results if not r.ok]
    post_failed = [r for r in post_results if not r.ok]
    eu_ids, us_ids = eu.post_ids(), us.post_ids()
    twice = set(eu_ids) & set(us_ids)
    failovers = await proxy.metric(
        http, "geoproxy_failovers_total", from_geode="eu-1", to_geode="us-1"
    )
    figures(
        "geode_killed",
        sent=len(get_results) + len(post_results),
        get_sent=len(get_results),
        get_failed=len(get_failed),
        failovers_to_us_1=int(failovers),
        post_sent=len(post_results),
        post_failed=len(post_failed),
        post_outcomes=by_outcome(post_results),
        out_of_rotation_after=ms(out_of_rotation),
        unhealthy_after=ms(unhealthy),
        post_ids_on_two_geodes=len(twice),
    )

    assert get_failed == [], by_outcome(get_failed)
    assert {r.geode for r in get_results if r.start > killed + out_of_rotation} == {"us-1"}
    assert not twice, f"POSTs reached both geodes: {sorted(twice)}"
    assert max([*eu_ids.values(), *us_ids.values()]) == 1  # and none reached one twice
    for r in post_results:
        if r.ok:  # a POST answered by a geode was logged by that very geode
            assert "p" + r.kind.removeprefix("post-") in (eu_ids if r.geode == "eu-1" else us_ids)
    # A POST may fail only with 502 (its connection to eu-1 died and it is never replayed),
    # and only until eu-1 is out of rotation.
    assert {r.status for r in post_failed} <= {502}
    assert all(r.start < killed + out_of_rotation for r in post_failed)
    assert "Traceback" not in proxy.child.output


async def _false(state: Awaitable[dict[str, Any]], key: str) -> bool:
    return (await state)[key] is False


async def test_hung_geode_gets_504_within_the_response_timeout_and_other_regions_are_unaffected(
    rig: Rig, http: aiohttp.ClientSession
) -> None:
    """ap-1 is SIGSTOPped for 1.5 s: the kernel still accepts connections, nothing answers.
    Its region has no fallback, so its clients get 504 after ``response_timeout``; French
    and American clients see no failure and no slowdown. ap-1's own health checks are slow
    and passive ejection is off here, so every request meets the hang (rather than the 503
    that health would soon give)."""
    response_timeout = 0.5
    eu, us, ap = await rig.geodes(
        ("eu-1", "eu-west"), ("us-1", "us-east"), ("ap-1", "ap-northeast")
    )
    data = proxy_config(
        [eu, us, ap],
        regions={**TWO_REGIONS, "ap-northeast": None},
        countries={**TWO_COUNTRIES, "JP": "ap-northeast"},
        forwarding={"response_timeout": f"{response_timeout * 1000:.0f}ms"},
        outlier_detection={"consecutive_failures": 0},
    )
    data["geodes"][2]["health"] = {"interval": "5s", "timeout": "1s"}
    proxy = await rig.proxy(data)

    others = Load(http, get_whoami(proxy, "FR", "US"), rate=250, limit=1000, seconds=5).start()
    hung = Load(
        http, get_whoami(proxy, "JP"), rate=40, limit=160, seconds=4, concurrency=40
    ).start()
    await run_until(others.t0 + 1.0)
    stopped = now()
    ap.child.send(signal.SIGSTOP)
    await run_until(stopped + 1.5)
    ap.child.send(signal.SIGCONT)
    resumed = now()
    other_results, jp_results = await others.done(), await hung.done()

    # JP requests sent while ap-1 was stopped (and not answered before it resumed). The
    # 0.25 s margin: a starved proxy's timer may fire late, when ap-1 answers again.
    during = [r for r in jp_results if stopped + 0.05 < r.start < resumed - response_timeout - 0.25]
    after = [r for r in jp_results if r.start > resumed + 0.3]
    base = [r.latency for r in other_results if r.start < stopped]
    hang = [r.latency for r in other_results if stopped <= r.start <= resumed]
    other_failed = [r for r in other_results if not r.ok]
    latencies = [r.latency for r in during]
    figures(
        "geode_hangs",
        sent=len(other_results) + len(jp_results),
        other_sent=len(other_results),
        other_failed=len(other_failed),
        other_p99_before=ms(percentile(base, 99)),
        other_p99_during=ms(percentile(hang, 99)),
        hung_region_sent_during_hang=len(during),
        hung_outcomes=by_outcome(during),
        hung_latency_min=ms(min(latencies)),
        hung_latency_max=ms(max(latencies)),
        hung_region_after_resume=by_outcome(after),
    )

    assert other_failed == [], by_outcome(other_failed)
    assert len(hang) > 100 and percentile(hang, 99) < 1.0
    assert len(during) >= 20
    assert {r.status for r in during} == {504}
    for r in during:
        assert json.loads(r.body)["error"]["code"] == "gateway_timeout"
        assert response_timeout - 0.05 < r.latency < response_timeout + 0.5
    assert after and all(r.ok and r.geode == "ap-1" for r in after)
    assert "Traceback" not in proxy.child.output


async def test_geode_reset_mid_body_reaches_the_client_as_an_aborted_response(
    rig: Rig, http: aiohttp.ClientSession
) -> None:
    """A geode sends a response head and part of its body, then resets the connection: with
    a Content-Length, chunked, and delimited only by the connection's end. The client must
    see an aborted response every time, never a clean short one; other requests succeed."""
    eu, us = await rig.geodes(("eu-1", "eu-west"), ("us-1", "us-east"))
    proxy = await rig.proxy(proxy_config([eu, us]))
    modes = ("length", "chunked", "close")

    def reset(session: aiohttp.ClientSession, i: int) -> Awaitable[Result]:
        mode = modes[i % len(modes)]
        return fetch(
            session, mode, "GET", f"{proxy.url}/reset?mode={mode}", headers={"CF-IPCountry": "FR"}
        )

    normal = Load(http, get_whoami(proxy, "FR", "US"), rate=200, limit=800, seconds=5).start()
    resets = Load(http, reset, rate=75, limit=300, seconds=5).start()
    normal_results, reset_results = await normal.done(), await resets.done()

    normal_failed = [r for r in normal_results if not r.ok]
    per_mode = {m: by_outcome(r for r in reset_results if r.kind == m) for m in modes}
    figures(
        "geode_resets_mid_body",
        sent=len(normal_results) + len(reset_results),
        normal_failed=len(normal_failed),
        resets_sent=len(reset_results),
        reset_outcomes=per_mode,
    )

    assert normal_failed == [], by_outcome(normal_failed)
    assert len(reset_results) == 300
    clean = [r for r in reset_results if r.error is None]
    assert clean == [], f"clean short responses: {[(r.kind, len(r.body)) for r in clean[:5]]}"
    for r in reset_results:
        assert r.status == 200 and r.geode == "eu-1"  # the head came through, then the abort
        assert r.error == "ClientPayloadError", (r.kind, r.error)
    assert "Traceback" not in proxy.child.output


async def test_all_geodes_down_gives_503_json_with_retry_after_and_recovers_when_one_returns(
    rig: Rig, http: aiohttp.ClientSession
) -> None:
    """Both geodes are SIGKILLed under load. Once health notices, every request gets a 503
    JSON error with Retry-After (before that, 502: no geode could be reached). eu-1 is then
    started again on its port, and requests succeed again once it passes its checks."""
    eu, us = await rig.geodes(("eu-1", "eu-west"), ("us-1", "us-east"))
    proxy = await rig.proxy(proxy_config([eu, us]))
    load = Load(http, get_whoami(proxy, "FR", "US"), rate=250, limit=1500, seconds=8).start()
    await run_until(load.t0 + 1.0)
    killed = now()
    await asyncio.gather(eu.child.kill(), us.child.kill())

    def first(status: int, after: float) -> Result | None:
        return next((r for r in load.results if r.status == status and r.start > after), None)

    await eventually(lambda: first(503, killed) is not None, 5)
    first_503 = first(503, killed)
    assert first_503 is not None
    await run_until(first_503.end + 1.2)
    restarting = now()
    eu = await rig.restart(eu)
    back = now()  # the geode process listens again
    await eventually(lambda: first(200, back) is not None, 5)
    first_200 = first(200, back)
    assert first_200 is not None
    await run_until(first_200.end + 1.5)
    load.stop()
    results = await load.done()

    before = [r for r in results if r.end < killed]
    transition = [r for r in results if killed <= r.end and r.start <= first_503.end]
    down = [r for r in results if first_503.end < r.start < back]
    recovered = [r for r in results if r.start > first_200.end]
    figures(
        "all_geodes_down",
        sent=len(results),
        failed=sum(1 for r in results if not r.ok),
        before_kill=by_outcome(before),
        until_health_noticed=by_outcome(transition),
        while_down=by_outcome(down),
        after_recovery=by_outcome(recovered),
        detection=ms(first_503.end - killed),
        restart=ms(back - restarting),
        recovery=ms(first_200.end - back),
    )

    assert before and all(r.ok for r in before)
    assert {r.outcome for r in transition} <= {"200", "502", "503"}
    assert len(down) > 50
    for r in down:
        assert r.status == 503, r
        assert r.headers["Content-Type"].startswith("application/json")
        assert int(r.headers["Retry-After"]) >= 1
        error = json.loads(r.body)["error"]
        assert error["code"] == "no_healthy_geode" and error["status"] == 503
    assert len(recovered) > 50 and all(r.ok and r.geode == "eu-1" for r in recovered)
    assert "Traceback" not in proxy.child.output


async def test_broken_config_reload_under_load_keeps_routing_and_counts_failures(
    rig: Rig, http: aiohttp.ClientSession
) -> None:
    """While traffic runs, the config file is replaced with invalid YAML, then with a
    config naming an unknown region, then restored: each broken file is logged and counted
    as a failed reload, the running config keeps serving, and no request fails."""
    eu, us = await rig.geodes(("eu-1", "eu-west"), ("us-1", "us-east"))
    good = proxy_config([eu, us], reload={"poll_interval": "200ms"})
    proxy = await rig.proxy(good)
    reloads = "geoproxy_config_reloads_total"

    async def count(result: str) -> float:
        return await proxy.metric(http, reloads, result=result)

    async def reaches(result: str, value: float) -> bool:
        return await count(result) == value

    load = Load(http, get_whoami(proxy, "FR", "US"), rate=250, limit=1250, seconds=6).start()
    await run_until(load.t0 + 1.0)
    started = now()
    write_atomically(proxy.config, "regions: {eu-west: [\ngeodes: }\n")
    await eventually(lambda: reaches("failure", 1), 5, 0.05)
    invalid_yaml = now() - started
    await proxy.child.wait_for(
        rf"{re.escape(str(proxy.config))}: reload \(config file "
        r"changed\) failed",
        5,
    )
    started = now()
    write_atomically(proxy.config, {**good, "countries": {"FR": "moon-base", "US": "us-east"}})
    await eventually(lambda: reaches("failure", 2), 5, 0.05)
    unknown_region = now() - started
    await proxy.child.wait_for(r"countries\.FR: unknown region 'moon-base'", 5)
    served = len(load.results)
    await eventually(lambda: len(load.results) >= served + 100, 5)  # under the broken file
    write_atomically(proxy.config, good)
    await eventually(lambda: reaches("success", 1), 5, 0.05)
    results = await load.done()

    failed = [r for r in results if not r.ok]
    routes = Counter((r.kind, r.geode) for r in results)
    figures(
        "broken_config_reload",
        sent=len(results),
        failed=len(failed),
        routes=dict(routes),
        failed_reloads=int(await count("failure")),
        good_reloads=int(await count("success")),
        invalid_yaml_noticed=ms(invalid_yaml),
        unknown_region_noticed=ms(unknown_region),
    )

    assert failed == [], by_outcome(failed)
    assert set(routes) == {("FR", "eu-1"), ("US", "us-1")}  # routing never changed
    assert await count("failure") == 2
    assert await count("success") == 1
    assert "Traceback" not in proxy.child.output


async def test_reload_moving_a_country_under_load_routes_it_to_the_new_region_without_errors(
    rig: Rig, http: aiohttp.ClientSession
) -> None:
    """Under load, FR moves from eu-west to us-east by an atomic file swap (noticed by the
    content poll), then back by a file change plus SIGHUP (the first reload turned polling
    off, so only the signal can apply it). No request fails; after each reload every French
    request goes to the new region's geode."""
    eu, us = await rig.geodes(("eu-1", "eu-west"), ("us-1", "us-east"))
    first = proxy_config([eu, us], reload={"poll_interval": "200ms"})
    proxy = await rig.proxy(first)
    moved = {
        **first,
        "countries": {"FR": "us-east", "US": "us-east"},
        "reload": {"poll_interval": "0s"},
    }
    back = {**moved, "countries": TWO_COUNTRIES}

    async def reloaded(n: int) -> bool:
        return await proxy.metric(http, "geoproxy_config_reloads_total", result="success") == n

    load = Load(http, get_whoami(proxy, "FR", "US"), rate=250, limit=1500, seconds=8).start()
    await run_until(load.t0 + 1.0)
    swapped = now()
    write_atomically(proxy.config, moved)
    applied = await eventually(lambda: reloaded(1), 5, 0.02)
    await run_until(applied + 0.5)
    write_atomically(proxy.config, back)
    with pytest.raises(TimeoutError):  # polling is off: no reload for 3 old poll intervals
        await eventually(lambda: reloaded(2), 0.6, 0.02)
    assert await reloaded(1)
    hup = now()
    proxy.child.send(signal.SIGHUP)
    applied_hup = await eventually(lambda: reloaded(2), 5, 0.02)
    await run_until(applied_hup + 1.5)
    load.stop()
    results = await load.done()

    failed = [r for r in results if not r.ok]
    fr = [r for r in results if r.kind == "FR"]
    phases = {
        "before": [r for r in fr if r.end < swapped],
        "moved": [r for r in fr if applied < r.start and r.end < hup],
        "after_sighup": [r for r in fr if r.start > applied_hup],
    }
    routes = {name: dict(Counter(r.geode for r in rs)) for name, rs in phases.items()}
    figures(
        "reload_moves_country",
        sent=len(results),
        failed=len(failed),
        fr_routes=routes,
        file_swap_applied_after=ms(applied - swapped),
        sighup_applied_after=ms(applied_hup - hup),
    )

    assert failed == [], by_outcome(failed)
    assert all(len(rs) > 30 for rs in phases.values()), {k: len(v) for k, v in phases.items()}
    assert routes == {
        "before": {"eu-1": len(phases["before"])},
        "moved": {"us-1": len(phases["moved"])},
        "after_sighup": {"eu-1": len(phases["after_sighup"])},
    }
    assert {r.geode for r in results if r.kind == "US"} == {"us-1"}
    assert "Traceback" not in proxy.child.output


async def test_sigterm_drains_in_flight_requests_refuses_new_connections_and_exits_0(
    rig: Rig, http: aiohttp.ClientSession
) -> None:
    """20 requests of 1.5 s are in flight at SIGTERM: /readyz turns 503 at once, new
    connections are refused, all 20 complete with 200, and the process exits 0 without
    waiting out the drain timeout."""
    (eu,) = await rig.geodes(("eu-1", "eu-west"))
    proxy = await rig.proxy(
        proxy_config(
            [eu],
            regions={"eu-west": None},
            countries={"FR": "eu-west"},
            forwarding={"response_timeout": "5s"},
            shutdown={"drain_timeout": "5s"},
        )
    )
    async with http.get(proxy.admin_url + "/readyz") as resp:
        assert resp.status == 200

    async def slow_in_flight() -> int:
        async with http.get(eu.url + "/stats") as resp:
            return int((await resp.json())["slow_in_flight"])

    async def readyz_503() -> bool:
        async with http.get(proxy.admin_url + "/readyz") as resp:
            return resp.status == 503

    async def refused() -> bool:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        except ConnectionRefusedError:
            return True
        writer.close()
        return False

    sent = now()
    url, fr = proxy.url + "/slow?delay=1.5", {"CF-IPCountry": "FR"}
    slow = [asyncio.create_task(fetch(http, "slow", "GET", url, headers=fr)) for _ in range(20)]
    await eventually(lambda: _equals(slow_in_flight(), 20), 5)
    term = now()
    proxy.child.send(signal.SIGTERM)
    not_ready = await eventually(readyz_503, 2, 0.005) - term
    refusing = await eventually(refused, 2, 0.005) - term
    results = await asyncio.gather(*slow)
    code = await proxy.child.wait(10)
    exited = now() - term

    figures(
        "sigterm_drain",
        sent=len(results),
        failed=sum(1 for r in results if not r.ok),
        readyz_503_after=ms(not_ready),
        new_connections_refused_after=ms(refusing),
        in_flight_done_after=ms(max(r.end for r in results) - term),
        exit_code=code,
        exited_after=ms(exited),
    )

    assert [r.outcome for r in results] == ["200"] * 20
    assert all(r.geode == "eu-1" for r in results)
    assert code == 0
    assert not_ready < 0.5
    assert refusing < 1.0 and term + refusing < min(r.end for r in results)
    assert min(r.end for r in results) > sent + 1.5  # they really were in flight
    assert exited < 5  # done when the requests were, not at the drain timeout
    assert "Traceback" not in proxy.child.output


async def _equals(value: Awaitable[int], expected: int) -> bool:
    return await value == expected
