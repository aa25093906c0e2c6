"""A real Prometheus scrapes a running geoproxy; its HTTP API must show what happened."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp

from conftest import GeodeFactory, ProxyFactory, base_config, geode_entry, need_binary
from tls_certs import Authority


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def prometheus(tmp_path: Path, target: str, rules: Path | None = None) -> AsyncIterator[str]:
    """Start Prometheus scraping ``target`` (host:port) every 200 ms, evaluating ``rules``
    as often; yield its API URL."""
    binary = need_binary("prometheus")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 200ms, scrape_timeout: 200ms, evaluation_interval: 200ms}\n"
        + (f"rule_files: ['{rules}']\n" if rules else "")
        + "scrape_configs:\n"
        f"  - job_name: geoproxy\n    static_configs: [{{targets: ['{target}']}}]\n"
    )
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http, asyncio.timeout(30):
            while True:
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"{url}/-/ready") as resp:
                        if resp.status == 200:
                            break
                assert proc.returncode is None, "prometheus exited"
                await asyncio.sleep(0.1)
        yield url
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                async with asyncio.timeout(10):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def query(http: aiohttp.ClientSession, url: str, expr: str) -> float | None:
    async with http.get(f"{url}/api/v1/query", params={"query": expr}) as resp:
        body = await resp.json()
    assert body["status"] == "success", body
    result = body["data"]["result"]
    return float(result[0]["value"][1]) if result else None


async def test_prometheus_sees_requests_decisions_failovers_and_geode_up(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    eu = await geode_factory("eu-1", "eu-west")
    us = await geode_factory("us-1", "us-east")
    ap = await geode_factory("ap-1", "ap-northeast")
    data = base_config([geode_entry(g) for g in (eu, us, ap)])
    data["health_check"] = {
        "interval": "200ms",
        "timeout": "150ms",
        "jitter": "0s",
        "healthy_threshold": 2,
        "unhealthy_threshold": 2,
    }
    proxy = await proxy_factory(data)
    admin = proxy.admin_url.removeprefix("http://")

    async with prometheus(tmp_path, admin) as prom, aiohttp.ClientSession() as http:

        async def send(country: str, count: int) -> list[str]:
            served = []
            for _ in range(count):
                async with http.get(
                    f"{proxy.url}/whoami", headers={"CF-IPCountry": country}
                ) as resp:
                    assert resp.status == 200
                    served.append(resp.headers["X-Geoproxy-Geode"])
            return served

        assert await send("FR", 10) == ["eu-1"] * 10
        assert await send("JP", 6) == ["ap-1"] * 6
        assert await send("US", 4) == ["us-1"] * 4
        # Kill the Japanese geode: before health notices, requests fail over...
        assert ap.server is not None
        await ap.server.close()
        assert await send("JP", 3) == ["us-1"] * 3
        # ...then health takes it out, and Japanese clients go to the fallback directly.
        down = asyncio.Event()
        proxy.gateway.board.on_transition.append(
            lambda state: down.set() if state.geode.name == "ap-1" else None
        )
        async with asyncio.timeout(10):
            await down.wait()
        assert "ap-1" not in proxy.gateway.board.healthy
        assert await send("JP", 2) == ["us-1"] * 2

        expected = {
            "sum(geoproxy_requests_total)": 25,
            'geoproxy_requests_total{geode="eu-1",code_class="2xx"}': 10,
            'geoproxy_routing_decisions_total{client_region="eu-west",geode="eu-1",'
            'decision="home"}': 10,
            'geoproxy_routing_decisions_total{client_region="ap-northeast",geode="ap-1",'
            'decision="home"}': 6,
            'geoproxy_routing_decisions_total{client_region="ap-northeast",geode="us-1",'
            'decision="fallback"}': 5,
            'geoproxy_failovers_total{from_geode="ap-1",to_geode="us-1"}': 3,
            'geoproxy_upstream_attempts_total{geode="ap-1",outcome="connect_error"}': 3,
            'geoproxy_geode_up{geode="ap-1",region="ap-northeast"}': 0,
            'geoproxy_geode_up{geode="eu-1",region="eu-west"}': 1,
            'geoproxy_geode_up{geode="us-1",region="us-east"}': 1,
            "geoproxy_ready": 1,
        }
        seen: dict[str, float | None] = {}
        try:
            async with asyncio.timeout(20):
                while True:
                    seen = {e: await query(http, prom, e) for e in expected}
                    if seen == expected:
                        break
                    await asyncio.sleep(0.2)
        except TimeoutError:
            raise AssertionError(f"Prometheus never showed {expected}; last saw {seen}") from None


async def test_the_certificate_expiry_alert_fires_for_a_certificate_expiring_within_14_days(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    eu = await geode_factory("eu-1", "eu-west")
    authority = Authority(tmp_path)
    soon, fine = authority.issue("soon.test", days=3), authority.issue("fine.test", days=60)
    data = base_config([geode_entry(eu)])
    data["listen"]["proxy"]["tls"] = [fine.entry(), soon.entry()]
    proxy = await proxy_factory(data)
    admin = proxy.admin_url.removeprefix("http://")
    alerts = Path(__file__).resolve().parent.parent / "deploy" / "prometheus" / "alerts.yml"
    async with prometheus(tmp_path, admin, alerts) as prom, aiohttp.ClientSession() as http:
        firing = 'ALERTS{alertname="TlsCertificateExpiringSoon"}'
        async with asyncio.timeout(20):
            while await query(http, prom, firing) is None:  # noqa: ASYNC110
                await asyncio.sleep(0.2)
        async with http.get(f"{prom}/api/v1/query", params={"query": firing}) as resp:
            found = (await resp.json())["data"]["result"]
    # Pending: it fires once it has held for an hour.
    assert [(a["metric"]["certificate"], a["metric"]["alertstate"]) for a in found] == [
        (str(soon.cert), "pending")
    ]
