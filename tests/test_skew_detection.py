"""The skew test: a rank whose deviation from the aggregate leans along the updates'
coordinate-wise spread (ALIE's ``mean - lam * std``, a threshold-aware attacker) is flagged even
when its norm, distance and cosine are inside the honest spread; symmetric honest noise is not."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedgspo.robust.aggregators import TrimmedMean
from fedgspo.robust.detection import SKEW_BOUND, detect, statistics_from_sums


def _stats(x: torch.Tensor, a: torch.Tensor):
    s = x.std(0, correction=0)
    return statistics_from_sums(x @ a, (x * x).sum(1), float(a @ a), x @ s, float(a @ s), float(s @ s))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 9), d=st.integers(2, 300), seed=st.integers(0, 2**16))
def test_skews_are_the_cosine_of_the_deviation_to_the_spread(n, d, seed):
    x = np.random.default_rng(seed).normal(size=(n, d))
    a = np.median(x, axis=0)
    s = x.std(axis=0)
    dev = x - a
    norms = np.linalg.norm(dev, axis=1) * np.linalg.norm(s)
    distance = np.linalg.norm(dev, axis=1)
    near = distance <= 1e-3 * np.median(distance[distance > 0]) if (distance > 0).any() else distance >= 0
    expected = np.where((norms > 0) & ~near, dev @ s / np.where(norms > 0, norms, 1), 0.0)
    got = _stats(torch.tensor(x), torch.tensor(a)).skews
    np.testing.assert_allclose(got, expected, atol=1e-9)


def _honest(n: int, d: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mu = 0.3 * torch.randn(d, generator=gen, dtype=torch.float64)
    scale = torch.exp(0.5 * torch.randn(n, 1, generator=gen, dtype=torch.float64))  # heterogeneous ranks
    return mu + scale * torch.randn(n, d, generator=gen, dtype=torch.float64)


# Three colluders of eight at half a standard deviation are not flagged: they pull the
# aggregate so far that the honest skews spread out and the MAD of eight skews, three of them
# the attackers', grows with them (robust z ~2.4 < 3.5).
CASES = [(4, 1, lam) for lam in (-1.5, -0.5, 0.5, 1.5)] + [(8, 1, lam) for lam in (-1.5, -0.5, 0.5, 1.5)] + [
    (8, 3, lam) for lam in (-1.5, 1.5)]


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
