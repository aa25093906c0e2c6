"""The live state one proxy process serves from: the topology in force, trust rules, the
GeoIP reader, health and load state and the pooled client session. Built by ``app.py``; a reload
replaces the whole (frozen) object, so a request that reads it once sees one config."""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp

from geoproxy.config.model import Topology
from geoproxy.health.board import HealthBoard
from geoproxy.health.load import GeodeLoad
from geoproxy.health.tls import GeodeContexts
from geoproxy.routing.clientip import TrustedProxies
from geoproxy.routing.geoip import GeoLookup


@dataclass(frozen=True, slots=True)
class Runtime:
    topology: Topology
    trusted: TrustedProxies
    geoip: GeoLookup | None
    board: HealthBoard
    session: aiohttp.ClientSession
    via: str  # this instance's name in Via (loop detection)
    load: GeodeLoad  # in flight, capacity and latency per geode (kept across reloads)
    tls: GeodeContexts  # each https geode's TLS context (health checks use the same)
