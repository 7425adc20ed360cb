"""Configuration of the robust gradient aggregation (the ``aggregation`` section of a run).

:meth:`AggregationConfig.all_reduce_kwargs` turns the model into the keyword arguments of
:func:`fedgspo.robust_all_reduce`, so the training loop never spells them out.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedgspo.robust.aggregators import build_aggregator
from fedgspo.robust.detection import DEFAULT_THRESHOLD
from fedgspo.robust.reputation import ReputationConfig

RuleName = Literal["mean", "median", "trimmed_mean", "krum", "multi_krum", "geometric_median", "centered_clipping"]


class AggregationConfig(BaseModel):
    """How the ranks' gradients are combined (replaces ``dist.all_reduce``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    rule: RuleName = Field("trimmed_mean", description="Aggregation rule (fedgspo.robust.aggregators.RULES).")
    f: int | Literal["auto"] = Field(
        "auto", description="Byzantine ranks to tolerate; 'auto': the most the rule allows for the world size."
    )
    z_threshold: float = Field(DEFAULT_THRESHOLD, gt=0, description="Robust z-score above which a rank is flagged.")
    mode: Literal["sharded", "replicated", "audited"] = Field(
        "sharded", description="sharded: all-reduce bytes; replicated: trusts no rank; audited: double-checked shards."
    )
    pre: list[Literal["nnm", "bucketing"]] = Field(
        default_factory=list, description="Pre-aggregation steps applied in order."
    )
    bucket_size: int = Field(2, gt=0, description="Rows per bucket for 'bucketing'.")
    options: dict[str, float | int] = Field(
        default_factory=dict, description="Further rule arguments: tau, iterations, eps, max_iter, tol, m."
    )
    exclude_flagged: bool = Field(False, description="Re-aggregate without the ranks flagged in the same step.")
    trust_weighted: bool = Field(False, description="Weight ranks by reputation trust (weighted rules only).")
    on_consensus_failure: Literal["skip", "stop"] = Field(
        "skip", description="skip: no optimizer step for that batch; stop: end the run with an error."
    )
    reputation: ReputationConfig = Field(default_factory=ReputationConfig)

    @model_validator(mode="after")
    def _rule_builds(self) -> "AggregationConfig":
        build_aggregator(self.rule, 0 if self.f == "auto" else self.f, pre=self.pre, bucket_size=self.bucket_size, **self.options)
        return self

    def all_reduce_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`fedgspo.robust_all_reduce` (add ``weights=`` per step)."""
        extra: dict[str, Any] = {"bucket_size": self.bucket_size} if "bucketing" in self.pre else {}
        return {
            "rule": self.rule,
            "f": self.f,
            "mode": self.mode,
            "z_threshold": self.z_threshold,
            "exclude_flagged": self.exclude_flagged,
            "pre": tuple(self.pre),
            **extra,
            **self.options,
        }
