"""KV-cached rollouts: recorded log-probs equal a full forward; masks stop after EOS."""

from __future__ import annotations

import torch

from fedgspo.config import ModelConfig, TaskConfig
from fedgspo.gspo.model import build_model, weights_sha256
from fedgspo.gspo.rollout import completion_logps, generate, selective_log_softmax
from fedgspo.gspo.task import DigitTask


def _setup(seed: int = 0):
    task = DigitTask(TaskConfig(min_digits=1, max_digits=4, prompts_per_rank=4), seed=seed)
    tok = task.tokenizer
    model = build_model(ModelConfig(), tok.vocab_size, pad_id=tok.pad_id, bos_id=tok.bos_id,
                        eos_id=tok.eos_id, seed=seed)
    return task, tok, model


def _rollout(model, task, tok, seed=0, temperature=1.0, max_new=6):
    batch = task.sample(0, 0)
    return generate(model, batch.input_ids, batch.attention_mask, num_generations=3,
                    max_new_tokens=max_new, temperature=temperature, eos_id=tok.eos_id,
                    pad_id=tok.pad_id, generator=torch.Generator().manual_seed(seed))


def test_recorded_logps_match_full_forward():
    task, tok, model = _setup()
    for temperature in (1.0, 0.7):
        r = _rollout(model, task, tok, temperature=temperature)
        with torch.no_grad():
            full, _ = completion_logps(model, r, temperature)
        mask = r.completion_mask.bool()
        assert torch.allclose(full[mask], r.old_logps[mask], atol=1e-5)
        assert torch.all(r.old_logps[~mask] == 0)


def test_shapes_masks_and_eos():
    task, tok, model = _setup()
    r = _rollout(model, task, tok, max_new=6)
    assert r.completion_ids.shape == (12, 6)
    assert r.input_ids.shape == (12, r.prompt_length + 6)
    for ids, mask in zip(r.completion_ids.tolist(), r.completion_mask.tolist()):
        n = int(sum(mask))
        assert mask == [1.0] * n + [0.0] * (6 - n)
        assert tok.eos_id not in ids[: n - 1]  # EOS, if any, is the last unmasked token
        assert all(i == tok.pad_id for i in ids[n:])
        if n < 6:
            assert ids[n - 1] == tok.eos_id


def test_sampling_is_reproducible_and_leaves_model_state():
    task, tok, model = _setup()
    model.train()
    before = weights_sha256(model)
    a = _rollout(model, task, tok, seed=5)
    b = _rollout(model, task, tok, seed=5)
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert model.training and weights_sha256(model) == before


def test_model_build_is_deterministic():
    _, _, m1 = _setup(seed=1)
    _, _, m2 = _setup(seed=1)
    _, _, m3 = _setup(seed=2)
    assert weights_sha256(m1) == weights_sha256(m2) != weights_sha256(m3)


def test_selective_log_softmax_equals_gathered_log_softmax():
    logits = torch.randn(3, 5, 17, dtype=torch.float64)
    index = torch.randint(0, 17, (3, 5))
    expected = torch.log_softmax(logits, -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(selective_log_softmax(logits, index), expected)


def test_completions_of_a_prompt_share_its_prompt():
    task, tok, model = _setup()
    roll = _rollout(model, task, tok)
    prompts = task.sample(0, 0).input_ids.repeat_interleave(3, dim=0)
    assert torch.equal(roll.input_ids[:, :roll.prompt_length], prompts)
    assert torch.equal(roll.attention_mask[:, roll.prompt_length:].float(), roll.completion_mask)
