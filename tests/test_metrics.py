"""Metrics sinks: JSONL, TensorBoard scalars, the Prometheus endpoint and its config checks."""

from __future__ import annotations

import importlib.util
import json
import socket
import urllib.request

import pytest

from fedgspo.config import ConfigError, load_config
from fedgspo.telemetry.metrics import MetricsConfig, MetricsLogger, jsonable, numeric_fields, read_metrics
from fedgspo.train import main

RECORD = {"step": 3, "reward_mean": 0.5, "consensus_failed": True, "flagged": [1], "rank_trust": [1.0, 0.25],
          "reward/exact_match": 0.125, "note": "text"}


def test_numeric_fields_are_scalars_and_per_rank_lists():
    assert list(numeric_fields(RECORD)) == [
        ("reward_mean", None, 0.5), ("consensus_failed", None, 1.0), ("rank_trust", 0, 1.0),
        ("rank_trust", 1, 0.25), ("reward/exact_match", None, 0.125)]


def test_jsonable_keeps_non_finite_floats_as_text():
    assert jsonable([1.0, float("nan"), [float("inf")]]) == [1.0, "nan", ["inf"]]
    assert jsonable(float("-inf")) == "-inf" and jsonable("x") == "x"


def test_logger_writes_jsonl_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = MetricsLogger(tmp_path)
    logger.log(RECORD)
    logger.log({**RECORD, "step": 4, "rank_z_score": [float("nan"), 0.5]})
    logger.close()
    (tmp_path / "metrics.jsonl").open("a").write('{"step": 5, "torn')
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [3, 4] and records[1]["rank_z_score"] == ["nan", 0.5]
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"reward_mean", "consensus_failed", "rank_trust/0", "rank_trust/1", "reward/exact_match"} <= tags
    assert "flagged" not in tags and [e.value for e in acc.Scalars("rank_trust/1")] == [0.25, 0.25]


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return resp.read().decode()


def test_prometheus_endpoint_serves_the_latest_record(tmp_path):
    pytest.importorskip("prometheus_client")
    logger = MetricsLogger(tmp_path, tensorboard=False,
                           cfg=MetricsConfig(prometheus_port=0, prometheus_addr="127.0.0.1"))
    port = logger.prometheus.port
    logger.log(RECORD)
    logger.log({**RECORD, "step": 4, "reward_mean": 0.75})
    text = _scrape(port)
    assert "fedgspo_reward_mean 0.75" in text and "fedgspo_step 4.0" in text
    assert 'fedgspo_rank_trust{rank="1"} 0.25' in text
    assert "fedgspo_reward_exact_match 0.125" in text and "fedgspo_consensus_failed 1.0" in text
    logger.close()
    with socket.socket() as sock:  # closing frees the port (the scrape's connection may linger)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen()


def test_prometheus_port_without_the_client_is_a_config_error(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "prometheus_client" else find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"metrics\.prometheus_port: .*fedgspo\[metrics\]"):
        load_config(None, ["metrics.prometheus_port=9100"])
    assert load_config(None, []).metrics.prometheus_port is None  # off by default: no client needed


def test_prometheus_port_in_use_stops_the_run_with_one_line(tmp_path, capsys):
    pytest.importorskip("prometheus_client")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        code = main([f"run.dir={tmp_path / 'run'}", f"metrics.prometheus_port={port}",
                     "metrics.prometheus_addr=127.0.0.1", "train.max_steps=2", "run.progress_bar=false"])
    assert code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "metrics.prometheus_port" in err[0] and str(port) in err[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_step_record_has_robustness_and_system_figures(tmp_path):
    run = tmp_path / "run"
    assert main([f"run.dir={run}", "train.max_steps=4", "run.progress_bar=false", "task.prompts_per_rank=2",
                 "gspo.num_generations=4", "checkpoint.every=2"]) == 0
    records = read_metrics(run)
    first = records[0]
    for key in ("tokens_per_s", "flagged_frac", "time_checkpoint_s", "registry_conflicts", "registry_retries",
                "event_queue_depth", "events_dropped"):
        assert isinstance(first[key], (int, float)), key
    assert first["tokens_per_s"] > 0
    assert first["rank_trust"] == [1.0] and first["rank_flags"] == [0] and len(first["rank_z_score"]) == 1
    # step 1 ends at a checkpoint (every 2 steps); step 0 does not
    assert records[1]["time_checkpoint_s"] > records[0]["time_checkpoint_s"]
    assert json.loads((run / "summary.json").read_text())["steps"] == 4
