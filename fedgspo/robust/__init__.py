"""The robust aggregation library: a drop-in for ``dist.all_reduce`` that tolerates Byzantine ranks.

Stands alone: it imports torch, pydantic (for its config sections) and fedgspo's small
collectives module (:mod:`fedgspo.distributed`), never transformers, the entity system, the
integrity code or telemetry. Authentication plugs in through
:class:`~fedgspo.robust.authentication.ExchangeAuthenticator`.

    from fedgspo.robust import robust_all_reduce, TrimmedMean
    report = robust_all_reduce(flat_grads, TrimmedMean(f=1))
"""

from fedgspo.robust.aggregators import (
    PRE_AGGREGATORS,
    RULES,
    AdaptiveRobustClipping,
    Aggregator,
    Bucketing,
    CenteredClipping,
    CoordinateMedian,
    GeometricMedian,
    Krum,
    Mean,
    MultiKrum,
    NearestNeighborMixing,
    TrimmedMean,
    build_aggregator,
)
from fedgspo.robust.all_reduce import MODES, RobustReport, robust_all_reduce
from fedgspo.robust.ddp_hook import RobustHookState, robust_hook
from fedgspo.robust.reputation import ReputationConfig, ReputationTracker

__all__ = [
    "MODES", "PRE_AGGREGATORS", "RULES", "AdaptiveRobustClipping", "Aggregator", "Bucketing", "CenteredClipping",
    "CoordinateMedian", "GeometricMedian", "Krum", "Mean", "MultiKrum", "NearestNeighborMixing",
    "ReputationConfig", "ReputationTracker", "RobustHookState", "RobustReport", "TrimmedMean",
    "build_aggregator", "robust_all_reduce", "robust_hook",
]
