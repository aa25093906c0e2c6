"""Stamp configuration: YAML -> a frozen ``StampConfig``, errors named like the proxy's
(``config/stamps/eu-west.yaml: peers[1].url: ...``).

The fleet's shared secret (peer authentication) is read from a file or an environment
variable at load time, never written in the YAML itself, and never shown in a repr."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from yarl import URL

from geoproxy.config.schema import Node, Problems, parse_duration, parse_http_url, read_yaml
from geoproxy.errors import ConfigError
from geoproxy.stamp import tls as stamp_tls
from geoproxy.stamp.tls import StampTLS

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
#: The shortest shared secret accepted (bytes): 128 bits as 32 hex digits.
MIN_SECRET_BYTES = 32


@dataclass(frozen=True, slots=True)
class Peer:
    name: str
    url: URL


@dataclass(frozen=True, slots=True)
class Replication:
    interval: float = 1.0  # seconds between pushes when no write wakes the pusher
    batch_size: int = 500  # changes per push
    timeout: float = 5.0  # seconds for one push to a peer
    min_backoff: float = 0.1  # first retry delay after a failed push; doubles, with jitter
    max_backoff: float = 10.0  # cap of that delay
    sync_quorum: int | None = None  # peers that must confirm a sync write; None: all


@dataclass(frozen=True, slots=True)
class StampConfig:
    path: Path | None  # the file it came from (None when built in code)
    name: str  # unique among stamps: it breaks version ties
    region: str
    host: str
    port: int
    database: Path
    peers: tuple[Peer, ...]
    replication: Replication = Replication()
    durable: bool = True  # SQLite synchronous=FULL: a commit survives power loss
    peer_host: str = "127.0.0.1"  # the peer listener: replication and /metrics
    peer_port: int = 9101
    #: The fleet's shared secret: every replication request is signed with it. None: the
    #: peer listener refuses every replication request (a stamp without peers).
    secret: bytes | None = field(default=None, repr=False)
    auth_window: float = 30.0  # a signed request is good this long either side of now
    max_clock_skew: float = 60.0  # a peer's change further ahead of our clock is refused
    allow_clock_ahead: bool = False  # start even if the restored clock is beyond that
    max_replication_lag: float | None = None  # /health is 503 past it (None: never)
    header_timeout: float = 10.0  # a connection's first request head must arrive by then
    keepalive_timeout: float = 60.0  # an idle connection closes after this
    #: HTTPS on both listeners and to the peers; with its ``ca``, mutual TLS between
    #: peers (stamp/tls.py). None: plain HTTP.
    tls: StampTLS | None = None
    home_header: bool = False  # name this stamp's region in a ``Geoproxy-Home`` answer
    # header on every successful write (PUT, DELETE, POST): behind a geoproxy with
    # ``home_affinity.cookie``, the writer's later requests come here (read-your-writes).
    # The region must be the proxy's id for it.


def load(path: str | Path) -> StampConfig:
    path = Path(path)
    data = read_yaml(path)
    problems = Problems(str(path))
    root = Node(data, "", problems)
    cfg = _build(root, path)
    if problems or cfg is None:
        raise ConfigError(problems.lines)
    return cfg


def _build(root: Node, path: Path) -> StampConfig | None:
    keys = (
        "name",
        "region",
        "listen",
        "database",
        "peers",
        "replication",
        "durability",
        "peer_auth",
        "max_clock_skew",
        "health",
        "tls",
        "home_header",
    )
    if not root.expect_mapping(keys, required=("name", "region", "database")):
        return None
    name = _name(root.get("name"))
    region = root.get("region").string()
    listen = root.get("listen")
    listen.expect_mapping(("host", "port", "peer"), allow_missing=True)
    host = listen.get("host").string(optional=True) or "127.0.0.1"
    port = listen.get("port").integer(0, 65535, optional=True)
    peer_listen = listen.get("peer")
    peer_listen.expect_mapping(("host", "port"), allow_missing=True)
    peer_host = peer_listen.get("host").string(optional=True) or "127.0.0.1"
    peer_port = peer_listen.get("port").integer(0, 65535, optional=True)
    database = root.get("database").string()
    tls = stamp_tls.read(root.get("tls"), path.parent)
    mutual = not root.get("tls").get("ca").missing  # (even when the block is broken:
    # reported there, and no noise about a secret or peers' URLs)
    peers = []
    seen = {name}
    for item in root.get("peers").items(optional=True):
        if not item.expect_mapping(("name", "url"), required=("name", "url")):
            continue
        peer = _name(item.get("name"))
        url = parse_http_url(item.get("url"))
        if mutual and url is not None and url.scheme != "https":
            item.get("url").problem(f"must be https:// with tls.ca (mutual TLS): {str(url)!r}")
            url = None
        if peer in seen:
            item.get("name").problem(f"duplicate stamp name {peer!r}")
        elif peer and url:
            seen.add(peer)
            peers.append(Peer(peer, url))
    replication = _replication(root.get("replication"), len(peers))
    durability = root.get("durability").choice(("full", "normal"), optional=True) or "full"
    auth = root.get("peer_auth")
    secret = _secret(auth, path, needed=bool(peers) and not mutual)
    window = _duration(auth.get("window"), 30.0)
    skew = _duration(root.get("max_clock_skew"), 60.0)
    health = root.get("health")
    health.expect_mapping(("max_replication_lag",), allow_missing=True)
    lag_node = health.get("max_replication_lag")
    lag = None if lag_node.missing else parse_duration(lag_node)
    home_header = root.get("home_header").boolean(optional=True)
    if not (name and region and database):
        return None
    return StampConfig(
        path=path,
        name=name,
        region=region,
        host=host,
        port=8101 if port is None else port,
        database=path.parent / database,
        peers=tuple(peers),
        replication=replication,
        durable=durability == "full",
        peer_host=peer_host,
        peer_port=9101 if peer_port is None else peer_port,
        secret=secret,
        auth_window=window,
        max_clock_skew=skew,
        max_replication_lag=lag,
        tls=tls,
        home_header=bool(home_header),
    )


def _duration(node: Node, default: float) -> float:
    return default if node.missing else (parse_duration(node) or default)


def _secret(node: Node, path: Path, needed: bool) -> bytes | None:
    """The shared secret from ``secret_file`` (relative to the config file) or the
    environment variable ``secret_env``: exactly one of them."""
    if node.missing:
        if needed:
            node.problem(
                "required with peers: the fleet's shared secret, as secret_file "
                "or secret_env (never inline), unless tls.ca makes the peers speak "
                "mutual TLS"
            )
        return None
    if isinstance(node.value, dict) and "secret" in node.value:
        node.get("secret").problem(
            "never inline (the YAML is read by many): put the secret "
            "in secret_file, or name an environment variable in "
            "secret_env"
        )
        return None
    if not node.expect_mapping(("secret_file", "secret_env", "window")):
        return None
    file_node, env_node = node.get("secret_file"), node.get("secret_env")
    if file_node.missing == env_node.missing:
        node.problem("give exactly one of secret_file and secret_env")
        return None
    if not file_node.missing:
        name = file_node.string()
        if name is None:
            return None
        try:
            raw = (path.parent / name).read_bytes()
        except OSError as exc:
            file_node.problem(f"cannot read the secret file {name!r}: {exc.strerror or exc}")
            return None
        where = file_node
    else:
        var = env_node.string()
        if var is None:
            return None
        text = os.environ.get(var)
        if text is None:
            env_node.problem(f"environment variable {var!r} is not set")
            return None
        raw, where = text.encode(), env_node
    secret = raw.strip()
    if len(secret) < MIN_SECRET_BYTES:
        where.problem(
            f"the secret must be at least {MIN_SECRET_BYTES} bytes, got {len(secret)} "
            "(e.g. openssl rand -hex 32)"
        )
        return None
    return secret


def _name(node: Node) -> str | None:
    text = node.string()
    if text is not None and not _NAME.match(text):
        node.problem(f"invalid name {text!r} (letters, digits, '.', '_', '-'; up to 63)")
        return None
    return text


def _replication(node: Node, peers: int) -> Replication:
    base = Replication()
    keys = ("interval", "batch_size", "timeout", "min_backoff", "max_backoff", "sync_quorum")
    if node.missing or not node.expect_mapping(keys):
        return base

    def duration(key: str, default: float) -> float:
        return _duration(node.get(key), default)

    quorum_node = node.get("sync_quorum")
    quorum = None
    if not quorum_node.missing and quorum_node.value != "all":
        quorum = quorum_node.integer(0, peers)
    return Replication(
        interval=duration("interval", base.interval),
        batch_size=node.get("batch_size").integer(1, 10000, optional=True) or base.batch_size,
        timeout=duration("timeout", base.timeout),
        min_backoff=duration("min_backoff", base.min_backoff),
        max_backoff=duration("max_backoff", base.max_backoff),
        sync_quorum=quorum,
    )
