"""The ``tls`` blocks of geodes and ``forwarding``: what the loader reads, and every
problem named with its file, YAML path and value (whole lines)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_config import check_config, check_errors, edited

from geoproxy.config import loader as config_mod
from geoproxy.config.values import GeodeTLS

from tls_certs import Authority, Pair

WriteConfig = Any


@pytest.fixture
def pki(tmp_path: Path) -> Authority:
    authority = Authority(tmp_path)
    authority.ca_file()
    return authority


def https(changes: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """``edited`` with the first geode on https."""
    return edited({"geodes[0].url": "https://euw-1.test", **changes}, **overrides)


def layered(client: Pair, **more: Any) -> dict[str, Any]:
    """Two https geodes under a forwarding.tls default (the CA, ``client``); the first
    overrides its server_name."""
    return https(
        {
            "forwarding.tls": {"ca": "ca.pem", **client.entry()},
            "geodes[0].tls": {"server_name": "stamp.internal"},
            "geodes[1].url": "https://use-1.test",
            **more,
        }
    )


def test_geode_tls_overrides_the_forwarding_default_field_by_field(
    write_config: WriteConfig, pki: Authority, tmp_path: Path
) -> None:
    client = pki.issue("geoproxy.test")
    data = layered(client)
    cfg = config_mod.load(write_config(data))
    ca = tmp_path / "ca.pem"
    default = GeodeTLS(
        ca=ca,
        cert=client.cert,
        key=client.key,
        ca_pem=ca.read_bytes(),
        cert_pem=client.cert.read_bytes(),
        key_pem=client.key.read_bytes(),
    )
    assert cfg.forwarding.tls == default
    assert cfg.geodes[0].tls == GeodeTLS(
        **{**{f: getattr(default, f) for f in GeodeTLS.__slots__}, "server_name": "stamp.internal"}
    )
    assert cfg.geodes[1].tls == default
    # Every PEM file is watched like the config: a renewed one reloads.
    assert cfg.files[1:] == (ca, client.cert, client.key)
    assert cfg.contents[1:] == (default.ca_pem, default.cert_pem, default.key_pem)


def test_no_tls_block_means_the_system_trust_store_and_no_files_watched(
    write_config: WriteConfig,
) -> None:
    cfg = config_mod.load(write_config(https({})))
    assert cfg.geodes[0].tls == GeodeTLS()
    assert len(cfg.files) == 1


def test_tls_problems_name_the_path_and_the_file(
    write_config: WriteConfig, pki: Authority, tmp_path: Path
) -> None:
    good = pki.issue("geoproxy.test")
    other = pki.issue("other.test")
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    check_errors(
        write_config,
        https(
            {
                "geodes[0].tls": {"ca": "missing.pem", "server_name": "https://x.test"},
                "geodes[1].tls": {"verify": True},
                "geodes[2].url": "https://apne-1.test",
                "geodes[2].tls": {"cert": good.cert.name, "key": other.key.name},
                "forwarding.tls": {"ca": "junk.pem", "cert": good.cert.name, "verfy": False},
            }
        ),
        [
            f"geodes[0].tls.ca: cannot read {tmp_path / 'missing.pem'}: No such file or directory",
            "geodes[0].tls.server_name: a host name only, without scheme, port or spaces: "
            "'https://x.test'",
            "geodes[1].tls: only for https:// geodes; this one is http://",
            f"geodes[2].tls: {good.cert} and {other.key}: the key does not belong to the "
            "certificate (geoproxy.test): its public key differs",
            "forwarding.tls.verfy: unknown key (did you mean 'verify'?)",
            f"forwarding.tls.ca: {tmp_path / 'junk.pem'}: not a PEM file (no '-----BEGIN' line)",
            "forwarding.tls.key: a client certificate needs both cert and key (cert is set)",
        ],
    )


def test_verify_false_is_a_warning_at_load_and_in_check_config(
    write_config: WriteConfig, tmp_path: Path
) -> None:
    path = write_config(https({"geodes[0].tls": {"verify": False}}))
    warning = (
        f"{path}: geodes[0].tls.verify: false: the certificate of geode euw-1 is not "
        "verified; anyone on the path to it can read and change its traffic"
    )
    assert config_mod.load(path).warnings == (warning,)
    result = check_config(path, tmp_path)
    assert result.returncode == 0
    assert result.stderr.splitlines() == [f"warning: {warning}"]


def test_a_client_certificate_expiring_soon_is_a_warning_where_it_is_given(
    write_config: WriteConfig, pki: Authority
) -> None:
    client = pki.issue("geoproxy.test", days=3)
    data = https(
        {
            "forwarding.tls": client.entry(),
            "geodes[1].url": "https://use-1.test",
            "geodes[1].tls": {"server_name": "use-1.internal"},  # the same certificate
        }
    )
    path = write_config(data)
    [warning] = config_mod.load(path).warnings
    assert warning.startswith(
        f"{path}: forwarding.tls.cert: {client.cert}: the certificate (geoproxy.test) "
        "expires in 3.0 days, on "
    ), warning


def test_check_config_says_how_each_https_geode_is_verified(
    write_config: WriteConfig, pki: Authority, tmp_path: Path
) -> None:
    client = pki.issue("geoproxy.test")
    data = layered(client, **{"geodes[1].tls": {"verify": False}})
    result = check_config(write_config(data), tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    ca = tmp_path / "ca.pem"
    assert [line.partition("  tls: ")[2] for line in lines if "  tls: " in line] == [
        f"ca {ca}, client cert {client.cert}, server_name stamp.internal",
        "verify OFF (any certificate)",
    ]
