"""The control channel between the supervisor and its workers (``--workers N``): one JSON
object per line over a socket pair, each naming its type in ``op``. Every message type,
both ways, is made here and only here:

    supervisor -> worker  start    path, config, health,  first, once
                                   geoip
                          health   health                 active health, on every change
                          passed   geode, url             a check passed (re-admits an
                                                          ejected geode, as in one process)
                          reload   config, health         the supervisor's new config
                          geoip    identity               the GeoIP database file changed:
                                                          open it if it is still the one
                                                          validated
                          metrics  id                     send your counts
                          stop                            drain and exit
    worker -> supervisor  ready    fingerprint            serving
                          reloaded ok, fingerprint
                          metrics  id, families           (fleet.py)
                          drained  drained, cut           the drain's counts, last

``config`` carries the exact bytes of the supervisor's config files (worker.py says why):
``encode_sources`` and ``load_sent`` are the two ends of it.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from typing import Any

from geoproxy.config import loader as config_mod
from geoproxy.config.values import Config
from geoproxy.health.board import HealthBoard

Message = Mapping[str, Any]

#: The longest line either end reads: a metrics answer with many geodes is a long one.
LINE_LIMIT = 64 * 1024 * 1024


def encode_sources(config: Config) -> dict[str, str]:
    return {path: base64.b64encode(raw).decode() for path, raw in config.sources().items()}


def load_sent(path: str, sources: Mapping[str, str]) -> Config:
    """The config the supervisor sent (raises ConfigError like ``config.load``)."""
    given = {name: base64.b64decode(text) for name, text in sources.items()}
    return config_mod.load(path, given)


# supervisor -> worker
START, HEALTH, PASSED, RELOAD, GEOIP, METRICS, STOP = (
    "start",
    "health",
    "passed",
    "reload",
    "geoip",
    "metrics",
    "stop",
)
# worker -> supervisor (and METRICS, the answer)
READY, RELOADED, DRAINED = "ready", "reloaded", "drained"


def encode(message: Message) -> bytes:
    """One message as the line that carries it."""
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def decode(raw: bytes) -> dict[str, Any]:
    """One line as the message it carries; ValueError when it is none."""
    message = json.loads(raw)
    if not isinstance(message, dict) or not isinstance(message.get("op"), str):
        raise ValueError("not a control message (a JSON object with an 'op')")
    return message


def start(
    path: str,
    config: Mapping[str, str],
    health: object,
    geoip: Sequence[object] | None,
    workers: int = 1,
) -> Message:
    """``geoip``: the identity of the GeoIP database file the supervisor opened;
    ``workers``: how many share the listener (each allows its share of a geode's
    ``max_inflight``)."""
    return {
        "op": START,
        "path": path,
        "config": config,
        "health": health,
        "geoip": None if geoip is None else list(geoip),
        "workers": workers,
    }


def health_snapshot(board: HealthBoard) -> dict[str, dict[str, object]]:
    """The supervisor's active-check health of every geode, as sent to workers."""
    return {
        name: {"url": str(s.geode.url), "checked": s.checked, "healthy": s.healthy}
        for name, s in board.states.items()
    }


def health_results(
    snapshot: Mapping[str, Mapping[str, object]],
) -> list[tuple[str, str, bool, bool]]:
    """A sent snapshot as ``HealthBoard.take_checks`` reads it."""
    return [
        (name, str(entry.get("url")), bool(entry.get("checked")), bool(entry.get("healthy")))
        for name, entry in snapshot.items()
    ]


def health(snapshot: object) -> Message:
    return {"op": HEALTH, "health": snapshot}


def passed(geode: str, url: str) -> Message:
    return {"op": PASSED, "geode": geode, "url": url}


def reload(config: Mapping[str, str], snapshot: object) -> Message:
    return {"op": RELOAD, "config": config, "health": snapshot}


def geoip(identity: Sequence[object]) -> Message:
    return {"op": GEOIP, "identity": list(identity)}


def ask_metrics(ident: int) -> Message:
    return {"op": METRICS, "id": ident}


def stop() -> Message:
    return {"op": STOP}


def ready(fingerprint: str) -> Message:
    return {"op": READY, "fingerprint": fingerprint}


def reloaded(ok: bool, fingerprint: str) -> Message:
    return {"op": RELOADED, "ok": ok, "fingerprint": fingerprint}


def metrics(ident: object, families: object) -> Message:
    return {"op": METRICS, "id": ident, "families": families}


def drained(count: int, cut: int) -> Message:
    return {"op": DRAINED, "drained": count, "cut": cut}
