"""The reference stamp over TLS: both listeners on HTTPS, and mutual TLS between peers as a
way to authenticate replication (alone, or with the shared secret). Real stamps on
loopback, certificates from a throwaway fleet CA (tests/tls_certs.py)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from prometheus_client import CollectorRegistry
from test_stamp_api import FAST, SECRET, bound_socket, eventually
from yarl import URL

from geoproxy.errors import ConfigError
from geoproxy.stamp import auth
from geoproxy.stamp import config as stamp_config
from geoproxy.stamp.app import build_stamp_app, stamp_runner
from geoproxy.stamp.config import Peer, StampConfig
from geoproxy.stamp.tls import StampTLS

from tls_certs import Authority, Pair


@pytest.fixture
def fleet(tmp_path: Path) -> Authority:
    """The fleet's CA (``ca.pem``)."""
    authority = Authority(tmp_path)
    authority.ca_file()
    return authority


def stamp_tls(fleet: Authority, pair: Pair) -> StampTLS:
    ca = fleet.folder / "ca.pem"
    return StampTLS(
        pair.cert, pair.key, ca, pair.cert.read_bytes(), pair.key.read_bytes(), ca.read_bytes()
    )


class TLSStamp:
    """A started stamp, both listeners on HTTPS, and the registry of its metrics."""

    def __init__(self, config: StampConfig, registry: CollectorRegistry) -> None:
        self.config, self.registry = config, registry

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.config.port}"

    @property
    def peer_url(self) -> str:
        return f"https://127.0.0.1:{self.config.peer_port}"


Fleet = Callable[..., Awaitable[list[TLSStamp]]]


@pytest.fixture
async def tls_fleet(fleet: Authority, tmp_path: Path) -> AsyncIterator[Fleet]:
    """``await tls_fleet(n, secret=None)``: n stamps, each the others' peer, each with a
    certificate naming it (and 127.0.0.1) from the fleet CA."""
    async with contextlib.AsyncExitStack() as stack:

        async def make(n: int = 2, secret: bytes | None = None) -> list[TLSStamp]:
            socks = [(bound_socket(), bound_socket()) for _ in range(n)]
            names = [f"stamp-{i}" for i in range(n)]
            ports = [(s.getsockname()[1], p.getsockname()[1]) for s, p in socks]
            made = []
            for i, (sock, peer_sock) in enumerate(socks):
                peers = tuple(
                    Peer(names[j], URL(f"https://127.0.0.1:{ports[j][1]}"))
                    for j in range(n)
                    if j != i
                )
                tls = stamp_tls(fleet, fleet.issue(names[i], "127.0.0.1"))
                config = StampConfig(
                    path=None,
                    name=names[i],
                    region="eu-west",
                    host="127.0.0.1",
                    port=ports[i][0],
                    database=tmp_path / f"{names[i]}.db",
                    peers=peers,
                    replication=FAST,
                    peer_port=ports[i][1],
                    secret=secret,
                    tls=tls,
                )
                registry = CollectorRegistry()
                runner = stamp_runner(
                    build_stamp_app(config, registry, peer_sock=peer_sock), shutdown_timeout=2.0
                )
                await runner.setup()
                stack.push_async_callback(runner.cleanup)
                context = tls.server_context(peers=False)
                await web.SockSite(runner, sock, ssl_context=context).start()
                made.append(TLSStamp(config, registry))
            return made

        yield make


def client(fleet: Authority, pair: Pair | None = None) -> aiohttp.ClientSession:
    """A client that trusts the fleet CA, presenting ``pair`` if given."""
    context = fleet.client()
    if pair is not None:
        context.load_cert_chain(pair.cert, pair.key)
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context))


async def test_peers_with_mutual_tls_and_no_secret_replicate_over_https(
    fleet: Authority, tls_fleet: Fleet
) -> None:
    a, b = await tls_fleet(2)
    async with client(fleet) as http:
        async with http.put(f"{a.url}/items/greeting", json={"hello": "tls"}) as resp:
            assert resp.status == 201

        async def arrived() -> bool:
            async with http.get(f"{b.url}/items/greeting") as resp:
                return resp.status == 200 and (await resp.json())["value"] == {"hello": "tls"}

        await eventually(arrived, "the item reached stamp-1 over mutual TLS")
    pushed = {"peer": "stamp-1", "result": "ok"}
    assert (a.registry.get_sample_value("stamp_replication_pushes_total", pushed) or 0) >= 1


async def push(
    http: aiohttp.ClientSession, stamp: TLSStamp, sender: str, secret: bytes
) -> tuple[int, Any]:
    raw = json.dumps({"from": sender, "changes": []}).encode()
    url = f"{stamp.peer_url}/replication/changes"
    headers = auth.sign(secret, sender, "POST", URL(url).raw_path_qs, raw)
    async with http.post(url, data=raw, headers=headers) as resp:
        return resp.status, await resp.json()


@pytest.mark.parametrize("secret", [None, SECRET], ids=["mtls-alone", "mtls-and-secret"])
async def test_a_peer_certificate_that_names_another_stamp_is_refused(
    secret: bytes | None, fleet: Authority, tls_fleet: Fleet
) -> None:
    """Signed by the fleet CA, but for stamp-impostor: it may not speak for stamp-0,
    even with the right shared secret (with both, both must hold)."""
    _, b = await tls_fleet(2, secret=secret)
    impostor = fleet.issue("stamp-impostor", file="impostor")
    async with client(fleet, impostor) as http:
        status, body = await push(http, b, "stamp-0", secret or b"")
    assert status == 401
    assert body["error"]["message"] == (
        "not an authenticated peer: the client certificate names stamp-impostor, not peer 'stamp-0'"
    )
    refused = {"reason": "certificate_mismatch"}
    assert b.registry.get_sample_value("stamp_peer_auth_failures_total", refused) == 1
    # The same push over stamp-0's own certificate is taken.
    own = fleet.issue("stamp-0", file="stamp-0-again")
    async with client(fleet, own) as http:
        assert (await push(http, b, "stamp-0", secret or b""))[0] == 200


async def test_a_certificate_naming_only_the_peers_shared_host_is_refused(
    fleet: Authority, tls_fleet: Fleet
) -> None:
    """Stamps on one host (the demo, a shared VIP) reach each other at the same address:
    a fleet certificate that names that address, but another stamp, may not speak for
    stamp-0. Only the peer's configured name in the SAN authenticates it."""
    _, b = await tls_fleet(2)
    neighbour = fleet.issue("stamp-neighbour", "127.0.0.1", file="neighbour")
    async with client(fleet, neighbour) as http:
        status, body = await push(http, b, "stamp-0", b"")
    assert status == 401
    assert "not peer 'stamp-0'" in body["error"]["message"]


async def test_the_peer_listener_refuses_a_client_without_a_certificate(
    fleet: Authority, tls_fleet: Fleet
) -> None:
    _, b = await tls_fleet(2)
    async with client(fleet) as http:
        with pytest.raises(aiohttp.ClientError):
            await push(http, b, "stamp-0", b"")


def test_a_stamp_config_with_a_fleet_ca_needs_https_peers_and_no_secret(
    fleet: Authority, tmp_path: Path
) -> None:
    pair = fleet.issue("stamp-eu", file="stamp-eu")
    data: dict[str, Any] = {
        "name": "stamp-eu",
        "region": "eu-west",
        "database": "eu.db",
        "tls": {"cert": pair.cert.name, "key": pair.key.name, "ca": "ca.pem"},
        "peers": [{"name": "stamp-us", "url": "https://10.0.0.2:9101"}],
    }
    path = tmp_path / "stamp.yaml"
    path.write_text(yaml.safe_dump(data))
    config = stamp_config.load(path)
    assert config.tls is not None and config.tls.mutual and config.secret is None
    assert config.tls.ca == tmp_path / "ca.pem"

    data["peers"][0]["url"] = "http://10.0.0.2:9101"
    data["tls"]["key"] = fleet.issue("other", file="other").key.name
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as raised:
        stamp_config.load(path)
    assert raised.value.problems == [
        f"{path}: tls: {pair.cert} and {tmp_path / 'other.key'}: pair: the key does not "
        "belong to the certificate (stamp-eu): its public key differs",
        f"{path}: peers[0].url: must be https:// with tls.ca (mutual TLS): 'http://10.0.0.2:9101'",
    ]
