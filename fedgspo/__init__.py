"""fedgspo: Byzantine-robust distributed GSPO training on torch.distributed.

Public entry points:
    gspo_loss, group_advantages   the GSPO objective (fedgspo.gspo.loss)
    robust_all_reduce             drop-in robust replacement for dist.all_reduce (fedgspo.robust.all_reduce)
    build_aggregator, RULES       aggregation rules by name (fedgspo.robust.aggregators)
    robust_hook, RobustHookState  DDP communication hook (fedgspo.robust.ddp_hook)
    ReputationTracker             per-rank trust and quarantine (fedgspo.robust.reputation)
    AttackConfig, apply_attack    Byzantine attack simulator (fedgspo.robust.attacks)
    AggregationConfig             the aggregation section of a run (fedgspo.robust.config)
"""

from fedgspo.robust.config import AggregationConfig
from fedgspo.robust.aggregators import RULES, build_aggregator
from fedgspo.robust.attacks import AttackConfig, apply_attack, poison_rewards
from fedgspo.robust.ddp_hook import RobustHookState, robust_hook
from fedgspo.gspo.loss import group_advantages, gspo_loss
from fedgspo.robust.reputation import ReputationConfig, ReputationTracker
from fedgspo.robust.all_reduce import RobustReport, robust_all_reduce

__version__ = "0.1.0"

__all__ = [
    "gspo_loss",
    "group_advantages",
    "robust_all_reduce",
    "RobustReport",
    "build_aggregator",
    "RULES",
    "robust_hook",
    "RobustHookState",
    "ReputationConfig",
    "ReputationTracker",
    "AttackConfig",
    "apply_attack",
    "poison_rewards",
    "AggregationConfig",
    "__version__",
]
