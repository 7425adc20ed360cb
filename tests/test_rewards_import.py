"""Reward resolution (registry, import paths), async and ``None`` scores, errors, the general
rewards, hot-swap registration, and the gspo package's import boundary."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path

import pytest

import fedgspo.gspo
from fedgspo.entities.callables import CallableRegistry
from fedgspo.entities.events import NullEventBus
from fedgspo.gspo.rewards import (RewardError, UnknownRewardError, WeightedReward, answer_match, extract_answer,
                                  format_reward, get_reward, make_format_reward, math_answer, register_reward,
                                  resolve_reward, reward_means, reward_names)
from fedgspo.swappable import build_swapper, current_reward

MODULE = '''
import asyncio


def first_char(prompts, completions, answer, **kwargs):
    return [float(c[:1] == a[:1]) for c, a in zip(completions, answer)]


class Scorers:
    @staticmethod
    def length(prompts, completions, **kwargs):
        return [float(len(c)) for c in completions]


async def slow_match(prompts, completions, answer, **kwargs):
    await asyncio.sleep(0)
    return [float(c == a) for c, a in zip(completions, answer)]


NOT_CALLABLE = 3
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_rewards"


def test_resolution_by_name_and_import_path(user_module):
    assert resolve_reward("math_answer") is math_answer
    colon = resolve_reward(f"{user_module}:first_char")
    assert resolve_reward(f"{user_module}.first_char") is colon
    assert colon([], ["12", "x"], answer=["1", "1"]) == [1.0, 0.0]
    assert resolve_reward(f"{user_module}:Scorers.length")([], ["abc"]) == [3.0]
    total, parts = WeightedReward.from_names([(f"{user_module}:first_char", 2.0), ("exact_match", 1.0)])(
        [], ["1"], answer=["1"])
    assert total == [3.0] and set(parts) == {f"{user_module}:first_char", "exact_match"}


@pytest.mark.parametrize(("name", "match"), [
    ("nope", r"unknown reward function 'nope'; registered: .*answer_match.*math_answer.*; or give an import path"),
    ("no_such_pkg.mod:fn", r"'no_such_pkg.mod:fn': cannot import module 'no_such_pkg.mod' \(ModuleNotFoundError"),
    ("my_rewards:missing", r"'my_rewards:missing': 'my_rewards' has no attribute 'missing'"),
    ("my_rewards.NOT_CALLABLE", r"'my_rewards.NOT_CALLABLE': int object is not callable"),
    (":fn", r"expected package.module:function"),
])
def test_resolution_errors_are_one_line(user_module, name, match):
    with pytest.raises(RewardError, match=match) as info:
        resolve_reward(name)
    assert "\n" not in str(info.value)


def test_registry_lookup_errors():
    with pytest.raises(UnknownRewardError) as info:
        get_reward("nope")
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
    assert str(info.value).startswith("unknown reward function 'nope'; registered: answer_match")
    with pytest.raises(ValueError, match="already registered"):
        register_reward("exact_match", answer_match)
    assert {"answer_match", "math_answer", "format_reward", "digit_accuracy", "exact_match",
            "length_match"} <= set(reward_names())


def test_async_rewards_are_awaited(user_module):
    fn = WeightedReward.from_names([(f"{user_module}:slow_match", 1.0), ("exact_match", 1.0)])
    assert fn([], ["a", "b"], answer=["a", "c"])[0] == [2.0, 0.0]

    async def inside_a_running_loop():
        return fn([], ["a"], answer=["a"])

    assert asyncio.run(inside_a_running_loop())[0] == [2.0]


def test_none_scores_are_not_applicable():
    def half(prompts, completions, **kw):
        return [1.0, None, None]

    def other(prompts, completions, **kw):
        return [None, 0.5, None]

    total, parts = WeightedReward([(half, 2.0), (other, 1.0)])([], ["a", "b", "c"])
    assert total == [2.0, 0.5, 0.0]
    assert parts == {"half": [1.0, None, None], "other": [None, 0.5, None]}
    assert reward_means(parts) == {"half": 1.0, "other": 0.5}
    assert reward_means({"never": [None, None]}) == {}


def test_misbehaving_functions_raise_reward_error_naming_them():
    def short(prompts, completions, **kw):
        return [1.0]

    def broken(prompts, completions, **kw):
        raise ZeroDivisionError("division by zero\nmore detail")

    async def broken_async(prompts, completions, **kw):
        raise KeyError("answer")

    def scalar(prompts, completions, **kw):
        return 1.0

    def words(prompts, completions, **kw):
        return ["high", "low"]

    cases = [(short, "reward function short returned 1 scores for 2 completions"),
             (broken, "reward function broken raised ZeroDivisionError: division by zero$"),
             (broken_async, "reward function broken_async raised KeyError: 'answer'"),
             (scalar, "reward function scalar returned float, not a list of scores"),
             (words, "reward function words returned a non-numeric score")]
    for fn, match in cases:
        with pytest.raises(RewardError, match=match) as info:
            WeightedReward([(fn, 1.0)])(["p", "q"], ["a", "b"])
        assert "\n" not in str(info.value)
    with pytest.raises(RewardError) as info:
        WeightedReward([(broken, 1.0)])([], ["a"])
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_answer_match_normalises():
    completions = ["  Paris. ", [{"role": "assistant", "content": "new   YORK"}], "Lyon", "x"]
    assert answer_match([], completions, answer=["paris", "New York", "Paris", None]) == [1.0, 1.0, 0.0, None]


@pytest.mark.parametrize(("completion", "answer", "score"), [
    ("so 2 + 1 is\n#### 3", "3", 1.0),
    ("#### 3.0", "3", 1.0),
    ("the sum is \\boxed{3}.", "Natalia sold 48 clips... #### 3", 1.0),
    ("\\boxed{\\frac{1}{2}} then #### 7", "7", 1.0),
    ("#### 7 and finally \\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 1.0),
    ("#### 1,000", "1000", 1.0),
    ("#### Paris.", "paris", 1.0),
    ("#### 4", "3", 0.0),
    ("3", "3", 0.0),  # no final-answer marker
    ([{"role": "assistant", "content": "#### 12"}], "12", 1.0),
])
def test_math_answer(completion, answer, score):
    assert math_answer([], [completion], answer=[answer]) == [score]


def test_extract_answer():
    assert extract_answer("a \\boxed{x^{2}} b") == "x^{2}"
    assert extract_answer("#### 5\n#### 6\nbye") == "6"
    assert extract_answer("####") == "" and extract_answer("no answer") is None


def test_format_rewards():
    assert format_reward([], ["work\n#### 42", "#### ", "42", "#### 4\nmore text",
                              [{"role": "assistant", "content": "#### 1"}]]) == [1.0, 0.0, 0.0, 0.0, 1.0]
    think = make_format_reward(r"\A<think>.*</think>", name="think_format")
    assert think.__name__ == "think_format"
    assert think([], ["<think>hm</think> 3", "3"]) == [1.0, 0.0]


def test_swapper_registers_every_reward(user_module):
    def custom(prompts, completions, **kw):
        return [0.25] * len(completions)

    register_reward("t_custom_reward", custom, replace=True)
    path_name = f"{user_module}:first_char"
    configured = WeightedReward.from_names([("digit_accuracy", 1.0), (path_name, 1.0)])
    swapper = build_swapper(reward=configured, aggregator="mean", lr_schedule="constant", run_dir=None,
                            bus=NullEventBus())
    try:
        assert {"answer_match", "math_answer", "t_custom_reward", path_name, "config"} <= set(
            CallableRegistry.names("reward"))
        assert current_reward(swapper) is configured
        swapper.request("reward", "t_custom_reward")
        swapper.sync(step=1)
        total, parts = current_reward(swapper)([], ["a", "b"])
        assert total == [0.25, 0.25] and set(parts) == {"t_custom_reward"}
        swapper.request("reward", path_name)
        swapper.sync(step=2)
        assert current_reward(swapper)([], ["1"], answer=["1"])[0] == [1.0]
    finally:
        for name in ("t_custom_reward", path_name):
            CallableRegistry.unregister(name)


def test_gspo_package_imports_nothing_else_of_fedgspo():
    package = Path(fedgspo.gspo.__file__).parent
    for source in package.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert not name.startswith("fedgspo") or name.startswith("fedgspo.gspo"), \
                    f"{source.name} imports {name}"
