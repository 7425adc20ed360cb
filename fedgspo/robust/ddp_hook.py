"""DDP communication hook: robust aggregation of every gradient bucket.

Usage::

    state = RobustHookState(rule="trimmed_mean", f=1)
    model.register_comm_hook(state, robust_hook)
    loss.backward()                      # buckets are robustly aggregated here
    if state.consensus_failed:           # any bucket failed in this backward
        optimizer.zero_grad()            # skip the step
    else:
        optimizer.step()

Exactness: DDP hands the hook one bucket (a slice of the flat gradient) at a time.
Coordinate-wise rules (mean, median, trimmed mean) are exact per bucket: the result equals
aggregating the whole gradient. Whole-vector rules (Krum, Multi-Krum, geometric median,
centered clipping, NNM) and the detection z-scores see only the bucket's coordinates, so
they become per-bucket approximations (e.g. Krum may pick different ranks for different
buckets). For exact whole-vector rules call :func:`fedgspo.robust_all_reduce` once on the
flattened gradient instead of using DDP.

Failure behaviour: the hook runs the robust all-reduce synchronously (no overlap with
backward) and returns a completed future. A consensus failure zeroes that bucket on every
rank and sets :attr:`RobustHookState.consensus_failed`; argument errors raise
``ValueError`` on every rank during backward.
"""

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from fedgspo.robust.detection import DEFAULT_THRESHOLD, SKEW_BOUND
from fedgspo.robust.all_reduce import RobustReport, robust_all_reduce


@dataclass
class RobustHookState:
    """Hook arguments plus the reports of the current backward, by bucket index."""

    rule: str = "trimmed_mean"
    f: int = 1
    mode: str = "sharded"
    z_threshold: float = DEFAULT_THRESHOLD
    skew_bound: float | None = SKEW_BOUND
    process_group: dist.ProcessGroup | None = None
    options: dict[str, Any] = field(default_factory=dict)
    reports: dict[int, RobustReport] = field(default_factory=dict)
    _finished: bool = False

    @property
    def consensus_failed(self) -> bool:
        """Whether any bucket of the latest backward failed consensus."""
        return any(r.consensus_failed for r in self.reports.values())

    @property
    def flagged(self) -> list[int]:
        """Ranks flagged in any bucket of the latest backward (sorted)."""
        return sorted({rank for r in self.reports.values() for rank in r.flagged})

    def record(self, index: int, is_last: bool, report: RobustReport) -> None:
        """Store a bucket's report; the first bucket after a finished backward starts a new set."""
        if self._finished:
            self.reports = {}
        self.reports[index] = report
        self._finished = is_last


def robust_hook(state: RobustHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Replace DDP's averaging all-reduce of ``bucket`` by :func:`fedgspo.robust_all_reduce`."""
    buffer = bucket.buffer()
    report = robust_all_reduce(
        buffer,
        rule=state.rule,
        f=state.f,
        group=state.process_group,
        mode=state.mode,
        z_threshold=state.z_threshold,
        skew_bound=state.skew_bound,
        **state.options,
    )
    state.record(bucket.index(), bucket.is_last(), report)
    future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    future.set_result(buffer)
    return future
