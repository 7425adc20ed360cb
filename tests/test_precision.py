"""Half-precision rows: norms and products widened (fedgspo.robust.precision), so rules and the
detection statistics of float16/bfloat16 updates match float64 instead of overflowing."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedgspo.robust import aggregators as A
from fedgspo.robust import precision
from fedgspo.robust.detection import detect, statistics_from_partial
from fedgspo.robust.shard_exchange import partial_stats

HALF = (torch.float16, torch.bfloat16)
#: Relative error of one half-precision rounding of the inputs (float16 / bfloat16 mantissas).
INPUT_ROUNDING = {torch.float16: 1e-3, torch.bfloat16: 8e-3}


def large_rows(n: int = 7, d: int = 4096, seed: int = 0) -> torch.Tensor:
    """Honest rows of norm ~450 (above float16's sqrt(65504) = 256) and one flipped, 3x row."""
    gen = torch.Generator().manual_seed(seed)
    x = 5 * torch.randn(n, d, generator=gen) + 5 * torch.randn(d, generator=gen)
    x[-1] *= -3
    return x


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 5), m=st.integers(1, 4), d=st.integers(1, 300), chunk=st.integers(1, 64),
       scale=st.sampled_from([1e-3, 1.0, 300.0]), seed=st.integers(0, 2**16))
def test_products_of_half_rows_equal_float64_products_of_the_same_values(n, m, d, chunk, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    rows, other = scale * torch.randn(n, d, generator=gen), scale * torch.randn(d, m, generator=gen)
    original = precision.CHUNK_ELEMENTS
    precision.CHUNK_ELEMENTS = chunk  # many chunks, ragged last one
    try:
        for dtype in HALF:
            r, o = rows.to(dtype), other.to(dtype)
            ref = r.double() @ o.double()
            got = precision.products(r, o)
            assert got.dtype == torch.float64 and torch.isfinite(got).all()
            bound = 1e-6 * (r.double().abs() @ o.double().abs()) + 1e-30
            assert ((got - ref).abs() <= bound).all()
            vec = precision.products(r[0], o[:, 0])
            assert vec.shape == () and abs(float(vec) - float(ref[0, 0])) <= float(bound[0, 0])
    finally:
        precision.CHUNK_ELEMENTS = original


def test_float32_products_and_norms_are_the_plain_ones():
    x = large_rows()
    assert torch.equal(precision.products(x, x[0]), (x @ x[0]).double())
    assert torch.equal(precision.products(x[0], x[0]), torch.dot(x[0], x[0]).double())
    assert torch.equal(precision.row_sq_norms(x), torch.linalg.vector_norm(x, dim=1).double().square())


def test_row_norms_of_float16_rows_above_its_range_stay_finite():
    x = torch.full((3, 64), 15000.0)  # every entry fits float16, each norm (120000) does not
    got = precision.row_sq_norms(x.half())
    torch.testing.assert_close(got, torch.full((3,), 64 * 15000.0**2, dtype=torch.float64), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("rule", ["krum", "geometric_median", "centered_clipping", "nnm"])
def test_distance_based_rules_on_large_half_rows_match_float64(rule, dtype):
    x = large_rows()
    agg = (A.build_aggregator("trimmed_mean", 1, pre=["nnm"]) if rule == "nnm"
           else A.build_aggregator(rule, 1, **({"tau": 10.0} if rule == "centered_clipping" else {})))
    got = agg(x.to(dtype)).double()
    ref = agg(x.to(dtype).double())
    assert torch.isfinite(got).all()
    assert float((got - ref).norm() / ref.norm()) < INPUT_ROUNDING[dtype]


@pytest.mark.parametrize("dtype", HALF)
def test_detection_statistics_of_large_half_rows_flag_only_the_outlier(dtype):
    x = large_rows()
    keep = list(range(6))
    agg = x[:6].median(0).values
    ref = statistics_from_partial(partial_stats(x.to(dtype).double(), agg.to(dtype).double(), keep))
    got = statistics_from_partial(partial_stats(x.to(dtype), agg.to(dtype), keep))
    torch.testing.assert_close(torch.tensor(got.cosines), torch.tensor(ref.cosines), rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.tensor(got.norms), torch.tensor(ref.norms), rtol=1e-6, atol=0)
    assert detect(got).flagged == [6]
