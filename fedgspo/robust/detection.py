"""Outlier detection on per-rank statistics relative to the robust aggregate.

For every rank ``i`` the robust all-reduce measures, exactly and at the cost of one tiny
all-reduce, the distance ``||x_i - a||`` to the aggregate ``a``, the cosine of ``x_i`` to
``a`` and the norm ``||x_i||``. Each statistic is turned into robust z-scores across ranks
(median and MAD, scaled by 0.6745 so that z ~ N(0, 1) for Gaussian data; distances and norms
on a log scale) and a rank is flagged when it could pull the aggregate:

* any of its statistics is NaN/Inf (always flagged);
* its log-norm z-score is above ``threshold`` (blown up; one-sided: a small or zero update
  is harmless to a robust rule and is never flagged);
* its log-distance z-score is above ``threshold`` (far from the aggregate; one-sided);
* its cosine is below the absolute bound ``cosine_bound`` (opposes the aggregate), or its
  cosine z-score is below ``-threshold``.

MAD floors keep z-scores meaningful when honest ranks agree closely: ``log_floor`` for log
norms/distances, ``cosine_floor`` for cosines. With the defaults (threshold 3.5, log_floor
0.85) a norm is flagged only once it is at least ``exp(3.5 * 0.85 / 0.6745) ~ 80`` times the
median norm (more when the honest spread is wider).

Calibration (``benchmarks/detection_calibration.py``; JSON in
``benchmarks/results/detection_calibration.json``): real GSPO gradients of the default tiny
policy and task, n = 8 simulated ranks, 30 steps per setting, prompts_per_rank 2 and 8, at the
initial weights and after 150 Adam steps (mean reward 0.17 -> 0.54), coordinate median and
trimmed mean, f = 1 and 2 attackers. Honest ranks are far more heterogeneous than Gaussian
models suggest: the cosine to the aggregate has median 0.25-0.47 and reaches -0.66 (1 %
quantile -0.42 with prompts_per_rank 2 after training); the norm relative to the step's
median norm reaches 35x (99 % quantile 25x) with prompts_per_rank 2 after training, 6x with 8
prompts. The previous rule (two-sided norm z, cosine MAD floor 0.05, log floor 0.1) flagged
0.35-0.52 honest ranks per clean step. The defaults here flag none in all four settings,
while nan, gaussian (N(0, 1), ~360x the honest norm) and bit_flip are caught with recall 1.0
and precision 1.0 (no honest rank flagged in attacked steps either). Not separable from
honest ranks with these statistics at n = 8: ``scaled`` x10 (honest ranks reach 35x),
``sign_flip`` (a flipped noisy update keeps a cosine within the honest range, partly because
the aggregate it is compared with includes it) and, by design, ALIE; IPM is caught 34-94 %
of the time by the cosine bound. Lowering ``log_floor`` to 0.3 catches 93-100 % of ``scaled``
attacks at the cost of 0.07-0.17 false flags per clean step after training (see the JSON).
``zero`` is deliberately never flagged per step.

**Across steps** (:class:`PersistentDeviation`): an attacker that repeats itself is found by
its averages even when each single step is within the honest spread. Per rank it keeps an EMA
of the cosine to the aggregate and of the log norm relative to the step's median log norm,
and flags ranks whose EMA is a robust outlier among the ranks' EMAs (the honest EMAs
concentrate as noise averages out). On the calibration statistics above (EMA decay 0.95,
threshold 3.5, 10 warm-up steps), ``scaled`` x10 is flagged in every step after warm-up
with precision 1.0 in all four settings, with 0 false flags per clean step; ``sign_flip`` in
one setting only (8 prompts per rank, initial weights): elsewhere the flipped updates keep a
positive mean cosine (+0.2 to +0.4), because each update is mostly noise and the aggregate
it is compared with includes it.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import torch

#: Scales the MAD of Gaussian data to its standard deviation's z-score.
MAD_TO_Z = 0.6745
DEFAULT_THRESHOLD = 3.5
#: MAD floor of log norms / log distances (honest log-norm spread is wide: see above).
LOG_FLOOR = 0.85
#: MAD floor of cosines.
COSINE_FLOOR = 0.3
#: Cosines below this are flagged whatever the others (calibration: benchmarks/detection_calibration.py).
COSINE_BOUND = -0.8


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
    stats: RankStatistics,
    threshold: float = DEFAULT_THRESHOLD,
    log_floor: float = LOG_FLOOR,
    cosine_floor: float = COSINE_FLOOR,
    cosine_bound: float = COSINE_BOUND,
    use_distance: bool = True,
) -> Detection:
    """Flag ranks that could pull the aggregate, or are nonfinite (rules: module docstring).

    ``z_norm`` and ``z_distance`` are robust z-scores of the log norms / log distances
    (MAD at least ``log_floor``), ``z_cosine`` of the cosines (MAD at least ``cosine_floor``).
    Flagged: any nonfinite statistic; ``z_norm > threshold``; ``z_distance > threshold``
    (with ``use_distance``); ``cosine < cosine_bound``; ``z_cosine < -threshold``. Low norms
    and distances are never flagged.
    """
    z_d = robust_z(_log(stats.distances), floor=log_floor)
    z_n = robust_z(_log(stats.norms), floor=log_floor)
    z_c = robust_z(stats.cosines, floor=cosine_floor)
    flagged = [
        i
        for i in range(len(stats.distances))
        if not all(math.isfinite(v) for v in (z_d[i], z_n[i], z_c[i], stats.cosines[i]))
        or z_n[i] > threshold
        or (use_distance and z_d[i] > threshold)
        or stats.cosines[i] < cosine_bound
        or z_c[i] < -threshold
    ]
    return Detection(z_d, z_c, z_n, flagged)


class PersistentDeviation:
    """Flag ranks whose *average* behaviour deviates, step after step (module docstring).

    Per rank: ``c <- decay c + (1 - decay) cos_i`` and ``l <- decay l + (1 - decay)
    (log ||x_i|| - median_j log ||x_j||)``, bias-corrected like Adam's moments; nonfinite
    statistics leave a rank's averages unchanged. From ``warmup`` updates on, rank ``i`` is
    flagged when the robust z-score of its ``c`` among all ranks' is below ``-threshold``
    (opposes or ignores the common direction) or that of its ``l`` is above ``threshold``
    (persistently larger). MAD floors ``cosine_floor`` and ``log_floor`` keep close honest
    averages from making tiny differences significant. State is plain data, identical on
    every rank when fed identical reports (:meth:`state_dict` for checkpoints).
    """

    def __init__(self, world_size: int, decay: float = 0.95, threshold: float = DEFAULT_THRESHOLD,
                 warmup: int = 10, cosine_floor: float = 0.05, log_floor: float = 0.2) -> None:
        self.decay, self.threshold, self.warmup = decay, threshold, warmup
        self.cosine_floor, self.log_floor = cosine_floor, log_floor
        self.cosine_ema = [0.0] * world_size
        self.log_norm_ema = [0.0] * world_size
        self.updates = [0] * world_size

    def update(self, cosines: list[float], norms: list[float]) -> list[int]:
        """Fold one step's statistics in; the ranks flagged after it (sorted).

        Raises ``ValueError`` when the lists do not have one entry per rank."""
        n = len(self.updates)
        if len(cosines) != n or len(norms) != n:
            raise ValueError(f"expected {n} cosines and norms, got {len(cosines)} and {len(norms)}")
        log_norms = _log(norms)
        finite = [math.isfinite(c) and math.isfinite(v) for c, v in zip(cosines, log_norms)]
        if not any(finite):
            return []
        median = statistics.median(v for v, ok in zip(log_norms, finite) if ok)
        d = self.decay
        for i in range(n):
            if finite[i]:
                self.cosine_ema[i] = d * self.cosine_ema[i] + (1 - d) * cosines[i]
                self.log_norm_ema[i] = d * self.log_norm_ema[i] + (1 - d) * (log_norms[i] - median)
                self.updates[i] += 1
        ready = [i for i in range(n) if self.updates[i] >= self.warmup]
        if len(ready) < 3:  # no majority to compare with
            return []
        cos = [self.cosine_ema[i] / (1 - d ** self.updates[i]) for i in ready]
        log = [self.log_norm_ema[i] / (1 - d ** self.updates[i]) for i in ready]
        z_c = robust_z(cos, floor=self.cosine_floor)
        z_l = robust_z(log, floor=self.log_floor)
        return sorted(r for r, zc, zl in zip(ready, z_c, z_l) if zc < -self.threshold or zl > self.threshold)

    def state_dict(self) -> dict[str, list]:
        return {"cosine_ema": list(self.cosine_ema), "log_norm_ema": list(self.log_norm_ema),
                "updates": list(self.updates)}

    def load_state_dict(self, state: dict[str, list]) -> None:
        """Restore :meth:`state_dict`; ``ValueError`` if the world size differs."""
        if len(state["updates"]) != len(self.updates):
            raise ValueError(f"state has {len(state['updates'])} ranks, detector has {len(self.updates)}")
        self.cosine_ema = [float(v) for v in state["cosine_ema"]]
        self.log_norm_ema = [float(v) for v in state["log_norm_ema"]]
        self.updates = [int(v) for v in state["updates"]]


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
    is the coordinate-wise median. A synthetic sanity check; the defaults are calibrated on real
    GSPO gradients (module docstring).
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
