"""Rollout proofs: honest rollouts of the default model always pass (KV-cached prover vs
prefill verifier), tampered completions, log-probs and proofs fail; cross-rank verification."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedgspo.config import ModelConfig, TaskConfig
from fedgspo.gspo.model import build_model
from fedgspo.integrity.proof import (
    ProofConfig,
    ProofError,
    RolloutClaim,
    build_proofs,
    check_proofs,
    cross_verify,
    decode_hidden,
    decode_proof,
    prefill,
    prefill_from_outputs,
    select_rows,
)
from fedgspo.gspo.rollout import Rollout, generate
from fedgspo.gspo.task import DigitTask
from dist_helpers import run_ranks

CFG = ProofConfig()
EOS, PAD = 2, 0


def setup(seed: int = 0) -> tuple[torch.nn.Module, DigitTask]:
    task = DigitTask(TaskConfig(), seed=seed)
    model = build_model(ModelConfig(), task.tokenizer.vocab_size, pad_id=PAD, bos_id=1, eos_id=EOS, seed=seed)
    return model, task


def rollout(model: torch.nn.Module, task: DigitTask, step: int, rank: int = 0) -> Rollout:
    prompts = task.sample(rank, step)
    return generate(model, prompts.input_ids, prompts.attention_mask, num_generations=8, max_new_tokens=6,
                    temperature=1.0, eos_id=EOS, pad_id=PAD, generator=torch.Generator().manual_seed(step))


def verify(model: torch.nn.Module, ro: Rollout, proofs: list[bytes], input_ids: torch.Tensor | None = None,
           logps: torch.Tensor | None = None):
    ids = ro.input_ids if input_ids is None else input_ids
    ref = prefill(model, ids, ro.attention_mask, ro.prompt_length, 1.0)
    return check_proofs(ref, ids[:, ro.prompt_length:], ro.completion_mask,
                        ro.old_logps if logps is None else logps, proofs, CFG, eos_id=EOS, pad_id=PAD)


@pytest.fixture(scope="module")
def honest() -> tuple[torch.nn.Module, Rollout, list[bytes]]:
    model, task = setup()
    ro = rollout(model, task, 0)
    return model, ro, build_proofs(decode_hidden(model, ro.input_ids, ro.attention_mask, ro.prompt_length),
                                   ro.completion_mask, CFG)


def test_no_false_rejects_over_256_honest_rollouts() -> None:
    model, task = setup(seed=1)
    checks = []
    for step in range(4):
        ro = rollout(model, task, step)
        hidden = decode_hidden(model, ro.input_ids, ro.attention_mask, ro.prompt_length)  # generation path
        checks += verify(model, ro, build_proofs(hidden, ro.completion_mask, CFG))
    assert len(checks) == 256
    assert [c.reason for c in checks if not c.ok] == []


def test_proof_from_training_forward_passes(honest) -> None:
    model, ro, _ = honest
    out = model(input_ids=ro.input_ids, attention_mask=ro.attention_mask,
                position_ids=(ro.attention_mask.cumsum(-1) - 1).clamp(min=0), output_hidden_states=True)
    pre = prefill_from_outputs(out.hidden_states[-1], out.logits, ro.input_ids, ro.prompt_length, 1.0)
    assert all(c.ok for c in verify(model, ro, build_proofs(pre.hidden, ro.completion_mask, CFG)))


@pytest.mark.parametrize("position", ["first", "last"])
def test_tampered_completion_is_rejected(honest, position: str) -> None:
    model, ro, proofs = honest
    ids = ro.input_ids.clone()
    rows = [r for r in range(ids.shape[0]) if ro.completion_mask[r].sum() >= 2]
    for row in rows:
        t = 0 if position == "first" else int(ro.completion_mask[row].sum()) - 1
        col = ro.prompt_length + t
        ids[row, col] = 3 + (int(ids[row, col]) - 2) % 14  # another digit/letter, never EOS/pad
    ref = prefill(model, ids, ro.attention_mask, ro.prompt_length, 1.0)
    # even with log-probs made consistent with the changed tokens
    for logps in (ro.old_logps, ref.logps * ro.completion_mask):
        checks = check_proofs(ref, ids[:, ro.prompt_length:], ro.completion_mask, logps, proofs, CFG,
                              eos_id=EOS, pad_id=PAD)
        assert not any(checks[r].ok for r in rows)


def test_tampered_logps_are_rejected(honest) -> None:
    model, ro, proofs = honest
    for delta in (0.01, -0.2):
        logps = ro.old_logps.clone()
        logps[:, 0] += delta
        assert not any(c.ok for c in verify(model, ro, proofs, logps=logps))
    padding = ro.old_logps.clone()
    short = int(ro.completion_mask.sum(-1).argmin())
    padding[short, -1] = -0.5
    if ro.completion_mask[short, -1] == 0:
        assert not verify(model, ro, proofs, logps=padding)[short].ok


def test_swapped_or_malformed_proofs_are_rejected(honest) -> None:
    model, ro, proofs = honest
    rotated = proofs[1:] + proofs[:1]
    checks = verify(model, ro, rotated)
    assert sum(c.ok for c in checks) <= 1  # only if two rows happen to be identical completions
    bad = verify(model, ro, [p[:-3] for p in proofs])
    assert not any(c.ok for c in bad) and "malformed" in bad[0].reason
    with pytest.raises(ProofError):
        decode_proof(b"\x01", 64, CFG)


def test_claim_round_trip_and_row_selection(honest) -> None:
    _, ro, proofs = honest
    claim = RolloutClaim(ro.input_ids, ro.attention_mask, ro.completion_mask, ro.old_logps, ro.prompt_length, proofs)
    back = RolloutClaim.from_bytes(claim.to_bytes())
    assert back.proofs == proofs and back.prompt_length == ro.prompt_length
    assert torch.equal(back.input_ids, ro.input_ids)
    with pytest.raises(ProofError):
        RolloutClaim.from_bytes(b"not a claim")
    assert select_rows(64, 0.0, b"s") == [] and select_rows(64, 1.0, b"s") == list(range(64))
    assert select_rows(64, 0.25, b"a") != select_rows(64, 0.25, b"b")


def _cross(rank: int, world_size: int) -> list[int]:
    model, task = setup()
    ro = rollout(model, task, 3, rank=rank)
    cfg = ProofConfig(rate=1.0)
    hidden = decode_hidden(model, ro.input_ids, ro.attention_mask, ro.prompt_length)
    logps = ro.old_logps + (0.3 * ro.completion_mask if rank == 1 else 0.0)  # rank 1 claims other log-probs
    claim = RolloutClaim(ro.input_ids, ro.attention_mask, ro.completion_mask, logps, ro.prompt_length,
                         build_proofs(hidden, ro.completion_mask, cfg))
    report = cross_verify(model, claim, step=3, cfg=cfg, temperature=1.0, eos_id=EOS, pad_id=PAD,
                          expected_prompt_ids=lambda r: task.sample(r, 3).input_ids)
    return report.failed


@pytest.mark.slow
def test_cross_verify_names_the_cheating_rank() -> None:
    results = run_ranks(_cross, 2)
    assert results == [("ok", [1]), ("ok", [1])]


def test_cross_verify_single_process_checks_itself(honest) -> None:
    model, ro, proofs = honest
    claim = RolloutClaim(ro.input_ids, ro.attention_mask, ro.completion_mask, ro.old_logps, ro.prompt_length, proofs)
    report = cross_verify(model, claim, step=0, cfg=ProofConfig(rate=0.5), temperature=1.0, eos_id=EOS, pad_id=PAD)
    assert report.failed == [] and report.checked[0] == len(report.local) > 0
    wrong = dataclasses.replace(claim, input_ids=claim.input_ids.clone())
    wrong.input_ids[:, 1] = 5
    report = cross_verify(model, wrong, step=0, cfg=ProofConfig(rate=0.5), temperature=1.0, eos_id=EOS, pad_id=PAD,
                          expected_prompt_ids=lambda r: ro.input_ids[::8, :ro.prompt_length])
    assert report.failed == [0]


def test_stop_string_rollouts_verify_with_the_same_stop_strings() -> None:
    from hf_fixtures import make_model, make_tokenizer

    tok = make_tokenizer()
    model = make_model(tok, hidden=32, seed=1).eval()
    batch = tok(["what is 2 + 3", "1 + 1"], padding=True, return_tensors="pt")
    args = dict(num_generations=8, max_new_tokens=10, temperature=1.0, eos_id=tok.eos_token_id,
                pad_id=tok.pad_token_id)
    free = generate(model, batch["input_ids"], batch["attention_mask"], **args,
                    generator=torch.Generator().manual_seed(0))
    stops = [tok.decode(free.completion_ids[0, 2:3].tolist())]
    ro = generate(model, batch["input_ids"], batch["attention_mask"], **args, stop_strings=stops, tokenizer=tok,
                  generator=torch.Generator().manual_seed(0))
    assert bool((ro.completion_mask.sum(-1) < 10).any())
    proofs = build_proofs(decode_hidden(model, ro.input_ids, ro.attention_mask, ro.prompt_length),
                          ro.completion_mask, CFG)
    ref = prefill(model, ro.input_ids, ro.attention_mask, ro.prompt_length, 1.0)
    ids = ro.input_ids[:, ro.prompt_length:]

    def check(**stop):
        return check_proofs(ref, ids, ro.completion_mask, ro.old_logps, proofs, CFG, eos_id=tok.eos_token_id,
                            pad_id=tok.pad_token_id, **stop)

    assert all(c.ok for c in check(stop_strings=stops, tokenizer=tok))
    ended_early = [r for r in range(ids.shape[0])
                   if tok.eos_token_id not in ids[r].tolist() and ro.completion_mask[r].sum() < 10]
    assert ended_early
    without = check()  # a verifier without the stop strings sees completions cut short
    assert all(not without[r].ok and "ends before EOS" in without[r].reason for r in ended_early)
    longer = ro.completion_mask.clone()  # a completion that runs on past its stop string fails
    r = ended_early[0]
    n = int(longer[r].sum())
    longer[r, n] = 1
    bad = check_proofs(ref, ids, longer, ro.old_logps, proofs, CFG, eos_id=tok.eos_token_id,
                       pad_id=tok.pad_token_id, stop_strings=stops, tokenizer=tok)[r]
    assert not bad.ok and "after EOS or a stop string" in bad.reason
