"""Step tracing: free when off, OpenTelemetry spans in traces.jsonl when on, config checks."""

from __future__ import annotations

import json

import pytest

import fedgspo.telemetry.tracing as tracing
from fedgspo.config import ConfigError, load_config
from fedgspo.telemetry.tracing import StepTracer, TracingConfig
from fedgspo.train import main


def test_off_is_a_shared_no_op_that_still_times(tmp_path):
    tracer = StepTracer(TracingConfig(), tmp_path)
    assert not tracer.enabled and tracer.span("a") is tracer.span("b")
    times: dict[str, float] = {}
    for _ in range(2):
        with tracer.phase(times, "rollout"):
            pass
    assert set(times) == {"rollout"} and times["rollout"] >= 0
    tracer.close()
    assert not (tmp_path / "traces.jsonl").exists()


def test_enabled_without_the_sdk_is_a_config_error(monkeypatch):
    monkeypatch.setattr(tracing, "otel_installed", lambda: False)
    with pytest.raises(ConfigError, match=r"tracing\.enabled: .*fedgspo\[tracing\]"):
        load_config(None, ["tracing.enabled=true"])
    assert not load_config(None, ["tracing.enabled=auto"]).tracing.active()


def test_only_rank_0_traces(tmp_path):
    pytest.importorskip("opentelemetry.sdk")
    assert not StepTracer(TracingConfig(enabled=True), None).enabled


def test_spans_nest_and_are_written_as_json_lines(tmp_path):
    pytest.importorskip("opentelemetry.sdk")
    tracer = StepTracer(TracingConfig(enabled="auto"), tmp_path, run_name="r")
    times: dict[str, float] = {}
    with tracer.span("step", step=3):
        with tracer.phase(times, "rollout"):
            with tracer.span("reward"):
                pass
    tracer.close()
    spans = {s["name"]: s for s in map(json.loads, (tmp_path / "traces.jsonl").read_text().splitlines())}
    assert set(spans) == {"step", "rollout", "reward"}
    assert spans["step"]["attributes"] == {"step": 3} and spans["step"]["parent_id"] is None
    assert spans["rollout"]["parent_id"] == spans["step"]["context"]["span_id"]
    assert spans["reward"]["parent_id"] == spans["rollout"]["context"]["span_id"]
    assert spans["step"]["resource"]["attributes"]["fedgspo.run"] == "r"
    assert set(times) == {"rollout"}


def test_run_traces_every_step_phase(tmp_path):
    pytest.importorskip("opentelemetry.sdk")
    run = tmp_path / "run"
    assert main([f"run.dir={run}", "tracing.enabled=true", "train.max_steps=2", "run.progress_bar=false",
                 "task.prompts_per_rank=2", "gspo.num_generations=4"]) == 0
    names = [json.loads(line)["name"] for line in (run / "traces.jsonl").read_text().splitlines()]
    assert names.count("step") == 2 and names.count("reward") == 1  # one rollout for two steps
    for phase in ("rollout", "backward", "aggregate", "optimizer", "checkpoint", "bookkeeping"):
        assert names.count(phase) == 2, phase
