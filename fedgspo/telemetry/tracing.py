"""Spans per step phase through OpenTelemetry, on every rank: JSON lines in the run directory
(``traces.jsonl`` for rank 0, ``traces.rank<N>.jsonl`` for rank N) or OTLP to a collector.

:class:`StepTracer` is what the trainer uses on every rank: :meth:`StepTracer.phase` times a
block into a dict of phase times (always: these are the ``time_<phase>_s`` figures of the step
record) and, when tracing is on, also wraps it in a span; :meth:`StepTracer.span` is a span
alone. Every span carries the attributes ``rank`` and, from the first ``step`` span on,
``step``; the resource names the run (``fedgspo.run``) and the rank (``fedgspo.rank``).
Tracing is on when ``tracing.enabled`` is ``true``, or ``auto`` with ``opentelemetry-sdk``
installed (``pip install 'fedgspo[tracing]'``). When off, a span is a shared no-op context
manager: no OpenTelemetry import, no allocation.

Spans are exported in batches by OpenTelemetry's ``BatchSpanProcessor`` on its own thread: one
``ReadableSpan.to_json`` object per line, or, with ``tracing.otlp_endpoint`` set, OTLP/HTTP
(protobuf) POSTs to that URL instead of the files. :meth:`StepTracer.close` exports what is left.

Failure behaviour: ``enabled: true`` without ``opentelemetry-sdk``, or ``otlp_endpoint``
without ``opentelemetry-exporter-otlp-proto-http``, is a config error. An export that fails
(a collector that is down) is logged by the SDK and dropped; it never reaches training.
"""

from __future__ import annotations

import contextlib
import importlib.util
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ContextManager, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from fedgspo import runfiles

_OFF: ContextManager[None] = contextlib.nullcontext()


def otel_installed(module: str = "opentelemetry.sdk") -> bool:
    """Whether ``module`` (by default ``opentelemetry-sdk``) can be imported."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


OTLP_MODULE = "opentelemetry.exporter.otlp.proto.http.trace_exporter"


class TracingConfig(BaseModel):
    """OpenTelemetry spans of every step's phases, on every rank."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    enabled: bool | Literal["auto"] = Field(
        False, description="true: trace (needs opentelemetry-sdk: pip install 'fedgspo[tracing]'); "
        "auto: trace when it is installed; false: off.")
    otlp_endpoint: str | None = Field(
        None, pattern=r"^https?://", description="Send spans by OTLP/HTTP to this URL (e.g. "
        "http://collector:4318/v1/traces) instead of writing traces*.jsonl; needs "
        "opentelemetry-exporter-otlp-proto-http (pip install 'fedgspo[tracing]').")

    @field_validator("enabled")
    @classmethod
    def _sdk_installed(cls, enabled: bool | str) -> bool | str:
        if enabled is True and not otel_installed():
            raise ValueError("needs opentelemetry-sdk: pip install 'fedgspo[tracing]'")
        return enabled

    @field_validator("otlp_endpoint")
    @classmethod
    def _exporter_installed(cls, endpoint: str | None) -> str | None:
        if endpoint is not None and not otel_installed(OTLP_MODULE):
            raise ValueError("needs opentelemetry-exporter-otlp-proto-http: pip install 'fedgspo[tracing]'")
        return endpoint

    def active(self) -> bool:
        return self.enabled is True or (self.enabled == "auto" and otel_installed())


def json_lines_exporter(path: Path) -> Any:
    """An OpenTelemetry ``SpanExporter`` appending each span as one JSON line to ``path``."""
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    class JsonLinesSpanExporter(SpanExporter):
        def __init__(self) -> None:
            self._file = Path(path).open("a")

        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            self._file.write("".join(span.to_json(indent=None) + "\n" for span in spans))
            self._file.flush()
            return SpanExportResult.SUCCESS

        def shutdown(self) -> None:
            self._file.close()

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            self._file.flush()
            return True

    return JsonLinesSpanExporter()


def span_exporter(cfg: TracingConfig, run_dir: Path, rank: int) -> Any:
    """OTLP/HTTP to ``cfg.otlp_endpoint`` when set, else JSON lines in this rank's traces file."""
    if cfg.otlp_endpoint is not None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=cfg.otlp_endpoint)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    return json_lines_exporter(runfiles.RunFiles(run_dir).traces_of(rank))


class StepTracer:
    """Phase timing on every rank; spans too when tracing is on and ``run_dir`` is given."""

    def __init__(self, cfg: TracingConfig, run_dir: Path | None, *, run_name: str = "", rank: int = 0) -> None:
        self._provider: Any = None
        self._tracer: Any = None
        self.rank = rank
        self._step: int | None = None
        if run_dir is not None and cfg.active():
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            self._provider = TracerProvider(resource=Resource.create(
                {"service.name": "fedgspo", "fedgspo.run": run_name, "fedgspo.rank": rank}))
            self._provider.add_span_processor(BatchSpanProcessor(span_exporter(cfg, Path(run_dir), rank)))
            self._tracer = self._provider.get_tracer("fedgspo")

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    def span(self, name: str, **attributes: Any) -> ContextManager[Any]:
        """A span named ``name`` (child of the current one) with ``attributes``, ``rank`` and
        the current step (a ``step`` attribute sets it for the spans that follow); a no-op
        when off."""
        if self._tracer is None:
            return _OFF
        if "step" in attributes:
            self._step = attributes["step"]
        context = {"rank": self.rank} if self._step is None else {"rank": self.rank, "step": self._step}
        return self._tracer.start_as_current_span(name, attributes={**context, **attributes})

    @contextlib.contextmanager
    def phase(self, times: dict[str, float], name: str) -> Iterator[None]:
        """Add the block's wall time to ``times[name]``, inside a span ``name`` when tracing."""
        t0 = time.perf_counter()
        with self.span(name):
            yield
        times[name] = times.get(name, 0.0) + time.perf_counter() - t0

    def close(self) -> None:
        """Export the spans still queued and close the file."""
        if self._provider is not None:
            self._provider.shutdown()
