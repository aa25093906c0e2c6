"""The admin listener: liveness, readiness and geode health as JSON.
Binds to loopback by default (``listen.admin``)."""

from __future__ import annotations

from aiohttp import web

from geoproxy.health import HealthBoard

BOARD = web.AppKey("board", HealthBoard)


async def healthz(request: web.Request) -> web.Response:
    """The process is alive and its event loop answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready once the first health round is done and at least one geode is healthy."""
    board = request.app[BOARD]
    if not board.first_round_done:
        return web.json_response({"ready": False, "reason": "first health round running"},
                                 status=503)  # fmt: skip
    if not board.healthy:
        return web.json_response({"ready": False, "reason": "no healthy geode"}, status=503)
    return web.json_response({"ready": True, "healthy_geodes": sorted(board.healthy)})


async def geodes(request: web.Request) -> web.Response:
    board = request.app[BOARD]
    return web.json_response({"geodes": [s.as_dict() for s in board.states.values()]})


def build_admin_app(board: HealthBoard) -> web.Application:
    app = web.Application()
    app[BOARD] = board
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/geodes", geodes)
    return app
