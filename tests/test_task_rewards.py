"""The synthetic task, its tokenizer and the reward functions."""

from __future__ import annotations

import pytest
import torch

from fedgspo.config import TaskConfig
from fedgspo.gspo.rewards import WeightedReward, digit_accuracy, exact_match, get_reward, length_match, register_reward
from fedgspo.gspo.task import CharTokenizer, DigitTask, solve


def test_solve():
    assert solve("copy", "3141") == "3141"
    assert solve("reverse", "3141") == "1413"
    assert solve("sort", "3141") == "1134"
    with pytest.raises(ValueError, match="unknown task"):
        solve("add", "1")


def test_tokenizer_round_trip_and_eos():
    tok = CharTokenizer()
    ids = tok.encode("R3141=")
    assert tok.decode(ids + [tok.eos_id] + tok.encode("99")) == "R3141="
    assert tok.decode([tok.pad_id] + tok.encode("12")) == "_12"
    with pytest.raises(ValueError, match="not in the task vocabulary"):
        tok.encode("x")


def test_prompts_depend_only_on_seed_rank_step():
    task = DigitTask(TaskConfig(name="reverse", prompts_per_rank=5), seed=3)
    a, b = task.sample(rank=1, step=7), task.sample(rank=1, step=7)
    assert a.prompts == b.prompts and torch.equal(a.input_ids, b.input_ids)
    assert task.sample(rank=0, step=7).prompts != a.prompts
    assert task.sample(rank=1, step=8).prompts != a.prompts
    assert DigitTask(TaskConfig(name="reverse", prompts_per_rank=5), seed=4).sample(1, 7).prompts != a.prompts
    for prompt, answer in zip(a.prompts, a.answers):
        assert prompt[0] == "R" and prompt[-1] == "=" and answer == prompt[1:-1][::-1]


def test_prompts_are_left_padded():
    task = DigitTask(TaskConfig(min_digits=1, max_digits=5, prompts_per_rank=16), seed=0)
    batch = task.sample(0, 0)
    tok = task.tokenizer
    for ids, mask, prompt in zip(batch.input_ids.tolist(), batch.attention_mask.tolist(), batch.prompts):
        real = [i for i, m in zip(ids, mask) if m]
        assert real == [tok.bos_id] + tok.encode(prompt)
        assert mask == sorted(mask)  # zeros (padding) first


def test_reward_functions_partial_credit():
    kw = {"answer": ["1234", "1234", "12"]}
    comps = ["1234", "1299", "1"]
    assert exact_match([], comps, **kw) == [1.0, 0.0, 0.0]
    assert digit_accuracy([], comps, **kw) == [1.0, 0.5, 0.5]
    assert length_match([], comps, **kw) == [1.0, 1.0, 0.5]
    assert digit_accuracy([], ["123456789"], answer=["1"]) == [pytest.approx(1 / 9)]


def test_weighted_reward_sum_and_parts():
    fn = WeightedReward.from_names([("digit_accuracy", 1.0), ("exact_match", 0.5)])
    total, parts = fn(["C12="], ["12"], answer=["12"])
    assert total == [1.5] and parts == {"digit_accuracy": [1.0], "exact_match": [1.0]}


def test_reward_registry_errors():
    with pytest.raises(KeyError, match="digit_accuracy"):
        get_reward("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_reward("exact_match", exact_match)
    bad = WeightedReward([(lambda prompts, completions, **kw: [1.0], 1.0)])
    with pytest.raises(ValueError, match="returned 1 scores for 2"):
        bad(["a", "b"], ["a", "b"])
