"""The compiled static-cache decode and the compiled loss forward against the eager reference.

Tolerances: log-probs within 1e-5 absolute (float32, the same ops in a different fusion
order); gradients within 1e-5 relative to the largest gradient entry. Sampling on a fixed
seed gives the same tokens (both paths draw the same random numbers in the same order).
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import MistralConfig, MistralForCausalLM

from fedgspo.gspo.loss import gspo_loss
from fedgspo.gspo.model import compile_forward
from fedgspo.gspo.rollout import completion_logps, generate
from fedgspo.gspo.static_decode import _DECODERS, bucket_length, static_shape, unsupported_reason, use_compiled
from hf_fixtures import make_model, make_tokenizer

PROMPTS = ["what is 2 + 3", "1 + 1", "what is the answer : 4 + 4 + 4"]  # different lengths
LONGER = ["what is the answer : 1 + 2 + 3 + 4", "4", "what is 3 + 3"]
MAX_NEW = 8


@pytest.fixture(scope="module")
def setup():
    tok = make_tokenizer()
    model = make_model(tok, hidden=32, seed=1).eval()
    return model, tok


def _batch(tok, texts):
    batch = tok(texts, padding=True, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


def _generate(setup, compile, texts=PROMPTS, seed=0, **kwargs):
    model, tok = setup
    ids, mask = _batch(tok, texts)
    args = dict(num_generations=2, max_new_tokens=MAX_NEW, temperature=1.0, eos_id=tok.eos_token_id,
                pad_id=tok.pad_token_id, generator=torch.Generator().manual_seed(seed), compile=compile)
    return generate(model, ids, mask, **{**args, **kwargs})


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_bucket_lengths_are_powers_of_two_at_least_the_minimum():
    assert [bucket_length(n) for n in (1, 17, 32, 33, 64, 65)] == [32, 32, 32, 64, 64, 128]
    assert bucket_length(5, min_bucket=4) == 8 and bucket_length(4, min_bucket=4) == 4
    assert static_shape(9, 8) == (16, 32) and static_shape(3, 8) == (8, 32) and static_shape(17, 16) == (32, 64)


def test_auto_compiles_only_when_the_expected_decode_steps_pay(setup):
    model, _ = setup
    assert not use_compiled("off", model, decode_steps=10**9)
    assert not use_compiled("auto", model, decode_steps=99, min_decode_steps=100)
    assert use_compiled("auto", model, decode_steps=100, min_decode_steps=100)
    assert use_compiled("on", model, decode_steps=0)
    with pytest.raises(ValueError, match="compile must be"):
        use_compiled("sometimes", model, decode_steps=0)


def test_a_sliding_window_model_stays_eager_under_auto_and_is_refused_under_on():
    cfg = MistralConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=2, sliding_window=4)
    model = MistralForCausalLM(cfg)
    assert "full attention" in unsupported_reason(model)
    assert not use_compiled("auto", model, decode_steps=10**9)
    with pytest.raises(ValueError, match="full attention"):
        use_compiled("on", model, decode_steps=0)


@pytest.mark.slow
@pytest.mark.parametrize("options", [
    {},
    {"temperature": 0.7},
    {"top_k": 3},
    {"top_p": 0.8},
    {"temperature": 1.3, "top_k": 5, "top_p": 0.9, "repetition_penalty": 1.2},
    # Chunks of 3 prompts x 2 (the shape the cases above compiled) and 2 prompts x 2: a second shape.
    {"max_batch": 6, "texts": PROMPTS + LONGER[:2]},
])
def test_compiled_sampling_equals_eager_on_fixed_seeds(setup, options):
    for seed in range(3):
        eager = _generate(setup, "off", seed=seed, **options)
        compiled = _generate(setup, "on", seed=seed, **options)
        assert torch.equal(compiled.completion_ids, eager.completion_ids)
        assert torch.equal(compiled.attention_mask, eager.attention_mask)
        torch.testing.assert_close(compiled.old_logps, eager.old_logps, atol=1e-5, rtol=0)


def test_auto_decodes_a_short_run_eagerly():
    tok = make_tokenizer()
    model = make_model(tok, hidden=32, seed=2)
    _generate((model, tok), "auto", expected_calls=10)
    assert model not in _DECODERS


@pytest.mark.slow
def test_auto_compiles_for_a_long_run(setup):
    model, _ = setup
    eager = _generate(setup, "off")
    auto = _generate(setup, "auto", expected_calls=10_000)
    assert _DECODERS[model] and torch.equal(auto.completion_ids, eager.completion_ids)


@pytest.mark.slow
def test_recorded_log_probs_equal_a_prefill(setup):
    model, _ = setup
    for temperature in (1.0, 0.7):
        roll = _generate(setup, "on", temperature=temperature)
        with torch.no_grad():
            full, _ = completion_logps(model, roll, temperature)
        mask = roll.completion_mask.bool()
        torch.testing.assert_close(roll.old_logps[mask], full[mask], atol=1e-5, rtol=0)
        assert torch.all(roll.old_logps[~mask] == 0)


@pytest.mark.slow
def test_nothing_recompiles_across_20_calls_after_warm_up(setup):
    model, tok = setup
    short = [t.split(" + ")[0] for t in LONGER]  # at most 8 tokens: the shorter prompt bucket
    for texts in (PROMPTS, short):  # warm-up: each shape twice (a shape's first prefill runs uncompiled)
        _generate(setup, "on", texts=texts)
        _generate(setup, "on", texts=texts)
    before = _graphs()
    params = [p for p in model.parameters() if p.ndim == 2]
    for call in range(20):
        texts = [PROMPTS, LONGER, short][call % 3]
        texts = texts[call % 2:] + texts[:call % 2]  # prompt widths 3 to 12 tokens
        with torch.no_grad():  # an optimizer-like in-place update: the compiled step must see it
            params[call % len(params)].mul_(1.01)
        eager = _generate(setup, "off", texts=texts, seed=call)
        compiled = _generate(setup, "on", texts=texts, seed=call)
        assert torch.equal(compiled.completion_ids, eager.completion_ids)
    assert _graphs() == before


@pytest.mark.slow
def test_compiled_loss_gradients_equal_eager(setup):
    model, _ = setup
    forward = compile_forward(model)
    model.train()

    def gradients(forward, rollout, advantages):
        model.zero_grad()
        logps, _ = completion_logps(forward, rollout, 0.9)
        # A policy slightly off the sampling one, so that ratios and clipping are exercised.
        gspo_loss(logps, rollout.old_logps - 1e-4, advantages, rollout.completion_mask).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    try:
        for texts, seed in ((PROMPTS, 0), (LONGER, 1), (LONGER[:2], 2)):  # other lengths and row counts
            roll = _generate(setup, "off", texts=texts, seed=seed)
            advantages = torch.linspace(-2.0, 2.0, roll.completion_ids.shape[0])
            eager = gradients(model, roll, advantages)
            compiled = gradients(forward, roll, advantages)
            assert eager.abs().max() > 0
            assert (compiled - eager).abs().max() <= 1e-5 * eager.abs().max()
    finally:
        model.eval()
