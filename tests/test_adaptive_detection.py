"""Adaptive MAD floors: tight honest clusters expose overt attackers from the first call,
heterogeneous (tiny-batch GSPO-like) clusters keep the calibrated constant floors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedgspo.robust.aggregators import CoordinateMedian, TrimmedMean
from fedgspo.robust.detection import (
    LOG_FLOOR,
    MIN_SPREAD,
    SPREAD_FACTOR,
    RankStatistics,
    cluster_spread,
    detect,
    statistics_from_sums,
)

N, D, F = 8, 20_000, 2
ATTACKERS = {N - 2, N - 1}


def stats_of(x: torch.Tensor, rule: str = "median", f: int = F) -> RankStatistics:
    """Statistics as the all-reduce computes them: nonfinite rows are never aggregated."""
    x = x.double()
    finite = torch.isfinite(x).all(1)
    agg = (CoordinateMedian(f=f) if rule == "median" else TrimmedMean(f=f))(x[finite]).double()
    sq = (x * x).sum(1)
    dots = torch.where(finite, torch.nan_to_num(x) @ agg, torch.full_like(sq, math.nan))
    return statistics_from_sums(dots, sq, float(agg @ agg))


def tight(seed: int, n: int = N, d: int = D) -> torch.Tensor:
    """Honest updates ``mu + N(0, I)`` around a shared random ``mu ~ N(0, I)``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d, generator=g, dtype=torch.float64) + torch.randn(n, d, generator=g, dtype=torch.float64)


def attack(x: torch.Tensor, kind: str, seed: int) -> torch.Tensor:
    x = x.clone()
    bad = sorted(ATTACKERS)
    if kind == "gaussian":
        g = torch.Generator().manual_seed(10_000 + seed)
        x[bad] = 10.0 * torch.randn(len(bad), x.shape[1], generator=g, dtype=x.dtype)
    elif kind == "scaled":
        x[bad] *= 10.0
    elif kind == "sign_flip":
        x[bad] *= -1.0
    return x


@pytest.mark.parametrize("rule", ["median", "trimmed_mean"])
@pytest.mark.parametrize("kind", ["gaussian", "scaled", "sign_flip"])
def test_overt_attackers_in_a_tight_cluster_are_flagged_in_every_step(kind, rule):
    for seed in range(6):
        det = detect(stats_of(attack(tight(seed), kind, seed), rule))
        assert set(det.flagged) == ATTACKERS, (seed, det.flagged)
        assert det.spread is not None and SPREAD_FACTOR * det.spread < LOG_FLOOR


def test_constant_floors_alone_miss_them():
    """What the adaptation is for: the calibrated caps flag none of these attackers."""
    for kind in ("gaussian", "scaled", "sign_flip"):
        assert detect(stats_of(attack(tight(0), kind, 0)), spread_factor=None).flagged == []


@pytest.mark.parametrize("seed", range(3))
def test_clean_tight_steps_flag_no_one(seed):
    g = torch.Generator().manual_seed(seed)
    for step in range(40):
        mu = torch.randn(D, generator=g, dtype=torch.float64)
        x = mu + torch.randn(N, D, generator=g, dtype=torch.float64)
        assert detect(stats_of(x, "median" if step % 2 else "trimmed_mean")).flagged == []


def test_heterogeneous_honest_ranks_keep_the_constant_floors():
    # Norms 0.03x to 35x the median and cosines spread widely, as tiny-batch GSPO gradients.
    x = tight(1, d=2000)
    x = x - x.mean(0) + 0.3 * x.mean(0)
    for i, s in enumerate([0.03, 0.3, 1.0, 1.0, 2.0, 3.0, 10.0, 35.0]):
        x[i] *= s
    s = stats_of(x)
    assert SPREAD_FACTOR * cluster_spread(s) > LOG_FLOOR
    adaptive, constant = detect(s), detect(s, spread_factor=None)
    assert (adaptive.z_norm, adaptive.z_distance, adaptive.z_cosine) == (constant.z_norm, constant.z_distance,
                                                                          constant.z_cosine)
    assert adaptive.flagged == constant.flagged == []


@pytest.mark.parametrize("scale", [0.0, 1e-6, 0.05])
def test_a_small_or_zero_update_in_a_tight_cluster_is_not_flagged(scale):
    x = tight(2)
    x[3] *= scale
    det = detect(stats_of(x))
    assert det.flagged == [] and det.z_norm[3] < 0


def test_a_negligible_update_is_still_held_to_the_cosine_bound():
    x = tight(2)
    x[3] = -0.01 * x[:3].mean(0)  # tiny, but opposes the common direction
    assert detect(stats_of(x)).flagged == [3]


def test_nonfinite_is_flagged_in_a_tight_cluster():
    x = attack(tight(3), "scaled", 3)
    x[0, 5] = math.nan
    x[1, 0] = math.inf
    assert detect(stats_of(x)).flagged == [0, 1, *sorted(ATTACKERS)]
    assert detect(stats_of(x), threshold=1e9).flagged == [0, 1]


def test_a_majority_of_zero_updates_is_not_a_tight_cluster():
    # Groups with equal rewards everywhere give exact zeros: no cluster to adapt to.
    x = tight(4, n=8, d=2000)
    x[:4] = 0.0
    x[4] *= 3.0
    s = stats_of(x, f=1)
    assert cluster_spread(s) is None and detect(s).spread is None
    assert detect(s).flagged == detect(s, spread_factor=None).flagged == []


def test_identical_updates_use_the_minimum_spread():
    x = tight(5, n=6, d=100)[:1].repeat(6, 1)
    s = stats_of(x, f=1)
    assert cluster_spread(s) == MIN_SPREAD and detect(s).flagged == []
    x[5] *= 1.01  # 1 % larger than five identical updates: far outside their cluster
    assert detect(stats_of(x, f=1)).flagged == [5]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), log_scale=st.floats(-20.0, 20.0),
       kind=st.sampled_from(["clean", "gaussian", "scaled", "sign_flip"]))
def test_flags_are_scale_invariant(seed, log_scale, kind):
    x = attack(tight(seed, d=4000), kind, seed) if kind != "clean" else tight(seed, d=4000)
    base, scaled = detect(stats_of(x)), detect(stats_of(x * math.exp(log_scale)))
    assert scaled.flagged == base.flagged
    assert scaled.spread == pytest.approx(base.spread, rel=1e-6, abs=1e-9)


@settings(max_examples=30, deadline=None)
@given(perm=st.permutations(range(N)), seed=st.integers(0, 10_000))
def test_flags_are_permutation_equivariant(perm, seed):
    s = stats_of(attack(tight(seed, d=4000), "scaled", seed))
    p = RankStatistics(*([v[i] for i in perm] for v in (s.distances, s.cosines, s.norms)))
    assert sorted(perm[i] for i in detect(p).flagged) == detect(s).flagged
