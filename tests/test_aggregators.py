"""Aggregation rules: numerics against independent float64 references, properties, bounds."""

from __future__ import annotations

import doctest
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedgspo.robust import aggregators as A
from fedgspo.robust.order_stats import order_statistic_mean, selection_network

# ---------------------------------------------------------------- references (float64, from the papers / ByzFL)


def ref_median(x: torch.Tensor) -> torch.Tensor:
    s = x.sort(0).values
    n = x.shape[0]
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def ref_trimmed(x: torch.Tensor, f: int) -> torch.Tensor:
    return x.sort(0).values[f : x.shape[0] - f].mean(0)


def ref_krum_scores(x: torch.Tensor, f: int) -> torch.Tensor:
    n = x.shape[0]
    d2 = torch.tensor([[float(((x[i] - x[j]) ** 2).sum()) for j in range(n)] for i in range(n)], dtype=torch.float64)
    return d2.sort(1).values[:, 1 : n - f].mean(1)


def ref_multi_krum(x: torch.Tensor, f: int, m: int) -> torch.Tensor:
    order = sorted(range(x.shape[0]), key=lambda i: (float(ref_krum_scores(x, f)[i]), i))
    return x[order[:m]].mean(0)


def ref_geomed(x: torch.Tensor, nu: float, T: int) -> torch.Tensor:
    z = torch.zeros_like(x[0])
    for _ in range(T):
        betas = (x - z).norm(dim=1).clamp_min(nu)
        betas = (1 / len(x) / betas)[:, None]
        z = (x * betas).sum(0) / betas.sum()
    return z


def ref_cc(x: torch.Tensor, tau: float, L: int) -> torch.Tensor:
    v = torch.zeros_like(x[0])
    for _ in range(L):
        diff = x - v
        clip = torch.minimum(torch.ones(len(x), dtype=x.dtype), tau / diff.norm(dim=1))
        v = v + (diff * clip[:, None]).mean(0)
    return v


def ref_nnm(x: torch.Tensor, f: int) -> torch.Tensor:
    n = x.shape[0]
    rows = []
    for i in range(n):
        order = sorted(range(n), key=lambda j: (float(((x[i] - x[j]) ** 2).sum()), j))
        rows.append(x[order[: n - f]].mean(0))
    return torch.stack(rows)


def ref_arc(x: torch.Tensor, f: int) -> torch.Tensor:
    """ByzFL's ARC: the int(2 f / n (n - f)) largest rows clipped to the largest norm left."""
    n = x.shape[0]
    norms = [float(row.norm()) for row in x]
    order = sorted(range(n), key=lambda i: norms[i])  # ascending
    k = int((2 * f / n) * (n - f))
    radius = norms[order[n - k - 1]]
    out = x.clone()
    for i in order[n - k:]:
        if norms[i] > radius:
            out[i] = x[i] * (radius / norms[i])
    return out


def random_stack(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------- one matrix over every rule


CASES = [
    ("mean", {}, lambda x, f: x.mean(0)),
    ("median", {}, lambda x, f: ref_median(x)),
    ("trimmed_mean", {}, ref_trimmed),
    ("krum", {}, lambda x, f: ref_multi_krum(x, f, 1)),
    ("multi_krum", {}, lambda x, f: ref_multi_krum(x, f, x.shape[0] - f)),
    ("multi_krum", {"m": 2}, lambda x, f: ref_multi_krum(x, f, 2)),
    ("geometric_median", {"eps": 0.1, "max_iter": 3, "tol": 0.0}, lambda x, f: ref_geomed(x, 0.1, 3)),
    ("geometric_median", {"eps": 1e-8, "max_iter": 50, "tol": 0.0}, lambda x, f: ref_geomed(x, 1e-8, 50)),
    ("centered_clipping", {"tau": 0.5, "iterations": 3}, lambda x, f: ref_cc(x, 0.5, 3)),
    ("centered_clipping", {}, lambda x, f: ref_cc(x, 100.0, 1)),
]


@pytest.mark.parametrize("rule,options,reference", CASES, ids=[f"{c[0]}{c[1]}" for c in CASES])
@pytest.mark.parametrize("n,f", [(5, 1), (7, 2), (8, 1), (9, 3)])
def test_rule_matches_reference(rule, options, reference, n, f):
    x = random_stack(n, 37, seed=n * 10 + f)
    x[0] += 20.0  # one far row
    agg = A.build_aggregator(rule, f, **options)
    if rule in ("krum", "multi_krum") and n <= 2 * f + 2:
        with pytest.raises(ValueError, match="n > 2f \\+ 2"):
            agg(x)
        return
    torch.testing.assert_close(agg(x), reference(x, f), rtol=1e-9, atol=1e-9)


def test_float32_matches_float64_reference():
    x = random_stack(6, 100, 0)
    for name in ("median", "trimmed_mean", "krum"):
        got = A.build_aggregator(name, 1)(x.float())
        ref = A.build_aggregator(name, 1)(x)
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


def test_nnm_matches_reference():
    x = random_stack(6, 11, 3)
    torch.testing.assert_close(A.NearestNeighborMixing(f=2)(x), ref_nnm(x, 2))


@pytest.mark.parametrize("n,f", [(3, 1), (4, 1), (5, 2), (8, 3), (9, 4), (6, 0)])
def test_arc_matches_reference(n, f):
    x = random_stack(n, 13, n * 7 + f)
    x[-1] *= 50.0  # one blown-up row
    torch.testing.assert_close(A.AdaptiveRobustClipping(f=f)(x), ref_arc(x, f), rtol=1e-12, atol=1e-12)


def test_arc_reproduces_byzfl_example():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    expected = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [4.41004009, 5.04004582, 5.67005155]])
    torch.testing.assert_close(A.AdaptiveRobustClipping(f=1)(x), expected)


def test_bucketing_averages_buckets_of_its_permutation():
    x = random_stack(7, 5, 4)
    b = A.Bucketing(s=3, seed=5)
    perm = b.permutation(7, round=2)
    expected = torch.stack([x[perm[i : i + 3]].mean(0) for i in range(0, 7, 3)])
    torch.testing.assert_close(b(x, round=2), expected)
    assert b(x, round=2).shape == (3, 5)


def test_pipeline_applies_steps_then_rule():
    x = random_stack(7, 9, 6)
    agg = A.build_aggregator("trimmed_mean", 1, pre=["nnm"])
    torch.testing.assert_close(agg(x), ref_trimmed(ref_nnm(x, 1), 1))
    assert agg.spec() == "nnm(f=1)+trimmed_mean(f=1)"


def test_weighted_rules():
    x = random_stack(4, 3, 7)
    w = torch.tensor([1.0, 2.0, 0.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(A.Mean()(x, weights=w), (w[:, None] * x).sum(0) / w.sum())
    # A weight-0 row does not move the weighted geometric median.
    gm = A.GeometricMedian(eps=1e-9, max_iter=30, tol=0.0)
    torch.testing.assert_close(gm(x, weights=w), gm(x[[0, 1, 1, 3]]), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- bounds and registry


@pytest.mark.parametrize(
    "rule,f,n,message",
    [("median", 2, 4, "2f < n"), ("trimmed_mean", 1, 2, "2f < n"), ("krum", 1, 4, "n > 2f \\+ 2"),
     ("multi_krum", 2, 6, "n > 2f \\+ 2"), ("geometric_median", 3, 6, "2f < n")],
)
def test_refuses_bounds_it_cannot_tolerate(rule, f, n, message):
    with pytest.raises(ValueError, match=message):
        A.build_aggregator(rule, f)(torch.zeros(n, 3))


@pytest.mark.parametrize(
    "build", [lambda: A.TrimmedMean(-1), lambda: A.MultiKrum(1, m=0), lambda: A.GeometricMedian(eps=0),
              lambda: A.CenteredClipping(tau=-1.0), lambda: A.CenteredClipping(iterations=0), lambda: A.Bucketing(s=0),
              lambda: A.build_aggregator("median", 1, bogus=3)]
)
def test_invalid_parameters_raise(build):
    with pytest.raises(ValueError):
        build()


def test_unknown_names_list_known_ones():
    with pytest.raises(ValueError, match="known: centered_clipping, geometric_median, krum"):
        A.build_aggregator("average")
    with pytest.raises(ValueError, match="known: arc, bucketing, nnm"):
        A.build_aggregator("median", 1, pre=["mix"])


def test_bad_stacks_raise():
    with pytest.raises(ValueError, match="non-empty"):
        A.Mean()(torch.zeros(3))
    with pytest.raises(ValueError, match="floating"):
        A.Mean()(torch.zeros(2, 3, dtype=torch.int64))


def test_docstring_examples_run():
    result = doctest.testmod(A, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 5 and result.failed == 0


# ---------------------------------------------------------------- sorting networks


@pytest.mark.parametrize("n", range(1, 11))
def test_selection_network_gives_every_order_statistic_range(n):
    x = torch.randn(n, 64, generator=torch.Generator().manual_seed(n))
    x[:, :8] = x[0, :8].clone()  # ties
    for lo, hi in itertools.combinations(range(n + 1), 2):
        torch.testing.assert_close(order_statistic_mean(x, lo, hi, compiled=False), x.sort(0).values[lo:hi].mean(0))


def test_pruning_drops_unneeded_comparators():
    assert len(selection_network(8, 0, 8)) > len(selection_network(8, 3, 5))
    with pytest.raises(ValueError):
        selection_network(4, 2, 2)


@pytest.mark.slow
def test_compiled_kernel_equals_eager():
    x = torch.randn(5, 1000, generator=torch.Generator().manual_seed(0))
    eager = order_statistic_mean(x, 1, 4, compiled=False)
    torch.testing.assert_close(order_statistic_mean(x, 1, 4, compiled=True), eager, rtol=0, atol=0)


# ---------------------------------------------------------------- properties

rows = st.integers(min_value=3, max_value=9)
seeds = st.integers(min_value=0, max_value=2**31 - 1)
PERMUTATION_INVARIANT = ["mean", "median", "trimmed_mean", "multi_krum", "geometric_median", "centered_clipping"]
TRANSLATION_EQUIVARIANT = ["mean", "median", "trimmed_mean", "krum", "multi_krum"]


def _f_for(rule: str, n: int) -> int:
    return max(0, (n - 3) // 2) if "krum" in rule else (n - 1) // 2


@settings(max_examples=40, deadline=None)
@given(n=rows, seed=seeds, rule=st.sampled_from(PERMUTATION_INVARIANT))
def test_permutation_invariance(n, seed, rule):
    x = random_stack(n, 6, seed)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    agg = A.build_aggregator(rule, _f_for(rule, n))
    torch.testing.assert_close(agg(x[perm]), agg(x), rtol=1e-9, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(n=rows, seed=seeds, rule=st.sampled_from(TRANSLATION_EQUIVARIANT), shift=st.floats(-100, 100))
def test_translation_equivariance(n, seed, rule, shift):
    x = random_stack(n, 6, seed)
    c = torch.full((6,), shift, dtype=torch.float64)
    agg = A.build_aggregator(rule, _f_for(rule, n))
    torch.testing.assert_close(agg(x + c), agg(x) + c, rtol=1e-9, atol=1e-8)


@settings(max_examples=60, deadline=None)
@given(
    n=rows,
    seed=seeds,
    rule=st.sampled_from(["median", "trimmed_mean"]),
    byzantine=st.lists(st.floats(min_value=-1e30, max_value=1e30), min_size=6, max_size=6),
)
def test_coordinate_rules_stay_in_the_honest_range(n, seed, rule, byzantine):
    f = (n - 1) // 2
    x = random_stack(n, 6, seed)
    x[:f] = torch.tensor(byzantine, dtype=torch.float64)  # f arbitrary rows, identical (colluding)
    honest = x[f:]
    out = A.build_aggregator(rule, f)(x)
    assert bool((out >= honest.min(0).values - 1e-12).all() and (out <= honest.max(0).values + 1e-12).all())


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 12), seed=seeds, dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]))
def test_trimmed_mean_at_the_largest_f_is_the_coordinate_median(n, seed, dtype):
    """``f: auto`` gives the trimmed mean ``(n - 1) // 2``: the same sorted positions as the median,
    so the two rules return the same bits (and the benchmarks' default rows are the median's)."""
    x = random_stack(n, 7, seed).to(dtype)
    f = (n - 1) // 2
    median = A.build_aggregator("median", f)(x)
    assert torch.equal(A.build_aggregator("trimmed_mean", f)(x), median)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(median.double(), ref_median(x.double()), rtol=tol, atol=tol)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(5, 10), seed=seeds, offset=st.floats(50, 1e6))
def test_krum_picks_an_honest_row(n, seed, offset):
    f = (n - 3) // 2  # largest f with n > 2f + 2
    x = random_stack(n, 6, seed).clamp(-3, 3)
    x[:f] = random_stack(f, 6, seed + 1) + offset  # Byzantine rows far away
    out = A.Krum(f)(x)
    assert any(torch.equal(out, x[i]) for i in range(f, n))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 10), seed=seeds, data=st.data(), scales=st.lists(st.floats(0, 1e6), min_size=10, max_size=10))
def test_arc_clips_only_the_k_largest_rows_to_the_next_norm(n, seed, data, scales):
    f = data.draw(st.integers(0, n - 1))
    x = random_stack(n, 5, seed) * torch.tensor(scales[:n], dtype=torch.float64)[:, None]
    arc = A.AdaptiveRobustClipping(f)
    out = arc(x)
    norms = x.norm(dim=1)
    k = arc.clipped(n)
    assert k <= n // 2 and (k == 0) == (f == 0)
    radius = norms.sort(descending=True).values[k]
    assert bool((out.norm(dim=1) <= radius * (1 + 1e-12)).all())
    changed = [i for i in range(n) if not torch.equal(out[i], x[i])]
    assert len(changed) <= k and all(norms[i] > radius for i in changed)
    for i in changed:  # same direction, shorter
        torch.testing.assert_close(out[i] * norms[i], x[i] * radius, rtol=1e-9, atol=1e-9)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(arc(x[perm]), out[perm], rtol=0, atol=0)


def test_arc_bounds_a_blown_up_row_in_the_mean():
    x = random_stack(5, 8, 11)
    x[4] = 1e6 * x[4]
    honest_max = float(x[:4].norm(dim=1).max())
    assert float(A.build_aggregator("mean", 1, pre=["arc"])(x).norm()) <= honest_max
    with pytest.raises(ValueError, match="arc cannot tolerate f=5 of n=5"):
        A.build_aggregator("mean", 5, pre=["arc"])(x)


# ---------------------------------------------------------------- configuration


def test_aggregation_config_builds_all_reduce_arguments():
    from pydantic import ValidationError

    from fedgspo.robust.config import AggregationConfig, tolerated_f

    cfg = AggregationConfig(rule="median", f=1, pre=["bucketing"], bucket_size=3, options={"seed": 4})
    assert cfg.all_reduce_kwargs() == {"mode": "sharded", "z_threshold": cfg.z_threshold,
                                       "skew_bound": cfg.skew_bound, "exclude_flagged": False}
    assert cfg.build(world_size=5).spec() == "bucketing(s=3,seed=4)+median(f=1)"
    assert cfg.build(world_size=5, rule="trimmed_mean").spec() == "bucketing(s=3,seed=4)+trimmed_mean(f=1)"
    assert AggregationConfig(rule="median").build(world_size=5).f == tolerated_f("median", "auto", 5) == 2
    for bad in ({"rule": "average"}, {"options": {"taux": 1.0}}, {"mode": "fast"}, {"unknown": 1}):
        with pytest.raises(ValidationError):
            AggregationConfig(**bad)


def test_auto_rule_is_the_trimmed_mean_below_eight_participants_and_the_geometric_median_from_eight():
    from pydantic import ValidationError

    from fedgspo.robust.config import AUTO_GEOMETRIC_MEDIAN_FROM, AggregationConfig

    cfg = AggregationConfig()
    assert cfg.rule == "auto" and AUTO_GEOMETRIC_MEDIAN_FROM == 8
    assert [cfg.rule_for(n) for n in (2, 4, 7, 8, 16)] == ["trimmed_mean"] * 3 + ["geometric_median"] * 2
    assert cfg.build(world_size=4).spec() == "trimmed_mean(f=1)"
    assert cfg.build(world_size=8).spec().startswith("geometric_median(f=3,")
    assert cfg.build(world_size=8, rule="median").spec() == "median(f=3)"  # a hot swap names its rule
    assert AggregationConfig(rule="trimmed_mean").build(world_size=8).spec() == "trimmed_mean(f=3)"
    with pytest.raises(ValidationError, match="need a named rule"):
        AggregationConfig(options={"tau": 1.0})
    assert AggregationConfig(pre=["arc"]).build(world_size=8).spec().startswith("arc(f=3)+geometric_median(f=3,")


def test_arc_on_half_precision_rows_clips_like_float64():
    x = random_stack(5, 64, 12)
    x[4] = 15000.0  # every entry fits float16 (max 65504), its norm (120000) does not
    for dtype in (torch.float16, torch.bfloat16):
        got = A.AdaptiveRobustClipping(f=1)(x.to(dtype)).double()
        torch.testing.assert_close(got, ref_arc(x.to(dtype).double(), 1), rtol=2e-2, atol=2e-2)
