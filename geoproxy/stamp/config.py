"""Stamp configuration: YAML -> a frozen ``StampConfig``, errors named like the proxy's
(``config/stamps/eu-west.yaml: peers[1].url: ...``)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from yarl import URL

from geoproxy.errors import ConfigError
from geoproxy.schema import Node, Problems, parse_duration, parse_http_url, read_yaml

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


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
    keys = ("name", "region", "listen", "database", "peers", "replication", "durability")
    if not root.expect_mapping(keys, required=("name", "region", "database")):
        return None
    name = _name(root.get("name"))
    region = root.get("region").string()
    listen = root.get("listen")
    listen.expect_mapping(("host", "port"), allow_missing=True)
    host = listen.get("host").string(optional=True) or "127.0.0.1"
    port = listen.get("port").integer(0, 65535, optional=True)
    database = root.get("database").string()
    peers = []
    seen = {name}
    for item in root.get("peers").items(optional=True):
        if not item.expect_mapping(("name", "url"), required=("name", "url")):
            continue
        peer = _name(item.get("name"))
        url = parse_http_url(item.get("url"))
        if peer in seen:
            item.get("name").problem(f"duplicate stamp name {peer!r}")
        elif peer and url:
            seen.add(peer)
            peers.append(Peer(peer, url))
    replication = _replication(root.get("replication"), len(peers))
    durability = root.get("durability").choice(("full", "normal"), optional=True) or "full"
    if not (name and region and database):
        return None
    return StampConfig(
        path=path, name=name, region=region, host=host, port=8101 if port is None else port,
        database=path.parent / database, peers=tuple(peers), replication=replication,
        durable=durability == "full",
    )  # fmt: skip


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
        sub = node.get(key)
        return default if sub.missing else (parse_duration(sub) or default)

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
