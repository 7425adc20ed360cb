"""Adaptive rollout-proof rate: which rollouts are checked (every one until a clean record,
then about one in k and never more than k - 1 in a row unchecked, every one again after a
failure), the same decision from the same agreed data, counters kept across a resume, and the
verifier's prefill through the compiled loss forward."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest
import torch

import fedgspo.integrity.proof as proof_mod
from fedgspo.config import ModelConfig, TaskConfig, load_config
from fedgspo.distributed import init_distributed
from fedgspo.gspo.model import build_model, compile_forward
from fedgspo.gspo.rollout import Rollout, generate
from fedgspo.gspo.task import DigitTask
from fedgspo.integrity.proof import (
    ProofConfig,
    ProofSchedule,
    RolloutClaim,
    build_proofs,
    check_proofs,
    cross_verify,
    decode_hidden,
    prefill,
)

EOS, PAD = 2, 0


def seed_of(i: int) -> bytes:
    return hashlib.sha256(i.to_bytes(8, "little")).digest()


def run_schedule(schedule: ProofSchedule, rollouts: int, failures: dict[int, list[int]] | None = None
                 ) -> list[list[int]]:
    """The ranks examined at each rollout, recording ``failures[i]`` (ranks) at rollout ``i``."""
    history = []
    for i in range(rollouts):
        examined = schedule.examined(seed_of(i))
        schedule.record(examined, [r for r in (failures or {}).get(i, []) if r in examined])
        history.append(examined)
    return history


def unchecked_runs(history: list[list[int]], rank: int, start: int) -> list[int]:
    """Lengths of the runs of rollouts (from ``start``) on which ``rank`` was not examined."""
    runs, current = [], 0
    for examined in history[start:]:
        if rank in examined:
            runs.append(current)
            current = 0
        else:
            current += 1
    return runs + [current]


def test_every_rollout_is_checked_by_default_and_before_a_clean_record() -> None:
    assert all(e == [0, 1, 2] for e in run_schedule(ProofConfig().schedule(3), 50))
    history = run_schedule(ProofConfig(adaptive_every=4, clean_before_adaptive=5).schedule(3), 5)
    assert all(e == [0, 1, 2] for e in history)


def test_clean_ranks_are_checked_about_one_in_k_and_never_k_in_a_row_unchecked() -> None:
    k, m, n = 4, 3, 4
    history = run_schedule(ProofConfig(adaptive_every=k, clean_before_adaptive=m).schedule(n), 400 + m)
    for rank in range(n):
        assert max(unchecked_runs(history, rank, m)) <= k - 1
        rate = sum(rank in e for e in history[m:]) / 400
        # one draw of 1/k per rollout, forced at the k-th: 1 / E[min(Geometric(1/k), k)] = 0.366
        assert 0.28 < rate < 0.46
    # the ranks are drawn independently: not always the same set
    assert len({tuple(e) for e in history[m:]}) > 4


def test_a_failure_returns_the_rank_to_every_rollout() -> None:
    k, m = 8, 3
    schedule = ProofConfig(adaptive_every=k, clean_before_adaptive=m).schedule(2)
    history = run_schedule(schedule, 40)
    failed_at = next(i for i in range(m, 40) if 1 in history[i])
    schedule = ProofConfig(adaptive_every=k, clean_before_adaptive=m).schedule(2)
    history = run_schedule(schedule, 60, failures={failed_at: [1]})
    assert all(1 in e for e in history[failed_at:failed_at + m + 1])
    assert max(unchecked_runs(history, 1, failed_at)) <= k - 1


def test_ranks_fed_the_same_outcomes_make_the_same_decisions() -> None:
    cfg = ProofConfig(adaptive_every=3, clean_before_adaptive=2)
    failures = {5: [0], 9: [2], 10: [1]}
    histories = [run_schedule(cfg.schedule(3), 80, failures) for _ in range(3)]
    assert histories[0] == histories[1] == histories[2]


def test_state_round_trip_and_fresh_fallbacks() -> None:
    cfg = ProofConfig(adaptive_every=4, clean_before_adaptive=2)
    schedule = cfg.schedule(3)
    run_schedule(schedule, 20, {7: [1]})
    other = cfg.schedule(3)
    other.load_state_dict(schedule.state_dict())
    assert other.state_dict() == schedule.state_dict() and other.examined(b"x") == schedule.examined(b"x")
    for state in (None, cfg.schedule(4).state_dict()):
        other.load_state_dict(state)
        assert other.state_dict() == cfg.schedule(3).state_dict()
    with pytest.raises(ValueError, match="non-negative"):
        other.load_state_dict({"clean": [1, -1, 0], "unchecked": [0, 0, 0]})
    with pytest.raises(ValueError, match="one of each per rank"):
        other.load_state_dict({"clean": [1, 1, 0], "unchecked": [0, 0]})


@pytest.fixture(scope="module")
def honest() -> tuple[torch.nn.Module, Rollout, RolloutClaim]:
    task = DigitTask(TaskConfig(), seed=0)
    model = build_model(ModelConfig(), task.tokenizer.vocab_size, pad_id=PAD, bos_id=1, eos_id=EOS, seed=0)
    prompts = task.sample(0, 0)
    ro = generate(model, prompts.input_ids, prompts.attention_mask, num_generations=8, max_new_tokens=6,
                  temperature=1.0, eos_id=EOS, pad_id=PAD, generator=torch.Generator().manual_seed(0))
    proofs = build_proofs(decode_hidden(model, ro.input_ids, ro.attention_mask, ro.prompt_length),
                          ro.completion_mask, ProofConfig())
    claim = RolloutClaim(ro.input_ids, ro.attention_mask, ro.completion_mask, ro.old_logps, ro.prompt_length, proofs)
    return model, ro, claim


def test_unchecked_rollouts_skip_the_prefill_and_a_forced_check_catches_a_cheat(honest, monkeypatch) -> None:
    model, _, claim = honest
    prefills: list[int] = []
    original = proof_mod.prefill

    def counted(*args, **kwargs):
        prefills.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(proof_mod, "prefill", counted)
    cfg = ProofConfig(rate=1.0, adaptive_every=1024, clean_before_adaptive=2)
    schedule = cfg.schedule(1)
    cheat = dataclasses.replace(claim, old_logps=claim.old_logps + 0.5 * claim.completion_mask)

    def verify(c: RolloutClaim, step: int):
        result = cross_verify(model, c, step=step, cfg=cfg, temperature=1.0, eos_id=EOS, pad_id=PAD,
                              schedule=schedule)
        schedule.record(result.examined, result.failed)
        return result

    assert [verify(claim, s).failed for s in range(2)] == [[], []] and len(prefills) == 2
    # a clean record: a draw of 1/1024 per rollout, at least every 1024th; a cheat passes unseen
    skipped = verify(cheat, 2)
    assert (skipped.examined, skipped.failed, skipped.checked, skipped.local) == ([], [], [0], [])
    assert len(prefills) == 2 and schedule.unchecked == [1]
    schedule.load_state_dict({"clean": [2], "unchecked": [1023]})  # the next rollout is due
    caught = verify(cheat, 3)
    assert caught.examined == [0] and caught.failed == [0] and len(prefills) == 3
    assert schedule.state_dict() == {"clean": [0], "unchecked": [0]}
    assert verify(claim, 4).examined == [0]  # every rollout again


def test_a_schedule_for_another_world_size_is_refused(honest) -> None:
    model, _, claim = honest
    with pytest.raises(ValueError, match="holds 2 ranks"):
        cross_verify(model, claim, step=0, cfg=ProofConfig(), temperature=1.0, eos_id=EOS, pad_id=PAD,
                     schedule=ProofConfig().schedule(2))


def test_resume_keeps_the_proof_counters(tmp_path: Path) -> None:
    from fedgspo.preflight import prepare
    from fedgspo.train import Trainer, resolve_run_dir

    ctx = init_distributed("cpu")
    overrides = [f"run.dir={tmp_path / 'run'}", "run.progress_bar=false", "run.tensorboard=false",
                 "bookkeeping.enabled=false", "task.prompts_per_rank=2", "gspo.num_generations=4",
                 "proof.adaptive_every=4", "proof.clean_before_adaptive=2"]

    def trainer(*extra: str) -> Trainer:
        cfg = load_config(None, [*overrides, *extra])
        return Trainer(cfg, ctx, resolve_run_dir(cfg, ctx), prepare(cfg, ctx))

    first = trainer()
    first.proof_schedule.load_state_dict({"clean": [5], "unchecked": [2]})
    first.save_checkpoint(3, {"reward_mean": 0.0}, now=True)
    first.close()
    resumed = trainer("checkpoint.resume=auto")
    assert resumed.resume() == 3
    assert resumed.proof_schedule.state_dict() == {"clean": [5], "unchecked": [2]}
    resumed.close()


@pytest.mark.slow
def test_compiled_loss_forward_prefill_verifies_honest_rollouts(honest) -> None:
    model, ro, claim = honest
    mode = model.training
    eager = prefill(model, ro.input_ids, ro.attention_mask, ro.prompt_length, 1.0)
    compiled = prefill(compile_forward(model), ro.input_ids, ro.attention_mask, ro.prompt_length, 1.0)
    assert model.training == mode  # restored after the call through the compiled wrapper
    assert torch.allclose(compiled.hidden, eager.hidden, atol=1e-5)
    assert torch.allclose(compiled.logps, eager.logps, atol=1e-5)
    checks = check_proofs(compiled, ro.completion_ids, ro.completion_mask, ro.old_logps, claim.proofs,
                          ProofConfig(), eos_id=EOS, pad_id=PAD)
    assert all(c.ok for c in checks)
