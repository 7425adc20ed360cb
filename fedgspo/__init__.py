"""fedgspo: Byzantine-robust distributed GSPO training on torch.distributed.

Public entry points:
    gspo_loss, group_advantages   the GSPO objective (fedgspo.gspo)
    robust_all_reduce             drop-in robust replacement for dist.all_reduce (fedgspo.robust)
    Aggregator, TrimmedMean, ...  the rules as objects; build_aggregator, RULES by name
    robust_hook, RobustHookState  DDP communication hook
    ReputationTracker             per-rank trust and quarantine
    AttackConfig, apply_attack    Byzantine attack simulator
    AggregationConfig             the aggregation section of a run
    on, StepCompleted, ...        hooks: ``@fedgspo.on(fedgspo.StepCompleted)`` receives a run's
                                  events in the process of rank 0 (fedgspo.entities.events)

Importing fedgspo loads the robust library and the GSPO loss only (torch, pydantic); the event
names load the event module on first use; the trainer (``python -m fedgspo.train``) and the
``fedgspo`` command load the rest.
"""

from typing import Any

from fedgspo.gspo.loss import group_advantages, gspo_loss
from fedgspo.robust import *  # noqa: F403 - the robust library's public names, at the top
from fedgspo.robust import __all__ as _ROBUST
from fedgspo.robust.attacks import AttackConfig, apply_attack, poison_rewards
from fedgspo.robust.config import AggregationConfig

__version__ = "0.1.0"

#: Names of fedgspo.entities.events available here, loaded on first access.
_EVENTS = ("on", "Event", "TrainingStarted", "StepCompleted", "TrainingCompleted", "CheckpointCreated",
           "ByzantineRankFlagged", "ReputationChanged", "HotSwapApplied", "AlertRaised", "OperationStarted",
           "OperationCompleted", "OperationFailed", "OperationRejected")

__all__ = ["gspo_loss", "group_advantages", *_ROBUST, "AttackConfig", "apply_attack", "poison_rewards",
           "AggregationConfig", *_EVENTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EVENTS:
        from fedgspo.entities import events

        return getattr(events, name)
    raise AttributeError(f"module 'fedgspo' has no attribute {name!r}")
