"""Error responses geoproxy itself sends: small JSON bodies with one stable shape,
``{"error": {"status": 503, "code": "no_healthy_geode", "message": "...", ...}}``."""

from __future__ import annotations

import json
from collections.abc import Mapping

from aiohttp import web


def json_error(
    status: int,
    code: str,
    message: str,
    headers: Mapping[str, str] | None = None,
    **details: object,
) -> web.Response:
    body = {"error": {"status": status, "code": code, "message": message, **details}}
    return web.Response(
        status=status,
        text=json.dumps(body, separators=(",", ":")) + "\n",
        content_type="application/json",
        headers=headers,
    )
