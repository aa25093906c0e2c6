#!/usr/bin/env python3
"""A/B benchmark: geoproxy from two (or more) source trees, and Caddy, interleaved in the
same run against the same nginx upstream, so that a change is judged against a reference
measured minutes apart on the same noisy machine.

    python bench/ab.py --tree base=/tmp/geoproxy-base --tree new=. --conns 10,50,200
    python bench/ab.py --tree py311=. --python py313=/opt/py313/bin/python
    python bench/ab.py --tree base=../geoproxy-base --tree new=. --scenario browser

Each tree is run as ``python -m geoproxy`` with the tree as working directory (so its own
``geoproxy`` package is imported); ``--python`` runs this tree under another interpreter
(a virtualenv with geoproxy's dependencies installed). Everything listens on 127.0.0.1;
every run is bounded.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # bench/run.py: the shared tooling


class TreeProxy(run.Proxy):
    def __init__(
        self, name: str, tree: Path, config: Path, port: int, script: str | None = None,
        python: str = run.PY,
    ) -> None:  # fmt: skip
        argv = ([python, script, str(config)] if script else
                [python, "-m", "geoproxy", "run", "--config", str(config), "--log-level",
                 "warning"])  # fmt: skip
        super().__init__(name, argv, port)
        self.tree = tree

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["taskset", "-c", "0", *self.argv], cwd=self.tree, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        run.wait_port(self.port)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--python",
        action="append",
        default=[],
        help="name=interpreter: this tree under another Python",
    )
    ap.add_argument("--tree", action="append", default=[],
                    help="name=path, or name=path=script.py to run a bench script (given "
                         "the config) from that tree instead of geoproxy itself")  # fmt: skip
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--conns", default="10,50,200")
    ap.add_argument("--no-caddy", action="store_true")
    ap.add_argument(
        "--scenario",
        default="repeated",
        choices=list(run.SCENARIOS),
        help="wrk's own repeated header lines, or browser-like ones (bench/browser.lua)",
    )
    args = ap.parse_args()
    run.ensure_tools()
    trees = [t.split("=", 2) for t in args.tree]
    conns = [int(c) for c in args.conns.split(",")]
    upstream = run.free_port()
    ports = {n: run.free_port() for n in run.PORTS}
    rps: dict[tuple[str, int], list[float]] = {}
    p99s: dict[tuple[str, int], list[float]] = {}
    # CPU time of the proxy process per request: steadier than req/s on a shared machine,
    # where wrk and the upstream compete for the same cores.
    cpu: dict[tuple[str, int], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="geoproxy-ab-") as d:
        tmp = Path(d)
        run.configs(tmp, upstream, ports)
        contenders: list[run.Proxy] = []
        if not args.no_caddy:
            contenders += run.proxies(tmp, upstream, ports, {"caddy"})
        for name, path, *script in trees:
            port = run.free_port()
            run.write_geoproxy_config(tmp / f"{name}.yaml", port, upstream)
            tree = Path(path).resolve()
            script_path = str(tree / script[0]) if script else None
            contenders.append(TreeProxy(name, tree, tmp / f"{name}.yaml", port, script_path))
        for name, python in (p.split("=", 1) for p in args.python):
            port = run.free_port()
            run.write_geoproxy_config(tmp / f"{name}.yaml", port, upstream)
            contenders.append(TreeProxy(name, run.ROOT, tmp / f"{name}.yaml", port,
                                        python=python))  # fmt: skip
        with run.upstream_nginx(tmp, upstream):
            for rnd in range(args.rounds):
                for proxy in contenders:
                    proxy.start()
                    try:
                        run.wrk(proxy.port, "/small", 10, 1)  # warm up
                        for c in conns:
                            cpu0 = run.cpu_seconds(proxy.proc.pid)
                            r, p50, p99, errors = run.wrk(
                                proxy.port, "/small", c, args.duration, args.scenario
                            )
                            us = (run.cpu_seconds(proxy.proc.pid) - cpu0) / (r * args.duration)
                            rps.setdefault((proxy.name, c), []).append(r)
                            p99s.setdefault((proxy.name, c), []).append(p99)
                            cpu.setdefault((proxy.name, c), []).append(us * 1e6)
                            print(f"round {rnd + 1} {proxy.name:<10} c={c:<4} {r:>9.0f} req/s"
                                  f"  p50 {p50:6.2f} ms  p99 {p99:7.2f} ms  errors {errors}"
                                  f"  {us * 1e6:5.1f} us CPU/req", flush=True)  # fmt: skip
                    finally:
                        proxy.stop()
    names = [p.name for p in contenders]
    print(f"\n{args.scenario} scenario")
    print("| proxy | conns | req/s (median) | x caddy | us CPU/req (median) | p99 ms (median) |")
    for c in conns:
        for name in names:
            med = statistics.median(rps[(name, c)])
            ref = statistics.median(rps[("caddy", c)]) if "caddy" in names else None
            ratio = f"{med / ref:.2f}" if ref else "-"
            print(f"| {name} | {c} | {med:.0f} | {ratio} | "
                  f"{statistics.median(cpu[(name, c)]):.1f} |"
                  f" {statistics.median(p99s[(name, c)]):.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
