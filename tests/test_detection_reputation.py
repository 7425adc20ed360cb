"""Detection statistics and flags; reputation trust, quarantine, rehabilitation, state round trip."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from fedgspo.robust.aggregators import CoordinateMedian
from fedgspo.robust.detection import (
    COSINE_BOUND,
    DEFAULT_THRESHOLD,
    RankStatistics,
    detect,
    false_alarm_rate,
    robust_z,
    statistics_from_sums,
)
from fedgspo.robust.reputation import RankReputation, ReputationConfig, ReputationTracker
from fedgspo.robust.all_reduce import RobustReport


def stats_of(x: torch.Tensor) -> RankStatistics:
    """Statistics against the median of the finite rows (nonfinite rows are never aggregated)."""
    x = x.double()
    a = CoordinateMedian(f=1)(x[torch.isfinite(x).all(1)])
    return statistics_from_sums(x @ a, (x * x).sum(1), float(a @ a))


def honest(n: int = 6, d: int = 2000, seed: int = 0, signal: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return signal * torch.randn(d, generator=g) + 0.5 * torch.randn(n, d, generator=g)


def test_statistics_match_direct_formulas():
    x = honest().double()
    a = CoordinateMedian(f=1)(x)
    s = stats_of(x)
    as64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    torch.testing.assert_close(as64(s.distances), (x - a).norm(dim=1))
    torch.testing.assert_close(as64(s.norms), x.norm(dim=1))
    torch.testing.assert_close(as64(s.cosines), torch.nn.functional.cosine_similarity(x, a[None]))


def test_clean_updates_are_not_flagged():
    assert detect(stats_of(honest())).flagged == []


@pytest.mark.parametrize(
    "corrupt,statistic",
    [(lambda v: v * 200, "norm"),
     (lambda v: v + 300 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1)), "distance")],
)
def test_overt_attacks_are_flagged(corrupt, statistic):
    x = honest()
    x[2] = corrupt(x[2])
    det = detect(stats_of(x))
    assert det.flagged == [2]
    z = {"norm": det.z_norm, "distance": det.z_distance}
    assert z[statistic][2] > DEFAULT_THRESHOLD


def test_sign_flip_is_flagged():
    # A strong shared signal: honest cosines ~0.97, the flipped update opposes the aggregate.
    x = honest(signal=2.0)
    x[1] = -x[1]
    det = detect(stats_of(x))
    assert det.flagged == [1]
    assert det.z_cosine[1] < -DEFAULT_THRESHOLD and stats_of(x).cosines[1] < COSINE_BOUND


def test_sign_flip_is_caught_by_the_cosine_bound_alone():
    # Only the absolute bound: the z-score rule is switched off by a huge constant MAD floor.
    x = honest(signal=2.0)
    x[1] = -x[1]
    assert detect(stats_of(x), cosine_floor=1e9, spread_factor=None).flagged == [1]
    assert detect(stats_of(x), cosine_floor=1e9, cosine_bound=-1.1, spread_factor=None).flagged == []


@pytest.mark.parametrize("scale", [0.0, 1e-6, 0.05])
def test_small_or_zero_honest_update_is_not_flagged(scale):
    # E.g. a rank whose groups all had equal rewards: harmless to a robust rule.
    x = honest()
    x[3] *= scale
    det = detect(stats_of(x))
    assert det.flagged == []
    assert det.z_norm[3] < 0


def test_heterogeneous_honest_norms_are_not_flagged():
    # Real GSPO ranks differ in norm by 10x and more (calibration: up to 35x the median).
    x = honest()
    for i, s in enumerate([0.1, 0.3, 1.0, 1.0, 3.0, 10.0]):
        x[i] *= s
    assert detect(stats_of(x)).flagged == []


def test_honest_cosines_near_zero_are_not_flagged():
    # Calibration: honest cosines to the aggregate range from ~0.9 down to ~0 and below,
    # as ranks carry more or less of the shared signal; rank 4 carries none.
    g = torch.Generator().manual_seed(2)
    mu = torch.randn(2000, generator=g)
    x = torch.tensor([4.0, 1.5, 0.8, 0.4, 0.0, 0.3])[:, None] * mu + torch.randn(6, 2000, generator=g)
    s = stats_of(x)
    assert abs(s.cosines[4]) < 0.2 and min(c for i, c in enumerate(s.cosines) if i != 4) < 0.5
    assert detect(s).flagged == []


def test_nonfinite_is_always_flagged():
    x = honest()
    x[4, 3] = math.nan
    x[5, 0] = math.inf
    assert detect(stats_of(x), threshold=1e9).flagged == [4, 5]


def test_all_zero_updates_are_not_flagged():
    assert detect(stats_of(torch.zeros(4, 10))).flagged == []


def test_robust_z():
    z = robust_z([1.0, 2.0, 3.0, math.nan, 100.0])
    assert math.isnan(z[3]) and z[4] > 10 and abs(z[1] + 0.33725) < 1e-9
    assert robust_z([5.0, 5.0, 5.0], floor=0.1) == [0.0, 0.0, 0.0]


def test_default_threshold_gives_no_false_alarms_on_homogeneous_ranks():
    for n in (4, 8):
        assert false_alarm_rate(n, draws=50, d=512) == 0.0


def report(flagged: list[int], n: int = 4) -> RobustReport:
    return RobustReport([0.0] * n, [0.0] * n, flagged, world_size=n)


def test_trust_is_an_ema_of_clean_steps():
    t = ReputationTracker(2, ReputationConfig(decay=0.5, window=4, quarantine_after=4))
    t.update(report([1], 2))
    t.update(report([], 2))
    assert t.ranks[0].trust == 1.0 and t.ranks[1].trust == 0.75
    assert t.weights(trust_weighted=True) == [1.0, 0.75] and t.weights() == [1.0, 1.0]


def test_quarantine_after_k_recent_flags_and_rehabilitation():
    cfg = ReputationConfig(window=5, quarantine_after=3, rehabilitate_after=4)
    t = ReputationTracker(4, cfg)
    for flagged in ([3], [], [3], [], [3]):
        t.update(report(flagged))
    assert t.quarantined() == [3] and t.weights() == [1.0, 1.0, 1.0, 0.0]
    for _ in range(3):
        t.update(report([]))
    assert t.quarantined() == [3]
    t.update(report([]))
    assert t.quarantined() == [] and t.ranks[3].quarantines == 1 and t.ranks[3].flags == 3


def test_old_flags_leave_the_window():
    t = ReputationTracker(2, ReputationConfig(window=3, quarantine_after=2))
    for flagged in ([1], [], [], [1], [], []):
        t.update(report(flagged, 2))
    assert t.quarantined() == []


def test_state_dict_round_trip_and_determinism():
    a, b = ReputationTracker(4), ReputationTracker(4)
    for step in range(30):
        r = report([step % 4] if step % 3 else [1, 2])
        a.update(r)
        b.update(r)
    assert a.state_dict() == b.state_dict()
    c = ReputationTracker(4)
    c.load_state_dict(a.state_dict())
    assert c.state_dict() == a.state_dict()
    assert RankReputation.model_validate(a.ranks[1].model_dump()) == a.ranks[1]
    with pytest.raises(ValueError, match="ranks"):
        ReputationTracker(3).load_state_dict(a.state_dict())


def test_invalid_reputation_inputs():
    with pytest.raises(ValidationError):
        ReputationConfig(window=2, quarantine_after=3)
    with pytest.raises(ValidationError):
        ReputationConfig(unknown=1)
    with pytest.raises(ValueError, match="outside"):
        ReputationTracker(2).update(report([5], 2))
