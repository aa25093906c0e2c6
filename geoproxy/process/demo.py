"""``geoproxy demo``: the shipped demo config, three reference stamps on loopback (each
with its own SQLite file, replicating to the others), and the proxy in front of them.

The demo runs each stamp as its own ``geoproxy stamp`` process (``StampProcess``), from a
config file it writes into the data folder, and prints their PIDs: a user can stop, hang
(SIGSTOP) or kill one and watch failover, ejection, /status and the metrics change, then
start it again with the printed command. ``start_geodes`` runs geodes in this process
instead (the tests' in-process fleet).

Every geode's socket is bound first (its configured port, or a free one if taken), so each
app can be built knowing where all the others listen; the app comes from a ``GeodeApp``
factory, which is the seam between the proxy side and what the geodes are.

The stamps replicate over their own peer listeners (free loopback ports the proxy knows
nothing of), signed with a fleet secret made up for this run: the demo stays one command.
With ``--tls`` a throwaway CA (process/throwaway_ca.py) signs a certificate per stamp: the
stamps serve HTTPS, the proxy verifies them against the CA, and they authenticate each
other by mutual TLS instead of the secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import errno
import logging
import secrets
import shlex
import signal
import socket
import ssl
import sys
import time
from collections.abc import Callable, Mapping
from importlib import resources
from pathlib import Path

import aiohttp
import yaml
from aiohttp import web
from yarl import URL

from geoproxy.config.values import Config, Geode, GeodeTLS
from geoproxy.errors import GeoproxyError
from geoproxy.process import sockets
from geoproxy.stamp.config import Peer, Replication, StampConfig
from geoproxy.stamp.serve import peer_listener, runner_for, stamp_app

log = logging.getLogger("geoproxy.demo")

#: Builds one geode's app, given every geode as it really listens (its peers included).
GeodeApp = Callable[[Geode, Mapping[str, Geode]], web.Application]


def config_dir() -> Path:
    """The shipped ``config/`` folder: inside an installed wheel, else the source tree."""
    packaged = resources.files("geoproxy") / "_config"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / "config"


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
        peers = tuple(
            Peer(g.name, _peer_url(g, peer_socks[g.name]))
            for g in live.values()
            if g.name != geode.name
        )
        host = geode.url.host or ""
        return stamp_app(
            StampConfig(
                path=None,
                name=geode.name,
                region=geode.region,
                host=host,
                port=geode.url.port or 0,
                database=data_dir / f"{geode.name}.db",
                peers=peers,
                replication=Replication(interval=0.5),
                peer_host=host,
                peer_port=peer_socks[geode.name].getsockname()[1],
                secret=secret,
            ),
            peer_sock=peer_socks[geode.name],
        )

    return build


def _peer_url(geode: Geode, sock: socket.socket) -> URL:
    return geode.url.with_port(sock.getsockname()[1])


def _bind_any(host: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((host, 0))
    sock.listen(sockets.BACKLOG)
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
        sock.listen(sockets.BACKLOG)
        sock.setblocking(False)
        return sock
    raise AssertionError("unreachable")


async def start_geodes(config: Config, make_app: GeodeApp) -> tuple[Config, list[web.AppRunner]]:
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
            runner = runner_for(app)
            await runner.setup()
            runners.append(runner)
            await web.SockSite(runner, socks.pop(geode.name), backlog=sockets.BACKLOG).start()
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
    return dict(filter(None, (peer_listener(runner.app) for runner in runners)))


#: Appended to every curl line: the geode that served, from the proxy's response header.
SERVED_BY = "-w '  [%{http_code} from %header{x-geoproxy-geode}]\\n'"


def curl_lines(proxy_url: str, admin_url: str) -> str:
    curl = f"curl -s {SERVED_BY}"
    put = f"{curl} -X PUT -H 'Content-Type: application/json'"
    return "\n".join(
        [
            f"  {curl} -o /dev/null -H 'CF-IPCountry: FR' {proxy_url}/health   # France -> eu-west",
            f"  {curl} -o /dev/null -H 'CF-IPCountry: BR' {proxy_url}/health   # Brazil: sa-east "
            "has no geode -> us-east",
            "  # write as a French client, read back as a Japanese one (replicated in ~1 s):",
            f"  {put} -H 'CF-IPCountry: FR' -d '{{\"greeting\": \"bonjour\"}}' "
            f"{proxy_url}/items/hello",
            f"  {curl} -H 'CF-IPCountry: JP' {proxy_url}/items/hello",
            f"  {curl} -X POST -H 'CF-IPCountry: US' -d '{{\"delta\": 5}}' "
            f"{proxy_url}/counters/visits",
            f"  curl -s {admin_url}/geodes                             # health of every geode",
            f"  curl -s {admin_url}/status                             # the status page",
        ]
    )


# -- stamps as processes ------------------------------------------------------------------

#: Seconds a stamp process may take to answer its /health after it is started.
STAMP_START_TIMEOUT = 20.0


@dataclasses.dataclass
class StampProcess:
    """One stamp of the demo, run as ``geoproxy stamp --config <config_path>``."""

    geode: Geode  # where it listens (its public URL)
    config_path: Path
    peer_url: str  # its peer listener: replication, /events, /metrics
    proc: asyncio.subprocess.Process | None = None

    @property
    def command(self) -> list[str]:
        return [sys.executable, "-m", "geoproxy", "stamp", "--config", str(self.config_path)]

    @property
    def command_line(self) -> str:
        return shlex.join(self.command)

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *self.command, start_new_session=True, preexec_fn=_die_with_parent
        )  # a terminal's Ctrl-C reaches the demo, which stops its stamps in order

    async def stop(self, grace: float = 5.0) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)  # one the user froze must hear the SIGTERM
            proc.terminate()
        try:
            async with asyncio.timeout(grace):
                await proc.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


def _die_with_parent() -> None:
    """In the child before exec: the kernel stops it when the demo dies (Linux)."""
    if sys.platform == "linux":
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _free_port(host: str, wanted: int) -> int:
    """``wanted`` if nothing listens there, else one the kernel picks (logged)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for attempt in (wanted, 0) if wanted else (0,):
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, attempt))
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or attempt == 0:
                    raise
                continue
            port: int = sock.getsockname()[1]
            if attempt != wanted:
                log.warning("port %d is taken; using a free port", wanted)
            return port
    raise AssertionError("unreachable")


def write_stamp_configs(
    config: Config, data_dir: Path, tls: bool = False
) -> tuple[Config, list[StampProcess]]:
    """A stamp config file per geode of ``config`` in ``data_dir`` (free ports where the
    configured ones are taken; every other stamp a peer; one new fleet secret, or with
    ``tls`` a throwaway CA: HTTPS, and mutual TLS between the stamps), and the config
    pointing at where they will listen."""
    # Imported here: it imports cryptography (~9 MiB), which only --tls needs.
    from geoproxy.process.throwaway_ca import ThrowawayCA

    ca = ThrowawayCA() if tls else None
    # What the stamps share: the fleet secret, or with tls the CA's certificate.
    shared = data_dir / ("ca.pem" if ca else "fleet.secret")
    shared.write_bytes(ca.pem if ca else secrets.token_hex(32).encode() + b"\n")
    shared.chmod(0o600)
    geode_tls = GeodeTLS(ca=shared, ca_pem=ca.pem) if ca else GeodeTLS()
    stamps = []
    for g in config.geodes:
        host = g.url.host or "127.0.0.1"
        url = g.url.with_scheme("https" if ca else g.url.scheme)
        url = url.with_port(_free_port(host, g.url.port or 0))
        peer = str(url.with_port(_free_port(host, 0)))
        where = dataclasses.replace(g, url=url, tls=geode_tls)
        stamps.append(StampProcess(where, data_dir / f"{g.name}.yaml", peer))
    for stamp in stamps:
        g = stamp.geode
        doc = {
            "name": g.name,
            "region": g.region,
            "listen": {
                "host": g.url.host,
                "port": g.url.port,
                "peer": {"host": g.url.host, "port": URL(stamp.peer_url).port},
            },
            "database": f"{g.name}.db",
            "peers": [{"name": o.geode.name, "url": o.peer_url} for o in stamps if o is not stamp],
            "replication": {"interval": "500ms"},
            "peer_auth": {"secret_file": shared.name},
        }
        if ca is not None:  # mutual TLS alone authenticates the peers
            cert, key = ca.write(data_dir, g.name, [g.url.host or "127.0.0.1"])
            doc["tls"] = {"cert": cert.name, "key": key.name, "ca": shared.name}
            del doc["peer_auth"]
        head = f"# geoproxy demo: stamp {g.name}; start it again with\n#   {stamp.command_line}\n"
        stamp.config_path.write_text(head + yaml.safe_dump(doc))
    live = dataclasses.replace(config, geodes=tuple(s.geode for s in stamps))
    return live, stamps


async def start_stamps(stamps: list[StampProcess]) -> None:
    """Start every stamp process and wait until each answers its /health; one that exits
    or does not answer in time fails the start (GeoproxyError naming it)."""
    for stamp in stamps:
        await stamp.start()
    ca = stamps[0].geode.tls.ca_pem if stamps else None  # with --tls: the throwaway CA
    trust = ssl.create_default_context(cadata=ca.decode()) if ca else True
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trust)) as http:
        await asyncio.gather(*(_until_up(http, stamp) for stamp in stamps))


async def _until_up(http: aiohttp.ClientSession, stamp: StampProcess) -> None:
    assert stamp.proc is not None
    deadline = time.monotonic() + STAMP_START_TIMEOUT
    while time.monotonic() < deadline:
        if stamp.proc.returncode is not None:
            raise GeoproxyError(
                f"stamp {stamp.geode.name} exited at start-up (exit code "
                f"{stamp.proc.returncode}); see its messages above"
            )
        with contextlib.suppress(aiohttp.ClientError, OSError):
            async with http.get(
                stamp.geode.url / "health", timeout=aiohttp.ClientTimeout(total=1)
            ) as resp:
                if resp.status < 500:
                    return
        await asyncio.sleep(0.1)
    raise GeoproxyError(
        f"stamp {stamp.geode.name} did not answer on {stamp.geode.url} within "
        f"{STAMP_START_TIMEOUT:g}s"
    )


async def report_exits(stamps: list[StampProcess]) -> None:
    """Say when a stamp process ends while the demo runs (the user killed it, say)."""

    async def watch(stamp: StampProcess) -> None:
        assert stamp.proc is not None
        code = await stamp.proc.wait()
        how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        print(
            f"\nstamp {stamp.geode.name} (pid {stamp.proc.pid}) has stopped ({how}); the "
            "proxy fails its clients over once its health checks fail. Start it again "
            f"with:\n  {stamp.command_line}",
            flush=True,
        )

    await asyncio.gather(*(watch(s) for s in stamps))


def break_lines(stamps: list[StampProcess], admin_url: str) -> str:
    """How to break the demo, with the real PIDs."""
    first = stamps[0]
    pid = first.proc.pid if first.proc is not None else "PID"
    name = first.geode.name
    return "\n".join(
        [
            f"Break it (and watch {admin_url}/status, /geodes and /metrics change):",
            f"  kill -STOP {pid}   # hang {name}: requests time out, health checks fail, clients "
            "fail over",
            f"  kill -CONT {pid}   # and back",
            f"  kill {pid}         # stop {name}; the demo prints the command that starts it again",
        ]
    )
