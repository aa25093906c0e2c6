#!/usr/bin/env python3
"""Side-by-side proxy benchmark on loopback: geoproxy against nginx, HAProxy and Caddy (and
a plain aiohttp proxy), all in front of the same nginx upstream, measured in the same run.

    sudo python3 bench/run.py                      # installs nginx, haproxy, caddy, wrk
    python3 bench/run.py --rounds 3 --duration 5 --conns 10,50,200 --sizes 0,16384

Each proxy is pinned to core 0 (one core per proxy: one nginx worker, nbthread 1 for
HAProxy, GOMAXPROCS=1 for Caddy); the upstream nginx and wrk share the other core. Rounds
are interleaved (A B C ... A B C ...) so that drift on a shared machine hits every proxy
alike, and the table shows the median of the rounds with ratios to nginx, HAProxy and
Caddy from this same run.
Every peer is configured as its documentation recommends for many short requests over
kept-alive connections (``configs``): nginx keeps a pool of idle upstream connections
(``keepalive``), HAProxy reuses server connections (``http-reuse always``), and Caddy
speaks HTTP/1.1 only (``servers { protocols h1 }``) with an idle upstream pool large enough
for c=200 (``keepalive_idle_conns``; its default keeps 32 per host).

Scenarios (``--scenarios``): ``repeated``, wrk's default of the same header lines on
every request, and ``browser`` (bench/browser.lua), about 450 bytes of Firefox-like
header lines with a Cookie and an X-Request-Id of their own on every request and a
CF-IPCountry from a small mix; and, not by default, ``close`` (bench/close.lua), a new
connection for every request.
Everything listens on 127.0.0.1 only; every run is bounded by --duration.

    python3 bench/run.py --scaling --conns 50,200   # geoproxy --workers 1 against 2
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
#: wrk's request scripts by scenario name: None sends wrk's own repeated header lines.
SCENARIOS: dict[str, Path | None] = {
    "repeated": None,
    "browser": ROOT / "bench" / "browser.lua",
    "close": ROOT / "bench" / "close.lua",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


TOOLS = ("nginx", "haproxy", "caddy", "wrk", "taskset")
PORTS = ("nginx", "haproxy", "caddy", "geoproxy", "plain", "bypass", "alone", "sketch", "fastlane")
#: The proxies in table order; the first three are the references.
NAMES = (
    "nginx",
    "haproxy",
    "caddy",
    "geoproxy",
    "aiohttp-plain",
    "geoproxy-bypass",
    "aiohttp-alone",
    "callback-sketch",
    "fastlane-sketch",
)


def ensure_tools() -> None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        pkgs = ["nginx", "haproxy", "caddy", "wrk", "util-linux"]
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *pkgs],
                       check=True, env=env, stdout=subprocess.DEVNULL)  # fmt: skip
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        sys.exit(
            f"bench: missing {', '.join(missing)} (as root: apt-get install nginx haproxy "
            "caddy wrk)"
        )
    try:
        import uvloop  # noqa: F401
    except ImportError:
        subprocess.run([PY, "-m", "pip", "install", "--quiet", "uvloop"], check=True)


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def rss_kib(pid: int, field_name: str = "VmRSS") -> int:
    """Resident memory of a process and its children (nginx master + worker), in KiB."""
    total = 0
    for p in [pid, *children(pid)]:
        with contextlib.suppress(OSError):
            status = Path(f"/proc/{p}/status").read_text()
            m = re.search(rf"^{field_name}:\s+(\d+) kB", status, re.M)
            total += int(m.group(1)) if m else 0
    return total


def children(pid: int) -> list[int]:
    try:
        out = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    kids = [int(c) for c in out]
    return kids + [g for k in kids for g in children(k)]


@dataclass
class Proxy:
    name: str
    argv: list[str]
    port: int
    env: dict[str, str] = field(default_factory=dict)
    cores: str = "0"
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["taskset", "-c", self.cores, *self.argv], env={**os.environ, **self.env},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        wait_port(self.port)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@dataclass
class Result:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    rss_kib: int
    cpu_us: float = 0.0  # the proxy's CPU time (all its processes) per request, in µs


_UNIT = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def wrk_script(scenario: str) -> list[str]:
    """wrk's arguments for a scenario's request script (none for wrk's own requests)."""
    script = SCENARIOS[scenario]
    return ["-s", str(script)] if script is not None else []


def wrk(
    port: int, path: str, conns: int, duration: int, scenario: str = "repeated"
) -> tuple[float, float, float, int]:
    """req/s, p50 ms, p99 ms and errors of one wrk run (``scenario``: see SCENARIOS)."""
    lua = wrk_script(scenario)
    out = subprocess.run(
        ["taskset", "-c", "1", "wrk", "-t1", f"-c{conns}", f"-d{duration}s", "--latency", *lua,
         f"http://127.0.0.1:{port}{path}"],
        capture_output=True, text=True, timeout=duration + 30,
    ).stdout  # fmt: skip
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    lat = dict(re.findall(r"^\s+(50|99)%\s+([\d.]+\w+)", out, re.M))

    def ms(text: str) -> float:
        m = re.match(r"([\d.]+)(\w+)", text)
        assert m is not None
        return float(m.group(1)) * _UNIT[m.group(2)]

    errors = 0
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors += int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        errors += sum(int(g) for g in m.groups())
    return rps, ms(lat["50"]), ms(lat["99"]), errors


def configs(tmp: Path, upstream: int, ports: dict[str, int]) -> None:
    (tmp / "www").mkdir()
    (tmp / "www" / "16k").write_bytes(b"x" * 16384)
    for path in (tmp, tmp / "www"):  # nginx workers run as an unprivileged user
        path.chmod(0o755)
    (tmp / "www" / "16k").chmod(0o644)
    (tmp / "upstream.conf").write_text(
        textwrap.dedent(f"""
        worker_processes 1; daemon off; pid {tmp}/upstream.pid; error_log /dev/null crit;
        events {{ worker_connections 4096; }}
        http {{ access_log off; keepalive_requests 1000000;
          server {{ listen 127.0.0.1:{upstream} reuseport; root {tmp}/www;
            location = /health {{ return 200 "ok"; }}
            location = /small {{ return 200 "ok"; }}
            location = /16k {{ }} }} }}
    """)
    )
    (tmp / "nginx-proxy.conf").write_text(
        textwrap.dedent(f"""
        worker_processes 1; daemon off; pid {tmp}/proxy.pid; error_log /dev/null crit;
        events {{ worker_connections 4096; }}
        http {{ access_log off; keepalive_requests 1000000;
          upstream up {{ server 127.0.0.1:{upstream};
            keepalive 512; keepalive_requests 1000000; keepalive_timeout 120s; }}
          server {{ listen 127.0.0.1:{ports["nginx"]};
            location / {{ proxy_pass http://up; proxy_http_version 1.1;
              proxy_set_header Connection ""; }} }} }}
    """)
    )
    (tmp / "haproxy.cfg").write_text(
        textwrap.dedent(f"""
        global
          nbthread 1
          maxconn 4096
        defaults
          mode http
          timeout connect 5s
          timeout client 30s
          timeout server 30s
          http-reuse always
        frontend bench
          bind 127.0.0.1:{ports["haproxy"]}
          default_backend up
        backend up
          server up1 127.0.0.1:{upstream}
    """)
    )
    (tmp / "Caddyfile").write_text(
        textwrap.dedent(f"""
        {{
          admin off
          auto_https off
          servers {{
            protocols h1
          }}
        }}
        http://127.0.0.1:{ports["caddy"]} {{
          reverse_proxy 127.0.0.1:{upstream} {{
            transport http {{
              keepalive 120s
              keepalive_idle_conns 512
              keepalive_idle_conns_per_host 512
            }}
          }}
        }}
    """)
    )
    for name in ("geoproxy", "bypass", "fastlane"):
        write_geoproxy_config(tmp / f"{name}.yaml", ports[name], upstream)


def write_geoproxy_config(path: Path, port: int, upstream: int) -> None:
    path.write_text(
        textwrap.dedent(f"""
        listen: {{proxy: {{host: 127.0.0.1, port: {port}}},
                  admin: {{host: 127.0.0.1, port: {free_port()}}}}}
        trusted_proxies: [127.0.0.0/8]
        default_region: eu-west
        regions: {{eu-west: {{fallback: [us-east]}}, us-east: {{fallback: [eu-west]}}}}
        countries: {{FR: eu-west}}
        continents: {{EU: eu-west}}
        geodes: [{{name: bench-1, region: eu-west, url: "http://127.0.0.1:{upstream}"}}]
        access_log: "off"
        reload: {{poll_interval: 0s}}
    """)
    )


def proxies(tmp: Path, upstream: int, ports: dict[str, int], only: set[str]) -> list[Proxy]:
    all_ = [
        Proxy("nginx", ["nginx", "-c", str(tmp / "nginx-proxy.conf")], ports["nginx"]),
        Proxy("haproxy", ["haproxy", "-db", "-f", str(tmp / "haproxy.cfg")], ports["haproxy"]),
        Proxy(
            "caddy",
            ["caddy", "run", "--config", str(tmp / "Caddyfile"), "--adapter", "caddyfile"],
            ports["caddy"],
            env={"GOMAXPROCS": "1"},
        ),
        Proxy(
            "geoproxy",
            [
                PY,
                "-m",
                "geoproxy",
                "run",
                "--config",
                str(tmp / "geoproxy.yaml"),
                "--log-level",
                "warning",
            ],
            ports["geoproxy"],
        ),
        Proxy(
            "aiohttp-plain",
            [
                PY,
                str(ROOT / "bench" / "plain_proxy.py"),
                str(ports["plain"]),
                f"http://127.0.0.1:{upstream}",
            ],
            ports["plain"],
        ),
        Proxy(
            "geoproxy-bypass",
            [PY, str(ROOT / "bench" / "bypass_proxy.py"), str(tmp / "bypass.yaml")],
            ports["bypass"],
        ),
        Proxy(
            "aiohttp-alone",
            [PY, str(ROOT / "bench" / "aiohttp_alone.py"), str(ports["alone"])],
            ports["alone"],
        ),
        Proxy(
            "callback-sketch",
            [PY, str(ROOT / "bench" / "callback_proxy.py"), str(ports["sketch"]), str(upstream)],
            ports["sketch"],
        ),
        Proxy(
            "fastlane-sketch",
            [PY, str(ROOT / "bench" / "fastlane_sketch.py"), str(tmp / "fastlane.yaml")],
            ports["fastlane"],
        ),
    ]
    return [p for p in all_ if p.name in only]


@contextlib.contextmanager
def upstream_nginx(tmp: Path, port: int) -> Iterator[int]:
    proc = subprocess.Popen(["taskset", "-c", "1", "nginx", "-c", str(tmp / "upstream.conf")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_port(port)
        yield proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    ap.add_argument("--conns", default="10,50,200")
    ap.add_argument("--sizes", default="small,16k", help="small (2 bytes) and/or 16k")
    ap.add_argument(
        "--scenarios",
        default="repeated,browser",
        help="repeated (wrk's own header lines) and/or browser (bench/browser.lua)",
    )
    ap.add_argument("--proxies", default=",".join(NAMES))
    ap.add_argument(
        "--openloop",
        type=int,
        default=0,
        help="also: this many req/s, open "
        "loop, direct to the upstream and through geoproxy (p99 overhead)",
    )
    ap.add_argument(
        "--soak",
        type=int,
        default=0,
        help="also: seconds of c=200 on geoproxy (the last of --scenarios), sampling its RSS "
        "(idle first)",
    )
    ap.add_argument(
        "--scaling",
        action="store_true",
        help="only: geoproxy --workers 1 on one core against --workers 2 on both cores "
        "(small body, --conns, the first of --scenarios)",
    )
    args = ap.parse_args()
    ensure_tools()
    conns = [int(c) for c in args.conns.split(",")]
    scenarios = args.scenarios.split(",")
    unknown = [sc for sc in scenarios if sc not in SCENARIOS]
    if unknown:
        sys.exit(f"bench: unknown scenario {unknown[0]!r} (known: {', '.join(SCENARIOS)})")
    # A workload is a scenario and a body size, labelled "browser small" in the table.
    workloads = [(sc, size) for sc in scenarios for size in args.sizes.split(",")]
    labels = [f"{sc} {size}" for sc, size in workloads]
    only = set(args.proxies.split(","))
    upstream = free_port()
    ports = {n: free_port() for n in PORTS}
    results: dict[tuple[str, str, int], list[Result]] = {}
    with tempfile.TemporaryDirectory(prefix="geoproxy-bench-") as d:
        tmp = Path(d)
        configs(tmp, upstream, ports)
        with upstream_nginx(tmp, upstream) as upstream_pid:
            if args.scaling:
                return scaling(tmp, ports, conns, args.duration, args.rounds, upstream_pid,
                               scenarios[0])  # fmt: skip
            for rnd in range(args.rounds):
                for proxy in proxies(tmp, upstream, ports, only):
                    proxy.start()
                    try:
                        assert proxy.proc is not None
                        wrk(proxy.port, "/small", 10, 1)  # warm up (pools, caches)
                        for (sc, size), label in zip(workloads, labels, strict=True):
                            for c in conns:
                                cpu0 = cpu_seconds(proxy.proc.pid)
                                rps, p50, p99, errors = wrk(proxy.port, f"/{size}", c,
                                                            args.duration, sc)  # fmt: skip
                                us = (cpu_seconds(proxy.proc.pid) - cpu0) / (rps * args.duration)
                                rss = rss_kib(proxy.proc.pid)
                                results.setdefault((proxy.name, label, c), []).append(
                                    Result(rps, p50, p99, errors, rss, us * 1e6)
                                )
                                print(f"round {rnd + 1} {proxy.name:<14} {label:>14} c={c:<4}"
                                      f" {rps:>9.0f} req/s  p50 {p50:6.2f} ms  p99 {p99:7.2f}"
                                      f" ms  errors {errors}  rss {rss / 1024:.0f} MiB"
                                      f"  {us * 1e6:5.1f} us CPU/req", flush=True)  # fmt: skip
                    finally:
                        proxy.stop()
            if args.soak:
                soak(tmp, upstream, ports, args.soak, scenarios[-1])
            if args.openloop:
                openloop(tmp, upstream, ports, args.openloop, args.duration, args.rounds)
    print_table(results, labels, conns, only)


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a process and its children so far."""
    ticks = 0
    for p in [pid, *children(pid)]:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def connections_per_process(pids: list[int], port: int) -> list[int]:
    """Established TCP connections on local ``port`` that each process holds (how
    SO_REUSEPORT spread a load's connections over the workers)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                if cols[3] == "01" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{cols[9]}]")
    counts = []
    for pid in pids:
        held = 0
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    held += os.readlink(f"/proc/{pid}/fd/{fd}") in inodes
        counts.append(held)
    return counts


def scaling(
    tmp: Path, ports: dict[str, int], conns: list[int], seconds: int, rounds: int,
    upstream_pid: int, scenario: str = "repeated",
) -> None:  # fmt: skip
    """geoproxy --workers 1 pinned to core 0 against --workers 2 on cores 0-1, interleaved.
    On a 2-core machine the upstream and wrk share core 1 with the second worker, so the
    throughput ratio understates scaling; CPU seconds per request tell the efficiency,
    and the connections each worker holds mid-run tell the SO_REUSEPORT balance."""
    config = str(tmp / "geoproxy.yaml")
    base = [PY, "-m", "geoproxy", "run", "--config", config, "--log-level", "warning"]
    setups = [
        Proxy("1 worker", [*base, "--workers", "1"], ports["geoproxy"], cores="0"),
        Proxy("2 workers", [*base, "--workers", "2"], ports["geoproxy"], cores="0,1"),
    ]
    rows: dict[tuple[str, int], list[tuple[float, float, float, float]]] = {}
    shares: dict[int, list[float]] = {}  # the busier worker's share of connections, 2 workers
    for _ in range(rounds):
        for proxy in setups:
            proxy.start()
            try:
                assert proxy.proc is not None
                time.sleep(1)  # the workers come up after the port opens
                wrk(proxy.port, "/small", 10, 1)
                for c in conns:
                    cpu0, other0 = cpu_seconds(proxy.proc.pid), cpu_seconds(upstream_pid)
                    load0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                    held: list[int] = []
                    workers = children(proxy.proc.pid)
                    probe = threading.Timer(
                        seconds / 2,
                        lambda out, pids, port: out.extend(connections_per_process(pids, port)),
                        (held, workers, proxy.port),
                    )
                    probe.start()
                    rps, _p50, p99, errors = wrk(proxy.port, "/small", c, seconds, scenario)
                    probe.join()
                    load1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                    if len(held) == 2 and sum(held):
                        shares.setdefault(c, []).append(max(held) / sum(held))
                    cpu = cpu_seconds(proxy.proc.pid) - cpu0
                    other = (cpu_seconds(upstream_pid) - other0 + load1.ru_utime
                             + load1.ru_stime - load0.ru_utime - load0.ru_stime)  # fmt: skip
                    rows.setdefault((proxy.name, c), []).append((rps, cpu, other, p99))
                    print(
                        f"{proxy.name:<10} c={c:<4} {rps:>8.0f} req/s  p99 {p99:6.2f} ms  "
                        f"geoproxy CPU {cpu / seconds:.2f} cores  wrk+upstream "
                        f"{other / seconds:.2f} cores  errors {errors}  connections per "
                        f"worker {held}",
                        flush=True,
                    )
            finally:
                proxy.stop()
    print(f"\n{scenario} scenario")
    print("| conns | 1 worker req/s | 2 workers req/s | ratio | us CPU/req 1w | 2w |"
          " wrk+upstream cores (2w) | busier worker's connections |")  # fmt: skip
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for c in conns:
        one, two = rows[("1 worker", c)], rows[("2 workers", c)]

        def med(rs: list[tuple[float, float, float, float]], i: int) -> float:
            return statistics.median(r[i] for r in rs)

        per1 = statistics.median(r[1] / (r[0] * seconds) * 1e6 for r in one)
        per2 = statistics.median(r[1] / (r[0] * seconds) * 1e6 for r in two)
        print(
            f"| {c} | {med(one, 0):.0f} | {med(two, 0):.0f} | {med(two, 0) / med(one, 0):.2f}"
            f" | {per1:.1f} | {per2:.1f} | {med(two, 2) / seconds:.2f} |"
            f" {statistics.median(shares.get(c, [0.0])):.0%} |"
        )


def openloop(
    tmp: Path, upstream: int, ports: dict[str, int], rate: int, seconds: int, rounds: int
) -> None:
    """p50/p99 at a fixed, non-saturating rate: straight to the upstream, then through
    geoproxy, interleaved; the difference is what geoproxy adds."""
    (proxy,) = proxies(tmp, upstream, ports, {"geoproxy"})
    proxy.start()
    rows: dict[str, list[list[float]]] = {"direct": [], "geoproxy": []}
    try:
        for _ in range(rounds):
            for name, port in (("direct", upstream), ("geoproxy", proxy.port)):
                out = subprocess.run(
                    ["taskset", "-c", "1", PY, str(ROOT / "bench" / "openloop.py"),
                     f"http://127.0.0.1:{port}/small", str(rate), str(seconds)],
                    capture_output=True, text=True, timeout=seconds + 60, check=True,
                ).stdout.split()  # fmt: skip
                rows[name].append([float(x) for x in out])
    finally:
        proxy.stop()
    med = {n: [statistics.median(r[i] for r in rs) for i in range(4)] for n, rs in rows.items()}
    d, g = med["direct"], med["geoproxy"]
    print(f"\nopen loop, {rate} req/s for {seconds}s x {rounds} (median of rounds):")
    for name, v in (("direct", d), ("geoproxy", g)):
        print(
            f"  {name:<8} p50 {v[0]:.2f} ms  p99 {v[1]:.2f} ms  p99.9 {v[2]:.2f} ms  "
            f"errors {v[3]:.0f}"
        )
    print(f"  geoproxy adds: p50 {g[0] - d[0]:+.2f} ms, p99 {g[1] - d[1]:+.2f} ms")


def soak(
    tmp: Path, upstream: int, ports: dict[str, int], seconds: int, scenario: str = "repeated"
) -> None:
    """geoproxy's RSS idle, then sampled while wrk holds c=200 for ``seconds``
    (``scenario``: see SCENARIOS)."""
    (proxy,) = proxies(tmp, upstream, ports, {"geoproxy"})
    proxy.start()
    try:
        assert proxy.proc is not None
        time.sleep(1)
        idle = rss_kib(proxy.proc.pid)
        lua = wrk_script(scenario)
        load = subprocess.Popen(
            ["taskset", "-c", "1", "wrk", "-t1", "-c200", f"-d{seconds}s", *lua,
             f"http://127.0.0.1:{proxy.port}/small"], stdout=subprocess.DEVNULL,
        )  # fmt: skip
        samples = []
        while load.poll() is None:
            time.sleep(5)
            samples.append(rss_kib(proxy.proc.pid))
        load.wait()
        print(f"\ngeoproxy RSS: idle {idle / 1024:.1f} MiB; under c=200 ({scenario}) for"
              f" {seconds}s, every 5s:"
              f" {' '.join(f'{s / 1024:.1f}' for s in samples)} MiB")  # fmt: skip
    finally:
        proxy.stop()


def print_table(
    results: dict[tuple[str, str, int], list[Result]],
    sizes: list[str],
    conns: list[int],
    only: set[str],
) -> None:
    """The medians of the rounds per proxy, workload (``sizes``: "scenario body" labels)
    and concurrency, with ratios to the references from the same run."""

    def med(name: str, size: str, c: int, attr: str) -> float:
        return float(statistics.median(getattr(r, attr) for r in results[(name, size, c)]))

    print("\n| proxy | scenario, body | conns | req/s | p50 ms | p99 ms | p99/p50 | RSS MiB |"
          " errors | us CPU/req | x nginx | x haproxy | x caddy |")  # fmt: skip
    print("| --- | --- |" + " ---: |" * 11)
    for size in sizes:
        for c in conns:
            for name in NAMES:
                if name not in only:
                    continue
                rps = med(name, size, c, "rps")
                p50, p99 = med(name, size, c, "p50_ms"), med(name, size, c, "p99_ms")
                errors = sum(r.errors for r in results[(name, size, c)])
                rss = max(r.rss_kib for r in results[(name, size, c)]) / 1024
                vs = [f"{rps / med(ref, size, c, 'rps'):.2f}" if ref in only else "-"
                      for ref in NAMES[:3]]  # fmt: skip
                print(
                    f"| {name} | {size} | {c} | {rps:.0f} | {p50:.2f} | {p99:.2f} |"
                    f" {p99 / p50:.1f} | {rss:.0f} | {errors} | {med(name, size, c, 'cpu_us'):.1f}"
                    f" | {' | '.join(vs)} |"
                )
    others = (
        ("aiohttp-plain", "plain aiohttp proxy"),
        ("geoproxy-bypass", "geoproxy with routing and metrics bypassed"),
        ("aiohttp-alone", "aiohttp's web server alone, no upstream (a ceiling)"),
        ("callback-sketch", "a callback-style proxy sketch (bench/callback_proxy.py)"),
        (
            "fastlane-sketch",
            "the same with geoproxy's routing, header rules and metrics (bench/fastlane_sketch.py)",
        ),
    )
    for other, what in others:
        if {"geoproxy", other} <= only:
            ratios = [med("geoproxy", s, c, "rps") / med(other, s, c, "rps")
                      for s in sizes for c in conns]  # fmt: skip
            print(f"geoproxy / {what}: {min(ratios):.2f}x to {max(ratios):.2f}x")


if __name__ == "__main__":
    main()
