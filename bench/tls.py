#!/usr/bin/env python3
"""HTTPS benchmark on loopback: geoproxy's TLS termination against nginx's and Caddy's, in
front of the same plain-HTTP nginx upstream, measured in the same run.

    python3 bench/tls.py                          # as root it installs the peers (run.py)
    python3 bench/tls.py --rounds 3 --duration 5 --conns 50

Three scenarios, each a GET of a 2-byte answer:

- ``keepalive``: wrk, ``--conns`` connections kept alive (TLS 1.2: Debian's wrk offers no
  more): throughput once the handshakes are done.
- ``resumed``: wrk with ``Connection: close``, 10 connections: every request on a new TCP
  connection whose TLS 1.2 session is resumed (wrk keeps the session of the connection
  it replaces): the rate of returning clients.
- ``handshake``: four ``openssl s_time -new`` clients: every request on a new connection
  with a full TLS 1.3 handshake (ECDHE and an ECDSA P-256 signature): the handshake rate.

Every peer serves the same ECDSA P-256 certificate and is configured as its documentation
recommends: nginx with Mozilla's "intermediate" server block (its cipher list, a shared
session cache, tickets off) and an upstream keep-alive pool; Caddy with ``tls <cert>
<key>``, its own TLS defaults, HTTP/1.1 (as bench/run.py) and a large idle upstream pool;
geoproxy with ``listen.proxy.tls`` (Mozilla intermediate, tickets on), once with the fast
lane and once without (``geoproxy-coroutine``). As in bench/run.py
each proxy runs on core 0 alone (one nginx worker, GOMAXPROCS=1, geoproxy without
--workers); the clients and the upstream share core 1, rounds are interleaved, the table
shows medians with geoproxy's ratio to each peer, and the proxy's own CPU time per
request (steadier than req/s on a shared machine, and the figure to read when the
clients' core is the limit: nginx's handshake rate can be).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import ipaddress
import re
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # bench/run.py: the shared helpers

#: The proxies in table order; geoproxy-coroutine: geoproxy with forwarding.fast_lane off
#: (every request on the coroutine path), to show what the fast lane does over TLS.
#: geoproxy-http: geoproxy over plain HTTP (keepalive, and a new connection per request in
#: the resumed scenario): what TLS costs it, same run.
PEERS = ("nginx", "caddy", "geoproxy", "geoproxy-coroutine", "geoproxy-http")
SCENARIOS = ("keepalive", "resumed", "handshake")
#: Mozilla's "intermediate" TLS 1.2 ciphers, as its nginx configuration names them.
INTERMEDIATE = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
    "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
    "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384:DHE-RSA-CHACHA20-POLY1305"
)
CLIENTS = 4  # s_time processes in the handshake scenario


def certificate(tmp: Path) -> tuple[Path, Path]:
    """A self-signed ECDSA P-256 certificate for localhost and 127.0.0.1."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    san = x509.SubjectAlternativeName(
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(san, critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    for path in (cert_path, key_path):
        path.chmod(0o644)  # nginx's worker reads them as another user
    return cert_path, key_path


def tls_configs(tmp: Path, upstream: int, ports: dict[str, int]) -> None:
    cert, key = certificate(tmp)
    (tmp / "nginx-tls.conf").write_text(
        textwrap.dedent(f"""
        worker_processes 1; daemon off; pid {tmp}/tls.pid; error_log /dev/null crit;
        events {{ worker_connections 4096; }}
        http {{ access_log off; keepalive_requests 1000000;
          upstream up {{ server 127.0.0.1:{upstream};
            keepalive 512; keepalive_requests 1000000; keepalive_timeout 120s; }}
          server {{ listen 127.0.0.1:{ports["nginx"]} ssl;
            ssl_certificate {cert}; ssl_certificate_key {key};
            ssl_session_timeout 1d; ssl_session_cache shared:MozSSL:10m;
            ssl_session_tickets off;
            ssl_protocols TLSv1.2 TLSv1.3; ssl_ciphers {INTERMEDIATE};
            ssl_prefer_server_ciphers off;
            location / {{ proxy_pass http://up; proxy_http_version 1.1;
              proxy_set_header Connection ""; }} }} }}
    """)
    )
    (tmp / "Caddyfile-tls").write_text(
        textwrap.dedent(f"""
        {{
          admin off
          auto_https disable_redirects
          default_sni localhost
          servers {{
            protocols h1
          }}
        }}
        https://:{ports["caddy"]} {{
          tls {cert} {key}
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
    for name, fast in (("geoproxy", True), ("fastlane", False)):
        path = tmp / f"{name}-tls.yaml"
        run.write_geoproxy_config(path, ports[name], upstream)
        data = yaml.safe_load(path.read_text())
        data["listen"]["proxy"]["tls"] = {"cert": str(cert), "key": str(key)}
        data["forwarding"] = {"fast_lane": fast}
        path.write_text(yaml.safe_dump(data))
    run.write_geoproxy_config(tmp / "plain-http.yaml", ports["bypass"], upstream)


def peers(tmp: Path, ports: dict[str, int]) -> list[run.Proxy]:
    return [
        run.Proxy("nginx", ["nginx", "-c", str(tmp / "nginx-tls.conf")], ports["nginx"]),
        run.Proxy(
            "caddy",
            ["caddy", "run", "--config", str(tmp / "Caddyfile-tls"), "--adapter", "caddyfile"],
            ports["caddy"],
            env={"GOMAXPROCS": "1"},
        ),
        *(
            run.Proxy(name, geoproxy_argv(tmp / f"{config}-tls.yaml"), ports[config])
            for name, config in (("geoproxy", "geoproxy"), ("geoproxy-coroutine", "fastlane"))
        ),
        run.Proxy("geoproxy-http", geoproxy_argv(tmp / "plain-http.yaml"), ports["bypass"]),
    ]


def geoproxy_argv(config: Path) -> list[str]:
    return [run.PY, "-m", "geoproxy", "run", "--config", str(config), "--log-level", "warning"]


def wrk_https(
    port: int, conns: int, duration: int, close: bool, scheme: str = "https"
) -> tuple[float, int]:
    """req/s and errors of one wrk run over HTTPS (or ``scheme``)."""
    extra = ["-H", "Connection: close"] if close else []
    out = subprocess.run(
        ["taskset", "-c", "1", "wrk", "-t1", f"-c{conns}", f"-d{duration}s", *extra,
         f"{scheme}://127.0.0.1:{port}/small"],
        capture_output=True, text=True, timeout=duration + 30,
    ).stdout  # fmt: skip
    found = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if found is None:
        raise RuntimeError(f"wrk said:\n{out}")
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors += int(m.group(1))
    return float(found.group(1)), errors


def s_time(port: int, duration: int) -> tuple[float, int]:
    """Full TLS handshakes per second (each a new connection and a GET) of ``CLIENTS``
    ``openssl s_time -new`` processes at once; errors: none measured (s_time stops)."""
    argv = ["taskset", "-c", "1", "openssl", "s_time", "-connect", f"127.0.0.1:{port}",
            "-new", "-time", str(duration), "-www", "/small"]  # fmt: skip
    procs = [
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        for _ in range(CLIENTS)
    ]
    total = 0.0
    for proc in procs:
        out, _ = proc.communicate(timeout=duration + 30)
        m = re.search(r"(\d+) connections in (\d+) real seconds", out)
        if m is None:
            raise RuntimeError(f"s_time said:\n{out}")
        total += int(m.group(1)) / max(int(m.group(2)), 1)
    return total, 0


def measure(proxy: run.Proxy, scenario: str, conns: int, duration: int) -> tuple[float, float, int]:
    """req/s, the proxy's CPU µs per request, errors."""
    assert proxy.proc is not None
    cpu0 = run.cpu_seconds(proxy.proc.pid)
    if scenario == "handshake":
        rps, errors = s_time(proxy.port, duration)
    else:
        scheme = "http" if proxy.name == "geoproxy-http" else "https"
        rps, errors = wrk_https(proxy.port, conns if scenario == "keepalive" else 10, duration,
                                close=scenario == "resumed", scheme=scheme)  # fmt: skip
    cpu = run.cpu_seconds(proxy.proc.pid) - cpu0
    return rps, cpu / max(rps * duration, 1) * 1e6, errors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=5, help="seconds per run")
    ap.add_argument("--conns", type=int, default=50, help="connections kept alive")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--proxies", default=",".join(PEERS))
    args = ap.parse_args()
    run.ensure_tools()
    scenarios = args.scenarios.split(",")
    only = set(args.proxies.split(","))
    upstream = run.free_port()
    ports = {n: run.free_port() for n in run.PORTS}
    results: dict[tuple[str, str], list[tuple[float, float, int]]] = {}
    with tempfile.TemporaryDirectory(prefix="geoproxy-bench-tls-") as d:
        tmp = Path(d)
        run.configs(tmp, upstream, ports)  # the upstream nginx's
        tls_configs(tmp, upstream, ports)
        with run.upstream_nginx(tmp, upstream):
            for _ in range(args.rounds):
                for proxy in [p for p in peers(tmp, ports) if p.name in only]:
                    proxy.start()
                    try:
                        plain = proxy.name == "geoproxy-http"
                        wrk_https(proxy.port, 10, 1, False, "http" if plain else "https")
                        for scenario in scenarios:
                            if plain and scenario == "handshake":
                                continue  # no TLS: no handshake (resumed: a new connection)
                            got = measure(proxy, scenario, args.conns, args.duration)
                            results.setdefault((proxy.name, scenario), []).append(got)
                    finally:
                        proxy.stop()
    print_table(results, scenarios, args)


def print_table(
    results: dict[tuple[str, str], list[tuple[float, float, int]]],
    scenarios: list[str],
    args: argparse.Namespace,
) -> None:
    print(f"\nHTTPS, {args.rounds} rounds x {args.duration}s, medians; keepalive: "
          f"c={args.conns}; resumed: c=10; handshake: {CLIENTS} s_time clients")  # fmt: skip
    print(f"{'scenario':<10} {'proxy':<18} {'req/s':>9} {'CPU µs/req':>11} {'errors':>7}"
          f" {'geoproxy req/s ratio':>21} {'CPU ratio':>10}")  # fmt: skip
    for scenario in scenarios:
        med = {
            name: (
                statistics.median(r[0] for r in rows),
                statistics.median(r[1] for r in rows),
                sum(r[2] for r in rows),
            )
            for (name, sc), rows in results.items()
            if sc == scenario
        }
        ours = med.get("geoproxy")
        for name, (rps, cpu, errors) in med.items():
            ratio = cpu_ratio = ""
            if ours is not None and not name.startswith("geoproxy"):
                ratio = f"{ours[0] / rps:.2f}x"
                cpu_ratio = f"{ours[1] / cpu:.2f}x"
            print(f"{scenario:<10} {name:<18} {rps:>9.0f} {cpu:>11.0f} {errors:>7}"
                  f" {ratio:>21} {cpu_ratio:>10}")  # fmt: skip


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
