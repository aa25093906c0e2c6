"""deploy/systemd, deploy/container and deploy/kubernetes, checked offline: the systemd
unit by ``systemd-analyze verify`` and its directives, the Dockerfile's stages and
directives, the compose file's services against the files and ports they name, and the
Kubernetes manifests against the Kubernetes JSON schemas."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from geoproxy.config import loader as config_mod
from geoproxy.config.values import Lifecycle
from geoproxy.process.server import DRAIN_MARGIN
from geoproxy.stamp import config as stamp_config

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
    for key, want in {
        "ProtectSystem": "strict",
        "NoNewPrivileges": "yes",
        "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
    }.items():
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
    out = subprocess.run(
        [analyze, "verify", str(tmp_path / UNIT.name)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
    # Unknown keys are only warned about (exit code 0): none is allowed.
    assert out.stdout + out.stderr == "", out.stdout + out.stderr


def test_systemd_analyze_verify_would_catch_a_misspelt_directive(tmp_path: Path) -> None:
    """The check above can fail: a typo in a hardening directive is reported."""
    analyze = need_binary("systemd-analyze", package="systemd")
    bad = tmp_path / "geoproxy.service"
    bad.write_text("[Service]\nExecStart=/bin/true\nProtectSytem=strict\n")
    out = subprocess.run([analyze, "verify", str(bad)], capture_output=True, text=True, timeout=60)
    assert "ProtectSytem" in out.stdout + out.stderr


# -- container ----------------------------------------------------------------------------

CONTAINER = DEPLOY / "container"


def dockerfile_stages() -> list[tuple[str, list[tuple[str, str]]]]:
    """The Dockerfile's stages: (FROM line, [(instruction, arguments)])."""
    text = re.sub(r"\\\n", " ", (CONTAINER / "Dockerfile").read_text())
    stages: list[tuple[str, list[tuple[str, str]]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            stages.append((rest, []))
        elif stages:
            stages[-1][1].append((word.upper(), rest.strip()))
    return stages


def test_the_dockerfile_builds_in_one_stage_and_runs_in_a_slim_non_root_one() -> None:
    text = (CONTAINER / "Dockerfile").read_text()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)", text, re.M)
    assert base and re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?", base.group(1)), base
    stages = dockerfile_stages()
    assert [s[0] for s in stages] == ["${PYTHON_IMAGE} AS build", "${PYTHON_IMAGE} AS runtime"]
    build, final = stages[0][1], stages[1][1]
    assert any("build-essential" in arg for op, arg in build if op == "RUN")
    for _op, arg in final:  # no compilers, and nothing built in the final image
        assert not re.search(r"build-essential|gcc|apt-get install|pip install", arg), arg
    assert ("COPY", "--from=build /opt/geoproxy /opt/geoproxy") in final
    user = [arg for op, arg in final if op == "USER"]
    assert user and user[-1].split(":")[0] not in ("root", "0"), user
    # Every file COPY takes from the build context exists in the repository.
    for _, steps in stages:
        for op, arg in steps:
            if op == "COPY" and not arg.startswith("--from"):
                for source in arg.split()[:-1]:
                    assert (ROOT / source).exists(), source


def test_the_image_stops_on_sigterm_checks_healthz_and_takes_config_and_geoip_volumes() -> None:
    final = dict(dockerfile_stages()[-1][1])
    assert final["STOPSIGNAL"] == "SIGTERM"
    admin = config_mod.load(ROOT / "config" / "geoproxy.yaml").admin  # the image's default
    assert admin.host == "127.0.0.1"  # loopback: the HEALTHCHECK runs inside the container
    assert f"http://127.0.0.1:{admin.port}/healthz" in final["HEALTHCHECK"]
    volumes = set(re.findall(r'"([^"]+)"', final["VOLUME"]))
    assert {"/etc/geoproxy", "/var/lib/GeoIP"} <= volumes
    assert final["COPY"] == "config/geoproxy.yaml config/region-map.yaml /etc/geoproxy/"
    assert "/etc/geoproxy/geoproxy.yaml" in final["CMD"]


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((CONTAINER / "compose.yaml").read_text())
    return data


def mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """A service's volumes as (source, target): a bind mount's source is a path."""
    return [(v.split(":")[0], v.split(":")[1]) for v in service.get("volumes", [])]


def materialise(service: dict[str, Any], root: Path) -> Path:
    """The files a service's bind mounts put in its container, copied under ``root``."""
    for source, target in mounts(service):
        if source.startswith("."):
            there = root / target.lstrip("/")
            there.parent.mkdir(parents=True, exist_ok=True)
            if (CONTAINER / source).is_dir():
                shutil.copytree(CONTAINER / source, there)
            else:
                shutil.copy(CONTAINER / source, there)
    return root


def test_every_file_the_compose_file_names_exists_and_named_volumes_are_declared() -> None:
    data = compose()
    build = data["services"]["geoproxy"]["build"]
    assert (
        CONTAINER / build["context"] / build["dockerfile"]
    ).resolve() == CONTAINER / "Dockerfile"
    for name, service in data["services"].items():
        for source, _target in mounts(service):
            if source.startswith("."):
                assert (CONTAINER / source).exists(), (name, source)
            else:
                assert source in data["volumes"], (name, source)
    assert {
        "geoproxy",
        "stamp-eu-west",
        "stamp-us-east",
        "stamp-ap-northeast",
        "prometheus",
        "grafana",
    } <= set(data["services"])


def test_the_compose_services_agree_on_hosts_and_ports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = compose()
    services = data["services"]
    proxy_root = materialise(services["geoproxy"], tmp_path / "geoproxy")
    cfg = config_mod.load(proxy_root / "etc/geoproxy/geoproxy.yaml")  # as mounted, map included
    published = {p.split(":")[1] for p in services["geoproxy"]["ports"]}
    assert published == {str(cfg.proxy.port)}  # the admin listener is not published
    assert (
        seconds(services["geoproxy"]["stop_grace_period"])
        > cfg.lifecycle.drain_timeout + DRAIN_MARGIN
    )
    # Each geode is a stamp service, at the port its config listens on; the stamps' peers
    # are each other's peer listeners; their health checks ask their own port.
    monkeypatch.setenv("GEOPROXY_FLEET_SECRET", "0" * 64)
    stamps: dict[str, Any] = {}
    for name, service in services.items():
        if service.get("command", [""])[0] == "stamp":
            root = materialise(service, tmp_path / name)
            stamps[name] = stamp_config.load(root / service["command"][-1].lstrip("/"))
            assert stamps[name].name == name
            assert f"127.0.0.1:{stamps[name].port}/health" in " ".join(
                service["healthcheck"]["test"]
            )
            assert "GEOPROXY_FLEET_SECRET" in service["environment"]
    assert len(stamps) == 3
    assert {(g.name, g.url.host, g.url.port) for g in cfg.geodes} == {
        (n, n, s.port) for n, s in stamps.items()
    }
    for name, stamp in stamps.items():
        want = {(o, f"http://{o}:{s.peer_port}") for o, s in stamps.items() if o != name}
        assert {(p.name, str(p.url)) for p in stamp.peers} == want
    # Prometheus scrapes the proxy's admin listener and the stamps' peer listeners, and
    # loads the shipped rules where they are mounted; Grafana reads that Prometheus.
    prom_root = materialise(services["prometheus"], tmp_path / "prometheus")
    prom = yaml.safe_load((prom_root / "etc/prometheus/prometheus.yml").read_text())
    targets = {
        job["job_name"]: set(job["static_configs"][0]["targets"]) for job in prom["scrape_configs"]
    }
    assert targets["geoproxy"] == {f"geoproxy:{cfg.admin.port}"}
    assert targets["stamps"] == {f"{n}:{s.peer_port}" for n, s in stamps.items()}
    for rules in prom["rule_files"]:
        assert (prom_root / rules.lstrip("/")).read_text() == (
            DEPLOY / "prometheus" / "alerts.yml"
        ).read_text()
    graf_root = materialise(services["grafana"], tmp_path / "grafana")
    sources = yaml.safe_load(
        (graf_root / "etc/grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    assert (
        sources["datasources"][0]["url"]
        == f"http://prometheus:{services['prometheus']['ports'][0].split(':')[1]}"
    )
    provider = yaml.safe_load(
        (graf_root / "etc/grafana/provisioning/dashboards/geoproxy.yml").read_text()
    )
    folder = provider["providers"][0]["options"]["path"]
    assert (graf_root / folder.lstrip("/") / "geoproxy.json").read_text() == (
        DEPLOY / "grafana" / "geoproxy-dashboard.json"
    ).read_text()


# -- Kubernetes ---------------------------------------------------------------------------

KUBERNETES = DEPLOY / "kubernetes"
#: The oldest Kubernetes release the manifests are checked against (all of their API
#: versions are GA there), and the newest kubernetes-validate knows.
KUBE_VERSIONS = ("1.29.0", "1.34.0")


def manifests() -> dict[str, dict[str, Any]]:
    """Every document under deploy/kubernetes, by kind."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["kind"] not in found, doc["kind"]
            found[doc["kind"]] = doc
    return found


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_the_manifests_are_valid_against_the_kubernetes_schemas(version: str) -> None:
    """kubernetes-validate ships the JSON schemas of each release: offline, strict (an
    unknown field fails)."""
    import kubernetes_validate

    docs = manifests()
    assert set(docs) == {
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
    }
    for kind, doc in docs.items():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{kind}: {exc.path}: {exc.message}")


def test_kubernetes_validate_would_catch_a_misplaced_field() -> None:
    import kubernetes_validate

    doc = manifests()["Deployment"]
    doc["spec"]["template"]["spec"]["containers"][0]["readonlyRootFilesystem"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, KUBE_VERSIONS[0], strict=True)


def test_the_config_map_holds_a_valid_config_and_the_shipped_region_map(tmp_path: Path) -> None:
    data = manifests()["ConfigMap"]["data"]
    assert data["region-map.yaml"] == (ROOT / "config" / "region-map.yaml").read_text()
    for name, text in data.items():
        (tmp_path / name).write_text(text)
    cfg = config_mod.load(tmp_path / "geoproxy.yaml")
    assert cfg.files == (tmp_path / "geoproxy.yaml", tmp_path / "region-map.yaml")


def test_the_deployment_probes_drains_and_runs_locked_down(tmp_path: Path) -> None:
    docs = manifests()
    for name, text in docs["ConfigMap"]["data"].items():
        (tmp_path / name).write_text(text)
    cfg = config_mod.load(tmp_path / "geoproxy.yaml")
    pod = docs["Deployment"]["spec"]["template"]
    spec = pod["spec"]
    (box,) = spec["containers"]
    ports = {p["name"]: p["containerPort"] for p in box["ports"]}
    assert ports == {"proxy": cfg.proxy.port, "admin": cfg.admin.port}
    assert cfg.admin.host == "0.0.0.0"  # the kubelet probes the pod's address
    assert box["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert box["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    pre_stop = box["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert (
        spec["terminationGracePeriodSeconds"]
        > float(pre_stop[1]) + cfg.lifecycle.drain_timeout + DRAIN_MARGIN
    )
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert box["securityContext"]["readOnlyRootFilesystem"] is True
    assert box["securityContext"]["allowPrivilegeEscalation"] is False
    assert {"cpu", "memory"} <= set(box["resources"]["requests"])
    # The config is the ConfigMap, mounted as a folder (a subPath mount is never updated).
    (mount,) = [m for m in box["volumeMounts"] if m["name"] == "config"]
    assert "subPath" not in mount
    assert box["args"] == ["run", "--config", f"{mount['mountPath']}/geoproxy.yaml"]
    (volume,) = [v for v in spec["volumes"] if v["name"] == "config"]
    assert volume["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    notes = pod["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true"
    assert int(notes["prometheus.io/port"]) == cfg.admin.port


def test_the_service_budget_and_autoscaler_point_at_the_deployment() -> None:
    docs = manifests()
    deployment = docs["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == labels
    service = docs["Service"]["spec"]
    assert service["selector"] == labels
    assert [p["targetPort"] for p in service["ports"]] == ["proxy"]  # never the admin port
    assert service["externalTrafficPolicy"] == "Local"  # the client's address reaches us
    assert docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == labels
    target = docs["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert (
        docs["HorizontalPodAutoscaler"]["spec"]["minReplicas"]
        > docs["PodDisruptionBudget"]["spec"]["minAvailable"]
    )


def test_the_readme_walkthrough_names_what_the_unit_runs() -> None:
    """README's systemd walk-through installs where the unit looks: the binary and the
    config it names."""
    readme = (ROOT / "README.md").read_text()
    walk = readme[readme.index("### End to end: one Linux host with systemd") :]
    walk = walk[: walk.index("\n### ", 10)]
    start = service()["ExecStart"][0].split()
    binary, config = start[0], start[start.index("--config") + 1]
    assert binary.removesuffix("/bin/geoproxy") == "/opt/geoproxy"
    assert "python3 -m venv /opt/geoproxy && /opt/geoproxy/bin/pip install ." in walk
    assert f"-t {Path(config).parent}/" in walk
    assert f"cp deploy/systemd/{UNIT.name} /etc/systemd/system/" in walk
    assert (
        f"curl -s 127.0.0.1:{config_mod.load(ROOT / 'config/geoproxy.yaml').admin.port}"
        "/readyz" in walk
    )


def test_the_build_context_lets_in_what_the_dockerfile_copies() -> None:
    ignore = (CONTAINER / "Dockerfile.dockerignore").read_text().split()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore
    copied = {
        source.split("/")[0]
        for _, steps in dockerfile_stages()
        for op, arg in steps
        if op == "COPY" and not arg.startswith("--from")
        for source in arg.split()[:-1]
    }
    assert copied <= allowed, copied - allowed
