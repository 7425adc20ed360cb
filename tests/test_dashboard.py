"""The Grafana dashboard (launch/grafana/fedgspo.json) queries only metrics a run exports: the
names in its queries are checked against what the Prometheus exporter serves for the step
records of a real (tiny) run."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import pytest

from fedgspo.telemetry.metrics import PrometheusExporter, read_metrics
from fedgspo.train import main

DASHBOARD = Path(__file__).resolve().parents[1] / "launch" / "grafana" / "fedgspo.json"
METRIC = re.compile(r"\bfedgspo_[A-Za-z0-9_]+")


def _queries(dashboard: dict) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    return exprs + [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]


def test_dashboard_is_well_formed():
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_every_queried_metric_is_exported_by_a_run(tmp_path):
    pytest.importorskip("prometheus_client")
    run = tmp_path / "run"
    assert main([f"run.dir={run}", "train.max_steps=2", "checkpoint.every=2", "run.progress_bar=false",
                 "run.tensorboard=false", "task.prompts_per_rank=2", "gspo.num_generations=4"]) == 0
    exporter = PrometheusExporter(0, "127.0.0.1")
    try:
        for record in read_metrics(run):
            exporter.update(record)
        with urllib.request.urlopen(f"http://127.0.0.1:{exporter.port}/metrics", timeout=10) as resp:
            served = resp.read().decode()
    finally:
        exporter.close()
    exported = {m.group(0) for m in METRIC.finditer(served)}
    queried = {m.group(0) for q in _queries(json.loads(DASHBOARD.read_text())) for m in METRIC.finditer(q)}
    assert queried and not queried - exported, f"queried but not exported: {sorted(queried - exported)}"
