"""The run directory: every file name of a run, in one place, and atomic file writes.

A run directory (``runs/<name>`` by default) holds::

    config.yaml         the resolved config              metrics.jsonl    one record per step
    summary.json        written at the end               events.jsonl     rank 0's event bus
    registry.sqlite     the entity registry              alerts.jsonl     alerts that fired
    audit.jsonl         hash-chained audit log           traces.jsonl     rank 0's OpenTelemetry spans
    audit.head.json     signed head of the audit log    hotswap.json     pending hot swaps
    checkpoints/        step_NNNNNNNN/ and final/        requests/        signed operator requests
    sites/              siteK/step_NNNNNNNN/: a site's own state at a checkpoint (federated local steps)
    tensorboard/        TensorBoard event files          export/          the trained model
    traces.rank<N>.jsonl  rank N's spans (N > 0)

Every other module takes its paths from here (:class:`RunFiles`), so a file is named once. This
module imports nothing of fedgspo and may be imported from any package.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG = "config.yaml"
SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
EVENTS = "events.jsonl"
REGISTRY = "registry.sqlite"
ALERTS = "alerts.jsonl"
AUDIT = "audit.jsonl"
AUDIT_HEAD = "audit.head.json"
TRACES = "traces.jsonl"
TRACES_OF_RANK = "traces.rank{rank}.jsonl"
HOTSWAP = "hotswap.json"
CHECKPOINTS = "checkpoints"
SITE_STATES = "sites"
FINAL_CHECKPOINT = "final"
REQUESTS = "requests"
TENSORBOARD = "tensorboard"
EXPORT = "export"
#: Files whose presence marks a directory as a run.
RUN_MARKERS = (CONFIG, METRICS, SUMMARY)


@dataclass(frozen=True)
class RunFiles:
    """The paths of one run directory (nothing is created by reading a path)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    config = property(lambda self: self.root / CONFIG)
    summary = property(lambda self: self.root / SUMMARY)
    metrics = property(lambda self: self.root / METRICS)
    events = property(lambda self: self.root / EVENTS)
    registry = property(lambda self: self.root / REGISTRY)
    alerts = property(lambda self: self.root / ALERTS)
    audit = property(lambda self: self.root / AUDIT)
    audit_head = property(lambda self: self.root / AUDIT_HEAD)
    traces = property(lambda self: self.root / TRACES)

    def traces_of(self, rank: int) -> Path:
        """Where rank ``rank`` writes its spans: ``traces.jsonl`` for rank 0,
        ``traces.rank<N>.jsonl`` for the others."""
        return self.traces if rank == 0 else self.root / TRACES_OF_RANK.format(rank=rank)

    hotswap = property(lambda self: self.root / HOTSWAP)
    checkpoints = property(lambda self: self.root / CHECKPOINTS)
    final_checkpoint = property(lambda self: self.root / CHECKPOINTS / FINAL_CHECKPOINT)
    requests = property(lambda self: self.root / REQUESTS)
    tensorboard = property(lambda self: self.root / TENSORBOARD)
    export = property(lambda self: self.root / EXPORT)

    def holds_run(self) -> bool:
        """Whether a run has already written its step records here."""
        return self.metrics.exists()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same folder, fsync and
    ``os.replace``: readers see the old file or the new one, never half of it. On failure
    the temporary file is removed and the error propagates."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as indented, key-sorted JSON to ``path`` atomically (:func:`write_text_atomic`)."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True))
