"""Spans per step phase through OpenTelemetry, written as JSON lines to ``<run_dir>/traces.jsonl``.

:class:`StepTracer` is what the trainer uses on every rank: :meth:`StepTracer.phase` times a
block into a dict of phase times (always: these are the ``time_<phase>_s`` figures of the step
record) and, when tracing is on, also wraps it in a span; :meth:`StepTracer.span` is a span
alone. Tracing is on only on rank 0 and only when ``tracing.enabled`` is ``true``, or
``auto`` with ``opentelemetry-sdk`` installed (``pip install 'fedgspo[tracing]'``). When off,
a span is a shared no-op context manager: no OpenTelemetry import, no allocation.

Spans are exported in batches by OpenTelemetry's ``BatchSpanProcessor`` on its own thread, one
``ReadableSpan.to_json`` object per line; :meth:`StepTracer.close` exports what is left.

Failure behaviour: ``enabled: true`` without ``opentelemetry-sdk`` is a config error. An
export that fails is logged by the SDK and dropped; it never reaches training.
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

TRACES_FILENAME = runfiles.TRACES
_OFF: ContextManager[None] = contextlib.nullcontext()


def otel_installed() -> bool:
    """Whether ``opentelemetry-sdk`` can be imported."""
    try:
        return importlib.util.find_spec("opentelemetry.sdk") is not None
    except ModuleNotFoundError:
        return False


class TracingConfig(BaseModel):
    """OpenTelemetry spans of every step's phases (rank 0)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    enabled: bool | Literal["auto"] = Field(
        False, description="true: trace (needs opentelemetry-sdk: pip install 'fedgspo[tracing]'); "
        "auto: trace when it is installed; false: off.")

    @field_validator("enabled")
    @classmethod
    def _sdk_installed(cls, enabled: bool | str) -> bool | str:
        if enabled is True and not otel_installed():
            raise ValueError("needs opentelemetry-sdk: pip install 'fedgspo[tracing]'")
        return enabled

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


class StepTracer:
    """Phase timing for every rank, spans on rank 0 when tracing is on (``run_dir`` given)."""

    def __init__(self, cfg: TracingConfig, run_dir: Path | None, *, run_name: str = "") -> None:
        self._provider: Any = None
        self._tracer: Any = None
        if run_dir is not None and cfg.active():
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            self._provider = TracerProvider(
                resource=Resource.create({"service.name": "fedgspo", "fedgspo.run": run_name}))
            self._provider.add_span_processor(BatchSpanProcessor(json_lines_exporter(Path(run_dir) / TRACES_FILENAME)))
            self._tracer = self._provider.get_tracer("fedgspo")

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    def span(self, name: str, **attributes: Any) -> ContextManager[Any]:
        """A span named ``name`` (child of the current one) with ``attributes``; a no-op when off."""
        if self._tracer is None:
            return _OFF
        return self._tracer.start_as_current_span(name, attributes=attributes or None)

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
