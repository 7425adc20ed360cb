"""Outlier detection on per-rank statistics relative to the robust aggregate.

For every rank ``i`` the robust all-reduce measures, exactly and at the cost of one tiny
all-reduce, the distance ``||x_i - a||`` to the aggregate ``a``, the cosine of ``x_i`` to
``a`` and the norm ``||x_i||``. Each statistic is turned into robust z-scores across ranks,
``z = 0.6745 (v - median) / max(MAD, floor)`` (so that z ~ N(0, 1) for Gaussian data;
distances and norms on a log scale, which makes every test scale-free), and a rank is flagged
when it could pull the aggregate:

* any of its statistics is NaN/Inf (always flagged);
* its log-norm z-score is above ``threshold`` (blown up; one-sided: a small or zero update
  is harmless to a robust rule and is never flagged);
* its log-distance z-score is above ``threshold`` (far from the aggregate; one-sided);
* its cosine is below the absolute bound ``cosine_bound`` (opposes the aggregate);
* its cosine z-score is below ``-threshold`` (points elsewhere than the others);
* its *skew* is beyond ``+-skew_bound`` and its skew z-score beyond ``+-threshold`` (it leans
  along the spread: below).

The distance and cosine z-tests skip a rank whose log-norm z-score is below ``-threshold``:
a (nearly) zero update is far from the aggregate and has cosine ~0 whatever it was, and it
cannot pull a robust aggregate. The absolute cosine bound still applies to it.

**Skew.** An attacker that stays inside the honest spread on norm, distance and cosine can
still move a coordinate-wise rule by a fraction of the honest standard deviation in every
coordinate, all in one direction (ALIE's ``mean - z * std``; a threshold-aware attacker); an
adaptive optimizer turns that persistent per-coordinate bias into a persistent step. The skew
of rank ``i`` is the mean of ``sign(x_ij - a_j)`` over the *spread columns* ``j``, those in
which the aggregated updates are not all equal. In each column a median or trimmed mean has as
many honest ranks above it as below, so an honest rank's signs cancel over the columns and its
skew is a few thousandths (|skew| at most 0.014 on every honest rank-step of 72 runs of the
robustness benchmark at n = 4 and 8, non-IID data included: benchmarks/README.md), while
``mean - z * std`` lies below the aggregate in nearly every column: skew near ``-1`` for any
``z`` that moves the rule. Signs, not magnitudes: the cosine of ``x_i - a``
to the spread, measured before, rested on the few heavy-tailed columns that dominate a GSPO
gradient and scattered honest ranks up to +-0.9 once training had been damaged. Both the
absolute bound and the robust z-score must be exceeded: when attackers pull the aggregate,
the honest ranks' skews lean the other way together. Limits: ``f`` colluders near half the
ranks that are still aggregated pull the aggregate so far that honest ranks of different
noise scales lean by different amounts, and a single step does not single them out (three of
eight); once quarantined, they are flagged on every step, so the quarantine is not lifted, and
the across-step averages flag them too. An attacker that shifts each coordinate by
``+-z * std`` with signs of its own choosing has no skew.

**Adaptive floors.** With 8 ranks a MAD rests on four or five values, so it can be small by
chance while an honest rank lies far out (honest GSPO gradients of small batches are heavy
tailed). The MAD floors guard against that, and they follow the honest cluster of the same
call. The *cluster spread* ``S`` is the largest of the MADs of the log norms, the log
distances and the cosines over the regular ranks (finite statistics, norm above the
``_log`` clamp, i.e. not a zero update); it is measured only when the regular ranks are a
strict majority, and is at least ``MIN_SPREAD`` (float rounding). The floors are then

    log floor    = min(log_floor,    spread_factor * S)
    cosine floor = min(cosine_floor, spread_factor * S)

so a rank is flagged only once it deviates by ``threshold * spread_factor / 0.6745`` (~41
with the defaults) times the spread of the cluster on some statistic, and never more easily
than with the constant caps ``log_floor`` / ``cosine_floor`` (a norm at least ~80 times the
median norm). Taking the largest of three MADs protects against one of them being small by
chance. When the honest ranks agree closely (large batches, large models: every statistic
of an update of dimension ``d`` with isotropic noise varies by ~``1/sqrt(d)``), ``S`` is
small and an update scaled by 10, a flipped update or Gaussian noise at a few times the
honest norm is hundreds of spreads away. When they do not (tiny-batch GSPO gradients, whose
norms differ by 35x within one step), ``spread_factor * S`` exceeds the caps and the
constant floors, calibrated on real gradients, apply. There is no warm-up and no state: the
floors are set from the statistics of the call itself, from the first call on;
``spread_factor=None`` turns the adaptation off.

Calibration and measured precision, recall and false flags per clean step for both kinds of
cluster: ``benchmarks/detection_calibration.py``, ``benchmarks/detection.py`` and the
detection section of ``benchmarks/README.md``. ``zero`` is deliberately never flagged per step.

**Across steps** (:class:`PersistentDeviation`): an attacker that repeats itself is found by
its averages even when each single step is within the honest spread. Per rank it keeps an EMA
of the cosine to the aggregate, of the log norm relative to the step's median log norm and of
the skew, and flags ranks whose EMA is a robust outlier among the ranks' EMAs (the honest EMAs
concentrate as noise averages out), after a warm-up of ``warmup`` steps per rank. The averaged
skews are compared about the shortest half of the ranks' values (:func:`shorth_z`), which
colluders just short of half the ranks cannot widen the way they widen a MAD.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

import torch

from fedgspo.robust.shard_exchange import partial_stats, split_stats

#: Scales the MAD of Gaussian data to its standard deviation's z-score.
MAD_TO_Z = 0.6745
DEFAULT_THRESHOLD = 3.5
#: MAD floor of log norms / log distances (honest log-norm spread is wide: see above).
LOG_FLOOR = 0.85
#: MAD floor of cosines.
COSINE_FLOOR = 0.3
#: Cosines below this are flagged whatever the others (calibration: benchmarks/detection_calibration.py).
COSINE_BOUND = -0.8
#: Adaptive MAD floors are this many cluster spreads (module docstring; None turns it off).
SPREAD_FACTOR = 8.0
#: Smallest cluster spread: relative rounding of norms of float32 updates summed in float64.
MIN_SPREAD = 1e-6
#: Skews beyond +-this (and robust z-score outliers) are flagged; None turns the test off.
SKEW_BOUND: float | None = 0.5
#: MAD floor of skews.
SKEW_FLOOR = 0.1
#: Averaged skews beyond +-this (and robust z-score outliers) are flagged by the across-step test.
PERSISTENT_SKEW_BOUND = 0.1
#: Floor of the averaged skews' scale (the half-width of their shortest half: :func:`shorth_z`).
PERSISTENT_SKEW_FLOOR = 0.02


@dataclass(frozen=True)
class RankStatistics:
    """Per-rank statistics against the aggregate (lists indexed by rank)."""

    distances: list[float]
    cosines: list[float]
    norms: list[float]
    #: cosine of ``x_i - a`` to the coordinate-wise spread ``s`` of the aggregated rows
    #: (empty: not measured).
    skews: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class Detection:
    """Robust z-scores of each statistic, the flagged ranks (sorted) and the cluster spread.

    ``spread`` is the cluster spread ``S`` the floors were derived from (module docstring);
    ``None`` when the floors were the constant caps (adaptation off, or no regular majority).
    """

    z_distance: list[float]
    z_cosine: list[float]
    z_norm: list[float]
    flagged: list[int]
    spread: float | None = None
    z_skew: list[float] = field(default_factory=list)


def statistics_from_sums(dots: torch.Tensor, sq_norms: torch.Tensor, agg_sq_norm: float,
                         sign_sums: torch.Tensor | None = None, spread_count: float = 0.0) -> RankStatistics:
    """Statistics from global sums: ``dots[i] = <x_i, a>``, ``sq_norms[i] = ||x_i||^2``, ``||a||^2``,
    and optionally for the skews ``sign_sums[i]``, the sum of ``sign(x_ij - a_j)`` over the
    ``spread_count`` columns in which the aggregated rows differ.

    The distance is ``sqrt(||x_i||^2 - 2<x_i, a> + ||a||^2)`` (clamped at 0); the cosine of a
    zero vector is 0; the skew is ``sign_sums[i] / spread_count`` (0 without spread columns).
    Nonfinite inputs give NaN/Inf statistics.
    """
    dots, sq_norms = dots.double().cpu(), sq_norms.double().cpu()
    dist = (sq_norms - 2 * dots + agg_sq_norm).clamp_min(0).sqrt()
    norms = sq_norms.sqrt()
    denom = norms * math.sqrt(max(agg_sq_norm, 0.0))
    cos = torch.where(denom > 0, dots / denom, torch.zeros_like(dots))
    # A finite-looking ratio of nonfinite quantities still marks the rank as nonfinite.
    finite = torch.isfinite(sq_norms) & torch.isfinite(dots)
    cos = torch.where(finite, cos, torch.full_like(cos, math.nan))
    skews: list[float] = []
    if sign_sums is not None:
        sign_sums = sign_sums.double().cpu()
        skew = sign_sums / spread_count if spread_count > 0 else torch.zeros_like(sign_sums)
        skew = torch.where(finite & torch.isfinite(sign_sums), skew, torch.full_like(skew, math.nan))
        skews = skew.clamp(-1, 1).tolist()
    return RankStatistics(dist.tolist(), cos.clamp(-1, 1).tolist(), norms.tolist(), skews)


def statistics_from_partial(stats: torch.Tensor) -> RankStatistics:
    """:func:`statistics_from_sums` of a :func:`~fedgspo.robust.shard_exchange.partial_stats`
    vector summed over every column (one owner's alone when it holds them all)."""
    sums = split_stats(stats)
    return statistics_from_sums(sums.dots, sums.sq_norms, float(sums.agg_sq_norm), sums.sign_sums,
                                float(sums.spread_count))


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


def shorth_z(values: list[float], floor: float = 0.0) -> list[float]:
    """Robust z-scores ``0.6745 (v - c) / w`` about the shortest half: ``c`` and ``w`` are the
    midpoint and half-width of the shortest interval holding ``n // 2 + 1`` of the finite values
    (``w`` at least ``max(floor, 1e-12)``); NaN for nonfinite values.

    Like the MAD, the half-width estimates ``0.6745`` standard deviations of Gaussian data, but
    the interval need not be centred at the median: ``f`` colluders just short of half the
    values pull the median to the edge of the honest cluster and widen its MAD to the honest
    cluster's largest deviations, while the shortest half stays inside the honest cluster."""
    good = sorted(v for v in values if math.isfinite(v))
    if not good:
        return [math.nan] * len(values)
    h = len(good) // 2 + 1 if len(good) > 1 else 1
    lo = min(range(len(good) - h + 1), key=lambda i: good[i + h - 1] - good[i])
    centre, half = (good[lo] + good[lo + h - 1]) / 2, (good[lo + h - 1] - good[lo]) / 2
    scale = max(half, floor, 1e-12)
    return [MAD_TO_Z * (v - centre) / scale if math.isfinite(v) else math.nan for v in values]


def _clamp(values: list[float]) -> float | None:
    """1e-3 x the median finite positive value (None without one): below it a norm or distance
    counts as zero."""
    positive = [v for v in values if math.isfinite(v) and v > 0]
    return 1e-3 * statistics.median(positive) if positive else None


def _log(values: list[float]) -> list[float]:
    """Natural log, with values below :func:`_clamp` clamped up to it.

    So an exact match (Krum's chosen rank has distance 0) is merely very low, a zeroed
    update among non-zero ones gets a very negative z-score, and all-zero updates (e.g.
    every group with equal rewards) all score 0. NaN/Inf stay nonfinite.
    """
    clamp = _clamp(values)
    floor = 1e-30 if clamp is None else clamp
    return [math.log(max(v, floor)) if math.isfinite(v) else math.nan for v in values]


def _mad(values: list[float]) -> float:
    med = statistics.median(values)
    return statistics.median(abs(v - med) for v in values)


def cluster_spread(stats: RankStatistics, regular: list[int] | None = None) -> float | None:
    """The spread ``S`` of the ranks' cluster: the largest MAD of log norms, log distances, cosines.

    Over the regular ranks only: finite statistics and a norm above ``_log``'s clamp (1e-3 x
    the median positive norm), so a group of zero updates (equal rewards everywhere) does not
    pass for a tight cluster. ``None`` when the regular ranks are not a strict majority (the
    cluster is then undefined and callers keep constant floors); otherwise at least
    ``MIN_SPREAD``. Invariant under scaling every update by the same positive constant.
    ``regular``: :func:`regular_ranks` of ``stats`` when the caller has it already.
    """
    n = len(stats.norms)
    if regular is None:
        regular = regular_ranks(stats)
    if len(regular) < n // 2 + 1:
        return None
    log_norms, log_distances = _log(stats.norms), _log(stats.distances)
    spreads = (_mad([v[i] for i in regular]) for v in (log_norms, log_distances, stats.cosines))
    return max(MIN_SPREAD, *spreads)


def regular_ranks(stats: RankStatistics) -> list[int]:
    """Ranks with finite statistics and a norm above ``_log``'s clamp (1e-3 x the median
    positive norm): the ones that carry a direction. Zero updates (every group of the rank had
    equal rewards) are not regular."""
    clamp = _clamp(stats.norms)
    if clamp is None:
        return []
    log_distances = _log(stats.distances)
    return [i for i in range(len(stats.norms))
            if math.isfinite(log_distances[i]) and math.isfinite(stats.cosines[i])
            and math.isfinite(stats.norms[i]) and stats.norms[i] > clamp]


def detect(
    stats: RankStatistics,
    threshold: float = DEFAULT_THRESHOLD,
    log_floor: float = LOG_FLOOR,
    cosine_floor: float = COSINE_FLOOR,
    cosine_bound: float = COSINE_BOUND,
    use_distance: bool = True,
    spread_factor: float | None = SPREAD_FACTOR,
    skew_bound: float | None = SKEW_BOUND,
    skew_floor: float = SKEW_FLOOR,
) -> Detection:
    """Flag ranks that could pull the aggregate, or are nonfinite (rules: module docstring).

    ``z_norm`` and ``z_distance`` are robust z-scores of the log norms / log distances,
    ``z_cosine`` of the cosines. Their MAD floors are ``min(log_floor, spread_factor * S)``
    and ``min(cosine_floor, spread_factor * S)`` with ``S = cluster_spread(stats)``; the
    caps alone when ``spread_factor`` is None or ``S`` is None. Flagged: any nonfinite
    statistic; ``z_norm > threshold``; ``cosine < cosine_bound``; and, unless ``z_norm <
    -threshold`` (a negligible update), ``z_distance > threshold`` (with ``use_distance``)
    or ``z_cosine < -threshold``. Low norms and distances are never flagged, and when the
    regular ranks (:func:`regular_ranks`) are not a strict majority only nonfinite statistics
    and the cosine bound flag. Pure function of ``stats``: every rank computes the same flags
    from the same statistics.
    """
    regular = regular_ranks(stats)
    spread = cluster_spread(stats, regular) if spread_factor is not None else None
    if spread is not None:
        log_floor = min(log_floor, spread_factor * spread)
        cosine_floor = min(cosine_floor, spread_factor * spread)
    z_d = robust_z(_log(stats.distances), floor=log_floor)
    z_n = robust_z(_log(stats.norms), floor=log_floor)
    z_c = robust_z(stats.cosines, floor=cosine_floor)
    z_s = robust_z(stats.skews, floor=skew_floor)

    # When most ranks send (near-)zero updates — late in training, when most groups have equal
    # rewards — there is no majority to measure against: a rank with a real gradient would look
    # like an outlier of the zeros. The robust rule's output is then ~0 whatever one rank sends,
    # so only nonfinite statistics and the absolute cosine bound flag.
    comparable = len(regular) >= len(stats.norms) // 2 + 1

    def suspicious(i: int) -> bool:
        if not all(math.isfinite(v) for v in (z_d[i], z_n[i], z_c[i], stats.cosines[i])):
            return True
        if stats.cosines[i] < cosine_bound:
            return True
        if not comparable:
            return False
        if z_n[i] > threshold:
            return True
        negligible = z_n[i] < -threshold
        skewed = (skew_bound is not None and bool(stats.skews) and abs(stats.skews[i]) > skew_bound
                  and abs(z_s[i]) > threshold)
        return not negligible and ((use_distance and z_d[i] > threshold) or z_c[i] < -threshold or skewed)

    flagged = [i for i in range(len(stats.distances)) if suspicious(i)]
    return Detection(z_d, z_c, z_n, flagged, spread, z_s)


class PersistentDeviation:
    """Flag ranks whose *average* behaviour deviates, step after step (module docstring).

    Per rank: ``c <- decay c + (1 - decay) cos_i``, ``l <- decay l + (1 - decay)
    (log ||x_i|| - median_j log ||x_j||)`` (clipped to ``+-log_ratio_cap`` when set) and, when
    skews are given, ``k <- decay k + (1 - decay) skew_i`` (a zero update folds in 0), all
    bias-corrected like Adam's moments; nonfinite statistics leave a rank's averages unchanged.
    From ``warmup`` updates on, rank ``i`` is flagged when the robust z-score of its ``c`` among
    all ranks' is below ``-threshold`` (opposes or ignores the common direction), that of its
    ``l`` is above ``threshold`` (persistently larger), or its ``|k|`` exceeds ``skew_bound``
    and its :func:`shorth_z` score is beyond ``+-threshold`` (lies on one side of the aggregate,
    step after step: honest skews average out to a few thousandths). The floors
    ``cosine_floor``, ``log_floor`` and ``skew_floor`` keep close honest averages from making
    tiny differences significant. State is plain data, identical on every rank when fed
    identical reports (:meth:`state_dict` for checkpoints).

    Limit: a rank left out of the aggregate (quarantined) is compared with ranks inside it,
    each of which pulls the aggregate towards itself, so its cosine average falls for no fault
    of its own (an honest rank of 8 outside a geometric median of 4: 0.46 to 0.17 over 100
    steps, the aggregated ranks' 0.47-0.61), which holds a wrongly quarantined rank. The same
    pull holds a flipped-reward attacker, whose average deviates by about as much (0.33 against
    0.44-0.52 when it was quarantined): with the averages of left-out ranks frozen it was
    released after 63 steps and trained with the others to the end (seed 0, 4 ranks), so they
    go on. The cosine to the sum of the *other* aggregated updates removes the pull, and with it
    what holds the flipped-reward attacker: on these tiny batches honest updates are nearly
    orthogonal to each other, so a flipped one is too (averaged over the first update of each
    rollout, seed 0: 0.02 / -0.07 / 0.01 at steps 60 / 200 / 298 against the honest ranks'
    -0.06 to 0.12). Averaging the leave-one-out cosine instead, that attacker was released at
    step 48 (seed 0) or never quarantined (seed 1), 91 % of clean over three seeds against 99 %;
    the three sign flippers under centered clipping stayed unflagged either way
    (benchmarks/README.md, "Leave-one-out cosine").
    """

    def __init__(self, world_size: int, decay: float = 0.95, threshold: float = DEFAULT_THRESHOLD,
                 warmup: int = 10, cosine_floor: float = 0.05, log_floor: float = 0.2,
                 log_ratio_cap: float | None = None, skew_bound: float = PERSISTENT_SKEW_BOUND,
                 skew_floor: float = PERSISTENT_SKEW_FLOOR) -> None:
        self.decay, self.threshold, self.warmup = decay, threshold, warmup
        self.cosine_floor, self.log_floor, self.log_ratio_cap = cosine_floor, log_floor, log_ratio_cap
        self.skew_bound, self.skew_floor = skew_bound, skew_floor
        self.cosine_ema = [0.0] * world_size
        self.log_norm_ema = [0.0] * world_size
        self.skew_ema = [0.0] * world_size
        self.updates = [0] * world_size

    def update(self, cosines: list[float], norms: list[float], skews: list[float] | None = None) -> list[int]:
        """Fold one step's statistics in; the ranks flagged after it (sorted). ``skews``: one
        per rank, or None/empty (not measured: the skew averages stay as they are).

        Raises ``ValueError`` when a list does not have one entry per rank."""
        n = len(self.updates)
        skews = skews or None
        if len(cosines) != n or len(norms) != n or (skews is not None and len(skews) != n):
            raise ValueError(f"expected {n} cosines, norms and skews, got {len(cosines)}, {len(norms)} "
                             f"and {len(skews or [])}")
        log_norms = _log(norms)
        finite = [math.isfinite(c) and math.isfinite(v) and (skews is None or math.isfinite(skews[i]))
                  for i, (c, v) in enumerate(zip(cosines, log_norms))]
        if not any(finite):
            return []
        median = statistics.median(v for v, ok in zip(log_norms, finite) if ok)
        zero_below = _clamp(norms)
        d = self.decay
        for i in range(n):
            if finite[i]:
                self.cosine_ema[i] = d * self.cosine_ema[i] + (1 - d) * cosines[i]
                ratio = log_norms[i] - median
                if self.log_ratio_cap is not None:
                    ratio = max(-self.log_ratio_cap, min(self.log_ratio_cap, ratio))
                self.log_norm_ema[i] = d * self.log_norm_ema[i] + (1 - d) * ratio
                if skews is not None:
                    skew = skews[i] if zero_below is not None and norms[i] > zero_below else 0.0
                    self.skew_ema[i] = d * self.skew_ema[i] + (1 - d) * skew
                self.updates[i] += 1
        ready = [i for i in range(n) if self.updates[i] >= self.warmup]
        if len(ready) < 3:  # no majority to compare with
            return []
        corrections = [1 - d ** self.updates[i] for i in ready]
        cos = [self.cosine_ema[i] / c for i, c in zip(ready, corrections)]
        log = [self.log_norm_ema[i] / c for i, c in zip(ready, corrections)]
        skew = [self.skew_ema[i] / c for i, c in zip(ready, corrections)]
        z_c = robust_z(cos, floor=self.cosine_floor)
        z_l = robust_z(log, floor=self.log_floor)
        z_k = shorth_z(skew, floor=self.skew_floor)
        return sorted(r for r, zc, zl, k, zk in zip(ready, z_c, z_l, skew, z_k)
                      if zc < -self.threshold or zl > self.threshold
                      or (abs(k) > self.skew_bound and abs(zk) > self.threshold))

    def state_dict(self) -> dict[str, list]:
        return {"cosine_ema": list(self.cosine_ema), "log_norm_ema": list(self.log_norm_ema),
                "skew_ema": list(self.skew_ema), "updates": list(self.updates)}

    def load_state_dict(self, state: dict[str, list]) -> None:
        """Restore :meth:`state_dict` (a state without skew averages starts them at 0);
        ``ValueError`` if the world size differs."""
        if len(state["updates"]) != len(self.updates):
            raise ValueError(f"state has {len(state['updates'])} ranks, detector has {len(self.updates)}")
        self.cosine_ema = [float(v) for v in state["cosine_ema"]]
        self.log_norm_ema = [float(v) for v in state["log_norm_ema"]]
        self.skew_ema = [float(v) for v in state.get("skew_ema", [0.0] * len(self.updates))]
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
        stats = statistics_from_partial(partial_stats(x, a, list(range(n))))
        alarms += bool(detect(stats, threshold).flagged)
    return alarms / draws
