"""The real command line: `geoproxy run` and `geoproxy demo` as processes, over sockets."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from conftest import GeodeFactory, base_config, geode_entry

MiB = 1024 * 1024


class Running:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.output: list[str] = []

    async def wait_for(self, pattern: str, timeout: float = 20) -> re.Match[str]:
        """Read merged output lines until one matches ``pattern``."""
        assert self.proc.stdout is not None
        regex = re.compile(pattern)
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.proc.stdout.readline()
                if not raw:
                    raise AssertionError("process ended:\n" + "".join(self.output))
                line = raw.decode()
                self.output.append(line)
                if m := regex.search(line):
                    return m

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            rest = await self.proc.stdout.read()
            self.output.append(rest.decode())
            return await self.proc.wait()

    def peak_rss(self) -> int:
        """Peak resident set size (VmHWM) of the process, in bytes."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        m = re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)
        assert m is not None
        return int(m.group(1)) * 1024


@contextlib.asynccontextmanager
async def geoproxy(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> AsyncIterator[Running]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "geoproxy",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=cwd,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    running = Running(proc)
    try:
        yield running
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def run_to_end(*args: str, timeout: float = 30) -> tuple[int, str]:
    async with geoproxy(*args) as running:
        assert running.proc.stdout is not None
        async with asyncio.timeout(timeout):
            out = await running.proc.stdout.read()
            return await running.proc.wait(), out.decode()


READY = r"proxying on (http://\S+), admin on (http://\S+)"


async def test_run_streams_large_bodies_both_ways_with_bounded_memory(
    geode_factory: GeodeFactory, write_config: Callable[[dict[str, Any]], Path]
) -> None:
    size = 256 * MiB
    eu = await geode_factory("eu-1", "eu-west")
    us = await geode_factory("us-1", "us-east")
    ap = await geode_factory("ap-1", "ap-northeast")
    # The geode (in this test's process) hashes 256 MiB while the client sends them: on
    # a loaded machine it can stop taking the upload for longer than the 2 s the other
    # tests allow a geode to stay silent.
    path = write_config(
        base_config(
            [geode_entry(g) for g in (eu, us, ap)],
            limits={"max_body_bytes": "1GiB"},
            forwarding={"response_timeout": "15s"},
        )
    )
    async with geoproxy("run", "--config", str(path)) as proxy:
        proxy_url = (await proxy.wait_for(READY)).group(1)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{proxy_url}/whoami") as resp:  # warm up
                assert resp.status == 200
            baseline = proxy.peak_rss()

            got = 0
            async with http.get(f"{proxy_url}/stream?size={size}") as resp:
                assert resp.status == 200
                async for chunk in resp.content.iter_any():
                    got += len(chunk)
            assert got == size

            block = os.urandom(MiB)
            expected = hashlib.sha256()

            async def upload() -> AsyncIterator[bytes]:
                for _ in range(size // MiB):
                    expected.update(block)
                    yield block

            async with http.post(f"{proxy_url}/echo", data=upload()) as resp:
                body = await resp.json()
            assert body["size"] == size
            assert body["sha256"] == expected.hexdigest()
            growth = proxy.peak_rss() - baseline
        assert growth < 48 * MiB, f"proxy peak RSS grew by {growth / MiB:.1f} MiB"
        assert await proxy.stop() == 0


async def test_run_rejects_an_invalid_config_with_every_error_and_exit_1(
    write_config: Callable[[dict[str, Any]], Path],
) -> None:
    data = base_config([{"name": "a", "region": "eu-wst", "url": "ftp://x"}])
    data["trusted_proxies"] = ["10.0.0.0/33"]
    path = write_config(data)
    code, out = await run_to_end("run", "--config", str(path))
    assert code == 1
    assert f"{path}: trusted_proxies[0]: invalid CIDR '10.0.0.0/33'" in out
    assert f"{path}: geodes[0].region: unknown region 'eu-wst'" in out
    assert f"{path}: geodes[0].url: URL scheme must be http or https: 'ftp://x'" in out
    assert "Traceback" not in out


async def test_run_names_a_missing_geoip_database(
    geode_factory: GeodeFactory, write_config: Callable[[dict[str, Any]], Path]
) -> None:
    eu = await geode_factory("eu-1", "eu-west")
    data = base_config(
        [geode_entry(eu)],
        geoip={"database": "GeoLite2-City.mmdb"},
        regions={"eu-west": None},
        countries={},
        continents={},
    )
    path = write_config(data)
    code, out = await run_to_end("run", "--config", str(path))
    assert code == 1
    assert (
        f"geoproxy: {path}: geoip.database: {path.parent / 'GeoLite2-City.mmdb'}: GeoIP "
        "database not found\n"
    ) in out
    assert "Traceback" not in out


async def test_run_logs_config_warnings_at_start_up(
    geode_factory: GeodeFactory, write_config: Callable[[dict[str, Any]], Path]
) -> None:
    eu = await geode_factory("eu-1", "eu-west")
    data = base_config([geode_entry(eu), {**geode_entry(eu), "name": "us-1", "region": "us-east"}])
    path = write_config(data)
    async with geoproxy("run", "--config", str(path)) as proxy:
        await proxy.wait_for(READY)
        assert await proxy.stop() == 0
    warnings = [
        line.split(" ", 2)[2] for line in "".join(proxy.output).splitlines() if " WARNING " in line
    ]
    assert warnings == [
        f"WARNING geoproxy: {path}: geodes[1].url: same URL as geodes[0] (eu-1, "
        "region eu-west): one stamp would serve regions eu-west and us-east"
    ]


def _occupy(port: int) -> socket.socket | None:
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", port))
        sock.listen()
    except OSError:
        sock.close()
        return None  # already taken by something else: just as good for this test
    return sock


@pytest.mark.parametrize(
    ("ports_taken", "tls"),
    [(False, False), (True, False), (False, True)],
    ids=["free", "default-ports-taken", "tls"],
)
async def test_demo_starts_from_any_directory_routes_and_stops_cleanly(
    tmp_path: Path, ports_taken: bool, tls: bool
) -> None:
    """With ``--tls`` the stamps serve HTTPS from a throwaway CA and replicate over
    mutual TLS: the same demo, the same answers."""
    held = [s for p in (8080, 9901, 8101) if ports_taken and (s := _occupy(p))]
    try:
        async with geoproxy("demo", *(["--tls"] if tls else []), cwd=tmp_path) as demo:
            proxy_url = (await demo.wait_for(r"^\s+proxy: (http://\S+)")).group(1)
            admin_url = (await demo.wait_for(r"^\s+admin: (http://\S+)")).group(1)
            await demo.wait_for(r"Ctrl-C stops everything")
            if ports_taken:
                assert proxy_url != "http://127.0.0.1:8080"
                assert any("is taken" in line for line in demo.output)
            async with aiohttp.ClientSession() as http:
                for country, geode in [
                    ("FR", "demo-eu-west"),
                    ("JP", "demo-ap-northeast"),
                    ("BR", "demo-us-east"),
                    ("DE", "demo-eu-west"),
                ]:
                    async with http.get(
                        proxy_url + "/health", headers={"CF-IPCountry": country}
                    ) as r:
                        assert r.status == 200
                        body = await r.json()
                        assert body["name"] == geode, country
                        assert r.headers["X-Geoproxy-Geode"] == geode
                # Write as a French client, read back as a Japanese one once replicated.
                async with http.put(
                    proxy_url + "/items/hello",
                    json={"greeting": "bonjour"},
                    headers={"CF-IPCountry": "FR"},
                ) as r:
                    assert r.status == 201
                    assert r.headers["X-Geoproxy-Geode"] == "demo-eu-west"
                    version = (await r.json())["version"]
                async with asyncio.timeout(10):
                    while True:
                        async with http.get(
                            proxy_url + "/items/hello", headers={"CF-IPCountry": "JP"}
                        ) as r:
                            assert r.headers["X-Geoproxy-Geode"] == "demo-ap-northeast"
                            if r.status == 200:
                                item = await r.json()
                                break
                            assert r.status == 404  # not replicated yet
                        await asyncio.sleep(0.05)
                assert item["value"] == {"greeting": "bonjour"}
                assert item["version"] == version
                assert item["origin"] == {"stamp": "demo-eu-west", "region": "eu-west"}
                async with http.get(admin_url + "/readyz") as r:
                    assert r.status == 200
                async with http.get(admin_url + "/geodes") as r:
                    states = (await r.json())["geodes"]
                    assert sorted(s["name"] for s in states) == [
                        "demo-ap-northeast",
                        "demo-eu-west",
                        "demo-us-east",
                    ]
                    assert all(s["healthy"] for s in states)
                    scheme = "https" if tls else "http"
                    assert {s["url"].split(":")[0] for s in states} == {scheme}
            assert await demo.stop(signal.SIGINT) == 0
            assert "geoproxy demo stopped." in "".join(demo.output)
            assert "Traceback" not in "".join(demo.output)
    finally:
        for s in held:
            s.close()


async def test_check_config_accepts_the_shipped_configs() -> None:
    root = Path(__file__).resolve().parent.parent
    for name in ("geoproxy.yaml", "demo.yaml"):
        code, out = await run_to_end("check-config", "--config", str(root / "config" / name))
        assert code == 0, out
        assert out.rstrip().endswith("configuration is valid")


async def test_sigterm_during_start_up_exits_without_opening_the_listeners(
    geode_factory: GeodeFactory, write_config: Callable[[dict[str, Any]], Path]
) -> None:
    eu = await geode_factory("eu-1", "eu-west")
    # The first health round waits 4 s on this geode: start-up is still running at SIGTERM.
    data = base_config(
        [geode_entry(eu, health={"path": "/slow?delay=10", "timeout": "4s", "interval": "5s"})],
        regions={"eu-west": None},
        countries={},
        continents={},
    )
    path = write_config(data)
    async with geoproxy("run", "--config", str(path)) as proxy:
        await proxy.wait_for("first health round")
        async with asyncio.timeout(3):  # well before the 4 s health timeout
            assert await proxy.stop(signal.SIGTERM) == 0
        output = "".join(proxy.output)
    assert "stopped during start-up" in output
    assert "proxying on" not in output
    assert "Traceback" not in output


async def test_second_signal_stops_at_once_while_a_request_is_in_flight(
    geode_factory: GeodeFactory, write_config: Callable[[dict[str, Any]], Path]
) -> None:
    eu = await geode_factory("eu-1", "eu-west")
    data = base_config(
        [geode_entry(eu)],
        regions={"eu-west": None},
        countries={},
        continents={},
        forwarding={"response_timeout": "60s"},
    )
    path = write_config(data)
    async with geoproxy("run", "--config", str(path)) as proxy:
        proxy_url = (await proxy.wait_for(READY)).group(1)
        async with aiohttp.ClientSession() as http:
            slow = asyncio.create_task(http.get(f"{proxy_url}/slow?delay=30"))
            async with asyncio.timeout(10):
                while eu.hits["/slow"] == 0:  # noqa: ASYNC110 -- a bounded poll of a counter
                    await asyncio.sleep(0.02)
            assert proxy.proc.stdout is not None
            proxy.proc.send_signal(signal.SIGTERM)
            await proxy.wait_for("shutting down")
            assert proxy.proc.returncode is None  # draining the in-flight request
            async with asyncio.timeout(5):
                assert await proxy.stop(signal.SIGINT) == 130
            with contextlib.suppress(aiohttp.ClientError):
                (await slow).close()
    assert "second signal: stopping at once" in "".join(proxy.output)


async def test_malformed_requests_get_400_and_one_log_line_without_traceback(
    geode_factory: GeodeFactory, write_config: Callable[[dict[str, Any]], Path]
) -> None:
    eu = await geode_factory("eu-1", "eu-west")
    path = write_config(
        base_config([geode_entry(eu)], regions={"eu-west": None}, countries={}, continents={})
    )
    smuggle = (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    )
    async with geoproxy("run", "--config", str(path)) as proxy:
        m = await proxy.wait_for(READY)
        host, port = m.group(1).removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(smuggle)
        await writer.drain()
        async with asyncio.timeout(5):
            status_line = await reader.readline()
        writer.close()
        assert status_line.split()[1] == b"400"
        await proxy.wait_for("rejected malformed request")
        assert await proxy.stop() == 0
    output = "".join(proxy.output)
    assert "Traceback" not in output and "ERROR" not in output
    assert eu.hits["/echo"] == 0


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_public_mode_serves_says_why_once_and_shows_in_build_info(
    geode_factory: GeodeFactory, write_config: Callable[[dict[str, Any]], Path], workers: str
) -> None:
    """GEOPROXY_AIOHTTP=public: what an aiohttp outside the tested window gets
    (compat.py): aiohttp's public API only, one WARNING per process, the mode in
    geoproxy_build_info."""
    eu = await geode_factory("eu-1", "eu-west")
    path = write_config(base_config([geode_entry(eu)]))
    async with geoproxy(
        "run", "--config", str(path), "--workers", workers, env={"GEOPROXY_AIOHTTP": "public"}
    ) as proxy:
        ready = r"proxying on (http://\S+?),? .*admin on (http://\S+)"
        proxy_url, admin_url = (await proxy.wait_for(ready)).groups()
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{proxy_url}/echo", data=b"x" * 1000) as resp:
                assert resp.status == 200
                assert (await resp.json())["size"] == 1000
            async with http.get(f"{admin_url}/metrics") as resp:
                metrics = await resp.text()
        assert 'mode="public"' in metrics.split("geoproxy_build_info{", 1)[1].split("}")[0]
        assert await proxy.stop() == 0
    output = "".join(proxy.output)
    warnings = [
        line
        for line in output.splitlines()
        if "GEOPROXY_AIOHTTP=public: serving through aiohttp's public API" in line
    ]
    processes = 1 if workers == "1" else 3  # the supervisor and each worker decide
    assert len(warnings) == processes, output
    assert all("WARNING" in line for line in warnings)
    assert "Traceback" not in output


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):  # a zombie has ended
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    return False


async def _served_by(http: aiohttp.ClientSession, url: str, country: str) -> str:
    async with http.get(url, headers={"CF-IPCountry": country}) as r:
        assert r.status == 200
        return r.headers["X-Geoproxy-Geode"]


async def test_demo_stamps_are_processes_a_user_can_kill_and_start_again(tmp_path: Path) -> None:
    data = tmp_path / "new" / "data"  # made by the demo, and kept
    async with geoproxy("demo", "--data-dir", str(data), cwd=tmp_path) as demo:
        await demo.wait_for(r"Ctrl-C stops everything")
        text = "".join(demo.output)
        pids = {
            m.group(1): int(m.group(2))
            for m in re.finditer(r"^stamp (\S+) .* pid (\d+) ", text, re.M)
        }
        assert set(pids) == {"demo-eu-west", "demo-us-east", "demo-ap-northeast"}
        assert len(set(pids.values()) | {demo.proc.pid}) == 4  # each its own process
        assert f"kill -STOP {pids['demo-eu-west']}" in text
        # The printed curl lines show the serving geode (curl's -w with the response header).
        assert "%header{x-geoproxy-geode}" in text
        proxy_url = re.search(r"^\s+proxy: (http://\S+)", text, re.M).group(1)  # type: ignore[union-attr]
        url = proxy_url + "/health"
        async with aiohttp.ClientSession() as http:
            assert await _served_by(http, url, "FR") == "demo-eu-west"
            os.kill(pids["demo-eu-west"], signal.SIGTERM)
            again = await demo.wait_for(r"^\s+(\S+python\S* -m geoproxy stamp --config \S+)$")
            # Failover: France is served by us-east (eu-west's first fallback) meanwhile.
            async with asyncio.timeout(15):
                while await _served_by(http, url, "FR") != "demo-us-east":  # noqa: ASYNC110
                    await asyncio.sleep(0.1)
            # The printed command starts it again; health checks put it back in rotation.
            restarted = await asyncio.create_subprocess_exec(
                *again.group(1).split(),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            try:
                async with asyncio.timeout(20):
                    while await _served_by(http, url, "FR") != "demo-eu-west":  # noqa: ASYNC110
                        await asyncio.sleep(0.1)
            finally:
                restarted.terminate()
                await restarted.wait()
        assert await demo.stop(signal.SIGINT) == 0
    assert not any(_pid_alive(pid) for pid in pids.values())  # the demo stopped its stamps
    assert {p.name for p in data.glob("*.yaml")} == {f"{name}.yaml" for name in pids}


async def test_demo_names_a_data_dir_it_cannot_write(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    code, out = await run_to_end("demo", "--data-dir", str(tmp_path / "a-file" / "data"))
    assert code == 1
    assert (
        f"--data-dir {tmp_path / 'a-file' / 'data'}: cannot write the stamps' files "
        "there: Not a directory" in out
    )
    assert "Traceback" not in out


def test_a_proxy_without_tls_never_imports_cryptography(
    write_config: Callable[[dict[str, Any]], Path],
) -> None:
    """cryptography is ~9 MiB of resident memory per process (issue 19: idle RSS at most
    50 MiB): loading a config without TLS and building the proxy's app must not import
    it; config/pem.py and the demo's throwaway CA import it where they read or make
    certificates."""
    import subprocess

    path = write_config(base_config([geode_entry_at("http://127.0.0.1:9")]))
    script = (
        "import sys\n"
        "from geoproxy.process import cli, server, worker\n"
        "from geoproxy.process.app import Gateway\n"
        "from geoproxy.config import loader\n"
        f"loader.load({str(path)!r})\n"
        "print('cryptography' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "False", done.stderr


def geode_entry_at(url: str) -> dict[str, str]:
    return {"name": "eu-1", "region": "eu-west", "url": url}
