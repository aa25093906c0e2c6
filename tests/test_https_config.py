"""The HTTPS config (``listen.proxy.tls``, ``listen.proxy.hsts``, ``listen.redirect``):
every error as a whole line, ``check-config``'s certificate lines and expiry warning, and
every operator surface (check-config, the log, /status, the metric) naming a certificate
the same way."""

from __future__ import annotations

import datetime
import logging
import re
import time
from collections.abc import Callable
from html import unescape
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from test_config import check_config, problems_of

from geoproxy.config import loader as config_mod
from geoproxy.process.server import log_certificates

from conftest import GeodeFactory, ProxyFactory, base_config, geode_entry
from tls_certs import Authority

WriteConfig = Callable[..., Path]
GEODES = [{"name": "eu-1", "region": "eu-west", "url": "http://127.0.0.1:9"}]


def with_listen(proxy: dict[str, Any] | None = None, **listen: Any) -> dict[str, Any]:
    data = base_config(GEODES)
    data["listen"]["proxy"].update(proxy or {})
    data["listen"].update(listen)
    return data


@pytest.fixture
def authority(tmp_path: Path) -> Authority:
    return Authority(tmp_path)


def test_certificate_problems_name_the_yaml_path_the_file_and_what_is_wrong(
    write_config: WriteConfig, authority: Authority, tmp_path: Path
) -> None:
    a, b = authority.issue("a.test"), authority.issue("b.test")
    (tmp_path / "junk.pem").write_text("hello\n")
    (tmp_path / "locked.key").write_text(
        "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n"
    )
    tls = [
        {"cert": "missing.pem", "key": "a.test.key"},
        {"cert": "a.test.key", "key": "a.test.pem"},
        {"cert": "a.test.pem", "key": "b.test.key"},
        {"cert": "junk.pem", "key": "locked.key"},
        {"cert": "b.test.pem"},
    ]
    path = write_config(with_listen({"tls": tls}))
    p = "listen.proxy.tls"
    assert problems_of(path) == [
        f"{path}: {p}[0].cert: cannot read {tmp_path / 'missing.pem'}: No such file or directory",
        f"{path}: {p}[1].cert: {a.key}: holds a private key, not a certificate "
        "(are cert and key swapped?)",
        f"{path}: {p}[1].key: {a.cert}: holds a certificate, not a private key "
        "(are cert and key swapped?)",
        f"{path}: {p}[2]: {a.cert} and {b.key}: the key does not belong to the certificate "
        "(a.test): its public key differs",
        f"{path}: {p}[3].cert: {tmp_path / 'junk.pem'}: not a PEM file (no '-----BEGIN' line)",
        f"{path}: {p}[3].key: {tmp_path / 'locked.key'}: the key is encrypted with a "
        "passphrase; give an unencrypted key",
        f"{path}: {p}[4].key: is required",
    ]


@pytest.mark.parametrize(
    ("proxy", "listen", "expected"),
    [
        ({"tls": []}, {}, ["listen.proxy.tls: must list at least one {cert, key} pair"]),
        (
            {"tls": {"cert": "a.test.pem", "key": "a.test.key", "chain": "x"}},
            {},
            ["listen.proxy.tls.chain: unknown key (known: cert, key)"],
        ),
        (
            {"hsts": {"max_age": "365d"}},
            {},
            ["listen.proxy.hsts: HSTS is sent over HTTPS only: set listen.proxy.tls"],
        ),
        (
            {"tls": {"cert": "a.test.pem", "key": "a.test.key"}, "hsts": {"max_age": "1y"}},
            {},
            ["listen.proxy.hsts.max_age: not a duration: '1y' (e.g. 365d, 12h; 0s turns HSTS off)"],
        ),
        (
            {"tls": {"cert": "a.test.pem", "key": "a.test.key"}, "hsts": {"max_age": "800d"}},
            {},
            ["listen.proxy.hsts.max_age: must be at most 730d, got '800d'"],
        ),
        (
            {},
            {"redirect": {"port": 8081}},
            ["listen.redirect: redirects to HTTPS, but listen.proxy.tls is not set"],
        ),
        (
            {"host": "0.0.0.0", "port": 8443, "tls": {"cert": "a.test.pem", "key": "a.test.key"}},
            {"redirect": {"port": 8443}},
            [
                "listen.redirect: 0.0.0.0:8443 collides with the proxy listener 0.0.0.0:8443 "
                "(both bind port 8443 on 0.0.0.0); give them different ports"
            ],
        ),
        (
            {"tls": {"cert": "a.test.pem", "key": "a.test.key"}},
            {"redirect": {"port": 80, "https_port": 0}},
            ["listen.redirect.https_port: must be from 1 to 65535, got 0"],
        ),
    ],
    ids=[
        "empty-list",
        "unknown-key",
        "hsts-without-tls",
        "hsts-unit",
        "hsts-too-long",
        "redirect-without-tls",
        "redirect-collides",
        "redirect-port",
    ],
)
def test_https_settings_are_checked(
    write_config: WriteConfig,
    authority: Authority,
    proxy: dict[str, Any],
    listen: dict[str, Any],
    expected: list[str],
) -> None:
    authority.issue("a.test")
    path = write_config(with_listen(proxy, **listen))
    assert problems_of(path) == [f"{path}: {line}" for line in expected]


def test_the_certificate_and_key_files_join_the_fingerprinted_files(
    write_config: WriteConfig, authority: Authority
) -> None:
    pair = authority.issue("a.test")
    config = config_mod.load(write_config(with_listen({"tls": pair.entry()})))
    assert config.files[1:] == (pair.cert, pair.key)
    assert config.sources()[str(pair.key)] == pair.key.read_bytes()
    again = config_mod.load(config.path, given=config.sources())  # as a worker loads it
    assert again.proxy.tls == config.proxy.tls


def test_check_config_prints_each_certificate_hsts_and_the_redirect_and_warns_before_expiry(
    write_config: WriteConfig, authority: Authority, tmp_path: Path
) -> None:
    fine = authority.issue("a.test", "*.a.test", days=90)
    soon = authority.issue("b.test", days=3)
    data = with_listen(
        {"port": 8443, "tls": [fine.entry(), soon.entry()], "hsts": {"max_age": "365d"}},
        redirect={"port": 8080},
    )
    path = write_config(data)
    result = check_config(path, tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    at = lines.index("proxy listener: 127.0.0.1:8443 (HTTPS)")
    assert re.fullmatch(
        rf"  certificate {re.escape(str(fine.cert))}: a\.test, \*\.a\.test; expires "
        r"\d{4}-\d\d-\d\d \d\d:\d\d UTC \(in (89|90) days\) \[default\]",
        lines[at + 1],
    ), lines[at + 1]
    assert re.fullmatch(
        rf"  certificate {re.escape(str(soon.cert))}: b\.test; expires .* UTC \(in [23] days\)",
        lines[at + 2],
    ), lines[at + 2]
    assert lines[at + 3] == "  HSTS: max-age=31536000"
    assert lines[at + 4] == "redirect listener: 0.0.0.0:8080 (308 to HTTPS port 8443)"
    (warning,) = result.stderr.splitlines()
    assert re.fullmatch(
        rf"warning: {re.escape(str(path))}: listen\.proxy\.tls\[1\]\.cert: "
        rf"{re.escape(str(soon.cert))}: the certificate \(b\.test\) expires in "
        r"(2\.9|3\.0) days, on "
        r"\d{4}-\d\d-\d\d \d\d:\d\d UTC: renew it",
        warning,
    ), warning


def weak_pair(folder: Path) -> dict[str, str]:
    """A self-signed certificate with a 1024-bit RSA key: well-formed, matching, and
    refused by OpenSSL's default security level."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "weak.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    (folder / "weak.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "weak.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return {"cert": "weak.pem", "key": "weak.key"}


def test_check_config_reports_a_certificate_openssl_refuses(
    write_config: WriteConfig, tmp_path: Path
) -> None:
    path = write_config(with_listen({"tls": weak_pair(tmp_path)}))
    result = check_config(path, tmp_path)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.splitlines() == [
        f"{path}: configuration is invalid",
        f"listen.proxy.tls: {tmp_path / 'weak.pem'} and {tmp_path / 'weak.key'}: OpenSSL "
        "refuses the certificate and key: EE_KEY_TOO_SMALL",
    ]


async def test_every_surface_names_the_certificate_the_same_way(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    authority: Authority,
    write_config: WriteConfig,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    eu = await geode_factory("eu-1", "eu-west")
    pair = authority.issue("localhost", "*.example.test", days=40)
    data = base_config([geode_entry(eu)])
    data["listen"]["proxy"]["tls"] = pair.entry()
    result = check_config(write_config(data, name="check.yaml"), tmp_path)
    printed = next(
        line.removeprefix("  certificate ")
        for line in result.stdout.splitlines()
        if line.startswith("  certificate ")
    )
    proxy = await proxy_factory(data)
    with caplog.at_level(logging.INFO, logger="geoproxy"):
        log_certificates(proxy.gateway.config)
    (logged,) = [r.getMessage().removeprefix("HTTPS certificate ") for r in caplog.records]
    async with aiohttp.ClientSession() as http, http.get(f"{proxy.admin_url}/status") as resp:
        page = unescape(await resp.text())
    shown = re.search(r"HTTPS certificates: <code>(.*?)</code>", page)
    assert shown is not None
    # Made within a few seconds of each other: the same line (the day count may tick).
    assert printed == logged == shown.group(1)
    assert f"{pair.cert}: localhost, *.example.test; expires " in printed
    expiry = proxy.sample(
        "geoproxy_tls_certificate_expiry_timestamp_seconds", certificate=str(pair.cert)
    )
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(expiry))
    assert f"expires {stamp} (in " in printed
    assert abs(expiry - (time.time() + 40 * 86400)) < 120


async def test_a_reload_to_a_certificate_openssl_refuses_keeps_the_one_in_force(
    geode_factory: GeodeFactory,
    proxy_factory: ProxyFactory,
    authority: Authority,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The config loads (the pair parses and matches) but OpenSSL will not serve it: the
    reload fails before anything changed, like a broken config."""
    eu = await geode_factory("eu-1", "eu-west")
    data = base_config([geode_entry(eu)])
    data["listen"]["proxy"]["tls"] = authority.issue("localhost").entry()
    proxy = await proxy_factory(data)
    before = proxy.gateway.tls
    assert before is not None
    served = before.tls
    data["listen"]["proxy"]["tls"] = weak_pair(tmp_path)
    proxy.gateway.config.path.write_text(yaml.safe_dump(data))
    assert not await proxy.gateway.reload_from_file("test")
    assert proxy.sample("geoproxy_config_reloads_total", result="failure") == 1
    assert proxy.gateway.tls is before and before.tls is served
    assert proxy.gateway.config.proxy.tls is served
    assert "OpenSSL refuses the certificate and key: EE_KEY_TOO_SMALL" in caplog.text
