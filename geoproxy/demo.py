"""``geoproxy demo``: the shipped demo config, three reference stamps on loopback (each
with its own SQLite file, replicating to the others), and the proxy in front of them.

Every geode's socket is bound first (its configured port, or a free one if taken), so each
app can be built knowing where all the others listen; the app comes from a ``GeodeApp``
factory, which is the seam between the proxy side and what the geodes are.

The stamps replicate over their own peer listeners (free loopback ports the proxy knows
nothing of), signed with a fleet secret made up for this run: the demo stays one command.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import secrets
import socket
from collections.abc import Callable, Mapping
from importlib import resources
from pathlib import Path

from aiohttp import web
from yarl import URL

from geoproxy.config import Config, Geode
from geoproxy.stamp.app import STATE, build_stamp_app, stamp_runner
from geoproxy.stamp.config import Peer, Replication, StampConfig

log = logging.getLogger("geoproxy.demo")

#: Builds one geode's app, given every geode as it really listens (its peers included).
GeodeApp = Callable[[Geode, Mapping[str, Geode]], web.Application]


def config_dir() -> Path:
    """The shipped ``config/`` folder: inside an installed wheel, else the source tree."""
    packaged = resources.files("geoproxy") / "_config"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / "config"


def demo_config_path() -> Path:
    return config_dir() / "demo.yaml"


def stamp_apps(data_dir: Path) -> GeodeApp:
    """Reference stamps: one SQLite file each in ``data_dir``, every other geode a peer,
    each with a peer listener on a free loopback port, all sharing one new secret."""
    secret = secrets.token_hex(32).encode()
    peer_socks: dict[str, socket.socket] = {}

    def build(geode: Geode, live: Mapping[str, Geode]) -> web.Application:
        for g in live.values():  # every stamp's peer listener, before any stamp starts
            if g.name not in peer_socks:
                peer_socks[g.name] = _bind_any(g.url.host or "127.0.0.1")
        peers = tuple(Peer(g.name, _peer_url(g, peer_socks[g.name])) for g in live.values()
                      if g.name != geode.name)  # fmt: skip
        host = geode.url.host or ""
        return build_stamp_app(StampConfig(
            path=None, name=geode.name, region=geode.region, host=host,
            port=geode.url.port or 0, database=data_dir / f"{geode.name}.db", peers=peers,
            replication=Replication(interval=0.5), peer_host=host,
            peer_port=peer_socks[geode.name].getsockname()[1], secret=secret,
        ), peer_sock=peer_socks[geode.name])  # fmt: skip

    return build


def _peer_url(geode: Geode, sock: socket.socket) -> URL:
    return geode.url.with_port(sock.getsockname()[1])


def _bind_any(host: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((host, 0))
    sock.listen(128)
    sock.setblocking(False)
    return sock


def _bind(geode: Geode) -> socket.socket:
    host = geode.url.host or "127.0.0.1"
    port = geode.url.port or 80
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for attempt in (port, 0):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, attempt))
        except OSError as exc:
            sock.close()
            if exc.errno != errno.EADDRINUSE or attempt == 0:
                raise
            log.warning("geode %s: port %d is taken; using a free port", geode.name, port)
            continue
        sock.listen(128)
        sock.setblocking(False)
        return sock
    raise AssertionError("unreachable")


async def start_geodes(
    config: Config, make_app: GeodeApp
) -> tuple[Config, list[web.AppRunner]]:
    """Start every geode of ``config``; return the config pointing at where they listen."""
    socks = {g.name: _bind(g) for g in config.geodes}
    live = {
        g.name: dataclasses.replace(g, url=g.url.with_port(socks[g.name].getsockname()[1]))
        for g in config.geodes
    }
    runners: list[web.AppRunner] = []
    try:
        for geode in live.values():
            app = make_app(geode, live)
            # A stamp's runner carries its listener limits (head timeout, idle keep-alive).
            runner = stamp_runner(app) if STATE in app else web.AppRunner(app, access_log=None)
            await runner.setup()
            runners.append(runner)
            await web.SockSite(runner, socks.pop(geode.name)).start()
    except BaseException:
        for runner in runners:
            await runner.cleanup()
        raise
    finally:
        for sock in socks.values():
            sock.close()
    return dataclasses.replace(config, geodes=tuple(live.values())), runners


def peer_listeners(runners: list[web.AppRunner]) -> dict[str, str]:
    """Where each started stamp's peer listener is (replication, /events, /metrics)."""
    found = {}
    for runner in runners:
        state = runner.app.get(STATE)
        if state is not None and state.peer_address is not None:
            host, port = state.peer_address
            found[state.config.name] = f"http://{host}:{port}"
    return found


def curl_lines(proxy_url: str, admin_url: str) -> str:
    put = "curl -s -X PUT -H 'Content-Type: application/json'"
    return "\n".join([
        f"  curl -s -H 'CF-IPCountry: FR' {proxy_url}/health       # France -> eu-west",
        f"  curl -s -H 'CF-IPCountry: BR' {proxy_url}/health       # Brazil: sa-east has no "
        "geode -> us-east",
        "  # write as a French client, read back as a Japanese one (replicated in ~1 s):",
        f"  {put} -H 'CF-IPCountry: FR' -d '{{\"greeting\": \"bonjour\"}}' "
        f"{proxy_url}/items/hello",
        f"  curl -s -H 'CF-IPCountry: JP' {proxy_url}/items/hello",
        f"  curl -s -X POST -H 'CF-IPCountry: US' -d '{{\"delta\": 5}}' "
        f"{proxy_url}/counters/visits",
        f"  curl -s {admin_url}/geodes                             # health of every geode",
        f"  curl -s {admin_url}/status                             # the status page",
    ])  # fmt: skip
