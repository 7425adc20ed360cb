"""Step tracing: free when off, OpenTelemetry spans per rank (traces*.jsonl or OTLP) when on,
rank and step on every span, config checks."""

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


def test_no_run_directory_no_spans():
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
    assert spans["step"]["attributes"] == {"rank": 0, "step": 3} and spans["step"]["parent_id"] is None
    assert spans["reward"]["attributes"] == {"rank": 0, "step": 3}  # every span: rank and step
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


def test_every_rank_writes_its_own_spans(tmp_path):
    pytest.importorskip("opentelemetry.sdk")
    from fedgspo.recorder import NullRecorder
    from fedgspo.runfiles import RunFiles

    files = RunFiles(tmp_path / "run")
    recorder = NullRecorder(load_config(None, ["tracing.enabled=true"]), files, rank=2)
    with recorder.tracer.span("step", step=5):
        with recorder.tracer.phase({}, "aggregate"):
            pass
    recorder.close()
    spans = [json.loads(line) for line in files.traces_of(2).read_text().splitlines()]
    assert {s["name"] for s in spans} == {"step", "aggregate"}
    assert all(s["attributes"] == {"rank": 2, "step": 5} for s in spans)
    assert spans[0]["resource"]["attributes"]["fedgspo.rank"] == 2 and not files.traces.exists()
    assert not NullRecorder(load_config(None, [])).tracer.enabled


def test_spans_go_to_an_otlp_endpoint_when_configured(tmp_path):
    pytest.importorskip(tracing.OTLP_MODULE)
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    received: list[tuple[str, str, bytes]] = []

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            received.append((self.path, self.headers["Content-Type"],
                             self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}/v1/traces"
    try:
        tracer = StepTracer(TracingConfig(enabled=True, otlp_endpoint=endpoint), tmp_path, rank=1)
        with tracer.span("step", step=0):
            pass
        tracer.close()
    finally:
        server.shutdown()
        server.server_close()
    assert received and not list(tmp_path.glob("traces*.jsonl"))
    path, content_type, body = received[0]
    assert path == "/v1/traces" and content_type == "application/x-protobuf"
    request = ExportTraceServiceRequest.FromString(body)
    span = request.resource_spans[0].scope_spans[0].spans[0]
    assert span.name == "step" and {a.key: a.value.int_value for a in span.attributes} == {"rank": 1, "step": 0}


def test_otlp_endpoint_without_the_exporter_is_a_config_error(monkeypatch):
    installed = tracing.otel_installed
    monkeypatch.setattr(tracing, "otel_installed", lambda module="opentelemetry.sdk": (
        False if module == tracing.OTLP_MODULE else installed(module)))
    with pytest.raises(ConfigError, match=r"tracing\.otlp_endpoint: .*otlp"):
        load_config(None, ["tracing.otlp_endpoint=http://127.0.0.1:4318/v1/traces"])
