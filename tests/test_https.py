"""HTTPS on the proxy listener (``listen.proxy.tls``): the handshake and its profile,
proxying over it on every request path, SNI selection, certificates reloaded from disk
under load without a failed request, a bad new certificate kept out, and session
resumption across a rotation. Certificates come from a throwaway CA (tls_certs.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import warnings
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from cryptography import x509
from test_configmap_reload import ConfigMapVolume
from test_geoip_update import Load, watching
from test_workers import supervised

from geoproxy.config import loader as config_mod
from geoproxy.process.server import Bound, serve

from conftest import GeodeFactory, ProxyFactory, base_config, geode_entry
from tls_certs import Authority, Pair


@pytest.fixture(params=["fast", "coroutine", "public"])
def lane(request: pytest.FixtureRequest) -> str:
    """Every test here runs on each request path (conftest.py's ``lane``)."""
    return str(request.param)


@pytest.fixture
def authority(tmp_path: Path) -> Authority:
    return Authority(tmp_path)


def https_config(geodes: list[dict[str, Any]], tls: Any, **listen: Any) -> dict[str, Any]:
    data = base_config(geodes, access_log="off", reload={"poll_interval": "100ms"})
    data["listen"]["proxy"]["tls"] = tls
    data["listen"]["proxy"].update(listen)
    return data


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def handshake(
    url: str, context: ssl.SSLContext, server_name: str | None
) -> tuple[ssl.SSLObject, int]:
    """A TLS connection to the proxy: its SSL object and the serial number of the
    certificate the proxy presented. Closed again at once."""
    _reader, writer = await asyncio.open_connection(
        "127.0.0.1", port_of(url), ssl=context, server_hostname=server_name
    )
    tls = writer.get_extra_info("ssl_object")
    der = tls.getpeercert(binary_form=True)
    writer.close()
    await writer.wait_closed()
    return tls, x509.load_der_x509_certificate(der).serial_number


async def _count(into: list[int]) -> None:
    into[:] = [(into[0] if into else 0) + 1]


def unchecked(authority: Authority) -> ssl.SSLContext:
    """A client that takes any name (to see which certificate comes without SNI)."""
    return authority.client(check_hostname=False)


async def test_proxies_over_https_with_tls_1_2_or_later_alpn_and_forwarded_proto_https(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, authority: Authority
) -> None:
    eu = await geode_factory("eu-1", "eu-west")
    pair = authority.issue("proxy.test")
    proxy = await proxy_factory(https_config([geode_entry(eu)], pair.entry()))
    assert proxy.url.startswith("https://")
    client = authority.client()
    connector = aiohttp.TCPConnector(ssl=client)
    async with aiohttp.ClientSession(connector=connector) as http:
        for _ in range(3):  # the first on a new connection, then kept alive
            url = proxy.url.replace("127.0.0.1", "proxy.test")
            async with http.get(
                f"{proxy.url}/echo", headers={"Host": "proxy.test"}, server_hostname="proxy.test"
            ) as resp:
                assert resp.status == 200, url
                seen = (await resp.json())["headers"]
            assert seen["x-forwarded-proto"] == ["https"]
            assert seen["x-forwarded-host"] == ["proxy.test"]
    client.set_alpn_protocols(["h2", "http/1.1"])
    tls, serial = await handshake(proxy.url, client, "proxy.test")
    assert serial == pair.serial
    assert tls.version() in ("TLSv1.2", "TLSv1.3")
    assert tls.selected_alpn_protocol() == "http/1.1"


async def test_tls_1_1_is_refused_by_the_proxy(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, authority: Authority
) -> None:
    eu = await geode_factory("eu-1", "eu-west")
    proxy = await proxy_factory(https_config([geode_entry(eu)], authority.issue("p.test").entry()))
    old = authority.client(check_hostname=False)
    with warnings.catch_warnings():  # the standard library deprecates asking for it
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("DEFAULT:@SECLEVEL=0")  # this client would; the proxy must not

    def connect() -> None:
        with socket.create_connection(("127.0.0.1", port_of(proxy.url)), timeout=5) as raw:
            old.wrap_socket(raw, server_hostname="p.test").close()

    with pytest.raises(ssl.SSLError) as info:
        await asyncio.to_thread(connect)
    # The server's alert, not the client refusing on its own.
    # The server's alert (the client would have gone on), or asyncio's server hanging up
    # without sending it.
    assert "TLSV1_ALERT_PROTOCOL_VERSION" in str(info.value) or isinstance(
        info.value, ssl.SSLEOFError
    )


async def test_sni_selects_the_certificate_naming_the_host_else_the_first(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, authority: Authority
) -> None:
    eu = await geode_factory("eu-1", "eu-west")
    first = authority.issue("a.test")
    wild = authority.issue("*.b.test", file="wild-b")
    exact = authority.issue("x.b.test", "c.test")
    tls = [first.entry(), wild.entry(), exact.entry()]
    proxy = await proxy_factory(https_config([geode_entry(eu)], tls))
    client = authority.client()
    cases = {"a.test": first, "y.b.test": wild, "x.b.test": exact, "C.TEST": exact}
    for name, pair in cases.items():
        assert (await handshake(proxy.url, client, name))[1] == pair.serial, name
    anything = unchecked(authority)
    for name in (None, "b.test", "z.y.b.test", "unknown.test"):  # the default
        assert (await handshake(proxy.url, anything, name))[1] == first.serial, name


def tls_volume(root: Path, data: dict[str, Any], pair: Pair) -> ConfigMapVolume:
    """A Secret-like folder (symlinks swapped in one step, as the kubelet does it)
    holding the config and the certificate pair as tls.crt and tls.key."""
    volume = ConfigMapVolume(root)
    volume.write(volume_files(data, pair))
    return volume


def volume_files(data: dict[str, Any], pair: Pair) -> dict[str, str]:
    config = {**data}
    config["listen"] = {**data["listen"]}
    config["listen"]["proxy"] = {
        **data["listen"]["proxy"],
        "tls": {"cert": "tls.crt", "key": "tls.key"},
    }
    return {
        "geoproxy.yaml": yaml.safe_dump(config),
        "tls.crt": pair.cert.read_text(),
        "tls.key": pair.key.read_text(),
    }


async def test_a_renewed_certificate_is_served_to_new_handshakes_under_load_with_no_failed_request(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    authority: Authority,
    tmp_path: Path,
) -> None:
    eu = await geode_factory("eu-1", "eu-west")
    old = authority.issue("localhost", "127.0.0.1", file="old")
    data = https_config([geode_entry(eu)], old.entry())
    proxy = await proxy_factory(data)
    volume = tls_volume(tmp_path / "secret", data, old)
    await proxy.gateway.reload(config_mod.load(volume.root / "geoproxy.yaml"))
    client = authority.client()
    opened: list[int] = []
    reused: list[int] = []
    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(lambda *_: _count(opened))
    trace.on_connection_reuseconn.append(lambda *_: _count(reused))
    kept = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=client, limit=1), trace_configs=[trace]
    )
    async with kept, watching(proxy):
        async with kept.get(f"{proxy.url}/whoami") as resp:  # opened before, kept alive
            assert resp.status == 200
        async with Load(f"{proxy.url}/whoami", clients=4, fresh=True, ssl=client) as load:
            await load.more(100)
            new = authority.issue("localhost", "127.0.0.1", file="new")
            volume.write(volume_files(data, new))
            async with asyncio.timeout(10):
                while proxy.sample("geoproxy_config_reloads_total", result="success") < 1:  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
            await load.more(200)
        async with kept.get(f"{proxy.url}/whoami") as resp:
            assert resp.status == 200
        assert opened == [1] and reused == [1]  # the same connection, kept open
        assert (await handshake(proxy.url, client, "localhost"))[1] == new.serial
    assert load.failed() == []
    assert len(load.results) >= 300
    assert proxy.sample("geoproxy_config_reloads_total", result="failure") == 0


async def test_a_new_key_that_does_not_match_keeps_the_old_certificate_and_counts_a_failed_reload(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    authority: Authority,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "geoproxy")
    eu = await geode_factory("eu-1", "eu-west")
    old = authority.issue("localhost", file="site")
    proxy = await proxy_factory(https_config([geode_entry(eu)], old.entry()))
    client = authority.client()
    other = authority.issue("localhost", file="other")
    async with watching(proxy):
        old.key.write_bytes(other.key.read_bytes())  # a renewal that half happened
        async with asyncio.timeout(10):
            while proxy.sample("geoproxy_config_reloads_total", result="failure") < 1:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        assert (await handshake(proxy.url, client, "localhost"))[1] == old.serial
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert any(
            f"listen.proxy.tls: {old.cert} and {old.key}: the key does not belong to the "
            "certificate (CN=localhost"
            in line
            or "the key does not belong" in line
            for line in errors
        ), errors
        old.cert.write_bytes(other.cert.read_bytes())  # ...and then completes
        async with asyncio.timeout(10):
            while proxy.sample("geoproxy_config_reloads_total", result="success") < 1:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        assert (await handshake(proxy.url, client, "localhost"))[1] == other.serial
    assert proxy.sample("geoproxy_config_reloads_total", result="failure") == 1
    (reloaded,) = [r.getMessage() for r in caplog.records if "config reloaded" in r.getMessage()]
    assert f"listen.proxy.tls: certificates renewed or changed, now {old.cert}: localhost; " in (
        reloaded
    )
    assert "restart" not in reloaded  # a renewal takes effect at once


def _get(
    port: int, context: ssl.SSLContext, session: ssl.SSLSession | None
) -> tuple[ssl.SSLSession | None, bool]:
    """A blocking HTTPS request (the standard library's client resumes sessions): the
    session after its answer was read (TLS 1.3 tickets come after the handshake), and
    whether it was resumed."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    with context.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
        tls.sendall(b"GET /whoami HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        while tls.recv(65536):
            pass
        return tls.session, bool(tls.session_reused)


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_a_session_resumes_across_a_certificate_rotation(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    authority: Authority,
    version: ssl.TLSVersion,
) -> None:
    eu = await geode_factory("eu-1", "eu-west")
    data = https_config([geode_entry(eu)], authority.issue("localhost", file="one").entry())
    proxy = await proxy_factory(data)
    port, client = port_of(proxy.url), authority.client(maximum_version=version)
    serial_before = (await handshake(proxy.url, client, "localhost"))[1]
    session, reused = await asyncio.to_thread(_get, port, client, None)
    assert not reused
    session, reused = await asyncio.to_thread(_get, port, client, session)
    assert reused
    rotated = https_config([geode_entry(eu)], authority.issue("localhost", file="two").entry())
    path = proxy.gateway.config.path.with_name("rotated.yaml")
    path.write_text(yaml.safe_dump(rotated))
    await proxy.gateway.reload(config_mod.load(path))
    assert (await handshake(proxy.url, client, "localhost"))[1] != serial_before
    session, reused = await asyncio.to_thread(_get, port, client, session)
    assert reused


async def test_hsts_is_sent_over_https_in_place_of_the_geodes_own_when_configured(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, authority: Authority
) -> None:
    eu = await geode_factory("eu-1", "eu-west")
    hsts = {"max_age": "365d", "include_subdomains": True}
    pair = authority.issue("localhost")
    on = await proxy_factory(
        {
            **https_config([geode_entry(eu)], pair.entry(), hsts=hsts),
            "access": [{"path_prefix": "/private/", "action": "deny"}],
        }
    )
    off = await proxy_factory(https_config([geode_entry(eu)], pair.entry()))
    connector = aiohttp.TCPConnector(ssl=authority.client())
    async with aiohttp.ClientSession(connector=connector) as http:
        # /hsts: the geode sets its own; /private/: geoproxy's own answer (404)
        for path, status in (("/whoami", 200), ("/hsts", 200), ("/private/x", 404)):
            async with http.get(f"{on.url.replace('127.0.0.1', 'localhost')}{path}") as resp:
                assert resp.status == status
                assert resp.headers.getall("Strict-Transport-Security") == [
                    "max-age=31536000; includeSubDomains"
                ]
        url = off.url.replace("127.0.0.1", "localhost")
        async with http.get(f"{url}/whoami") as resp:
            assert "Strict-Transport-Security" not in resp.headers
        async with http.get(f"{url}/hsts") as resp:  # the geode's own passes
            assert resp.headers.getall("Strict-Transport-Security") == ["max-age=60"]


@contextlib.asynccontextmanager
async def serving(cfg: Any) -> AsyncIterator[Bound]:
    """``geoproxy run`` of ``cfg`` (its redirect listener included) until the block ends:
    where it listens."""
    stop, ready = asyncio.Event(), asyncio.Event()
    bound: list[Bound] = []

    def on_ready(where: Bound) -> None:
        bound.append(where)
        ready.set()

    task = asyncio.create_task(serve(cfg, stop, on_ready=on_ready))
    try:
        async with asyncio.timeout(10):
            await ready.wait()
        (where,) = bound
        assert where.redirect is not None
        yield where
    finally:
        stop.set()
        async with asyncio.timeout(15):
            await task


async def test_the_redirect_listener_answers_308_to_the_same_url_over_https(
    geode_factory: GeodeFactory, authority: Authority, write_config: Callable[..., Path]
) -> None:
    eu = await geode_factory("eu-1", "eu-west")
    data = https_config([geode_entry(eu)], authority.issue("localhost").entry())
    data["listen"]["redirect"] = {"host": "127.0.0.1", "port": 0}
    async with serving(config_mod.load(write_config(data))) as where:
        plain = f"http://127.0.0.1:{where.redirect[1]}"
        https_port = where.proxy[1]
        connector = aiohttp.TCPConnector(ssl=authority.client())
        async with aiohttp.ClientSession(connector=connector) as http:
            for method in ("GET", "POST"):
                async with http.request(
                    method,
                    f"{plain}/a/b?c=1",
                    headers={"Host": f"LocalHost:{where.redirect[1]}"},
                    data=b"x" * 10 if method == "POST" else None,
                    allow_redirects=False,
                ) as resp:
                    assert resp.status == 308
                    assert resp.headers["Location"] == f"https://localhost:{https_port}/a/b?c=1"
                    assert "Strict-Transport-Security" not in resp.headers  # never over HTTP
            async with http.get(f"http://localhost:{where.redirect[1]}/whoami") as resp:
                assert resp.status == 200  # followed to the proxy, over HTTPS
                assert str(resp.url) == f"https://localhost:{https_port}/whoami"
                assert (await resp.json())["geode"] == "eu-1"
        reader, writer = await asyncio.open_connection("127.0.0.1", where.redirect[1])
        writer.write(b"GET / HTTP/1.0\r\n\r\n")  # no Host
        assert (await reader.read()).startswith(b"HTTP/1.1 400 ")
        writer.close()


async def test_the_redirect_listener_closes_a_connection_whose_head_never_ends(
    geode_factory: GeodeFactory, authority: Authority, write_config: Callable[..., Path]
) -> None:
    """limits.header_timeout holds on the plain-HTTP redirect listener too: a client
    that never finishes its request head gets a 408 and is closed (slowloris on port
    80), as on the proxy listener."""
    eu = await geode_factory("eu-1", "eu-west")
    data = https_config([geode_entry(eu)], authority.issue("localhost").entry())
    data["listen"]["redirect"] = {"host": "127.0.0.1", "port": 0}
    data["limits"] = {"header_timeout": "300ms"}
    async with serving(config_mod.load(write_config(data))) as where:
        reader, writer = await asyncio.open_connection("127.0.0.1", where.redirect[1])
        writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n")  # and nothing more
        try:
            async with asyncio.timeout(5):
                answer = await reader.read()
            assert answer.startswith(b"HTTP/1.1 408 ")
        finally:
            writer.close()
        # A request that does come in time is still answered.
        reader, writer = await asyncio.open_connection("127.0.0.1", where.redirect[1])
        writer.write(b"GET /a HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        async with asyncio.timeout(5):
            assert (await reader.read()).startswith(b"HTTP/1.1 308 ")
        writer.close()


async def test_workers_serve_https_and_each_takes_a_renewed_certificate(
    geode_factory: GeodeFactory, authority: Authority, tmp_path: Path
) -> None:
    eu = await geode_factory("eu-1", "eu-west")
    old = authority.issue("localhost", file="old")
    data = https_config([geode_entry(eu)], old.entry())
    data["listen"]["redirect"] = {"host": "127.0.0.1", "port": 0}
    volume = tls_volume(tmp_path / "secret", data, old)
    client = authority.client()

    async def serials(url: str, n: int) -> set[int]:
        """The certificates ``n`` new connections got (spread over the workers)."""
        return {(await handshake(url, client, "localhost"))[1] for _ in range(n)}

    async with supervised(volume.root / "geoproxy.yaml", workers=2) as proxy:
        assert proxy.proxy_url.startswith("https://")
        connector = aiohttp.TCPConnector(ssl=client, force_close=True)
        async with aiohttp.ClientSession(connector=connector) as http:
            url = proxy.proxy_url.replace("127.0.0.1", "localhost")
            for _ in range(10):
                async with http.get(f"{url}/echo") as resp:
                    assert resp.status == 200
                    assert (await resp.json())["headers"]["x-forwarded-proto"] == ["https"]
        assert await serials(proxy.proxy_url, 10) == {old.serial}
        # The supervisor serves the redirect listener.
        found = await proxy.wait_for(r"redirecting plain HTTP on (http://\S+) to HTTPS port (\d+)")
        assert int(found.group(2)) == port_of(proxy.proxy_url)
        async with (
            aiohttp.ClientSession() as plain,
            plain.get(
                f"{found.group(1)}/x?y=1", headers={"Host": "localhost"}, allow_redirects=False
            ) as resp,
        ):
            assert resp.status == 308
            assert resp.headers["Location"] == f"https://localhost:{found.group(2)}/x?y=1"
        new = authority.issue("localhost", file="new")
        volume.write(volume_files(data, new))
        await proxy.wait_for("config reloaded")
        async with asyncio.timeout(5):
            while await serials(proxy.proxy_url, 20) != {new.serial}:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        assert "failed" not in proxy.output


async def test_a_client_that_finishes_its_handshake_late_still_gets_the_head_deadline(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, authority: Authority
) -> None:
    """limits.header_timeout counts from the accept; a TLS client that completes its
    handshake only after it and then sends nothing is answered 408 and closed, not kept
    (slowloris over TLS)."""
    eu = await geode_factory("eu-1", "eu-west")
    data = https_config([geode_entry(eu)], authority.issue("localhost").entry())
    data["limits"] = {"header_timeout": "300ms"}
    proxy = await proxy_factory(data)
    raw = socket.create_connection(("127.0.0.1", port_of(proxy.url)))
    raw.setblocking(False)
    await asyncio.sleep(0.6)  # past the deadline, before the handshake
    reader, writer = await asyncio.open_connection(
        sock=raw, ssl=authority.client(), server_hostname="localhost"
    )
    try:
        async with asyncio.timeout(5):
            answer = await reader.read()
        assert answer.startswith(b"HTTP/1.1 408 ")
    finally:
        writer.close()


async def test_a_websocket_is_proxied_over_https_with_forwarded_proto_https(
    geode_factory: GeodeFactory, proxy_factory: ProxyFactory, authority: Authority
) -> None:
    eu = await geode_factory("eu-1", "eu-west")
    proxy = await proxy_factory(
        https_config([geode_entry(eu)], authority.issue("localhost").entry())
    )
    url = proxy.url.replace("https://127.0.0.1", "wss://localhost")
    connector = aiohttp.TCPConnector(ssl=authority.client())
    async with (
        aiohttp.ClientSession(connector=connector) as http,
        http.ws_connect(f"{url}/ws") as ws,
    ):
        assert (await ws.receive_json())["geode"] == "eu-1"
        await ws.send_str("hello")
        assert await ws.receive_str() == "eu-1: hello"
    assert eu.last_headers["x-forwarded-proto"] == ["https"]
