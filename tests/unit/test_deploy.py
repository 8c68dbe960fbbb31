"""Deployment files: the compose file validates and hardens every worker; the Grafana dashboard is sound JSON."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import yaml

from tests.conftest import ROOT

DASHBOARD = ROOT / "deploy" / "grafana" / "quantserve.json"
_FUNCTIONS_AND_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
                           "unless", "offset"}


def dashboard_metric_names(dashboard: dict) -> set[str]:
    """Every metric a panel's PromQL reads: identifiers left once label lists, matchers, ranges, variables,
    strings, numbers and function calls are taken out."""
    names = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", " ", expr)
            expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\$\w+|\"[^\"]*\"", " ", expr)
            for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*(\s*\()?", expr):
                if not match.group(1) and match.group(0) not in _FUNCTIONS_AND_KEYWORDS:
                    names.add(match.group(0))
    return names


def test_the_dashboard_is_valid_json_reading_quantserve_metrics_only() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["panels"] and all(p["targets"] for p in dashboard["panels"])
    names = dashboard_metric_names(dashboard)
    assert {"quantserve_queue_depth", "quantserve_job_duration_seconds_bucket", "quantserve_job_failures_total",
            "quantserve_upload_bytes_total"} <= names, names
    assert all(n.startswith("quantserve_") for n in names), names
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


def test_compose_validates_and_every_worker_is_hardened_on_the_internal_network() -> None:
    assert shutil.which("docker-compose"), ("docker-compose is not installed: apt-get install -y docker-compose "
                                            "(`make services` does it where it can)")
    out = subprocess.run(["docker-compose", "--profile", "scale", "--profile", "gpu", "config"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    config = yaml.safe_load(out.stdout)
    assert config["networks"]["backend"].get("internal") is True
    workers = {name: s for name, s in config["services"].items() if name.startswith("worker")}
    assert len(workers) == 4, sorted(workers)
    # the notifier sends webhooks out and runs no model: hardened alike, but on the outside network too
    notifier = config["services"]["notifier"]
    assert notifier["command"][-3:] == ["webhooks", "--concurrency", "4"] and notifier["cap_drop"] == ["ALL"]
    assert all(w["command"][w["command"].index("--queues") + 1] in ("cpu", "gpu") for w in workers.values())
    for name, service in workers.items():
        assert service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name
        assert service["read_only"] is True and any(t.startswith("/tmp") for t in service["tmpfs"]), name
        assert list(service["networks"]) == ["backend"], name
