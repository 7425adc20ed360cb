"""Per-step metrics: ``metrics.jsonl`` (one object per optimizer step) and TensorBoard.

Only rank 0 constructs a :class:`MetricsLogger`; other ranks pass ``None`` around. Each JSON
line is flushed as it is written, so a crash loses at most the step in flight.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf; keep the information as text
    return value


class MetricsLogger:
    """Append step records to ``<run_dir>/metrics.jsonl`` and, optionally, TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool = True) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = self.path.open("a", buffering=1)
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        """Write one record; it must contain an integer ``step``."""
        step = int(record["step"])
        self._file.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """All records of ``<run_dir>/metrics.jsonl`` in order (a torn last line is skipped)."""
    records = []
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
