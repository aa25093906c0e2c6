"""deploy/systemd, deploy/container and deploy/kubernetes, checked offline: the systemd
unit by ``systemd-analyze verify`` and its directives, the Dockerfile's stages and
directives, the compose file's services against the files and ports they name, and the
Kubernetes manifests against the Kubernetes JSON schemas."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from geoproxy import config as config_mod
from geoproxy.config import Lifecycle
from geoproxy.server import DRAIN_MARGIN

from conftest import need_binary

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "systemd" / "geoproxy.service"


def seconds(text: str) -> float:
    """A systemd or geoproxy duration (``15s``, ``2min``, ``500ms``, ``90``)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(ms|s|sec|m|min)?", text.strip())
    assert m, text
    scale = {"ms": 0.001, "m": 60.0, "min": 60.0}.get(m.group(2) or "s", 1.0)
    return float(m.group(1)) * scale


# -- systemd ------------------------------------------------------------------------------


def unit_directives(text: str) -> dict[str, dict[str, list[str]]]:
    """Section -> key -> values (a key may repeat), as systemd reads a unit file."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def service() -> dict[str, list[str]]:
    return unit_directives(UNIT.read_text())["Service"]


def test_the_unit_reloads_with_sighup_and_stops_after_the_drain() -> None:
    svc = service()
    assert svc["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    stop = seconds(svc["TimeoutStopSec"][0])
    # Above the default drain and the shipped config's, plus the margin geoproxy takes.
    shipped = config_mod.load(ROOT / "config" / "geoproxy.yaml").lifecycle.drain_timeout
    for drain in (Lifecycle().drain_timeout, shipped):
        assert stop > drain + DRAIN_MARGIN, (stop, drain)
    assert svc["KillSignal"] == ["SIGTERM"]


def test_the_unit_kill_mode_is_the_one_the_workers_supervisor_handles() -> None:
    svc = service()
    assert "--workers" in svc["ExecStart"][0].split()
    # README's --workers section: under KillMode=control-group every process drains on its
    # own SIGTERM (tests/test_workers.py: test_sigterm_to_every_process_still_drains).
    assert svc["KillMode"] == ["control-group"]
    assert "KillMode=control-group" in (ROOT / "README.md").read_text()


def test_the_unit_is_hardened() -> None:
    svc = service()
    assert svc.get("DynamicUser") == ["yes"] or svc.get("User", ["root"]) != ["root"]
    for key, want in {"ProtectSystem": "strict", "NoNewPrivileges": "yes",
                      "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
                      "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
                      "ProtectHome": "yes", "PrivateTmp": "yes"}.items():  # fmt: skip
        assert svc.get(key) == [want], key
    families = set(svc["RestrictAddressFamilies"][0].split())
    # AF_UNIX: the supervisor's control channel to its workers is a socket pair.
    assert families == {"AF_INET", "AF_INET6", "AF_UNIX"}


def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """``systemd-analyze verify`` checks every directive and that the commands exist. The
    shipped unit runs /opt/geoproxy/bin/geoproxy (README's install path), which is not
    installed here: the copy verified runs this environment's geoproxy instead, and
    nothing else is changed."""
    analyze = need_binary("systemd-analyze", package="systemd")
    installed = Path(sys.executable).parent / "geoproxy"
    assert installed.exists(), installed
    text = UNIT.read_text()
    assert text.count("/opt/geoproxy/bin/geoproxy ") == 2  # ExecStartPre, ExecStart
    (tmp_path / UNIT.name).write_text(text.replace("/opt/geoproxy/bin/geoproxy", str(installed)))
    out = subprocess.run([analyze, "verify", str(tmp_path / UNIT.name)],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    # Unknown keys are only warned about (exit code 0): none is allowed.
    assert out.stdout + out.stderr == "", out.stdout + out.stderr


def test_systemd_analyze_verify_would_catch_a_misspelt_directive(tmp_path: Path) -> None:
    """The check above can fail: a typo in a hardening directive is reported."""
    analyze = need_binary("systemd-analyze", package="systemd")
    bad = tmp_path / "geoproxy.service"
    bad.write_text("[Service]\nExecStart=/bin/true\nProtectSytem=strict\n")
    out = subprocess.run([analyze, "verify", str(bad)], capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert "ProtectSytem" in out.stdout + out.stderr
