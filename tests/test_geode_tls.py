"""Geodes over HTTPS: real TLS geodes on loopback, certificates from a throwaway CA
(tests/tls_certs.py). A geode signed by the configured CA serves on every request path and
passes its health checks with the same context; one whose certificate is untrusted,
expired or for another host fails over with the reason in words, the same in the log,
the access log, ``/geodes`` and the metrics."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import TestServer
from cryptography import x509
from test_observability import access_lines
from test_stamp_api import eventually

from geoproxy.config import loader as config_mod
from geoproxy.health.tls import REASONS, GeodeContexts

from conftest import FakeGeode, Proxy, ProxyFactory, base_config, geode_entry
from tls_certs import Authority, write_atomically

__all__ = ["access_lines"]  # a fixture, used by name

NAME = "euw-1.test"  # the name the eu-west geode's certificate is for (SNI: server_name)


@pytest.fixture(params=["fast", "coroutine", "public"])
def lane(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def pki(tmp_path: Path) -> Authority:
    """The CA ``forwarding.tls.ca`` names (``ca.pem``)."""
    authority = Authority(tmp_path)
    authority.ca_file()
    return authority


TLSGeodeFactory = Callable[[str, str, ssl.SSLContext], Awaitable[FakeGeode]]


@pytest.fixture
async def tls_geode() -> AsyncIterator[TLSGeodeFactory]:
    """A FakeGeode serving HTTPS with the given server context."""
    servers: list[TestServer] = []

    async def make(name: str, region: str, context: ssl.SSLContext) -> FakeGeode:
        geode = FakeGeode(name, region)
        geode.server = TestServer(geode.app, host="127.0.0.1")
        await geode.server.start_server(ssl=context)
        servers.append(geode.server)
        return geode

    yield make
    for server in servers:
        await server.close()


def config(pki: Authority, *geodes: dict[str, Any], **tls: Any) -> dict[str, Any]:
    return base_config(
        list(geodes),
        forwarding={
            "connect_timeout": "1s",
            "response_timeout": "2s",
            "tls": {"ca": "ca.pem", **tls},
        },
    )


async def whoami(http: aiohttp.ClientSession, proxy: Proxy, region: str) -> tuple[int, Any]:
    async with http.get(f"{proxy.url}/whoami", headers={"X-Client-Region": region}) as resp:
        return resp.status, await resp.json()


async def geodes_view(http: aiohttp.ClientSession, proxy: Proxy) -> dict[str, Any]:
    async with http.get(f"{proxy.admin_url}/geodes") as resp:
        return {g["name"]: g for g in (await resp.json())["geodes"]}


@pytest.mark.parametrize("with_ca", [True, False], ids=["tls.ca", "system-store"])
async def test_a_geode_signed_by_the_configured_ca_serves_over_https_and_no_other(
    with_ca: bool,
    pki: Authority,
    tls_geode: TLSGeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
) -> None:
    """Health checks and traffic trust ``tls.ca``; without it, the system store does
    not know the private CA and the same geode is untrusted."""
    geode = await tls_geode("euw-1", "eu-west", pki.server(pki.issue(NAME)))
    data = config(pki, geode_entry(geode, tls={"server_name": NAME}))
    if not with_ca:
        del data["forwarding"]["tls"]["ca"]
    proxy = await proxy_factory(data)
    view = (await geodes_view(http, proxy))["euw-1"]
    if with_ca:
        assert view["state"] == "up"
        assert await whoami(http, proxy, "eu-west") == (200, {"geode": "euw-1", "path": "/whoami"})
        assert geode.hits["/whoami"] == 1
        return
    assert (view["state"], view["last_error"]) == (
        "down",
        "certificate verify failed: unable to get local issuer certificate (geode euw-1)",
    )
    reason = {"geode": "euw-1", "reason": "untrusted", "source": "health_check"}
    assert proxy.sample("geoproxy_geode_tls_errors_total", **reason) == 1


def _other_ca(pki: Authority) -> tuple[Path, Path]:
    pair = Authority(pki.folder).issue(NAME, file="other-ca")
    return pair.cert, pair.key


BAD_CERTIFICATES: dict[str, tuple[Callable[[Authority], tuple[Path, Path]], str, str]] = {
    "untrusted": (
        _other_ca,
        "untrusted",
        "certificate verify failed: unable to get local issuer certificate",
    ),
    "expired": (
        lambda pki: (p := pki.issue(NAME, expired=True)) and (p.cert, p.key),
        "expired",
        "certificate verify failed: certificate has expired",
    ),
    "wrong-host": (
        lambda pki: (p := pki.issue("other.test")) and (p.cert, p.key),
        "hostname_mismatch",
        f"certificate verify failed: Hostname mismatch, certificate is not valid for '{NAME}'.",
    ),
}


@pytest.mark.parametrize("case", BAD_CERTIFICATES, ids=list(BAD_CERTIFICATES))
async def test_a_bad_geode_certificate_fails_over_with_its_reason_on_every_surface(
    case: str,
    pki: Authority,
    tls_geode: TLSGeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    access_lines: list[str],
) -> None:
    """The eu-west geode is healthy at start; then it presents a bad certificate (new
    handshakes get it). A request fails over to us-east, and the reason is the same in
    the access log, /geodes (after the next health round) and the metrics."""
    make_bad, reason, words = BAD_CERTIFICATES[case]
    context = pki.server(pki.issue(NAME))
    home = await tls_geode("euw-1", "eu-west", context)
    other = await tls_geode("use-1", "us-east", pki.server(pki.issue("127.0.0.1")))
    proxy = await proxy_factory(
        config(pki, geode_entry(home, tls={"server_name": NAME}), geode_entry(other))
    )
    assert {g["state"] for g in (await geodes_view(http, proxy)).values()} == {"up"}
    context.load_cert_chain(*make_bad(pki))

    assert await whoami(http, proxy, "eu-west") == (200, {"geode": "use-1", "path": "/whoami"})
    message = f"{words} (geode euw-1)"
    line = json.loads(access_lines[-1])
    assert (line["geode"], line["attempts"], line["tls_error"]) == ("use-1", 2, message)
    assert proxy.sample("geoproxy_upstream_attempts_total", geode="euw-1", outcome="tls_error") == 1
    traffic = {"geode": "euw-1", "reason": reason, "source": "traffic"}
    assert proxy.sample("geoproxy_geode_tls_errors_total", **traffic) == 1
    assert proxy.sample("geoproxy_failovers_total", from_geode="euw-1", to_geode="use-1") == 1

    assert proxy.gateway.checker is not None
    await proxy.gateway.checker.check_once()
    assert (await geodes_view(http, proxy))["euw-1"]["last_error"] == message
    checks = {"geode": "euw-1", "reason": reason, "source": "health_check"}
    assert proxy.sample("geoproxy_geode_tls_errors_total", **checks) == 1


async def test_a_geode_that_requires_a_client_certificate_gets_the_configured_one(
    pki: Authority,
    tls_geode: TLSGeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
) -> None:
    clients = Authority(pki.folder)  # the geode trusts only this CA for clients
    server = pki.server(pki.issue(NAME), client_ca=clients.ca_file("client-ca"))
    geode = await tls_geode("euw-1", "eu-west", server)
    client = clients.issue("geoproxy.test", file="client")
    tls = {"server_name": NAME, "cert": client.cert.name, "key": client.key.name}
    proxy = await proxy_factory(config(pki, geode_entry(geode, tls=tls)))
    assert (await geodes_view(http, proxy))["euw-1"]["state"] == "up"
    assert await whoami(http, proxy, "eu-west") == (200, {"geode": "euw-1", "path": "/whoami"})
    # Its expiry is exported like the listener's certificates (the same alert rule).
    ends = proxy.sample(
        "geoproxy_tls_certificate_expiry_timestamp_seconds", certificate=str(client.cert)
    )
    assert (
        ends
        == x509.load_pem_x509_certificate(client.cert.read_bytes()).not_valid_after_utc.timestamp()
    )


async def test_a_geode_that_requires_a_client_certificate_refuses_a_proxy_without_one(
    pki: Authority,
    tls_geode: TLSGeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
) -> None:
    clients = Authority(pki.folder)
    server = pki.server(pki.issue(NAME), client_ca=clients.ca_file("client-ca"))
    geode = await tls_geode("euw-1", "eu-west", server)
    proxy = await proxy_factory(config(pki, geode_entry(geode, tls={"server_name": NAME})))
    view = (await geodes_view(http, proxy))["euw-1"]
    assert view["state"] == "down"
    assert view["last_error"] == (
        "the geode closed the connection after the TLS handshake without answering: does "
        "it require a client certificate (tls.cert and tls.key)? (geode euw-1)"
    )
    assert geode.hits["/health"] == 0


async def test_verify_false_reaches_a_geode_no_ca_vouches_for(
    pki: Authority,
    tls_geode: TLSGeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
) -> None:
    stranger = Authority(pki.folder).issue("other.test", file="stranger")
    geode = await tls_geode("euw-1", "eu-west", pki.server(stranger))
    proxy = await proxy_factory(config(pki, geode_entry(geode, tls={"verify": False})))
    assert proxy.gateway.config.warnings == (
        f"{proxy.gateway.config.path}: geodes[0].tls.verify: false: the certificate of geode "
        "euw-1 is not verified; anyone on the path to it can read and change its traffic",
    )
    assert await whoami(http, proxy, "eu-west") == (200, {"geode": "euw-1", "path": "/whoami"})


@pytest.mark.parametrize("lane", ["fast"])
async def test_a_reload_after_the_ca_file_changed_uses_the_new_ca(
    lane: str,
    pki: Authority,
    tls_geode: TLSGeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
) -> None:
    """The geode's new certificate comes from a new CA; the CA file is replaced in place
    (the same path, as cert-manager does): the reload builds a new context from it."""
    renewed = Authority(pki.folder)
    geode = await tls_geode("euw-1", "eu-west", renewed.server(renewed.issue(NAME, file="new")))
    proxy = await proxy_factory(config(pki, geode_entry(geode, tls={"server_name": NAME})))
    assert (await geodes_view(http, proxy))["euw-1"]["state"] == "down"
    ca_file = pki.folder / "ca.pem"
    assert ca_file in proxy.gateway.config.files  # the reload poll watches it
    write_atomically(ca_file, renewed.ca.cert_pem.bytes())

    assert await proxy.gateway.reload_from_file("test")
    last = proxy.gateway.last_reload
    assert last is not None and last.detail == "settings: forwarding.tls.ca renewed"
    assert proxy.gateway.checker is not None
    for _ in range(2):  # healthy_threshold
        await proxy.gateway.checker.check_once()
    assert (await geodes_view(http, proxy))["euw-1"]["state"] == "up"
    assert await whoami(http, proxy, "eu-west") == (200, {"geode": "euw-1", "path": "/whoami"})


def test_one_context_per_tls_block_rebuilt_when_its_file_changes(
    pki: Authority, tmp_path: Path
) -> None:
    """Geodes that share a tls block share its context; a context survives a reload
    that changed neither the block nor its files, and not one after its CA changed."""
    path = tmp_path / "geoproxy.yaml"
    entries = [{"name": n, "region": "eu-west", "url": f"https://{n}.test"} for n in ("a", "b")]
    entries.append(
        {
            "name": "c",
            "region": "eu-west",
            "url": "https://c.test",
            "tls": {"server_name": "c.internal"},
        }
    )
    path.write_text(yaml.safe_dump(config(pki, *entries)))
    contexts, geodes = GeodeContexts(), config_mod.load(path).geodes
    assert contexts.adopt(contexts.prepare(geodes)) == ["a", "b", "c"]
    a, b, c = (contexts.get(g) for g in geodes)
    assert a is b and a is not c
    assert contexts.adopt(contexts.prepare(config_mod.load(path).geodes)) == []
    write_atomically(pki.folder / "ca.pem", Authority(pki.folder).ca.cert_pem.bytes())
    assert contexts.adopt(contexts.prepare(config_mod.load(path).geodes)) == ["a", "b", "c"]


@pytest.mark.parametrize("lane", ["fast", "coroutine"])  # the lean client's own words
async def test_a_geode_that_never_completes_the_handshake_is_a_handshake_timeout(
    lane: str,
    pki: Authority,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    access_lines: list[str],
) -> None:
    """A port that accepts TCP and then says nothing: not a connect timeout."""
    held: list[asyncio.StreamWriter] = []

    async def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    entry = {"name": "euw-1", "region": "eu-west", "url": f"https://127.0.0.1:{port}"}
    data = config(pki, entry)
    data["forwarding"].update(connect_timeout="300ms", when_none_healthy="try_all")
    try:
        proxy = await proxy_factory(data)
        status, _ = await whoami(http, proxy, "eu-west")
    finally:
        for writer in held:
            writer.close()
        server.close()
    assert status == 502
    message = "TLS handshake timeout (0.3s) (geode euw-1)"
    assert json.loads(access_lines[-1])["tls_error"] == message
    timeout = {"geode": "euw-1", "reason": "handshake_timeout", "source": "traffic"}
    assert proxy.sample("geoproxy_geode_tls_errors_total", **timeout) == 1


def test_the_readme_names_every_tls_failure_reason() -> None:
    """The metric's reason label is a bounded set; operators find each one documented."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    [row] = [
        line for line in readme.splitlines() if line.startswith("| `geoproxy_geode_tls_errors")
    ]
    assert [r for r in REASONS if f"`{r}`" not in row] == []


@pytest.mark.parametrize("lane", ["fast"])  # WebSockets take one path on every lane
async def test_a_websocket_to_a_tls_geode_uses_its_context_and_a_bad_one_fails_over(
    lane: str,
    pki: Authority,
    tls_geode: TLSGeodeFactory,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
) -> None:
    context = pki.server(pki.issue(NAME))
    home = await tls_geode("euw-1", "eu-west", context)
    other = await tls_geode("use-1", "us-east", pki.server(pki.issue("127.0.0.1")))
    proxy = await proxy_factory(
        config(pki, geode_entry(home, tls={"server_name": NAME}), geode_entry(other))
    )
    headers = {"X-Client-Region": "eu-west"}
    async with http.ws_connect(f"{proxy.url}/ws", headers=headers) as ws:
        assert (await ws.receive_json())["geode"] == "euw-1"
        await ws.send_str("hello")
        assert await ws.receive_str() == "euw-1: hello"
    context.load_cert_chain(*_other_ca(pki))  # its next handshakes: an unknown CA
    async with http.ws_connect(f"{proxy.url}/ws", headers=headers) as ws:
        assert (await ws.receive_json())["geode"] == "use-1"
    failed = {"geode": "euw-1", "reason": "untrusted", "source": "traffic"}

    async def counted() -> bool:  # once the proxy's side of the socket has ended
        return proxy.sample("geoproxy_geode_tls_errors_total", **failed) == 1

    await eventually(counted, "the WebSocket's TLS failure counted")
    assert proxy.sample("geoproxy_upstream_attempts_total", geode="euw-1", outcome="tls_error") == 1


async def test_an_https_url_to_a_plain_http_port_says_the_geode_does_not_speak_tls(
    pki: Authority,
    geode_factory: Callable[[str, str], Awaitable[FakeGeode]],
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
) -> None:
    geode = await geode_factory("euw-1", "eu-west")
    entry = {**geode_entry(geode), "url": geode.url.replace("http://", "https://")}
    proxy = await proxy_factory(config(pki, entry))
    view = (await geodes_view(http, proxy))["euw-1"]
    assert view["last_error"] == (
        "the geode did not answer in TLS (is it an http:// port?) (geode euw-1)"
    )
    reason = {"geode": "euw-1", "reason": "not_tls", "source": "health_check"}
    assert proxy.sample("geoproxy_geode_tls_errors_total", **reason) == 1


async def test_geodes_sharing_a_url_with_other_client_certificates_never_share_a_connection(
    pki: Authority,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
) -> None:
    """Two geode entries at one URL, each with its own client certificate: a request to
    the second must not ride a kept-alive TLS session the first authenticated (the
    geode would take it for the first's identity)."""
    from aiohttp import web

    clients = Authority(pki.folder)
    server = pki.server(pki.issue(NAME), client_ca=clients.ca_file("client-ca"))

    async def who(request: web.Request) -> web.Response:
        cert = request.get_extra_info("peercert")
        names = [value for kind, value in (cert or {}).get("subjectAltName", ()) if kind == "DNS"]
        return web.json_response({"client": names[0] if names else None})

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/who", who)
    geode = TestServer(app, host="127.0.0.1")
    await geode.start_server(ssl=server)
    try:
        url = f"https://127.0.0.1:{geode.port}"
        entries = []
        for name, region in (("euw-1", "eu-west"), ("use-1", "us-east")):
            pair = clients.issue(f"proxy-{name}", file=f"client-{name}")
            tls = {"server_name": NAME, "cert": pair.cert.name, "key": pair.key.name}
            entries.append({"name": name, "region": region, "url": url, "tls": tls})
        proxy = await proxy_factory(config(pki, *entries))
        for region, expected in [("eu-west", "euw-1"), ("us-east", "use-1")] * 2:
            async with http.get(f"{proxy.url}/who", headers={"X-Client-Region": region}) as r:
                assert (r.status, await r.json()) == (200, {"client": f"proxy-{expected}"})
    finally:
        await geode.close()
