"""Per-step metrics: ``metrics.jsonl`` (one object per optimizer step), TensorBoard and,
optionally, a Prometheus endpoint.

Only rank 0 constructs a :class:`MetricsLogger`; other ranks pass ``None`` around. Each JSON
line is handed to the operating system as it is written; in a run, rank 0's recorder calls
:meth:`MetricsLogger.log` on its writer thread, so a crash loses the records still queued
there (at most those since the last checkpoint).

A step record is a flat dict. Numeric and boolean fields are exported to TensorBoard and
Prometheus as scalars; a list under a key starting with ``rank_`` holds one number per rank
(``rank_trust[3]`` is rank 3's trust) and is exported per rank (TensorBoard ``rank_trust/3``,
Prometheus ``fedgspo_rank_trust{rank="3"}``). Other lists (``flagged``: rank numbers) are only
written to the JSONL file.

Failure behaviour: asking for a Prometheus port without ``prometheus-client`` installed is a
config error (:class:`MetricsConfig` does not validate); a port that cannot be bound raises
``OSError`` from :class:`PrometheusExporter`.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from fedgspo import runfiles

PER_RANK_PREFIX = "rank_"


class MetricsConfig(BaseModel):
    """Where step records go besides ``metrics.jsonl`` (TensorBoard: ``run.tensorboard``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    prometheus_port: int | None = Field(
        None, ge=0, le=65535, description="Serve the latest step's figures at http://<addr>:<port>/metrics "
        "on rank 0 (needs prometheus-client: pip install 'fedgspo[metrics]'); 0: any free port; null: off.")
    prometheus_addr: str = Field("0.0.0.0", description="Address the Prometheus endpoint binds to.")

    @field_validator("prometheus_port")
    @classmethod
    def _client_installed(cls, port: int | None) -> int | None:
        if port is not None and importlib.util.find_spec("prometheus_client") is None:
            raise ValueError("needs prometheus-client: pip install 'fedgspo[metrics]'")
        return port


def jsonable(value: Any) -> Any:
    """``value`` with non-finite floats (also inside lists) as text: JSON has no NaN/Inf."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    return value


def prometheus_name(key: str) -> str:
    """The gauge a record field is exported as: ``fedgspo_<key>``, non-alphanumerics as ``_``."""
    return "fedgspo_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)


def numeric_fields(record: dict[str, Any]) -> Iterator[tuple[str, int | None, float]]:
    """``(key, rank, value)`` for every exportable number of a record: scalars (booleans as
    0/1) with rank ``None``, and each entry of a ``rank_*`` list with its rank. ``step`` is
    the x axis, not a field."""
    for key, value in record.items():
        if key == "step":
            continue
        if isinstance(value, (int, float)):
            yield key, None, float(value)
        elif isinstance(value, list) and key.startswith(PER_RANK_PREFIX):
            for rank, v in enumerate(value):
                yield key, rank, float(v)


class PrometheusExporter:
    """Serve the latest value of every numeric record field as a gauge named
    ``fedgspo_<key>`` (non-alphanumerics as ``_``; per-rank fields with a ``rank`` label), and
    the step as ``fedgspo_step``, from a registry of its own, on a daemon thread. :meth:`close`
    stops the server and frees the port."""

    def __init__(self, port: int, addr: str = "0.0.0.0") -> None:
        from prometheus_client import CollectorRegistry, start_http_server

        self.registry = CollectorRegistry()
        self._server, self._thread = start_http_server(port, addr, registry=self.registry)
        self.port: int = self._server.server_address[1]
        self._gauges: dict[str, Any] = {}

    def update(self, record: dict[str, Any]) -> None:
        (self._gauges.get("step") or self._new_gauge("step", per_rank=False)).set(record["step"])
        for key, rank, value in numeric_fields(record):
            gauge = self._gauges.get(key) or self._new_gauge(key, per_rank=rank is not None)
            (gauge if rank is None else gauge.labels(rank=str(rank))).set(value)

    def _new_gauge(self, key: str, *, per_rank: bool) -> Any:
        from prometheus_client import Gauge

        gauge = Gauge(prometheus_name(key), f"step record field {key}", ["rank"] if per_rank else [], registry=self.registry)
        self._gauges[key] = gauge
        return gauge

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


class TensorBoardScalars:
    """Every numeric field of a record as TensorBoard scalars (per-rank ones tagged
    ``<key>/<rank>``), written as one event per step: a fraction of the cost of one
    ``SummaryWriter.add_scalar`` call per field. Events are flushed by tensorboard's writer
    thread and on :meth:`close`."""

    def __init__(self, log_dir: Path) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._event, self._summary = Event, Summary
        self._writer = EventFileWriter(str(log_dir))

    def add(self, record: dict[str, Any]) -> None:
        values = [self._summary.Value(tag=key if rank is None else f"{key}/{rank}", simple_value=value)
                  for key, rank, value in numeric_fields(record)]
        self._writer.add_event(self._event(wall_time=time.time(), step=int(record["step"]),
                                           summary=self._summary(value=values)))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class MetricsLogger:
    """Append step records to ``<run_dir>/metrics.jsonl`` and, optionally, TensorBoard and a
    :class:`PrometheusExporter`."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, cfg: MetricsConfig | None = None) -> None:
        cfg = cfg or MetricsConfig()
        self.path = runfiles.RunFiles(run_dir).metrics
        # The endpoint first: a port that cannot be bound leaves nothing open behind it.
        self.prometheus = (PrometheusExporter(cfg.prometheus_port, cfg.prometheus_addr)
                           if cfg.prometheus_port is not None else None)
        self._tb = TensorBoardScalars(runfiles.RunFiles(run_dir).tensorboard) if tensorboard else None
        self._file = self.path.open("a", buffering=1)

    def log(self, record: dict[str, Any]) -> None:
        """Write one record; it must contain an integer ``step``."""
        self._file.write(json.dumps({k: jsonable(v) for k, v in record.items()}) + "\n")
        if self._tb is not None:
            self._tb.add(record)
        if self.prometheus is not None:
            self.prometheus.update(record)

    def flush(self) -> None:
        """Hand the JSONL and TensorBoard writes made so far to the operating system."""
        self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self.prometheus is not None:
            self.prometheus.close()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """All records of ``<run_dir>/metrics.jsonl`` in order (a torn last line is skipped)."""
    records = []
    for line in (runfiles.RunFiles(run_dir).metrics).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
