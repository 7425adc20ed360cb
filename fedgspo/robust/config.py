"""Configuration of the robust gradient aggregation (the ``aggregation`` section of a run).

The one place where the rule travels from a name to an object: :meth:`AggregationConfig.build`
makes the :class:`~fedgspo.robust.aggregators.Aggregator` for a world size (resolving
``f="auto"`` with :func:`tolerated_f`), and :meth:`AggregationConfig.all_reduce_kwargs` the
remaining keyword arguments of :func:`fedgspo.robust_all_reduce`, so the training loop never
spells them out.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedgspo.robust.aggregators import Aggregator, build_aggregator
from fedgspo.robust.detection import DEFAULT_THRESHOLD, SKEW_BOUND
from fedgspo.robust.reputation import ReputationConfig

#: From this many participants ``rule: auto`` is the geometric median, below it the trimmed
#: mean: measured at 4 and 8 ranks (benchmarks/README.md, "`rule: auto`").
AUTO_GEOMETRIC_MEDIAN_FROM = 8


class AggregationConfig(BaseModel):
    """How the ranks' gradients are combined (replaces ``dist.all_reduce``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    rule: Literal["auto", "mean", "median", "trimmed_mean", "krum", "multi_krum", "geometric_median",
                  "centered_clipping"] = Field(
        "auto", description="Aggregation rule (fedgspo.robust.aggregators.RULES); 'auto': trimmed_mean below "
        f"{AUTO_GEOMETRIC_MEDIAN_FROM} participants, geometric_median from {AUTO_GEOMETRIC_MEDIAN_FROM}.")
    f: int | Literal["auto"] = Field(
        "auto", description="Byzantine ranks to tolerate; 'auto': the most the rule allows for the world size."
    )
    z_threshold: float = Field(DEFAULT_THRESHOLD, gt=0, description="Robust z-score above which a rank is flagged.")
    skew_bound: float | None = Field(
        SKEW_BOUND, gt=0, le=1, description="Flag a rank whose update lies on one side of the aggregate "
        "in most coordinates (|skew|, the mean sign of its deviation, above this and a z-score outlier: "
        "fedgspo.robust.detection); null: off.")
    mode: Literal["sharded", "replicated", "audited"] = Field(
        "sharded", description="sharded: all-reduce bytes; replicated: trusts no rank; audited: double-checked shards."
    )
    pre: list[Literal["nnm", "arc", "bucketing"]] = Field(
        default_factory=list, description="Pre-aggregation steps applied in order (nnm: nearest-neighbour "
        "mixing; arc: adaptive clipping of the largest norms; bucketing)."
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
        if self.rule == "auto" and self.options:
            raise ValueError(f"options {sorted(self.options)} need a named rule: 'auto' picks trimmed_mean or "
                             "geometric_median by the number of participants")
        for rule in dict.fromkeys((self.rule_for(1), self.rule_for(AUTO_GEOMETRIC_MEDIAN_FROM))):  # auto's picks
            self._make(rule, 0 if self.f == "auto" else self.f)
        return self

    def rule_for(self, world_size: int) -> str:
        """The rule's name for ``world_size`` participants (``rule`` itself unless ``auto``)."""
        if self.rule != "auto":
            return self.rule
        return "geometric_median" if world_size >= AUTO_GEOMETRIC_MEDIAN_FROM else "trimmed_mean"

    def _make(self, rule: str, f: int) -> Aggregator:
        return build_aggregator(rule, f, pre=self.pre, bucket_size=self.bucket_size, **self.options)

    def build(self, world_size: int, rule: str | None = None) -> Aggregator:
        """The rule object for ``world_size`` ranks (``rule`` overrides the configured name, as
        a hot swap does), with ``f`` resolved by :func:`tolerated_f`. Build it once per run
        (and per swap): it keeps state across calls. Raises ``ValueError`` for bad options."""
        name = rule or self.rule_for(world_size)
        return self._make(name, tolerated_f(name, self.f, world_size, pre=self.pre))

    def fitted(self, agg: Aggregator, rule: str, usable: int) -> Aggregator:
        """``agg`` when it can aggregate ``usable`` participants (the others quarantined or left
        out); else rule ``rule`` with the largest ``f`` the ``usable`` ones allow (0 when none).
        That ``f`` is never below ``agg.f`` minus the participants left out (``2f < n`` keeps
        ``2(f - q) < n - q``), so the bound still holds while those left out are Byzantine; a
        run whose quarantine removed honest participants tolerates fewer attackers until they
        are released. Without this a quarantine that leaves too few participants for ``f``
        fails every step's consensus. A fitted rule is built per call (no state across calls);
        when no ``f`` fits (Krum among two) ``agg`` is returned and the call fails."""
        try:
            agg.check(usable)
            return agg
        except ValueError:
            fitted = self._make(rule, min(agg.f, tolerated_f(rule, "auto", usable, pre=self.pre)))
        try:
            fitted.check(usable)
            return fitted
        except ValueError:
            return agg

    def all_reduce_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`fedgspo.robust_all_reduce` besides the rule (add
        ``weights=`` per step)."""
        return {
            "mode": self.mode,
            "z_threshold": self.z_threshold,
            "skew_bound": self.skew_bound,
            "exclude_flagged": self.exclude_flagged,
        }


def tolerated_f(rule: str, f: int | str, world_size: int, pre: list[str] | tuple[str, ...] = ()) -> int:
    """``f`` itself, or for ``"auto"`` the largest f that ``rule`` (behind ``pre``) tolerates
    among ``world_size`` ranks (0 when none is tolerated: then the rule cannot protect the run)."""
    if f != "auto":
        return int(f)
    for candidate in range((world_size - 1) // 2, 0, -1):
        try:
            build_aggregator(rule, candidate, pre=pre).check(world_size)
            return candidate
        except ValueError:
            continue
    return 0
