"""The skew test: a rank whose deviation from the aggregate leans along the updates'
coordinate-wise spread (ALIE's ``mean - lam * std``, a threshold-aware attacker) is flagged even
when its norm, distance and cosine are inside the honest spread; symmetric honest noise is not."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedgspo.robust.aggregators import TrimmedMean
from fedgspo.robust.detection import SKEW_BOUND, detect, statistics_from_partial, statistics_from_sums
from fedgspo.robust.shard_exchange import partial_stats


def _stats(x: torch.Tensor, a: torch.Tensor):
    return statistics_from_partial(partial_stats(x, a, list(range(x.shape[0]))))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 9), d=st.integers(1, 300), levels=st.integers(2, 1000), seed=st.integers(0, 2**16))
def test_skews_are_the_mean_sign_of_the_deviation_over_the_spread_columns(n, d, levels, seed):
    """Against numpy, with values on a grid of ``levels`` steps so that ties (rows equal to
    the aggregate, columns where every row is equal) occur."""
    x = np.round(np.random.default_rng(seed).normal(size=(n, d)) * levels / 4) / levels
    a = np.median(x, axis=0)
    spread = (x != x[0]).any(axis=0)
    expected = np.sign(x - a)[:, spread].mean(axis=1) if spread.any() else np.zeros(n)
    got = _stats(torch.tensor(x), torch.tensor(a)).skews
    np.testing.assert_allclose(got, expected, atol=1e-12)


def test_a_row_at_the_aggregate_has_no_skew_and_a_nan_row_a_nan_skew():
    x = torch.tensor([[1.0, 2.0, 3.0], [0.0, 5.0, 1.0], [2.0, 2.0, 4.0], [0.5, float("nan"), 0.0]])
    stats = _stats(x, x[0])
    assert stats.skews[0] == 0.0 and math.isnan(stats.skews[3])
    assert stats.skews[1] == pytest.approx(-1 / 3) and stats.skews[2] == pytest.approx(2 / 3)


def _honest(n: int, d: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mu = 0.3 * torch.randn(d, generator=gen, dtype=torch.float64)
    scale = torch.exp(0.5 * torch.randn(n, 1, generator=gen, dtype=torch.float64))  # heterogeneous ranks
    return mu + scale * torch.randn(n, d, generator=gen, dtype=torch.float64)


# One attacker: flagged from a fifth of a standard deviation on at n = 8. Three colluders of
# eight that are aggregated are not flagged on a single step: they pull the aggregate so far that
# honest ranks of different noise scales lean by different amounts (skews 0.2-0.6 at lam = 0.5)
# and the spread of eight skews, three of them the attackers', grows with them. Once they are
# left out of the aggregate (quarantined) they are flagged on every step (the next test), so a
# quarantine is never lifted.
CASES = [(4, 1, lam) for lam in (-1.5, -0.5, 0.5, 1.5)] + [(8, 1, lam) for lam in (-1.5, -0.5, -0.2, 0.2, 0.5, 1.5)]


@pytest.mark.parametrize("n,f,lam", CASES)
def test_in_spread_attackers_are_flagged_by_their_skew_alone(n, f, lam):
    for seed in range(5):
        honest = _honest(n - f, 4096, seed)
        sent = honest.mean(0) - lam * honest.std(0)
        x = torch.cat([honest, sent.expand(f, -1)])
        a = TrimmedMean(f=f)(x)
        stats = _stats(x, a)
        without = detect(stats, skew_bound=None).flagged
        with_skew = detect(stats).flagged
        assert not set(without) & set(range(n - f)) and not set(with_skew) & set(range(n - f)), (seed, with_skew)
        assert set(range(n - f, n)) <= set(with_skew), (seed, stats.skews)
        assert min(abs(stats.skews[i]) for i in range(n - f, n)) > SKEW_BOUND


@pytest.mark.parametrize("lam", [-1.5, -0.5, 0.5, 1.5])
def test_quarantined_colluders_stay_flagged_by_their_skew(lam):
    """Three of eight left out of the aggregate (the trimmed mean of the five honest rows, with
    the spread of those rows) are flagged on every draw by their skew alone, the honest ranks never."""
    n, f = 8, 3
    for seed in range(5):
        honest = _honest(n - f, 4096, seed)
        sent = honest.mean(0) - lam * honest.std(0)
        x = torch.cat([honest, sent.expand(f, -1)])
        keep = list(range(n - f))
        stats = statistics_from_partial(partial_stats(x, TrimmedMean(f=2)(honest), keep))
        assert detect(stats).flagged == list(range(n - f, n)), (seed, stats.skews)
        assert detect(stats, skew_bound=None).flagged == []


@pytest.mark.parametrize("n", [4, 8, 16])
def test_honest_symmetric_noise_is_never_flagged_by_its_skew(n):
    for seed in range(50):
        x = _honest(n, 2048, seed)
        stats = _stats(x, TrimmedMean(f=(n - 1) // 2)(x))
        assert max(abs(v) for v in stats.skews) < SKEW_BOUND, stats.skews
        assert detect(stats).flagged == detect(stats, skew_bound=None).flagged


def test_statistics_without_spread_sums_have_no_skews():
    x = _honest(4, 64, 0)
    a = x.mean(0)
    stats = statistics_from_sums(x @ a, (x * x).sum(1), float(a @ a))
    assert stats.skews == [] and detect(stats).z_skew == []
