#!/usr/bin/env python3
"""One region, three geodes, one of them slowed down: how ``balance: weighted`` and
``balance: peak_ewma`` share the requests, and what the clients see.

    python bench/slow_geode.py --duration 10 --conns 20 --delay 0.05 --rounds 2

The geodes (aiohttp, one process) answer at once but for one that waits ``--delay``
seconds; geoproxy (``python -m geoproxy run``, this tree) serves one region with the three,
once with each balance; ``--conns`` clients each send one GET after another for
``--duration`` seconds. Printed per balance: requests/s, p50 and p99 latency in ms, and
each geode's share of the requests (from the ``X-Geoproxy-Geode`` header). Everything
listens on 127.0.0.1; every run is bounded by ``--duration`` (and 15 s to start).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp
import yaml
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # bench/run.py: free_port, wait_port

ROOT = Path(__file__).resolve().parent.parent
GEODES = ("geode-a", "geode-b", "geode-slow")


def serve_geodes(ports: dict[str, int], delay: float, seconds: float) -> None:
    """The three geodes, in this process, until ``seconds`` have passed."""

    async def main() -> None:
        runners = []
        for name, port in ports.items():
            wait = delay if name == "geode-slow" else 0.0

            async def answer(request: web.Request, wait: float = wait) -> web.Response:
                if wait:
                    await asyncio.sleep(wait)
                return web.Response(text="ok")

            app = web.Application()
            app.router.add_get("/{tail:.*}", answer)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            runners.append(runner)
        await asyncio.sleep(seconds)
        for runner in runners:
            await runner.cleanup()

    asyncio.run(main())


def config(path: Path, port: int, geodes: dict[str, int], balance: str) -> None:
    data = {
        "listen": {"proxy": {"host": "127.0.0.1", "port": port}, "admin": {"port": 0}},
        "default_region": "eu-west",
        "regions": {"eu-west": {"balance": balance}},
        "geodes": [
            {"name": name, "region": "eu-west", "url": f"http://127.0.0.1:{p}"}
            for name, p in geodes.items()
        ],
        "health_check": {"interval": "2s", "timeout": "1s"},
        "access_log": "off",
    }
    path.write_text(yaml.safe_dump(data, sort_keys=False))


async def load(url: str, conns: int, seconds: float) -> tuple[list[float], Counter[str], int]:
    """``conns`` clients, one request after another each, for ``seconds``."""
    latencies: list[float] = []
    served: Counter[str] = Counter()
    errors = 0
    clock = time.perf_counter
    end = clock() + seconds
    connector = aiohttp.TCPConnector(limit=conns)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def client() -> None:
            nonlocal errors
            while clock() < end:
                began = clock()
                try:
                    async with http.get(url) as resp:
                        await resp.read()
                        served[resp.headers.get("X-Geoproxy-Geode", "none")] += 1
                        errors += resp.status != 200
                except aiohttp.ClientError:
                    errors += 1
                latencies.append(clock() - began)

        await asyncio.gather(*(client() for _ in range(conns)))
    return latencies, served, errors


def one(balance: str, geodes: dict[str, int], args: argparse.Namespace) -> dict[str, float]:
    port = run.free_port()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "geoproxy.yaml"
        config(path, port, geodes, balance)
        proc = subprocess.Popen(
            [run.PY, "-m", "geoproxy", "run", "--config", str(path), "--log-level", "warning"],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            run.wait_port(port)
            asyncio.run(load(f"http://127.0.0.1:{port}/", args.conns, 1.0))  # warm-up
            latencies, served, errors = asyncio.run(
                load(f"http://127.0.0.1:{port}/", args.conns, args.duration)
            )
        finally:
            proc.terminate()
            proc.wait(15)
    latencies.sort()
    total = len(latencies)
    out = {
        "rps": total / args.duration,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[int(total * 0.99) - 1] * 1000,
        "errors": errors,
    }
    for name in GEODES:
        out[f"{name}_%"] = 100 * served[name] / total
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per run (<= 60)")
    ap.add_argument("--conns", type=int, default=20, help="concurrent clients (<= 200)")
    ap.add_argument("--delay", type=float, default=0.05, help="the slow geode's extra seconds")
    ap.add_argument("--rounds", type=int, default=1, help="rounds of both balances (<= 5)")
    args = ap.parse_args()
    args.duration = min(args.duration, 60.0)
    args.conns = min(args.conns, 200)
    args.rounds = min(args.rounds, 5)
    geodes = {name: run.free_port() for name in GEODES}
    budget = args.rounds * 2 * (args.duration + 20) + 10
    server = subprocess.Popen(
        [run.PY, __file__, "--serve-geodes", json.dumps([geodes, args.delay, budget])],
        start_new_session=True,
    )
    try:
        for port in geodes.values():
            run.wait_port(port)
        results: dict[str, list[dict[str, float]]] = {"weighted": [], "peak_ewma": []}
        for _ in range(args.rounds):
            for balance in results:  # interleaved: drift hits both alike
                results[balance].append(one(balance, geodes, args))
    finally:
        server.terminate()
        server.wait(15)
    keys = ["rps", "p50_ms", "p99_ms", "errors", *(f"{n}_%" for n in GEODES)]
    print(
        f"one region, 3 geodes, geode-slow +{args.delay * 1000:g} ms; {args.conns} clients, "
        f"{args.duration:g} s x {args.rounds} round(s); medians"
    )
    print(f"{'balance':<10}" + "".join(f"{k:>14}" for k in keys))
    for balance, rows in results.items():
        cells = [statistics.median(r[k] for r in rows) for k in keys]
        print(f"{balance:<10}" + "".join(f"{c:>14.1f}" for c in cells))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve-geodes":
        ports, delay, seconds = json.loads(sys.argv[2])
        serve_geodes(ports, delay, seconds)
    else:
        main()
