"""A TRL-style reward function registered with fedgspo and used to train.

A reward function has TRL's signature, ``fn(prompts, completions, **kwargs) -> list[float]``;
the task's columns (here ``answer``) arrive as keyword arguments, as TRL passes dataset
columns. ``fedgspo.gspo.rewards.register_reward(name, fn)`` makes it selectable by name in
``task.reward_funcs`` (and hot-swappable in a running job: ``fedgspo hotswap RUN reward=NAME``).
Every rank runs this file, so every rank registers the function before training starts.

    python examples/trl_style_reward.py run.dir=runs/trl-reward train.max_steps=50
    torchrun --standalone --nproc_per_node=2 examples/trl_style_reward.py run.dir=runs/trl-reward
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from fedgspo.gspo.rewards import WeightedReward, register_reward
from fedgspo.train import main


def first_digit_right(prompts: Sequence[str], completions: Sequence[str], answer: Sequence[str],
                      **kwargs: object) -> list[float]:
    """1.0 when the completion starts with the answer's first character, else 0.0."""
    return [float(bool(c) and c[0] == a[0]) for c, a in zip(completions, answer, strict=True)]


register_reward("first_digit_right", first_digit_right)

REWARDS = "task.reward_funcs=[{name: first_digit_right, weight: 1.0}, {name: digit_accuracy, weight: 1.0}]"

if __name__ == "__main__":
    combined = WeightedReward.from_names([("first_digit_right", 1.0), ("digit_accuracy", 1.0)])
    total, parts = combined(["12 ->", "34 ->"], ["12", "43"], answer=["12", "34"])
    print(f"weighted reward of two sample completions: {total} (parts {parts})")
    sys.exit(main([REWARDS, *sys.argv[1:]]))
