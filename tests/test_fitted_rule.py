"""A quarantine that leaves too few participants for the rule's f: the rule is fitted to those
left, never below f minus those left out."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from fedgspo.robust.aggregators import build_aggregator
from fedgspo.robust.config import AggregationConfig

RULES = ["median", "trimmed_mean", "krum", "geometric_median", "centered_clipping", "mean"]


@settings(max_examples=80, deadline=None)
@given(st.sampled_from(RULES), st.integers(3, 12), st.data())
def test_fitted_rule_aggregates_the_usable_and_keeps_the_bound(rule, n, data):
    cfg = AggregationConfig(rule=rule)
    agg = cfg.build(n)
    left_out = data.draw(st.integers(0, n - 1))
    usable = n - left_out
    fitted = cfg.fitted(agg, rule, usable)
    if fitted is not agg:
        assert fitted.f >= agg.f - left_out
        fitted.check(usable)  # the fitted rule can run on those left
        assert fitted.f < agg.f
    elif not fits(agg, usable):  # nothing fits (Krum needs 3 rows even at f = 0)
        assert not any(fits(build_aggregator(rule, f), usable) for f in range(agg.f))


def fits(agg, rows: int) -> bool:
    try:
        agg.check(rows)
    except ValueError:
        return False
    return True


def test_three_sites_one_quarantined_fall_back_to_no_tolerance():
    cfg = AggregationConfig(rule="median")
    agg = cfg.build(3)
    assert agg.f == 1 and cfg.fitted(agg, "median", 3) is agg
    assert cfg.fitted(agg, "median", 2).f == 0
