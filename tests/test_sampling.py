"""Sampling options of ``generate``: top-k / top-p / repetition penalty against transformers'
logits processors, greedy decoding against a naive full-forward loop, left padding, EOS lists,
stop strings and chunked generation."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from fedgspo.gspo.rollout import (
    StopCondition,
    apply_repetition_penalty,
    completion_logps,
    filter_logits,
    generate,
)
from hf_fixtures import make_model, make_tokenizer

PROMPTS = ["what is 2 + 3", "1 + 1", "what is the answer : 4 + 4 + 4"]  # different lengths


@pytest.fixture(scope="module")
def setup():
    tok = make_tokenizer()
    model = make_model(tok, hidden=32, seed=1).eval()
    batch = tok(PROMPTS, padding=True, return_tensors="pt")
    return model, tok, batch["input_ids"], batch["attention_mask"]


def _generate(setup, **kwargs):
    model, tok, ids, mask = setup
    args = dict(num_generations=2, max_new_tokens=8, temperature=1.0, eos_id=tok.eos_token_id,
                pad_id=tok.pad_token_id, generator=torch.Generator().manual_seed(0))
    return generate(model, ids, mask, **{**args, **kwargs})


@torch.no_grad()
def naive_greedy(model, prompt: list[int], steps: int, eos: int, penalty: float = 1.0) -> list[int]:
    """Argmax decoding with one full forward per token over the unpadded prompt."""
    ids = torch.tensor([prompt])
    out: list[int] = []
    for _ in range(steps):
        logits = model(input_ids=ids).logits[:, -1]
        if penalty != 1.0:
            logits = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits)
        token = int(logits.argmax(-1))
        out.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        if token == eos:
            break
    return out


def _rows(roll) -> list[list[int]]:
    return [ids[:int(n)] for ids, n in zip(roll.completion_ids.tolist(), roll.completion_mask.sum(-1).tolist())]


@pytest.mark.parametrize("penalty", [1.0, 1.5])
def test_top_k_one_is_greedy_for_left_padded_prompts(setup, penalty: float) -> None:
    model, tok, ids, mask = setup
    roll = _generate(setup, top_k=1, repetition_penalty=penalty)
    for row, got in enumerate(_rows(roll)):
        prompt = ids[row // 2][mask[row // 2].bool()].tolist()
        assert got == naive_greedy(model, prompt, 8, tok.eos_token_id, penalty)
    # old_logps are the temperature-scaled full-softmax log-probs, not those of the filtered draw
    full, _ = completion_logps(model, roll, 1.0)
    on = roll.completion_mask.bool()
    torch.testing.assert_close(roll.old_logps[on], full[on], rtol=0, atol=1e-5)
    assert bool((roll.old_logps[on] < 0).all())


def test_padded_prompt_samples_like_unpadded(setup) -> None:
    model, tok, ids, mask = setup
    single = tok([PROMPTS[1]], return_tensors="pt")
    assert single["input_ids"].shape[1] < ids.shape[1]  # the batched copy is left-padded
    alone = generate(model, single["input_ids"], single["attention_mask"], num_generations=2, max_new_tokens=8,
                     temperature=1e-4, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                     generator=torch.Generator().manual_seed(0))
    batched = _generate(setup, temperature=1e-4)
    assert torch.equal(alone.completion_ids, batched.completion_ids[2:4])


def test_filter_logits_matches_transformers_warpers() -> None:
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 3
    for top_k in (0, 1, 5, 50):
        for top_p in (1.0, 0.9, 0.5, 0.01):
            want = logits
            if top_k:
                want = TopKLogitsWarper(top_k)(None, want)
            if top_p < 1.0:
                want = TopPLogitsWarper(top_p)(None, want)
            torch.testing.assert_close(filter_logits(logits, top_k=top_k, top_p=top_p), want, rtol=0, atol=0)


def test_top_p_samples_only_the_nucleus() -> None:
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    kept = filter_logits(probs.log().expand(20_000, 4), top_p=0.75).softmax(-1)
    torch.testing.assert_close(kept[0], torch.tensor([0.0, 0.625, 0.0, 0.375]))
    draws = torch.multinomial(kept, 1, generator=torch.Generator().manual_seed(0)).flatten()
    freq = torch.bincount(draws, minlength=4).float() / draws.numel()
    assert freq[0] == freq[2] == 0
    assert abs(float(freq[1]) - 0.625) < 0.015


def test_repetition_penalty_matches_transformers() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 30, generator=gen) * 2
    ids = torch.randint(0, 30, (4, 12), generator=gen)
    seen = torch.zeros(4, 30, dtype=torch.bool).scatter_(1, ids, True)
    for penalty in (1.3, 0.7):
        want = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
        torch.testing.assert_close(apply_repetition_penalty(logits, seen, penalty), want, rtol=0, atol=0)


def _first_stop(row: list[int], tok, stops: list[str], eos: int) -> int:
    """Tokens kept by the contract: up to the first whose prefix text contains a stop string."""
    for t, token in enumerate(row):
        if token == eos or any(s in tok.decode(row[:t + 1]) for s in stops):
            return t + 1
    return len(row)


def test_stop_strings_end_completions_and_mask_after(setup) -> None:
    _, tok, _, _ = setup
    free = _generate(setup, max_new_tokens=10)
    rows = _rows(free)
    longest = max(rows, key=len)
    assert len(longest) >= 5
    stops = [tok.decode(longest[3:5]), tok.decode(longest[1:2])]  # a two-token and a one-token string
    stopped = _generate(setup, max_new_tokens=10, stop_strings=stops, tokenizer=tok)
    assert stopped.completion_ids.shape == free.completion_ids.shape
    cut_any = False
    for r, (row, got) in enumerate(zip(rows, _rows(stopped))):
        n = _first_stop(row, tok, stops, tok.eos_token_id)
        assert got == row[:n]  # same draws, cut at the stop string
        assert stopped.completion_mask[r].tolist() == [1.0] * n + [0.0] * (10 - n)
        assert bool((stopped.completion_ids[r, n:] == tok.pad_token_id).all())
        assert bool((stopped.old_logps[r, n:] == 0).all())
        torch.testing.assert_close(stopped.old_logps[r, :n], free.old_logps[r, :n], rtol=0, atol=1e-6)
        cut_any |= n < len(row)
    assert cut_any
    ended = StopCondition(tok.eos_token_id, stops, tok).ended_at(stopped.completion_ids)
    lengths = stopped.completion_mask.sum(-1).long()
    for r in range(ended.shape[0]):
        first = ended[r].nonzero()
        assert int(first[0]) + 1 == int(lengths[r]) if len(first) else int(lengths[r]) == 10


def test_eos_list_and_argument_errors(setup) -> None:
    stop = StopCondition([2, 5])
    assert stop.step(torch.tensor([[1, 2], [2, 5], [5, 1], [3, 4]])).tolist() == [True, True, False, False]
    for bad in (dict(top_p=0.0), dict(top_k=-1), dict(repetition_penalty=0.0), dict(max_batch=0),
                dict(temperature=0.0), dict(stop_strings=["x"])):
        with pytest.raises(ValueError):
            _generate(setup, **bad)


@pytest.mark.parametrize("max_batch", [1, 2, 4, 5, 100])
def test_chunked_generation_keeps_the_layout(setup, max_batch: int) -> None:
    model, tok, ids, _ = setup
    kwargs = dict(num_generations=3, top_k=1)
    whole, chunked = _generate(setup, **kwargs), _generate(setup, max_batch=max_batch, **kwargs)
    for name in ("input_ids", "attention_mask", "completion_ids", "completion_mask"):
        assert torch.equal(getattr(chunked, name), getattr(whole, name)), name  # greedy: identical rows
    torch.testing.assert_close(chunked.old_logps, whole.old_logps, rtol=0, atol=1e-5)
    sampled = _generate(setup, num_generations=3, max_batch=max_batch)
    assert sampled.completion_ids.shape == (9, 8) and sampled.input_ids.shape == (9, ids.shape[1] + 8)
    assert torch.equal(sampled.input_ids[:, :ids.shape[1]], ids.repeat_interleave(3, dim=0))
    full, _ = completion_logps(model, sampled, 1.0)
    on = sampled.completion_mask.bool()
    torch.testing.assert_close(sampled.old_logps[on], full[on], rtol=0, atol=1e-5)
