"""fedgspo: Byzantine-robust distributed GSPO training on torch.distributed.

Public entry points:
    gspo_loss, group_advantages   the GSPO objective (fedgspo.gspo)
    robust_all_reduce             drop-in robust replacement for dist.all_reduce (fedgspo.robust)
    build_aggregator, RULES       aggregation rules by name (fedgspo.aggregators)
    robust_hook, RobustHookState  DDP communication hook (fedgspo.ddp_comm_hook)
    ReputationTracker             per-rank trust and quarantine (fedgspo.reputation)
    AttackConfig, apply_attack    Byzantine attack simulator (fedgspo.attacks)
    AggregationConfig             the aggregation section of a run (fedgspo.aggregation_config)
"""

from fedgspo.aggregation_config import AggregationConfig
from fedgspo.aggregators import RULES, build_aggregator
from fedgspo.attacks import AttackConfig, apply_attack, poison_rewards
from fedgspo.ddp_comm_hook import RobustHookState, robust_hook
from fedgspo.gspo import group_advantages, gspo_loss
from fedgspo.reputation import ReputationConfig, ReputationTracker
from fedgspo.robust import RobustReport, robust_all_reduce

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
