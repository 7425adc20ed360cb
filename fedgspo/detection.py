"""Outlier detection on per-rank statistics relative to the robust aggregate.

For every rank ``i`` the robust all-reduce measures, exactly and at the cost of one tiny
all-reduce, the distance ``||x_i - a||`` to the aggregate ``a``, the cosine of ``x_i`` to
``a`` and the norm ``||x_i||``. Each statistic is turned into robust z-scores across ranks
(median and MAD, scaled by 0.6745 so that z ~ N(0, 1) for Gaussian data) and a rank is
flagged when

* its distance z-score is above ``threshold`` (too far from the aggregate),
* its norm z-score is above ``threshold`` in absolute value (blown up, or zeroed),
* its cosine z-score is below ``-threshold`` (points elsewhere: a sign-flipped update can be
  *closer* to the aggregate than honest ones when honest updates are noisy, but its cosine
  is negative), or
* any of its statistics is NaN/Inf (always flagged).

Distances and norms are scored on a log scale (a rank with twice the typical norm is as
far out as one with half of it; a zeroed update among non-zero ones is far out). MAD floors
keep z-scores meaningful when honest ranks agree almost exactly (a MAD of ~0 would turn
rounding noise into huge z-scores): ``log_floor`` for log distances/norms, ``cosine_floor``
for cosines.

Default threshold 3.5, from :func:`false_alarm_rate` (300 honest steps per cell, d = 4096,
signal-to-noise 0.3 and 3): homogeneous ranks (``spread`` 0 or 0.1): no false alarm for
n = 4, 8, 16 at thresholds >= 3.0. Strongly heterogeneous ranks (``spread`` 0.3, i.e. +-30%
per-rank noise scale): 5-8% of steps have a false flag at 3.5 (10-18% at 3.0, 1-2% at 5.0).
Single false flags cost nothing unless ``exclude_flagged`` is set; quarantine
(:mod:`fedgspo.reputation`) needs repeated flags.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import torch

#: Scales the MAD of Gaussian data to its standard deviation's z-score.
MAD_TO_Z = 0.6745
DEFAULT_THRESHOLD = 3.5


@dataclass(frozen=True)
class RankStatistics:
    """Per-rank statistics against the aggregate (lists indexed by rank)."""

    distances: list[float]
    cosines: list[float]
    norms: list[float]


@dataclass(frozen=True)
class Detection:
    """Robust z-scores of each statistic and the flagged ranks (sorted)."""

    z_distance: list[float]
    z_cosine: list[float]
    z_norm: list[float]
    flagged: list[int]


def statistics_from_sums(dots: torch.Tensor, sq_norms: torch.Tensor, agg_sq_norm: float) -> RankStatistics:
    """Statistics from global sums: ``dots[i] = <x_i, a>``, ``sq_norms[i] = ||x_i||^2``, ``||a||^2``.

    The distance is ``sqrt(||x_i||^2 - 2<x_i, a> + ||a||^2)`` (clamped at 0); the cosine of a
    zero vector is 0. Nonfinite inputs give NaN/Inf statistics.
    """
    dots, sq_norms = dots.double().cpu(), sq_norms.double().cpu()
    dist = (sq_norms - 2 * dots + agg_sq_norm).clamp_min(0).sqrt()
    norms = sq_norms.sqrt()
    denom = norms * math.sqrt(max(agg_sq_norm, 0.0))
    cos = torch.where(denom > 0, dots / denom, torch.zeros_like(dots))
    # A finite-looking ratio of nonfinite quantities still marks the rank as nonfinite.
    cos = torch.where(torch.isfinite(sq_norms) & torch.isfinite(dots), cos, torch.full_like(cos, math.nan))
    return RankStatistics(dist.tolist(), cos.clamp(-1, 1).tolist(), norms.tolist())


def robust_z(values: list[float], floor: float = 0.0, rel_floor: float = 0.0) -> list[float]:
    """Robust z-scores ``0.6745 (v - median) / MAD`` over the finite values; NaN elsewhere.

    The MAD is at least ``max(floor, rel_floor * |median|, 1e-12)``. The median of an even
    count is the mean of the middle two. Plain Python: ``n`` is the world size (small).
    """
    good = [v for v in values if math.isfinite(v)]
    if not good:
        return [math.nan] * len(values)
    med = statistics.median(good)
    mad = max(statistics.median(abs(v - med) for v in good), floor, rel_floor * abs(med), 1e-12)
    return [MAD_TO_Z * (v - med) / mad if math.isfinite(v) else math.nan for v in values]


def _log(values: list[float]) -> list[float]:
    """Natural log, with values below 1e-3 x the median positive value clamped up to it.

    So an exact match (Krum's chosen rank has distance 0) is merely very low, a zeroed
    update among non-zero ones gets a very negative z-score, and all-zero updates (e.g.
    every group with equal rewards) all score 0. NaN/Inf stay nonfinite.
    """
    positive = [v for v in values if math.isfinite(v) and v > 0]
    floor = 1e-3 * statistics.median(positive) if positive else 1e-30
    return [math.log(max(v, floor)) if math.isfinite(v) else math.nan for v in values]


def detect(
    stats: RankStatistics, threshold: float = DEFAULT_THRESHOLD, log_floor: float = 0.1, cosine_floor: float = 0.05
) -> Detection:
    """Flag outlying or nonfinite ranks (see the module docstring for the rules)."""
    z_d = robust_z(_log(stats.distances), floor=log_floor)
    z_n = robust_z(_log(stats.norms), floor=log_floor)
    z_c = robust_z(stats.cosines, floor=cosine_floor)
    flagged = [
        i
        for i in range(len(stats.distances))
        if not all(math.isfinite(v) for v in (z_d[i], z_n[i], z_c[i]))
        or z_d[i] > threshold
        or abs(z_n[i]) > threshold
        or z_c[i] < -threshold
    ]
    return Detection(z_d, z_c, z_n, flagged)


def false_alarm_rate(
    n: int,
    threshold: float = DEFAULT_THRESHOLD,
    snr: float = 1.0,
    spread: float = 0.0,
    d: int = 4096,
    draws: int = 500,
    seed: int = 0,
) -> float:
    """Fraction of honest-only steps with at least one flag, on synthetic Gaussian updates.

    Each draw: ``x_i = snr * mu + s_i * noise_i`` with ``mu, noise_i ~ N(0, I_d / d)`` and
    per-rank noise scales ``s_i = exp(spread * N(0, 1))`` (heterogeneous ranks); the aggregate
    is the coordinate-wise median. Used to choose :data:`DEFAULT_THRESHOLD`.
    """
    gen = torch.Generator().manual_seed(seed)
    alarms = 0
    for _ in range(draws):
        mu = torch.randn(d, generator=gen, dtype=torch.float64) / math.sqrt(d)
        scale = torch.exp(spread * torch.randn(n, 1, generator=gen, dtype=torch.float64))
        x = snr * mu + scale * torch.randn(n, d, generator=gen, dtype=torch.float64) / math.sqrt(d)
        a = x.median(0).values if n % 2 else x.sort(0).values[n // 2 - 1 : n // 2 + 1].mean(0)
        stats = statistics_from_sums(x @ a, (x * x).sum(1), float(a @ a))
        alarms += bool(detect(stats, threshold).flagged)
    return alarms / draws
