#!/usr/bin/env python3
"""Open-loop load at a fixed rate: requests are sent on schedule whether or not earlier
ones finished, and each latency counts from its scheduled time (no coordinated omission).

    python bench/openloop.py URL RATE SECONDS   -> prints "p50_ms p99_ms p999_ms errors"
"""

from __future__ import annotations

import asyncio
import sys
import time

import aiohttp
import uvloop


async def run(url: str, rate: float, seconds: float) -> tuple[list[float], int]:
    now = time.perf_counter  # uvloop's loop.time() is cached per iteration, in ms
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=256)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def one(scheduled: float) -> None:
            nonlocal errors
            try:
                async with http.get(url) as resp:
                    await resp.read()
                    if resp.status != 200:
                        errors += 1
            except aiohttp.ClientError:
                errors += 1
            latencies.append(now() - scheduled)

        for _ in range(int(rate)):  # warm the pool: one second at the rate, not counted
            await one(now())
        latencies.clear()
        start = now() + 0.05
        tasks = []
        for i in range(int(rate * seconds)):
            at = start + i / rate
            delay = at - now()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(at)))
        await asyncio.gather(*tasks)
    return latencies, errors


def main() -> None:
    url, rate, seconds = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
    latencies, errors = uvloop.run(run(url, rate, seconds))
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000

    print(f"{pct(0.50):.3f} {pct(0.99):.3f} {pct(0.999):.3f} {errors}")


if __name__ == "__main__":
    main()
