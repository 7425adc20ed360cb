"""Detection across steps: persistent deviations are flagged after warm-up, honest noise is not."""

from __future__ import annotations

import dataclasses
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedgspo.robust.detection import PersistentDeviation, RankStatistics, detect
from fedgspo.robust.reputation import PersistenceConfig, ReputationConfig, ReputationTracker
from fedgspo.robust.all_reduce import RobustReport

N = 8


def honest_step(rng: random.Random, n: int = N) -> tuple[list[float], list[float]]:
    """Per-rank cosines ~ N(0.3, 0.25) and heavy-tailed norms (log-normal, sigma 0.9): the
    spread measured on real GSPO gradients, where single steps overlap with attackers'."""
    return ([rng.gauss(0.3, 0.25) for _ in range(n)], [rng.lognormvariate(0.0, 0.9) for _ in range(n)])


def run(steps: int, attack=None, seed: int = 0, **kw) -> list[list[int]]:
    rng, det = random.Random(seed), PersistentDeviation(N, **kw)
    out = []
    for _ in range(steps):
        cos, norms = honest_step(rng)
        if attack:
            attack(cos, norms)
        out.append(det.update(cos, norms))
    return out


def scaled(cos, norms):
    norms[-1] *= 10


def flipped(cos, norms):
    cos[-1] = -cos[-1]


@pytest.mark.parametrize("seed", range(5))
def test_honest_ranks_are_never_flagged(seed):
    assert not any(run(300, seed=seed))


@pytest.mark.parametrize("attack", [scaled, flipped])
def test_a_persistent_attacker_is_flagged_every_step_after_warmup(attack):
    flags = run(60, attack, warmup=10)
    assert not any(flags[:9])
    after = flags[15:]
    assert all(f in ([], [N - 1]) for f in after)  # never an honest rank
    assert sum(f == [N - 1] for f in after) >= 0.95 * len(after)


def test_a_single_outlier_step_is_not_persistent():
    det, rng = PersistentDeviation(N), random.Random(1)
    for step in range(40):
        cos, norms = honest_step(rng)
        if step == 20:
            norms[3] *= 10
        assert det.update(cos, norms) == []


def test_nonfinite_statistics_leave_the_averages_unchanged():
    det = PersistentDeviation(4, warmup=1)
    det.update([0.5, 0.5, 0.5, 0.5], [1.0, 1.0, 1.0, 1.0])
    before = det.state_dict()
    det.update([float("nan"), 0.5, 0.5, 0.5], [float("nan"), 1.0, 1.0, 1.0])
    assert det.state_dict()["cosine_ema"][0] == before["cosine_ema"][0]
    assert det.state_dict()["updates"] == [1, 2, 2, 2]


def test_state_round_trip_continues_identically():
    rng = random.Random(2)
    steps = [honest_step(rng) for _ in range(30)]
    a = PersistentDeviation(N)
    for cos, norms in steps[:15]:
        a.update(cos, norms)
    b = PersistentDeviation(N)
    b.load_state_dict(a.state_dict())
    assert [a.update(*s) for s in steps[15:]] == [b.update(*s) for s in steps[15:]]
    with pytest.raises(ValueError, match="ranks"):
        PersistentDeviation(3).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="cosines"):
        a.update([0.1], [1.0])


@settings(max_examples=40, deadline=None)
@given(perm=st.permutations(range(N)), seed=st.integers(0, 1000))
def test_flags_are_permutation_equivariant(perm, seed):
    rng = random.Random(seed)
    a, b = PersistentDeviation(N, warmup=3), PersistentDeviation(N, warmup=3)
    for _ in range(12):
        cos, norms = honest_step(rng)
        norms[0] *= 20
        fa = a.update(cos, norms)
        fb = b.update([cos[p] for p in perm], [norms[p] for p in perm])
        assert sorted(perm[i] for i in fb) == fa


def report(cos: list[float], norms: list[float]) -> RobustReport:
    return RobustReport(distances=[1.0] * N, z_scores=[0.0] * N, flagged=[], cosines=cos, norms=norms, world_size=N)


def test_reputation_quarantines_a_persistent_attacker_and_can_be_disabled():
    rng = random.Random(3)
    steps = []
    for _ in range(40):
        cos, norms = honest_step(rng)
        scaled(cos, norms)
        steps.append(report(cos, norms))
    on, off = ReputationTracker(N), ReputationTracker(N, ReputationConfig(persistence=PersistenceConfig(enabled=False)))
    persistent = [on.update(r) for r in steps]
    assert [off.update(r) for r in steps] == [[]] * 40
    assert persistent[-1] == [N - 1] and on.quarantined() == [N - 1] and off.quarantined() == []
    restored = ReputationTracker(N)
    restored.load_state_dict(on.state_dict())
    assert restored.state_dict() == on.state_dict()


def test_each_phase_of_a_rollout_is_averaged_on_its_own():
    """An attacker that deviates only on the first update of each rollout, while the second
    update's statistics differ from the first's for everyone, is flagged on every step."""
    rng, tracker = random.Random(4), ReputationTracker(N, phases=2)
    flags = []
    for step in range(60):
        cos, norms = honest_step(rng)
        if step % 2 == 0:
            scaled(cos, norms)  # the first update of a rollout
        else:
            norms = [n * 0.05 for n in norms]  # later updates: mostly clipped, small for all
        flags.append(tracker.update(report(cos, norms), phase=step % 2))
    assert all(f == [N - 1] for f in flags[25:])
    restored = ReputationTracker(N, phases=2)
    restored.load_state_dict(tracker.state_dict())
    cos, norms = honest_step(rng)
    assert restored.update(report(cos, norms), phase=1) == tracker.update(report(cos, norms), phase=1)


def _feed(detector: PersistentDeviation, steps: int, spike_at: int | None, scale: float) -> set[int]:
    """Four ranks with equal cosines; rank 3's norm is ``scale`` times the others' every step,
    and 1e9 times at ``spike_at`` (one heavy-tailed step). Returns every rank ever flagged."""
    flagged: set[int] = set()
    for step in range(steps):
        norms = [1.0, 1.1, 0.9, scale * (1e9 if step == spike_at else 1.0)]
        flagged |= set(detector.update([0.5, 0.5, 0.5, 0.5], norms))
    return flagged


def test_log_ratio_cap_bounds_one_heavy_step_but_not_a_persistent_scale():
    assert _feed(PersistentDeviation(4), 40, spike_at=12, scale=1.0) == {3}  # one step: flagged for a while
    assert _feed(PersistentDeviation(4, log_ratio_cap=1.386), 40, spike_at=12, scale=1.0) == set()
    assert _feed(PersistentDeviation(4, log_ratio_cap=1.386), 40, spike_at=None, scale=10.0) == {3}


def skewed_run(steps: int, lean: float, colluders: int, offsets: list[float] | None = None,
               seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """Honest per-step skews ~ N(offset, 0.1) (as wide as the honest skews of a run damaged by
    attackers, up to +-0.24; +-0.014 otherwise), ``colluders`` ranks at ``lean`` +- 0.05 with
    their cosines and norms honest. Returns the across-step flags and the ranks the per-step
    test flags on the skews alone (every other statistic equal across ranks)."""
    rng, det = random.Random(seed), PersistentDeviation(N)
    offsets = offsets or [0.0] * N
    flags, per_step = [], []
    for _ in range(steps):
        cos, norms = honest_step(rng)
        skews = [rng.gauss(offsets[i], 0.1) for i in range(N)]
        for i in range(N - colluders, N):
            skews[i] = rng.gauss(lean, 0.05)
        per_step.append(detect(RankStatistics([1.0] * N, [0.5] * N, [1.0] * N, skews)).flagged)
        flags.append(det.update(cos, norms, skews))
    return flags, per_step


@pytest.mark.parametrize("lean", [-0.5, 0.3])
def test_colluders_that_lean_along_the_spread_are_flagged_by_their_averaged_skew(lean):
    """Three colluders of eight whose single-step skews are inside the honest scatter (the
    per-step test misses them on most steps) are flagged on every step after warm-up."""
    flags, per_step = skewed_run(80, lean, colluders=3)
    colluders = list(range(N - 3, N))
    assert sum(set(colluders) <= set(p) for p in per_step) < 0.2 * len(per_step)
    assert not any(flags[:9])
    assert all(f == colluders for f in flags[20:]), flags[20:]


@pytest.mark.parametrize("seed", range(5))
def test_honest_skews_with_small_persistent_offsets_are_never_flagged(seed):
    """Per-rank offsets up to +-0.06, twenty times the largest averaged honest skew of the
    robustness benchmark's runs (0.003)."""
    offsets = [random.Random(seed).uniform(-0.06, 0.06) for _ in range(N)]
    flags, _ = skewed_run(300, 0.0, colluders=0, offsets=offsets, seed=seed)
    assert not any(flags)


def test_a_zero_update_folds_a_skew_of_zero_and_old_states_load():
    det = PersistentDeviation(4, warmup=1)
    det.update([0.5] * 4, [1.0, 1.0, 1.0, 0.0], [0.2, 0.2, 0.2, -1.0])
    assert det.skew_ema[3] == 0.0 and det.skew_ema[0] > 0
    state = det.state_dict()
    del state["skew_ema"]
    fresh = PersistentDeviation(4)
    fresh.load_state_dict(state)
    assert fresh.skew_ema == [0.0] * 4 and fresh.updates == det.updates
    with pytest.raises(ValueError, match="skews"):
        det.update([0.5] * 4, [1.0] * 4, [0.0])


def test_a_report_repeating_a_failed_update_of_the_same_rollout_is_not_counted_again():
    """After a consensus failure the weights did not move: the rollout's next update measures
    the same gradients, and its flags are the failed step's again."""
    tracker = ReputationTracker(N, ReputationConfig(window=10, quarantine_after=2), phases=2)
    cos, norms = honest_step(random.Random(6))
    failed = dataclasses.replace(report(cos, norms), flagged=[2], consensus_failed=True)
    assert tracker.update(failed, phase=0) == [2]
    before = tracker.state_dict()
    assert tracker.update(failed, phase=1) == [2]  # returned, not folded in
    assert tracker.state_dict() == before and tracker.quarantined() == []
    assert tracker.update(dataclasses.replace(failed, consensus_failed=False), phase=0) == [2]  # a new rollout
    assert tracker.quarantined() == [2]
    one_phase = ReputationTracker(N, ReputationConfig(window=10, quarantine_after=2))
    one_phase.update(failed)
    one_phase.update(failed)  # every update has its own rollout: counted
    assert one_phase.quarantined() == [2]
