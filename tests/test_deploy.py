"""deploy/: Prometheus config and alert rules pass promtool; the dashboard and the alerts
only name metrics geoproxy exports; the real exposition passes `promtool check metrics`."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import aiohttp
import yaml
from prometheus_client import CollectorRegistry

from geoproxy.process.fleet import Fleet
from geoproxy.surfaces.metrics import Metrics, WorkerMetrics

from conftest import (
    GeodeFactory,
    ProxyFactory,
    assert_promtool_accepts,
    base_config,
    exported_metric_names,
    geode_entry,
    need_binary,
)

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
METRIC = re.compile(r"\b(geoproxy_[a-z_]+|process_[a-z_]+|python_[a-z_]+)\b")
#: Series Prometheus itself makes, not geoproxy.
PROMETHEUS_OWN = {"up"}


async def exported_names(proxy_factory: ProxyFactory, geode_factory: GeodeFactory) -> set[str]:
    """What one process exports, and what a ``--workers`` supervisor adds."""
    geode = await geode_factory("eu-1", "eu-west")
    proxy = await proxy_factory(
        base_config([geode_entry(geode)], regions={"eu-west": None}, countries={}, continents={})
    )
    own = CollectorRegistry()
    Metrics(own)
    WorkerMetrics(own)
    supervisor = CollectorRegistry()
    supervisor.register(Fleet(own))
    return exported_metric_names(proxy.registry) | exported_metric_names(supervisor)


def dashboard_exprs() -> list[str]:
    dash = json.loads((DEPLOY / "grafana" / "geoproxy-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    return exprs


def alert_exprs() -> list[str]:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def test_prometheus_config_passes_promtool() -> None:
    promtool = need_binary("promtool")
    path = DEPLOY / "prometheus" / "prometheus.yml"
    out = subprocess.run(
        [promtool, "check", "config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_alert_rules_pass_promtool_and_cover_the_required_alerts() -> None:
    promtool = need_binary("promtool")
    path = DEPLOY / "prometheus" / "alerts.yml"
    out = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
    rules = [r for g in yaml.safe_load(path.read_text())["groups"] for r in g["rules"]]
    names = {r["alert"] for r in rules}
    assert {
        "GeodeDown",
        "RegionWithoutHealthyGeode",
        "HighFailoverRate",
        "HighOffRegionRatio",
        "ProxyNotReady",
    } <= names
    for rule in rules:
        assert rule["annotations"]["summary"], rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]


async def test_dashboard_and_alerts_only_name_exported_metrics(
    proxy_factory: ProxyFactory, geode_factory: GeodeFactory
) -> None:
    exported = await exported_names(proxy_factory, geode_factory)
    exprs = dashboard_exprs() + alert_exprs()
    assert len(dashboard_exprs()) >= 10
    named = {m for e in exprs for m in METRIC.findall(e)}
    assert named, "no metric names found"
    assert named - exported == set()
    # And the metrics the issue asks the dashboard to show are on it.
    on_dashboard = {m for e in dashboard_exprs() for m in METRIC.findall(e)}
    assert {
        "geoproxy_routing_decisions_total",
        "geoproxy_geode_up",
        "geoproxy_request_duration_seconds_bucket",
        "geoproxy_failovers_total",
        "geoproxy_region_resolutions_total",
    } <= on_dashboard


async def test_real_exposition_passes_promtool_check_metrics(
    proxy_factory: ProxyFactory, geode_factory: GeodeFactory
) -> None:
    eu = await geode_factory("eu-1", "eu-west")
    us = await geode_factory("us-1", "us-east")
    ap = await geode_factory("ap-1", "ap-northeast")
    proxy = await proxy_factory(base_config([geode_entry(g) for g in (eu, us, ap)]))
    assert eu.server is not None
    await eu.server.close()  # failovers and connect errors show up too
    async with aiohttp.ClientSession() as http:
        for country in ("FR", "JP", "US", "XX", "ZZ"):
            async with http.get(f"{proxy.url}/whoami", headers={"CF-IPCountry": country}) as r:
                assert r.status == 200
        async with http.get(f"{proxy.admin_url}/metrics") as r:
            text = await r.text()
    await assert_promtool_accepts(text.encode())
    assert 'geoproxy_failovers_total{from_geode="eu-1",to_geode="us-1"}' in text
