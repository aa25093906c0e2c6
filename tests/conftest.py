"""Shared fixtures: real geode servers on loopback, real proxies, real .mmdb files."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import socket
import struct
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from geoproxy.config import loader as config_mod
from geoproxy.config.values import Listener
from geoproxy.process.app import Gateway
from geoproxy.process.server import make_proxy_runner, start_site
from geoproxy.proxy import compat
from geoproxy.routing.geoip import GeoLookup


class FakeGeode:
    """A real aiohttp app standing in for a stamp, with hit counters.

    /health            status from ``health_status`` (200 by default)
    /whoami            the geode's name
    /echo              method, headers and a digest of the streamed request body
    /stream?size=&chunk=  ``size`` bytes in chunks, streamed
    /status/{code}     that status
    /slow?delay=       answers after ``delay`` seconds
    /reset             sends part of a long body, then aborts the connection
    /gzip              a gzip-encoded body (must pass through undecoded)
    /set-cookie        sets a cookie
    /hop-headers       a response carrying hop-by-hop headers
    /hsts              a response with its own Strict-Transport-Security (max-age=60)
    /home/{region}     names the user's home region (``Geoproxy-Home``), as a stamp does
    ``force_status``   when set, /whoami and /echo answer with it (after reading the body)
    ``delay``          seconds /whoami waits before it answers (a slowed-down geode)
    ``headers``        extra response headers of /whoami (a load report, say)
    """

    def __init__(self, name: str, region: str) -> None:
        self.name = name
        self.region = region
        self.health_status = 200
        self.force_status: int | None = None
        self.delay = 0.0
        self.headers: dict[str, str] = {}
        self.hits: Counter[str] = Counter()
        self.last_headers: dict[str, list[str]] = {}
        self.server: TestServer | None = None
        self.app = web.Application()
        self.app.router.add_get("/health", self.health)
        self.app.router.add_route("*", "/whoami", self.whoami)
        self.app.router.add_route("*", "/echo", self.echo)
        self.app.router.add_get("/stream", self.stream)
        self.app.router.add_get("/bytes", self.bytes_)
        self.app.router.add_route("*", "/status/{code}", self.status)
        self.app.router.add_route("*", "/slow", self.slow)
        self.app.router.add_get("/reset", self.reset)
        self.app.router.add_get("/gzip", self.gzip)
        self.app.router.add_get("/set-cookie", self.set_cookie)
        self.app.router.add_get("/hop-headers", self.hop_headers)
        self.app.router.add_get("/hsts", self.hsts)
        self.app.router.add_route("*", "/home/{region}", self.home)
        self.app.router.add_get("/ws", self.websocket)
        self.app.router.add_get("/sse", self.sse)
        self.sse_gate = asyncio.Event()  # /sse sends its second event once this is set
        self.ws_closed: list[int | None] = []  # close codes this geode's /ws received
        self.app.router.add_route("*", "/{tail:(?s:.*)}", self.whoami)

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")

    def _note(self, request: web.Request) -> None:
        self.hits[request.path] += 1
        headers: dict[str, list[str]] = {}
        for k, v in request.headers.items():
            headers.setdefault(k.lower(), []).append(v)
        self.last_headers = headers

    async def health(self, request: web.Request) -> web.Response:
        self.hits["/health"] += 1
        return web.json_response({"geode": self.name}, status=self.health_status)

    async def whoami(self, request: web.Request) -> web.Response:
        self._note(request)
        await request.read()
        if self.delay:
            await asyncio.sleep(self.delay)
        return web.json_response(
            {"geode": self.name, "path": request.raw_path},
            status=self.force_status or 200,
            headers=self.headers,
        )

    async def echo(self, request: web.Request) -> web.Response:
        self._note(request)
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            size += len(chunk)
        return web.json_response(
            {
                "geode": self.name,
                "method": request.method,
                "size": size,
                "sha256": digest.hexdigest(),
                "headers": self.last_headers,
            },
            status=self.force_status or 200,
        )

    async def stream(self, request: web.Request) -> web.StreamResponse:
        self._note(request)
        size = int(request.query.get("size", "1024"))
        chunk = int(request.query.get("chunk", "65536"))
        resp = web.StreamResponse()
        resp.content_type = "application/octet-stream"
        await resp.prepare(request)
        block = b"x" * chunk
        sent = 0
        while sent < size:
            part = block[: min(chunk, size - sent)]
            await resp.write(part)
            sent += len(part)
        await resp.write_eof()
        return resp

    async def bytes_(self, request: web.Request) -> web.Response:
        """``size`` bytes (a repeating pattern) with a Content-Length."""
        self._note(request)
        size = int(request.query.get("size", "1024"))
        pattern = bytes(range(256))
        return web.Response(
            body=(pattern * (size // 256 + 1))[:size], content_type="application/octet-stream"
        )

    async def status(self, request: web.Request) -> web.Response:
        self._note(request)
        await request.read()
        code = int(request.match_info["code"])
        return web.json_response({"geode": self.name, "status": code}, status=code)

    async def slow(self, request: web.Request) -> web.Response:
        self._note(request)
        await asyncio.sleep(float(request.query.get("delay", "1")))
        return web.json_response({"geode": self.name})

    async def reset(self, request: web.Request) -> web.StreamResponse:
        self._note(request)
        resp = web.StreamResponse(headers={"Content-Length": "100000"})
        await resp.prepare(request)
        await resp.write(b"y" * 1000)
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()
        return resp

    async def gzip(self, request: web.Request) -> web.Response:
        self._note(request)
        body = gzip.compress(b"hello from " + self.name.encode())
        return web.Response(
            body=body, headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"}
        )

    async def set_cookie(self, request: web.Request) -> web.Response:
        self._note(request)
        resp = web.json_response({"geode": self.name})
        resp.set_cookie("session", "secret-of-client-a")
        return resp

    async def hsts(self, request: web.Request) -> web.Response:
        self._note(request)
        return web.json_response(
            {"geode": self.name}, headers={"Strict-Transport-Security": "max-age=60"}
        )

    async def home(self, request: web.Request) -> web.Response:
        self._note(request)
        await request.read()
        home = {"Geoproxy-Home": request.match_info["region"]}
        return web.json_response({"geode": self.name}, headers=home)

    async def hop_headers(self, request: web.Request) -> web.Response:
        self._note(request)
        return web.json_response(
            {"geode": self.name},
            headers={
                "Keep-Alive": "timeout=5",
                "Proxy-Authenticate": "Basic",
                "Trailer": "X-Sum",
                "Connection": "X-Private-Hop",
                "X-Private-Hop": "secret",
                "X-End-To-End": "kept",
            },
        )

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        """Echo; "close CODE REASON" closes with that code; reports its subprotocol."""
        self._note(request)
        ws = web.WebSocketResponse(protocols=("chat.v2", "chat.v1"))
        await ws.prepare(request)
        await ws.send_json({"geode": self.name, "protocol": ws.ws_protocol})
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT and msg.data.startswith("close "):
                _, code, reason = msg.data.split(" ", 2)
                await ws.close(code=int(code), message=reason.encode())
            elif msg.type == aiohttp.WSMsgType.TEXT:
                await ws.send_str(f"{self.name}: {msg.data}")
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(msg.data[::-1])
        self.ws_closed.append(ws.close_code)
        return ws

    async def sse(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: one now, one once ``sse_gate`` is set."""
        self._note(request)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: first\n\n")
        await self.sse_gate.wait()
        await resp.write(b"data: second\n\n")
        await resp.write_eof()
        return resp


GeodeFactory = Callable[..., Awaitable[FakeGeode]]


@pytest.fixture
async def geode_factory() -> AsyncIterator[GeodeFactory]:
    servers: list[TestServer] = []

    async def make(name: str, region: str) -> FakeGeode:
        geode = FakeGeode(name, region)
        server = TestServer(geode.app, host="127.0.0.1")
        await server.start_server()
        geode.server = server
        servers.append(server)
        return geode

    yield make
    for server in servers:
        await server.close()


@pytest.fixture
def dead_url() -> str:
    """A loopback port that was bound and closed: connections are refused."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}"


REGIONS = {
    "eu-west": {"fallback": ["us-east", "ap-northeast"]},
    "us-east": {"fallback": ["eu-west", "ap-northeast"]},
    "ap-northeast": {"fallback": ["us-east", "eu-west"]},
}


def base_config(geodes: list[dict[str, Any]], **overrides: Any) -> dict[str, Any]:
    """A complete config dict for tests: three regions, loopback listeners, fast checks."""
    data: dict[str, Any] = {
        "listen": {
            "proxy": {"host": "127.0.0.1", "port": 0},
            "admin": {"host": "127.0.0.1", "port": 0},
        },
        "trusted_proxies": ["127.0.0.1/32"],
        "default_region": "eu-west",
        "regions": REGIONS,
        "countries": {"FR": "eu-west", "GB": "eu-west", "US": "us-east", "JP": "ap-northeast"},
        "continents": {
            "EU": "eu-west",
            "NA": "us-east",
            "AS": "ap-northeast",
            "SA": "us-east",
            "AF": "eu-west",
            "OC": "ap-northeast",
            "AN": "us-east",
        },
        "geodes": geodes,
        "health_check": {
            "interval": "1s",
            "timeout": "500ms",
            "jitter": "0s",
            "healthy_threshold": 2,
            "unhealthy_threshold": 2,
        },
        "forwarding": {"connect_timeout": "1s", "response_timeout": "2s"},
    }
    data.update(overrides)
    return data


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[[dict[str, Any]], Path]:
    def write(data: dict[str, Any], name: str = "geoproxy.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return write


class Proxy:
    """A running proxy: its proxy and admin listeners, and its own metrics registry."""

    def __init__(self, gateway: Gateway, url: str, admin: TestServer) -> None:
        self.gateway = gateway
        self.url = url
        self.admin = admin

    @property
    def admin_url(self) -> str:
        return str(self.admin.make_url("")).rstrip("/")

    @property
    def registry(self) -> CollectorRegistry:
        return self.gateway.metrics.registry

    def sample(self, name: str, **labels: str) -> float:
        """A metric sample's value; 0 when the labelled series does not exist yet."""
        return self.registry.get_sample_value(name, labels) or 0.0


ProxyFactory = Callable[..., Awaitable[Proxy]]


@pytest.fixture
def lane() -> str:
    """The request path proxies serve from: "fast" (the default, as deployed: plain GETs
    from callbacks, geoproxy/proxy/fastlane.py), "coroutine" (``forwarding.fast_lane: false``)
    or "public" (aiohttp's public API only, compat.py).
    A module whose behaviour must hold on both overrides this with a parametrised
    fixture."""
    return "fast"


@pytest.fixture
async def proxy_factory(
    write_config: Callable[[dict[str, Any]], Path], lane: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[ProxyFactory]:
    """Start a real proxy from a config dict (through the real YAML loader), served as
    ``geoproxy run`` serves it (server.make_proxy_runner), on the ``lane`` fixture's path
    unless the config picks one. The "public" lane is the mode geoproxy falls back to
    when aiohttp is outside the tested window (compat.py)."""
    if lane == "public":
        monkeypatch.setattr(compat, "mode", lambda: compat.PUBLIC)
    async with contextlib.AsyncExitStack() as stack:

        async def make(data: dict[str, Any], geoip: GeoLookup | None = None) -> Proxy:
            fwd = data.get("forwarding", {})
            if "fast_lane" not in fwd:
                data = {**data, "forwarding": {**fwd, "fast_lane": lane == "fast"}}
            cfg = config_mod.load(write_config(data))
            gateway = Gateway(cfg, geoip=geoip, registry=CollectorRegistry())
            await stack.enter_async_context(gateway.lifespan())
            runner = make_proxy_runner(gateway)
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
            front = None if gateway.tls is None else gateway.tls.front
            # As `geoproxy run` listens: batched accepts in lean mode (process/acceptor.py).
            host, port = await start_site(runner, "proxy", Listener("127.0.0.1", 0), False, front)
            admin = TestServer(gateway.admin_app(), host="127.0.0.1")
            await admin.start_server()
            stack.push_async_callback(admin.close)
            scheme = "http" if front is None else "https"
            return Proxy(gateway, f"{scheme}://{host}:{port}", admin)

        yield make


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain client for talking to the proxy over real sockets."""
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


def geode_entry(geode: FakeGeode, **extra: Any) -> dict[str, Any]:
    return {"name": geode.name, "region": geode.region, "url": geode.url, **extra}


# GeoIP test networks: documentation-free public ranges, like MaxMind's own test data.
GEO_NETWORKS: dict[str, tuple[str | None, str]] = {
    "81.2.69.0/24": ("GB", "EU"),
    "175.16.199.0/24": ("CN", "AS"),
    "216.160.83.0/24": ("US", "NA"),
    "89.160.20.0/24": (None, "EU"),  # continent only: the continent rule decides
    "2001:218::/32": ("JP", "AS"),
    "2a02:cf40::/29": ("FR", "EU"),
    "2a02:cf80::/29": ("IL", "AS"),  # MaxMind's test data: Israel, continent Asia
    "2a02:d180::/29": ("DE", "EU"),
}
#: Where City records put each network: (latitude, longitude, accuracy radius in km), as
#: MaxMind's test databases do (2a02:cf80::/29 is theirs: 31.5, 34.75, 100 km). A network
#: without an entry here has London with 100 km.
GEO_LOCATIONS: dict[str, tuple[float, float, int]] = {
    "81.2.69.0/24": (51.5142, -0.0931, 10),  # London
    "175.16.199.0/24": (43.88, 125.3228, 100),  # Changchun
    "216.160.83.0/24": (47.2513, -122.3149, 22),  # Milton, WA
    "89.160.20.0/24": (58.4167, 15.6167, 76),  # Linköping
    "2001:218::/32": (35.68536, 139.75309, 100),  # Tokyo
    "2a02:cf40::/29": (48.8566, 2.3522, 50),  # Paris
    "2a02:cf80::/29": (31.5, 34.75, 100),  # Israel
    "2a02:d180::/29": (51.2993, 9.491, 1000),  # Germany's centre, country-level only
}


def _record(
    country: str | None,
    continent: str,
    city: bool,
    location: tuple[float, float, int] = (51.5, -0.1, 100),
) -> dict[str, Any]:
    rec: dict[str, Any] = {"continent": {"code": continent, "names": {"en": continent}}}
    if country:
        rec["country"] = {"iso_code": country, "names": {"en": country}}
        rec["registered_country"] = {"iso_code": country, "names": {"en": country}}
    if city:
        latitude, longitude, radius = location
        rec["city"] = {"names": {"en": f"Somewhere in {country or continent}"}}
        rec["location"] = {
            "latitude": latitude,
            "longitude": longitude,
            "accuracy_radius": radius,
            "time_zone": "Europe/London",
        }
    return rec


@pytest.fixture
def make_mmdb(tmp_path: Path) -> Callable[..., Path]:
    """Write a real MaxMind-format database (City or Country edition, IPv4 or IPv6).
    ``networks``: other networks than ``GEO_NETWORKS``; ``name``: another file name;
    ``built``: its build date (seconds since the epoch; default now); ``locations``: where
    City records put each network, other than ``GEO_LOCATIONS``."""
    import mmdb_writer
    from netaddr import IPSet

    def make(
        edition: str = "City",
        ip_version: int = 6,
        networks: dict[str, tuple[str | None, str]] | None = None,
        name: str | None = None,
        built: float | None = None,
        locations: dict[str, tuple[float, float, int]] | None = None,
    ) -> Path:
        writer = mmdb_writer.MMDBWriter(
            ip_version=ip_version,
            ipv4_compatible=ip_version == 6,
            database_type=f"GeoLite2-{edition}",
            languages=["en"],
            description="geoproxy test database",
        )
        for cidr, (country, continent) in (networks or GEO_NETWORKS).items():
            if ip_version == 4 and ":" in cidr:
                continue
            place = (locations or GEO_LOCATIONS).get(cidr, (51.5, -0.1, 100))
            record = _record(country, continent, edition == "City", place)
            writer.insert_network(IPSet([cidr]), record)
        path = tmp_path / (name or f"test-{edition}-v{ip_version}.mmdb")
        real_time = mmdb_writer.time.time
        if built is not None:  # the writer stamps build_epoch with time.time()
            mmdb_writer.time.time = lambda: built
        try:
            writer.to_db_file(str(path))
        finally:
            mmdb_writer.time.time = real_time
        return path

    return make


@pytest.fixture
def make_broken_mmdb(tmp_path: Path) -> Callable[..., Path]:
    """A City database like MaxMind's ``GeoIP2-City-Test-Broken-Double-Format.mmdb``: its
    metadata reads, but the location doubles of ``broken`` networks (every one by
    default) are declared 2 bytes long instead of 8, so looking one of them up fails."""
    from mmdb_writer import MMDBWriter
    from netaddr import IPSet

    def make(broken: Collection[str] | None = None) -> Path:
        writer = MMDBWriter(
            ip_version=6,
            ipv4_compatible=True,
            database_type="GeoIP2-City",
            languages=["en"],
            description="geoproxy broken test database",
        )
        latitudes = {}
        for i, (cidr, (country, continent)) in enumerate(GEO_NETWORKS.items()):
            record = _record(country, continent, True)
            record["location"] = {"latitude": 10.0 + i, "longitude": 20.0 + i}  # unique
            latitudes[cidr] = 10.0 + i
            writer.insert_network(IPSet([cidr]), record)
        path = tmp_path / "GeoIP2-City-Test-Broken-Double-Format.mmdb"
        writer.to_db_file(str(path))
        raw = path.read_bytes()
        for cidr in GEO_NETWORKS if broken is None else broken:
            double = struct.pack("!d", latitudes[cidr])  # control byte 0x68: double, size 8
            assert raw.count(b"\x68" + double) == 1
            raw = raw.replace(b"\x68" + double, b"\x62" + double)  # ...size 2
        path.write_bytes(raw)
        return path

    return make


def need_binary(name: str, package: str = "prometheus") -> str:
    """The path of a tool a test needs. Locally a missing tool skips the test with the
    reason; under CI (CI=true) it fails it, since .ci/run installs it (Debian's
    ``package``)."""
    import os
    import shutil

    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is not installed; .ci/run installs Debian's {package} package")
        pytest.skip(f"{name} is not installed (Debian: apt-get install {package})")
    return path


async def assert_promtool_accepts(exposition: bytes) -> None:
    """``promtool check metrics`` finds nothing wrong with a /metrics exposition."""
    promtool = need_binary("promtool")
    proc = await asyncio.create_subprocess_exec(
        promtool,
        "check",
        "metrics",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    async with asyncio.timeout(60):
        report, _ = await proc.communicate(exposition)
    assert proc.returncode == 0, report.decode()


def exported_metric_names(registry: CollectorRegistry) -> set[str]:
    """Every sample name a registry can expose (with _total, _bucket, ... suffixes)."""
    names: set[str] = set()
    for family in registry.collect():
        names.add(family.name)
        for suffix in ("_total", "_bucket", "_sum", "_count", "_created", "_info"):
            names.add(family.name + suffix)
    return names
