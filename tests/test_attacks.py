"""Attack simulator: each attack's effect, gating by rank and step, collusion over gloo."""

from __future__ import annotations

import math

import pytest
import torch
from dist_helpers import run_ranks, values
from pydantic import ValidationError

from fedgspo import robust_all_reduce
from fedgspo.robust.attacks import ATTACKS, AttackConfig, alie_z, apply_attack, poison_rewards


def attacked(kind: str, g: torch.Tensor, **kw) -> torch.Tensor:
    out = g.clone()
    assert apply_attack(AttackConfig(kind=kind, ranks=[0], **kw), out, rank=0, step=5)
    return out


def grad() -> torch.Tensor:
    return torch.randn(1000, generator=torch.Generator().manual_seed(0))


def test_local_attacks():
    g = grad()
    assert torch.equal(attacked("sign_flip", g), -g)
    assert torch.equal(attacked("scaled", g), 10 * g)
    assert torch.equal(attacked("scaled", g, strength=-2.0), -2 * g)
    assert torch.equal(attacked("zero", g), torch.zeros_like(g))
    assert attacked("nan", g).isnan().all()
    noise = attacked("gaussian", g, strength=3.0, seed=1)
    assert torch.equal(noise, attacked("gaussian", g, strength=3.0, seed=1)) and 2.5 < noise.std() < 3.5
    flipped = attacked("bit_flip", g, strength=0.01)
    changed = flipped != g
    assert int(changed.sum()) == 10 and (flipped[changed].abs() > 1e30).any() | (flipped[changed].abs() < 1e-30).any()


def test_gating_by_rank_and_step():
    cfg = AttackConfig(kind="sign_flip", ranks=[1], start_step=3)
    g = grad()
    for rank, step in ((0, 5), (1, 2)):
        out = g.clone()
        assert not apply_attack(cfg, out, rank, step) and torch.equal(out, g)
    assert not apply_attack(None, g, 0, 0)


def test_reward_flip_only_touches_rewards():
    cfg = AttackConfig(kind="reward_flip", ranks=[2])
    r = torch.tensor([0.0, 0.5, 1.0])
    assert torch.equal(poison_rewards(cfg, r, rank=2, step=0), -r)
    assert poison_rewards(cfg, r, rank=1, step=0) is r
    g = grad()
    apply_attack(cfg, g, rank=2, step=0)
    assert torch.equal(g, grad())


def test_protocol_attacks_leave_the_update_alone():
    for kind in ("lie_aggregate", "lie_vote", "lie_stats", "bad_metadata"):
        g = grad()
        assert not apply_attack(AttackConfig(kind=kind, ranks=[0]), g, rank=0, step=0)
        assert torch.equal(g, grad())


def test_registry_and_validation():
    assert set(ATTACKS) == {"sign_flip", "scaled", "gaussian", "zero", "nan", "bit_flip", "alie", "ipm", "reward_flip",
                            "stealth", "alternating", "sleeper", "collusion",
                            "lie_aggregate", "lie_vote", "lie_stats", "bad_metadata"}
    with pytest.raises(ValidationError, match="known: alie, alternating, bad_metadata, bit_flip"):
        AttackConfig(kind="label_flip")
    with pytest.raises(ValidationError):
        AttackConfig(kind="zero", ranks=[1, 1])
    with pytest.raises(ValidationError):
        AttackConfig(kind="zero", extra=1)
    with pytest.raises(ValueError, match="torch.distributed"):
        apply_attack(AttackConfig(kind="ipm", ranks=[0]), grad(), 0, 0)


def test_alie_z_matches_the_paper():
    # n = 50, f = 24 (Baruch et al.'s example): s = 2, z = Phi^-1(48/50) ~ 1.75.
    assert abs(alie_z(50, 24) - 1.7507) < 1e-3


def _colluding(rank: int, world: int) -> dict:
    x = torch.randn(world, 200, generator=torch.Generator().manual_seed(0)) + 1.0
    out = {}
    for kind in ("alie", "ipm"):
        g = x[rank].clone()
        attacked = apply_attack(AttackConfig(kind=kind, ranks=[3], strength=0.5), g, rank, step=0)
        report = robust_all_reduce(g.clone(), "trimmed_mean", 1)
        out[kind] = (attacked, g, report.consensus_failed)
    return out


@pytest.mark.slow
def test_colluding_attacks_read_honest_updates():
    results = values(run_ranks(_colluding, 4))
    x = torch.randn(4, 200, generator=torch.Generator().manual_seed(0)) + 1.0
    honest = x[:3]
    for rank, res in enumerate(results):
        for kind, (was_attacked, g, failed) in res.items():
            assert was_attacked == (rank == 3) and not failed
            if rank != 3:
                assert torch.equal(g, x[rank])
    torch.testing.assert_close(results[3]["alie"][1], honest.mean(0) - 0.5 * honest.std(0))
    torch.testing.assert_close(results[3]["ipm"][1], -0.5 * honest.mean(0))
    assert math.isclose(float(results[3]["ipm"][1].mean()), -0.5 * float(honest.mean()), rel_tol=1e-5)
