"""``geoproxy demo``: the shipped demo config, three small demo geodes on loopback, and the
proxy in front of them.

The geodes come from a ``GeodeLauncher``; the built-in one serves tiny apps that answer with
their name and region. The reference stamp (a later piece of work) plugs in as another
launcher without touching the proxy side.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path

from aiohttp import web
from yarl import URL

from geoproxy.config import Config, Geode

log = logging.getLogger("geoproxy.demo")

#: Starts one geode's server; returns the runner (to clean up) and the URL it serves on.
GeodeLauncher = Callable[[Geode], Awaitable[tuple[web.AppRunner, URL]]]


def config_dir() -> Path:
    """The shipped ``config/`` folder: inside an installed wheel, else the source tree."""
    packaged = resources.files("geoproxy") / "_config"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / "config"


def demo_config_path() -> Path:
    return config_dir() / "demo.yaml"


def demo_geode_app(name: str, region: str) -> web.Application:
    """A stand-in geode: ``/health`` and a catch-all that tells who answered."""

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "geode": name, "region": region})

    async def hello(request: web.Request) -> web.Response:
        return web.json_response({
            "geode": name,
            "region": region,
            "method": request.method,
            "path": request.path_qs,
            "x_forwarded_for": request.headers.get("X-Forwarded-For"),
        })  # fmt: skip

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_route("*", "/{tail:.*}", hello)
    return app


async def launch_demo_geode(geode: Geode) -> tuple[web.AppRunner, URL]:
    runner = web.AppRunner(demo_geode_app(geode.name, geode.region), access_log=None)
    await runner.setup()
    host = geode.url.host or "127.0.0.1"
    port = geode.url.port or 80
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            await runner.cleanup()
            raise
        log.warning("demo geode %s: port %d is taken; using a free port", geode.name, port)
        site = web.TCPSite(runner, host, 0)
        await site.start()
    addresses = runner.addresses
    port = addresses[0][1]
    return runner, geode.url.with_port(port)


async def start_geodes(
    config: Config, launch: GeodeLauncher = launch_demo_geode
) -> tuple[Config, list[web.AppRunner]]:
    """Start every geode of ``config``; return the config pointing at where they listen."""
    runners: list[web.AppRunner] = []
    geodes = []
    try:
        for geode in config.geodes:
            runner, url = await launch(geode)
            runners.append(runner)
            geodes.append(dataclasses.replace(geode, url=url))
    except BaseException:
        for runner in runners:
            await runner.cleanup()
        raise
    return dataclasses.replace(config, geodes=tuple(geodes)), runners


def curl_lines(proxy_url: str, admin_url: str) -> str:
    return "\n".join([
        f"  curl -s -H 'CF-IPCountry: FR' {proxy_url}/            # France -> eu-west",
        f"  curl -s -H 'CF-IPCountry: JP' {proxy_url}/            # Japan -> ap-northeast",
        f"  curl -s -H 'CF-IPCountry: BR' {proxy_url}/            # Brazil: sa-east has no "
        "geode -> falls back to us-east",
        f"  curl -s -H 'X-Client-Region: us-east' {proxy_url}/hello",
        f"  curl -s -i {proxy_url}/                               # no header: default region",
        f"  curl -s {admin_url}/geodes                            # health of every geode",
        f"  curl -s {admin_url}/readyz",
    ])  # fmt: skip
