"""Reward functions with TRL's signature ``fn(prompts, completions, **kwargs) -> list[float]``.

Extra columns of the task (here ``answer``) arrive as keyword arguments, as TRL passes dataset
columns. Reward functions live in :class:`~fedgspo.entities.callables.CallableRegistry` under kind
``"reward"`` (so a running job can hot-swap them by name); :class:`WeightedReward` combines
several into the weighted sum that drives training. A user's own function with the same
signature is added with :func:`register_reward` or ``@CallableRegistry.register(name,
kind="reward")``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from fedgspo.entities.callables import CallableRegistry

RewardFunc = Callable[..., list[float]]
KIND = "reward"


@CallableRegistry.register("digit_accuracy", kind=KIND, replace=True)
def digit_accuracy(prompts: Sequence[str], completions: Sequence[str], answer: Sequence[str],
                   **kwargs: object) -> list[float]:
    """Partial credit: characters in the right position / max(len(answer), len(completion))."""
    scores = []
    for completion, target in zip(completions, answer, strict=True):
        hits = sum(a == b for a, b in zip(completion, target))
        scores.append(hits / max(len(target), len(completion), 1))
    return scores


@CallableRegistry.register("exact_match", kind=KIND, replace=True)
def exact_match(prompts: Sequence[str], completions: Sequence[str], answer: Sequence[str],
                **kwargs: object) -> list[float]:
    """1.0 when the completion equals the answer, else 0.0."""
    return [float(c == a) for c, a in zip(completions, answer, strict=True)]


@CallableRegistry.register("length_match", kind=KIND, replace=True)
def length_match(prompts: Sequence[str], completions: Sequence[str], answer: Sequence[str],
                 **kwargs: object) -> list[float]:
    """Format credit: ``1 - |len(completion) - len(answer)| / len(answer)``, floored at 0."""
    return [max(0.0, 1.0 - abs(len(c) - len(a)) / max(len(a), 1))
            for c, a in zip(completions, answer, strict=True)]


def register_reward(name: str, fn: RewardFunc) -> None:
    """Make ``fn`` selectable as ``task.reward_funcs[].name`` and hot-swappable; a taken name
    is a ``ValueError``."""
    CallableRegistry.register(name, kind=KIND)(fn)


def get_reward(name: str) -> RewardFunc:
    """The reward function called ``name``; ``KeyError`` listing the known names otherwise."""
    return CallableRegistry.get(name, kind=KIND).fn


class WeightedReward:
    """``sum_k w_k * fn_k(prompts, completions, **kwargs)``, with each term kept for logging."""

    def __init__(self, funcs: Sequence[tuple[RewardFunc, float]]) -> None:
        if not funcs:
            raise ValueError("at least one reward function is needed")
        self.funcs = list(funcs)

    @classmethod
    def from_names(cls, items: Sequence[tuple[str, float]]) -> "WeightedReward":
        return cls([(get_reward(name), weight) for name, weight in items])

    def __call__(self, prompts: Sequence[str], completions: Sequence[str],
                 **kwargs: object) -> tuple[list[float], dict[str, list[float]]]:
        """Total rewards and each function's raw scores by name. A function returning the
        wrong number of scores raises ``ValueError`` naming it."""
        total = [0.0] * len(completions)
        parts: dict[str, list[float]] = {}
        for fn, weight in self.funcs:
            scores = fn(prompts, completions, **kwargs)
            name = getattr(fn, "__name__", repr(fn))
            if len(scores) != len(completions):
                raise ValueError(f"reward function {name} returned {len(scores)} scores for "
                                 f"{len(completions)} completions")
            parts[name] = list(scores)
            total = [t + weight * s for t, s in zip(total, scores)]
        return total, parts
