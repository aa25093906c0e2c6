"""The live state one proxy process serves from: the topology in force, trust rules, the
GeoIP reader, health state and the pooled client session. Built by ``app.py``; a reload
(later) replaces ``topology`` whole, so a request reads it once."""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp

from geoproxy.clientip import TrustedProxies
from geoproxy.geoip import GeoLookup
from geoproxy.health import HealthBoard
from geoproxy.model import Topology


@dataclass(slots=True)
class Runtime:
    topology: Topology
    trusted: TrustedProxies
    geoip: GeoLookup | None
    board: HealthBoard
    session: aiohttp.ClientSession
