"""The aiohttp version window (geoproxy/proxy/compat.py): the probe, the public mode it falls
back to, and a fingerprint of every aiohttp function geoproxy copies or overrides."""

from __future__ import annotations

import hashlib
import importlib
import inspect
import logging
import tomllib
from pathlib import Path

import aiohttp
import pytest
from aiohttp.web_protocol import RequestHandler

from geoproxy.proxy import compat

REPO = Path(__file__).resolve().parent.parent

#: sha256 (first 16 hex digits) of the source of each aiohttp function that geoproxy
#: copies, overrides or depends on the exact behaviour of, as in the release the window
#: starts at. A new aiohttp changes some: read each change against the geoproxy code
#: named, then update the digest (and the window in pyproject.toml and compat.TESTED).
FINGERPRINTS = {
    # protocol.ServerConnection and fastlane.ProxyConnection: parse as data_received
    # does, build the parser as __init__ does, answer parse errors (handle_error), arm
    # keep-alive as start() and _process_keepalive do, resume requests through
    # _handle_request, cancel as connection_lost does.
    "aiohttp.web_protocol.RequestHandler.__init__": "46c577d1f419158f",
    "aiohttp.web_protocol.RequestHandler.data_received": "1ee57ebe052e6c80",
    "aiohttp.web_protocol.RequestHandler.handle_error": "94962ffef500c172",
    "aiohttp.web_protocol.RequestHandler._process_keepalive": "b472e0fb8445ce42",
    "aiohttp.web_protocol.RequestHandler.connection_lost": "df2fe6e95fd04c7c",
    "aiohttp.web_protocol.RequestHandler._handle_request": "a88a34ee65a2714c",
    "aiohttp.web_protocol.RequestHandler.start": "2e565fd40c8e04fb",
    # connection.Connection: its read timer, parser reuse and the split of a bodiless
    # answer's head.
    "aiohttp.client_proto.ResponseHandler.data_received": "9bf7ecf8e50516cd",
    "aiohttp.client_proto.ResponseHandler.resume_reading": "ad1141ce3718aca7",
    "aiohttp.client_proto.ResponseHandler._reschedule_timeout": "100503e958d1a43c",
    "aiohttp.client_proto.ResponseHandler._drop_timeout": "3c2b369fcf15e810",
    "aiohttp.client_proto.ResponseHandler.set_response_params": "2eb047e322481533",
    "aiohttp.client_proto.ResponseHandler.connection_lost": "84b98dfd8035e493",
    # responses.RelayResponse, WholeResponse, ErrorResponse.
    "aiohttp.web_response.StreamResponse.prepare": "9c6c49cc07222eef",
    "aiohttp.web_response.StreamResponse._start": "7e03ebd82e7f9f98",
    "aiohttp.web_response.StreamResponse._prepare_headers": "92807d25d9c397cd",
    "aiohttp.web_response.StreamResponse._write_headers": "0280580268bc7e84",
    # acceptor.BatchSite: SockSite.start with an Acceptor for loop.create_server; BaseSite
    # registers it (start) and only calls its close() (stop).
    "aiohttp.web_runner.BaseSite.start": "8dcebeed1ae05654",
    "aiohttp.web_runner.BaseSite.stop": "c92f18307773ff03",
    "aiohttp.web_runner.SockSite.start": "9a6b6f426d3126a6",
    # websocket._pump: how each side's close() waits for the answering close.
    "aiohttp.client_ws.ClientWebSocketResponse.close": "c3341573c776430a",
    "aiohttp.web_ws.WebSocketResponse.close": "2d0acd02fdef1edd",
}


def _source_digest(dotted: str) -> str:
    module_name, cls_name, func = dotted.rsplit(".", 2)
    cls = getattr(importlib.import_module(module_name), cls_name)
    source = inspect.getsource(getattr(cls, func))
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def test_every_aiohttp_function_geoproxy_copies_or_overrides_is_the_reviewed_one() -> None:
    changed = {name for name, digest in FINGERPRINTS.items() if _source_digest(name) != digest}
    assert not changed, (
        f"aiohttp {aiohttp.__version__} changed {sorted(changed)}: review geoproxy's copy or "
        "override of each (tests/test_compat.py names where), then update the digests"
    )


def test_the_pin_in_pyproject_is_the_tested_window() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = [d for d in project["dependencies"] if d.startswith(("aiohttp>", "aiohttp<"))]
    low, high = (".".join(map(str, v)) for v in compat.TESTED)
    assert pins == [f"aiohttp>={low},<{high[: high.rindex('.')]}"]


def test_the_installed_aiohttp_passes_the_probe() -> None:
    assert compat.probe() is None


@pytest.mark.parametrize("version", ["3.14.3", "3.14.4", "3.15.0", "4.0.0a1"])
def test_an_aiohttp_outside_the_window_is_named_with_the_window(version: str) -> None:
    assert compat.probe(version) == (
        f"aiohttp {version} is outside the tested window (3.14.5 up to 3.15.0, not included)"
    )


@pytest.mark.parametrize("version", ["3.14.5", "3.14.9", "3.14.10.post1"])
def test_a_release_inside_the_window_passes(version: str) -> None:
    assert compat.probe(version) is None


def test_a_missing_private_name_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(RequestHandler, "_current_request")
    reason = compat.probe()
    assert reason == (
        f"aiohttp {aiohttp.__version__} lacks private names geoproxy uses: "
        "aiohttp.web_protocol.RequestHandler._current_request"
    )


def test_a_failed_probe_runs_public_mode_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv(compat.ENV, raising=False)
    monkeypatch.setattr(compat, "probe", lambda: "aiohttp 9.9.9 is outside the tested window")
    compat.decision.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="geoproxy"):
            assert compat.mode() == compat.PUBLIC
            assert compat.mode() == compat.PUBLIC  # decided once, silently
            assert caplog.records == []
            compat.warn_if_public()  # as the serving commands do, once logging is set up
        assert [r.getMessage()[:85] for r in caplog.records] == [
            "aiohttp 9.9.9 is outside the tested window: serving through aiohttp's public API only"
        ]
    finally:
        compat.decision.cache_clear()


@pytest.mark.parametrize(
    ("env", "expected"),
    [("public", "public"), ("PUBLIC", "public"), ("", "lean"), ("lean", "lean")],
)
def test_the_environment_can_ask_for_public_mode(
    monkeypatch: pytest.MonkeyPatch, env: str, expected: str
) -> None:
    monkeypatch.setenv(compat.ENV, env)
    compat.decision.cache_clear()
    try:
        assert compat.mode() == expected
    finally:
        compat.decision.cache_clear()
