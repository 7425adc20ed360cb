"""Micro-batched forward/backward accumulates the full-batch GSPO gradient and statistics."""

from __future__ import annotations

import pytest
import torch

from fedgspo.gspo.loss import backward_in_micro_batches, gspo_loss_and_stats
from fedgspo.gspo.rollout import completion_logps, generate
from hf_fixtures import make_model, make_tokenizer

TEMPERATURE = 0.9
ATOL = 1e-6  # float32: summation order of the chunks is the only difference


@pytest.fixture(scope="module")
def setup():
    tok = make_tokenizer()
    model = make_model(tok, hidden=32, seed=2)
    batch = tok(["what is 2 + 3", "1 + 1", "what is the answer : 4 + 4"], padding=True, return_tensors="pt")
    roll = generate(model, batch["input_ids"], batch["attention_mask"], num_generations=3, max_new_tokens=7,
                    temperature=TEMPERATURE, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                    generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    b, t = roll.old_logps.shape
    # Off-policy by a per-sequence shift, so some sequence ratios fall outside the clip range.
    old = (roll.old_logps + 0.02 * torch.randn(b, 1, generator=gen)) * roll.completion_mask
    ref = (roll.old_logps + 0.1 * torch.randn(b, t, generator=gen)) * roll.completion_mask
    advantages = torch.randn(b, generator=gen)
    return model.train(), roll, old, ref, advantages


def _grads(model) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("level", ["sequence", "token"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("micro_batch_size", [1, 4, 9, 32])
def test_micro_batches_equal_one_full_batch(setup, level: str, beta: float, micro_batch_size: int) -> None:
    model, roll, old, ref, advantages = setup
    kwargs = dict(epsilon=0.01, epsilon_high=0.012, level=level, ref_logps=ref if beta else None, beta=beta)

    model.zero_grad(set_to_none=False)
    logps, _ = completion_logps(model, roll, TEMPERATURE)
    want_loss, want = gspo_loss_and_stats(logps, old, advantages, roll.completion_mask, **kwargs)
    want_loss.backward()
    want_grads = _grads(model)

    model.zero_grad(set_to_none=False)
    loss, stats = backward_in_micro_batches(
        lambda rows: completion_logps(model, roll.rows(rows), TEMPERATURE)[0], old, advantages,
        roll.completion_mask, micro_batch_size=micro_batch_size, **kwargs)
    for got, expected in zip(_grads(model), want_grads):
        torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)
    torch.testing.assert_close(loss, want_loss.detach(), rtol=0, atol=ATOL)
    for name in ("clip_frac", "ratio_mean", "kl"):
        torch.testing.assert_close(getattr(stats, name), getattr(want, name), rtol=0, atol=ATOL)
    assert 0 < float(want.clip_frac) < 1  # both branches of the clip are exercised
    assert (float(want.kl) > 0) == (beta > 0)


def test_micro_batch_size_must_be_positive(setup) -> None:
    _, roll, old, _, advantages = setup
    with pytest.raises(ValueError, match="micro_batch_size"):
        backward_in_micro_batches(lambda rows: old[rows], old, advantages, roll.completion_mask, micro_batch_size=0)
