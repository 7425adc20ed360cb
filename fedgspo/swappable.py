"""What a running job can swap by name: its reward, its aggregation rule, its LR schedule.

Each lives in :class:`~fedgspo.entities.callables.CallableRegistry` under a kind that is also the
:class:`~fedgspo.entities.callables.HotSwapper` slot:

* ``reward``: TRL-signature reward functions. Every function of the :mod:`fedgspo.gspo.rewards`
  registry, and every function of the configured weighted sum under its configured name (an
  import path included), is registered when the swapper is built; the weighted sum itself is
  ``"config"``. Swapping to another name trains on that function alone.
* ``aggregator``: the rules of :data:`fedgspo.robust.aggregators.RULES`.
* ``lr_schedule``: ``fn(step, total_steps, warmup_steps) -> factor`` on the base learning rate.

A swap is requested by writing ``<run dir>/hotswap.json`` (``{"aggregator": "median"}``) and
applied by every rank at the same step boundary (:meth:`HotSwapper.sync`).
"""

from __future__ import annotations

import math
from pathlib import Path

from fedgspo.robust.aggregators import RULES
from fedgspo.entities.callables import CallableRegistry, HotSwapper
from fedgspo.entities.events import EventBus, NullEventBus
from fedgspo.gspo.rewards import WeightedReward, get_reward, reward_names

CONFIGURED_REWARD = "config"


def _warmup(step: int, warmup_steps: int) -> float:
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0


@CallableRegistry.register("constant", kind="lr_schedule", replace=True)
def constant(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up, then the base learning rate."""
    return _warmup(step, warmup_steps)


@CallableRegistry.register("linear", kind="lr_schedule", replace=True)
def linear(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up, then linear decay to 0 at ``total_steps``."""
    if step < warmup_steps:
        return _warmup(step, warmup_steps)
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


@CallableRegistry.register("cosine", kind="lr_schedule", replace=True)
def cosine(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up, then half a cosine down to 0 at ``total_steps``."""
    if step < warmup_steps:
        return _warmup(step, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


for _name, _rule in RULES.items():
    CallableRegistry.register(_name, kind="aggregator", replace=True)(_rule)


def build_swapper(*, reward: WeightedReward, aggregator: str, lr_schedule: str, run_dir: Path | None,
                  bus: EventBus | NullEventBus) -> HotSwapper:
    """A :class:`HotSwapper` over the three slots; ``run_dir`` (rank 0) enables ``hotswap.json``.

    Registers the reward functions (see the module docstring) at every call, so functions
    registered with :func:`~fedgspo.gspo.rewards.register_reward` before it are swappable.
    Unknown names raise :class:`~fedgspo.entities.callables.UnknownCallableError` listing the
    known ones; a reward name taken by a callable of another kind is a ``ValueError``.
    """
    rewards = {name: get_reward(name) for name in reward_names()}
    rewards.update(zip(reward.names, (fn for fn, _ in reward.funcs)))
    rewards[CONFIGURED_REWARD] = reward
    taken = set(CallableRegistry.names()) - set(CallableRegistry.names("reward"))
    clash = sorted(taken & set(rewards))
    if clash:
        raise ValueError(f"reward names {', '.join(clash)} are taken by other kinds of callables; rename them")
    for name, fn in rewards.items():
        CallableRegistry.register(name, kind="reward", replace=True)(fn)
    return HotSwapper({"reward": CONFIGURED_REWARD, "aggregator": aggregator, "lr_schedule": lr_schedule},
                      run_dir, bus=bus)


def current_reward(swapper: HotSwapper) -> WeightedReward:
    """The reward in use: the configured weighted sum, or a swapped-in function at weight 1."""
    fn = swapper["reward"]
    return fn if isinstance(fn, WeightedReward) else WeightedReward([(fn, 1.0)], names=[swapper.slots["reward"]])
