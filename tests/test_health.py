"""Geode health: the HealthBoard state machine (table-driven), one round of checks against
real servers on loopback, and the run loop (bounded waits, cancelled and awaited)."""

from __future__ import annotations

import asyncio
import ssl
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from geoproxy import __version__
from geoproxy.config import loader as config_mod
from geoproxy.config.values import Geode, HealthCheck
from geoproxy.health.board import GeodeHealth, HealthBoard
from geoproxy.health.checker import HealthChecker

from conftest import FakeGeode, GeodeFactory, base_config, need_binary

WriteConfig = Callable[..., Path]

# --- HealthBoard: the state machine -------------------------------------------------------


def geode(name: str, rise: int = 2, fall: int = 3) -> Geode:
    check = HealthCheck(healthy_threshold=rise, unhealthy_threshold=fall)
    return Geode(name, "eu-west", URL(f"http://{name}.test"), 1, check)


T, F = True, False

# (rise, fall, check results, healthy after each check, transitions seen by hooks)
STATE_CASES: list[tuple[int, int, list[bool], list[bool], list[bool]]] = [
    (2, 3, [T], [T], [T]),
    (5, 3, [T], [T], [T]),
    (2, 3, [F], [F], []),
    (2, 3, [F, T, T], [F, F, T], [T]),
    (2, 3, [T, F, F, F], [T, T, T, F], [T, F]),
    (2, 3, [T, F, F, T, F, F, F], [T, T, T, T, T, T, F], [T, F]),
    (2, 3, [T, F, F, F, T, F, T, T], [T, T, T, F, F, F, F, T], [T, F, T]),
    (3, 1, [T, F, T, T, T], [T, F, F, F, T], [T, F, T]),
    (1, 1, [T, F, T, F], [T, F, T, F], [T, F, T, F]),
    (2, 3, [T] * 5, [T] * 5, [T]),
    (2, 3, [F] * 5, [F] * 5, []),
    (2, 1, [F, F, F, T, F, T, T, T], [F, F, F, F, F, F, T, T], [T]),
]


@pytest.mark.parametrize(
    ("rise", "fall", "results", "healthy_after", "transitions"),
    STATE_CASES,
    ids=[
        "first-pass-at-start-up-turns-healthy",
        "first-pass-at-start-up-ignores-a-high-healthy-threshold",
        "first-failure-at-start-up-stays-unhealthy-without-a-hook",
        "after-a-failed-start-needs-healthy-threshold-passes",
        "needs-unhealthy-threshold-consecutive-failures-to-go",
        "a-pass-resets-the-failure-count",
        "a-failure-resets-the-pass-count",
        "comes-back-after-healthy-threshold-passes",
        "thresholds-of-one-flip-on-every-change",
        "steady-passes-flip-once",
        "steady-failures-never-flip",
        "a-failure-between-passes-restarts-the-climb",
    ],
)
def test_health_board_flips_at_thresholds(
    rise: int, fall: int, results: list[bool], healthy_after: list[bool], transitions: list[bool]
) -> None:
    board = HealthBoard([geode("g", rise, fall), geode("bystander")])
    board.record("bystander", True, 0.01, None)
    seen: list[tuple[str, bool]] = []
    board.on_transition.append(lambda s: seen.append((s.geode.name, s.healthy)))
    state = board.states["g"]
    for i, (ok, expected) in enumerate(zip(results, healthy_after, strict=True)):
        board.record("g", ok, 0.01 if ok else None, None if ok else "boom")
        assert state.healthy is expected, f"after check {i + 1}"
        assert board.healthy == {"bystander"} | ({"g"} if expected else set()), f"check {i + 1}"
    assert seen == [("g", t) for t in transitions]


@pytest.mark.parametrize(
    ("results", "passes", "failures"),
    [([T, T, T], 3, 0), ([T, T, F], 0, 1), ([F, F, T], 1, 0), ([T, F, F, F, F], 0, 4)],
    ids=["three-passes", "failure-resets-passes", "pass-resets-failures", "failures-keep-counting"],
)
def test_health_board_counts_consecutive_results(
    results: list[bool], passes: int, failures: int
) -> None:
    board = HealthBoard([geode("g")])
    for ok in results:
        board.record("g", ok, None, None)
    state = board.states["g"]
    assert (state.passes, state.failures) == (passes, failures)


def test_health_board_records_the_last_check() -> None:
    board = HealthBoard([geode("g")])
    state = board.states["g"]
    assert (state.checked, state.healthy, state.last_check) == (False, False, None)
    board.record("g", False, None, "connect failed: refused")
    assert state.checked
    assert state.last_check is not None
    assert (state.last_latency, state.last_error) == (None, "connect failed: refused")
    board.record("g", True, 0.25, None)
    assert (state.last_latency, state.last_error) == (0.25, None)
    assert state.as_dict()["consecutive_passes"] == 1


def test_every_transition_hook_is_called_once_per_flip() -> None:
    board = HealthBoard([geode("g", rise=1, fall=1)])
    first: list[GeodeHealth] = []
    second: list[GeodeHealth] = []
    board.on_transition.extend([first.append, second.append])
    for ok in [T, T, F, F, T]:
        board.record("g", ok, None, None)
    assert len(first) == len(second) == 3
    assert all(s is board.states["g"] for s in first)


# --- HealthChecker.check_once: real servers -----------------------------------------------


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def load_geodes(
    write_config: WriteConfig, entries: list[dict[str, Any]], **health: Any
) -> tuple[Geode, ...]:
    check = {
        "interval": "1s",
        "timeout": "500ms",
        "jitter": "0s",
        "healthy_threshold": 2,
        "unhealthy_threshold": 2,
        **health,
    }
    return config_mod.load(write_config(base_config(entries, health_check=check))).geodes


def entry(fake: FakeGeode | str, name: str = "g1", **extra: Any) -> dict[str, Any]:
    url = fake if isinstance(fake, str) else fake.url
    return {"name": name, "region": "eu-west", "url": url, **extra}


class HeldHealth:
    """A tiny app of our own whose /health answers after ``delay`` seconds, or (``delay``
    None) only once ``release`` is set; it notes each request's User-Agent."""

    def __init__(self) -> None:
        self.delay: float | None = None
        self.release = asyncio.Event()
        self.user_agents: list[str | None] = []
        self.app = web.Application()
        self.app.router.add_get("/health", self.health)
        self.server: TestServer | None = None

    async def health(self, request: web.Request) -> web.Response:
        self.user_agents.append(request.headers.get("User-Agent"))
        if self.delay is None:
            await self.release.wait()
        else:
            await asyncio.sleep(self.delay)
        return web.Response(text="ok")

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")


@pytest.fixture
async def held() -> AsyncIterator[HeldHealth]:
    app = HeldHealth()
    app.server = TestServer(app.app, host="127.0.0.1")
    await app.server.start_server()
    yield app
    app.release.set()  # let a held handler finish so the server closes at once
    await app.server.close()


async def test_check_once_passes_a_geode_answering_200(
    geode_factory: GeodeFactory, write_config: WriteConfig, session: aiohttp.ClientSession
) -> None:
    fake = await geode_factory("g1", "eu-west")
    board = HealthBoard(load_geodes(write_config, [entry(fake)]))
    assert not board.first_round_done
    await HealthChecker(board, session).check_once()
    state = board.states["g1"]
    assert (state.healthy, state.last_error, board.healthy) == (True, None, {"g1"})
    assert state.last_latency is not None
    assert 0 < state.last_latency < 0.5
    assert fake.hits["/health"] == 1
    assert board.first_round_done


@pytest.mark.parametrize(
    ("status", "expected_statuses", "error"),
    [
        (200, None, None),
        (202, None, None),
        (500, None, "unexpected status 500"),
        (503, None, "unexpected status 503"),
        (301, None, "unexpected status 301"),
        (404, None, "unexpected status 404"),
        (503, [200, 503], None),
        (200, ["500-599"], "unexpected status 200"),
    ],
    ids=[
        "200-passes",
        "any-2xx-passes-by-default",
        "500-fails",
        "503-fails",
        "redirect-fails-and-is-not-followed",
        "404-fails",
        "status-listed-in-expected-statuses-passes",
        "status-outside-expected-statuses-fails",
    ],
)
async def test_check_once_judges_status_against_expected_statuses(
    geode_factory: GeodeFactory,
    write_config: WriteConfig,
    session: aiohttp.ClientSession,
    status: int,
    expected_statuses: list[int | str] | None,
    error: str | None,
) -> None:
    fake = await geode_factory("g1", "eu-west")
    fake.health_status = status
    extra = {"expected_statuses": expected_statuses} if expected_statuses else {}
    board = HealthBoard(load_geodes(write_config, [entry(fake)], **extra))
    await HealthChecker(board, session).check_once()
    state = board.states["g1"]
    assert (state.healthy, state.last_error) == (error is None, error)
    assert state.last_latency is not None  # an answer, even a bad one, has a latency
    assert fake.hits["/health"] == 1


async def test_check_once_fails_a_geode_refusing_connections(
    dead_url: str, write_config: WriteConfig, session: aiohttp.ClientSession
) -> None:
    board = HealthBoard(load_geodes(write_config, [entry(dead_url)]))
    await HealthChecker(board, session).check_once()
    state = board.states["g1"]
    assert state.checked
    assert not state.healthy
    assert state.last_error is not None
    assert state.last_error.startswith("connect failed: "), state.last_error
    assert state.last_latency is None
    assert board.healthy == set()
    assert board.first_round_done


async def test_check_once_says_a_geode_host_cannot_be_resolved(
    write_config: WriteConfig, session: aiohttp.ClientSession
) -> None:
    """An unresolvable host is named, not ``connect failed: Unknown error -2``."""
    url = "http://no-such-geode.invalid:8080"
    board = HealthBoard(load_geodes(write_config, [entry(url)]))
    await HealthChecker(board, session).check_once()
    error = board.states["g1"].last_error
    assert error is not None
    assert error.startswith("cannot resolve host no-such-geode.invalid: "), error
    assert "Unknown error" not in error


@pytest.fixture
async def self_signed_geode(tmp_path: Path) -> AsyncIterator[str]:
    """An https geode whose certificate nobody signed: its URL."""
    openssl = need_binary("openssl")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    proc = await asyncio.create_subprocess_exec(
        openssl,
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        str(key),
        "-out",
        str(cert),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert await proc.wait() == 0
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/health", health)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = runner.addresses[0][1]
    yield f"https://127.0.0.1:{port}"
    await runner.cleanup()


async def test_check_once_says_a_geodes_certificate_failed_verification(
    self_signed_geode: str, write_config: WriteConfig, session: aiohttp.ClientSession
) -> None:
    """Not ``Operation not permitted``: the verification error, as OpenSSL words it."""
    board = HealthBoard(load_geodes(write_config, [entry(self_signed_geode)]))
    await HealthChecker(board, session).check_once()
    error = board.states["g1"].last_error
    assert error is not None
    assert error.startswith("certificate verify failed: self-signed certificate"), error


async def test_check_once_fails_a_geode_slower_than_the_timeout(
    held: HeldHealth, write_config: WriteConfig, session: aiohttp.ClientSession
) -> None:
    board = HealthBoard(load_geodes(write_config, [entry(held.url)], timeout="200ms"))
    loop = asyncio.get_running_loop()
    start = loop.time()
    async with asyncio.timeout(5):
        await HealthChecker(board, session).check_once()
    elapsed = loop.time() - start
    state = board.states["g1"]
    assert (state.healthy, state.last_error, state.last_latency) == (
        False,
        "timeout after 0.2s",
        None,
    )
    assert 0.2 <= elapsed < 2
    assert len(held.user_agents) == 1  # it did reach the geode


async def test_check_once_records_latency_of_a_slow_answer(
    held: HeldHealth, write_config: WriteConfig, session: aiohttp.ClientSession
) -> None:
    held.delay = 0.15
    board = HealthBoard(load_geodes(write_config, [entry(held.url)], timeout="900ms"))
    await HealthChecker(board, session).check_once()
    state = board.states["g1"]
    assert state.healthy
    assert state.last_latency is not None
    assert 0.15 <= state.last_latency < 0.9
    assert held.user_agents == [f"geoproxy-health/{__version__}"]


async def test_check_once_uses_a_geodes_own_health_path(
    geode_factory: GeodeFactory, write_config: WriteConfig, session: aiohttp.ClientSession
) -> None:
    own = await geode_factory("own", "eu-west")
    plain = await geode_factory("plain", "us-east")
    own.health_status = plain.health_status = 500  # /health fails; /whoami answers 200
    entries = [entry(own, "own", health={"path": "/whoami"}), entry(plain, "plain")]
    board = HealthBoard(load_geodes(write_config, entries))
    await HealthChecker(board, session).check_once()
    assert (own.hits["/whoami"], own.hits["/health"]) == (1, 0)
    assert (plain.hits["/whoami"], plain.hits["/health"]) == (0, 1)
    assert board.healthy == {"own"}
    assert board.states["plain"].last_error == "unexpected status 500"


async def test_check_once_appends_health_path_to_a_geodes_base_path(
    geode_factory: GeodeFactory, write_config: WriteConfig, session: aiohttp.ClientSession
) -> None:
    fake = await geode_factory("g1", "eu-west")
    board = HealthBoard(load_geodes(write_config, [entry(fake.url + "/base/")]))
    await HealthChecker(board, session).check_once()
    assert fake.hits["/base/health"] == 1
    assert board.healthy == {"g1"}


async def test_check_once_checks_only_the_given_geodes(
    geode_factory: GeodeFactory, write_config: WriteConfig, session: aiohttp.ClientSession
) -> None:
    one = await geode_factory("one", "eu-west")
    two = await geode_factory("two", "us-east")
    geodes = load_geodes(write_config, [entry(one, "one"), entry(two, "two")])
    board = HealthBoard(geodes)
    await HealthChecker(board, session).check_once([geodes[1]])
    assert (one.hits["/health"], two.hits["/health"]) == (0, 1)
    assert (board.states["one"].checked, board.healthy) == (False, {"two"})


async def test_check_once_checks_geodes_concurrently(
    write_config: WriteConfig, session: aiohttp.ClientSession
) -> None:
    # Each /health answers only once the other has been asked: sequential checks time out.
    arrived = {"a": asyncio.Event(), "b": asyncio.Event()}

    def app_for(me: str, other: str) -> web.Application:
        async def health(request: web.Request) -> web.Response:
            arrived[me].set()
            try:
                async with asyncio.timeout(1):
                    await arrived[other].wait()
            except TimeoutError:
                return web.Response(status=500)
            return web.Response(text="ok")

        app = web.Application()
        app.router.add_get("/health", health)
        return app

    servers = [
        TestServer(app_for("a", "b"), host="127.0.0.1"),
        TestServer(app_for("b", "a"), host="127.0.0.1"),
    ]
    for server in servers:
        await server.start_server()
    try:
        urls = [str(s.make_url("")).rstrip("/") for s in servers]
        geodes = load_geodes(write_config, [entry(urls[0], "a"), entry(urls[1], "b")])
        board = HealthBoard(geodes)
        await HealthChecker(board, session).check_once()
    finally:
        for server in servers:
            await server.close()
    assert board.healthy == {"a", "b"}


# --- HealthChecker.run: the loop ----------------------------------------------------------


class WatchedBoard(HealthBoard):
    """A HealthBoard that counts recorded checks and wakes waiters after each one."""

    def __init__(self, geodes: Iterable[Geode]) -> None:
        super().__init__(geodes)
        self.records: Counter[str] = Counter()
        self._recorded = asyncio.Event()

    def record(self, name: str, ok: bool, latency: float | None, error: str | None) -> None:
        super().record(name, ok, latency, error)
        self.records[name] += 1
        self._recorded.set()

    async def wait_until(self, condition: Callable[[], bool], timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not condition():
                self._recorded.clear()
                await self._recorded.wait()


FAST = {"interval": "100ms", "timeout": "80ms", "jitter": "0s"}


async def test_run_rechecks_a_geode_until_it_comes_back(
    geode_factory: GeodeFactory, write_config: WriteConfig, session: aiohttp.ClientSession
) -> None:
    fake = await geode_factory("g1", "eu-west")
    fake.health_status = 500
    board = WatchedBoard(load_geodes(write_config, [entry(fake)], **FAST))
    task = asyncio.create_task(HealthChecker(board, session).run())
    try:
        await board.wait_until(lambda: board.first_round_done and board.records["g1"] >= 2)
        assert board.healthy == set()
        assert board.states["g1"].last_error == "unexpected status 500"
        fake.health_status = 200
        await board.wait_until(lambda: "g1" in board.healthy)
        assert board.states["g1"].passes == 2  # after a failed start: healthy_threshold
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_run_checks_each_geode_at_its_own_interval(
    geode_factory: GeodeFactory, write_config: WriteConfig, session: aiohttp.ClientSession
) -> None:
    fast = await geode_factory("fast", "eu-west")
    slow = await geode_factory("slow", "us-east")
    entries = [entry(fast, "fast"), entry(slow, "slow", health={"interval": "1h"})]
    board = WatchedBoard(load_geodes(write_config, entries, **FAST))
    task = asyncio.create_task(HealthChecker(board, session).run())
    try:
        await board.wait_until(lambda: board.records["fast"] >= 4)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert fast.hits["/health"] >= 4
    assert slow.hits["/health"] == 1
    assert board.healthy == {"fast", "slow"}


async def test_a_hanging_geode_does_not_delay_the_checks_of_others(
    geode_factory: GeodeFactory,
    write_config: WriteConfig,
    session: aiohttp.ClientSession,
    held: HeldHealth,
) -> None:
    fast = await geode_factory("fast", "eu-west")
    held.delay = None  # /health never answers: every check runs into its 2 s timeout
    entries = [
        entry(fast, "fast"),
        entry(held.url, "hang", health={"interval": "3s", "timeout": "2s"}),
    ]
    board = WatchedBoard(load_geodes(write_config, entries, **FAST))
    checker = HealthChecker(board, session)
    # Start-up round over fast only: the hanging geode is due at once when run() starts.
    await checker.check_once([board.states["fast"].geode])
    task = asyncio.create_task(checker.run())
    try:
        before = board.records["fast"]
        # Within 1.5 s (less than the hanging check's timeout) fast is checked every 100 ms.
        await board.wait_until(lambda: board.records["fast"] >= before + 5, timeout=1.5)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_a_failing_hook_does_not_stop_health_checking(
    geode_factory: GeodeFactory,
    write_config: WriteConfig,
    session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = await geode_factory("g1", "eu-west")
    board = WatchedBoard(load_geodes(write_config, [entry(fake)], **FAST))
    calls = 0

    def broken_hook(state: Any, ok: bool, latency: float | None) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("bug in a metrics hook")

    board.on_check.append(broken_hook)
    task = asyncio.create_task(HealthChecker(board, session).run())
    try:
        await board.wait_until(lambda: calls >= 4)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert "health check of geode g1 failed unexpectedly" in caplog.text
