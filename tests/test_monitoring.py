"""The shipped monitoring: the Grafana dashboard parses and every metric its queries name is one
/metrics exposes; the provisioning and Prometheus files parse and point at each other; the
compose file's `monitoring` profile mounts them."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "monitoring"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "runyard.json"
METRIC = re.compile(r"\brunyard_[a-z0-9_]+")
SUFFIXES = ("_bucket", "_count", "_sum", "_total")
REQUIRED = {
    "runyard_executions_submitted",
    "runyard_executions_finished",
    "runyard_execution_duration_seconds",
    "runyard_queue_wait_seconds",
    "runyard_executions_queued",
    "runyard_executions_running",
    "runyard_oldest_queued_age_seconds",
    "runyard_schedule_lag_seconds",
    "runyard_notifications",
    "runyard_quota_rejections",
}


def exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    found = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    found += [
        variable["definition"]
        for variable in dashboard["templating"]["list"]
        if "definition" in variable
    ]
    return found


def family(sample_name: str, exposed: set[str]) -> str:
    """The metric family a series name belongs to (`x_total` -> `x`, `x_bucket` -> `x`)."""
    if sample_name in exposed:
        return sample_name
    for suffix in SUFFIXES:
        if sample_name.endswith(suffix) and sample_name.removesuffix(suffix) in exposed:
            return sample_name.removesuffix(suffix)
    return sample_name


def exposed_families(client) -> dict[str, str]:
    text = client.get("/metrics").get_data(as_text=True)
    return {f.name: f.type for f in text_string_to_metric_families(text)}


def test_every_dashboard_query_names_an_exposed_metric(client, connection):
    exposed = exposed_families(client)
    assert set(exposed) >= REQUIRED, REQUIRED - set(exposed)
    used = {name for expr in exprs() for name in METRIC.findall(expr)}
    assert used, "the dashboard queries no runyard metric"
    for name in sorted(used):
        base = family(name, set(exposed))
        assert base in exposed, f"{name} is not on /metrics"
        if name.endswith("_bucket"):
            assert exposed[base] == "histogram", name
        if name.endswith("_total"):
            assert exposed[base] == "counter", name
    # Every metric of the contract shows on the dashboard.
    assert {family(name, set(exposed)) for name in used} >= REQUIRED


def test_dashboard_panels_use_the_provisioned_datasource():
    dashboard = json.loads(DASHBOARD.read_text())
    datasources = yaml.safe_load(
        (MONITORING / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )["datasources"]
    uids = {source["uid"] for source in datasources}
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] in uids, panel["title"]
        assert all(
            target["expr"].count("(") == target["expr"].count(")") for target in panel["targets"]
        )
    provider = yaml.safe_load(
        (MONITORING / "grafana/provisioning/dashboards/runyard.yml").read_text()
    )["providers"][0]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"


def test_prometheus_scrapes_the_api():
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["api:8000"]


def test_compose_monitoring_profile():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"]
    mounts = " ".join(services["prometheus"]["volumes"] + services["grafana"]["volumes"])
    for path in (
        "./monitoring/prometheus.yml",
        "./monitoring/grafana/provisioning",
        "./monitoring/grafana/dashboards",
    ):
        assert path in mounts
        assert (ROOT / path).exists()
    # Nothing else is in a profile: a plain `docker compose up` starts the stack as before.
    assert [name for name, service in services.items() if "profiles" in service] == [
        "prometheus",
        "grafana",
    ]


@pytest.mark.skipif(
    shutil.which("docker-compose") is None, reason="docker-compose is not installed"
)
def test_docker_compose_accepts_both_profiles():
    env = {"RUNYARD_FLOWER_PASSWORD": "x", "PATH": "/usr/local/bin:/usr/bin:/bin"}
    plain = subprocess.run(
        ["docker-compose", "config", "--services"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    # (docker-compose 1.x lists every service here, profiles or not: `up` is what skips them.)
    assert plain.returncode == 0, plain.stderr
    full = subprocess.run(
        ["docker-compose", "--profile", "monitoring", "config", "--services"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert full.returncode == 0, full.stderr
    assert {"prometheus", "grafana", "api"} <= set(full.stdout.split())
