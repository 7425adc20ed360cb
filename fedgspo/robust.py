"""Robust all-reduce: a drop-in for ``dist.all_reduce`` that tolerates Byzantine ranks.

Every rank contributes a flat update; the ranks' updates are combined by a robust rule
instead of a sum, and the result is written back into the tensor on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

RULES = ("mean", "median", "trimmed_mean")


@dataclass(frozen=True)
class RobustReport:
    """What one robust all-reduce saw: per-rank distance to the result and flagged ranks."""

    distances: list[float]
    z_scores: list[float]
    flagged: list[int]


def _aggregate(stack: torch.Tensor, rule: str, f: int) -> torch.Tensor:
    n = stack.shape[0]
    if rule == "mean":
        return stack.mean(0)
    if rule == "median":
        return stack.median(0).values if n % 2 else stack.sort(0).values[n // 2 - 1 : n // 2 + 1].mean(0)
    sorted_ = stack.sort(0).values
    return sorted_[f : n - f].mean(0)


def robust_all_reduce(
    tensor: torch.Tensor,
    rule: str = "trimmed_mean",
    f: int = 1,
    group: dist.ProcessGroup | None = None,
    z_threshold: float = 3.0,
) -> RobustReport:
    """Replace ``tensor`` in place, on every rank, by the robust aggregate of all ranks' tensors."""
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; known: {', '.join(RULES)}")
    n = dist.get_world_size(group) if dist.is_initialized() else 1
    if n == 1:
        return RobustReport([0.0], [0.0], [])
    if rule == "trimmed_mean" and 2 * f >= n:
        f = 0  # placeholder behaviour until the aggregation module lands
    out = torch.empty(n * tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    dist.all_gather_into_tensor(out, tensor.reshape(-1).contiguous(), group=group)
    stack = out.view(n, -1)
    agg = _aggregate(stack, rule, f)
    dists = (stack - agg).norm(dim=1)
    med = dists.median()
    mad = (dists - med).abs().median().clamp_min(1e-12)
    z = 0.6745 * (dists - med) / mad
    tensor.copy_(agg.view_as(tensor))
    flagged = [i for i, v in enumerate(z.tolist()) if v > z_threshold]
    return RobustReport(dists.tolist(), z.tolist(), flagged)
