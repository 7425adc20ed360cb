"""robust_all_reduce on 4 gloo ranks: every mode equals the single-process rule; errors never hang."""

from __future__ import annotations

import math

import pytest
import torch
from dist_helpers import run_ranks, values

from fedgspo import robust_all_reduce
from fedgspo.robust.aggregators import ShardContext, build_aggregator

WORLD = 4
MODES = ("sharded", "replicated", "audited")
# (rule, f, kwargs); f within the bounds for 4 ranks.
RULES = [
    ("mean", 1, {}),
    ("mean", 1, {"weights": [1.0, 2.0, 0.5, 1.0]}),
    ("median", 1, {}),
    ("trimmed_mean", 1, {}),
    ("krum", 0, {}),
    ("multi_krum", 0, {"m": 2}),
    ("geometric_median", 1, {"tol": 0.0, "max_iter": 6}),
    ("centered_clipping", 1, {"tau": 1.0, "iterations": 3}),
    ("trimmed_mean", 1, {"pre": ("nnm",)}),
    ("trimmed_mean", 1, {"pre": ("arc",)}),
    ("median", 0, {"pre": ("bucketing",), "bucket_size": 2}),
]
SIZES = (3, 1000, 1001)


def updates(d: int, spread: float = 3.0) -> torch.Tensor:
    """Shared signal plus per-rank noise; rank 1's update is ``spread`` times larger."""
    g = torch.Generator().manual_seed(d)
    x = 0.5 * torch.randn(d, generator=g) + torch.randn(WORLD, d, generator=g)
    x[1] *= spread
    return x


def _equivalence(rank: int, world: int) -> dict:
    out = {}
    for d in SIZES:
        x = updates(d)
        for mode in MODES:
            for i, (rule, f, kw) in enumerate(RULES):
                t = x[rank].clone()
                report = robust_all_reduce(t, rule, f, mode=mode, z_threshold=1e9, **kw)
                out[(d, mode, i)] = (t, report)
    return out


def _all_scenarios(rank: int, world: int) -> dict:
    """Every scenario in one set of processes (starting 4 ranks costs more than the scenarios)."""
    return {
        "equivalence": _equivalence(rank, world),  # first: bucketing's rounds start at 0
        "bad_inputs": _bad_inputs(rank, world),
        "detection": _detection(rank, world),
        "ddp": _ddp(rank, world),
        "half": _half(rank, world),
    }


@pytest.fixture(scope="module")
def scenarios() -> dict[str, list]:
    per_rank = values(run_ranks(_all_scenarios, WORLD, timeout=240))
    return {name: [r[name] for r in per_rank] for name in per_rank[0]}


def _reference(d: int, call: int, rule: str, f: int, kw: dict) -> torch.Tensor:
    options = {k: v for k, v in kw.items() if k != "weights"}
    agg = build_aggregator(rule, f, **options)
    weights = torch.tensor(kw["weights"], dtype=torch.float64) if "weights" in kw else None
    return agg.aggregate(updates(d).double(), ShardContext(round=call), weights).float()


@pytest.mark.slow
def test_every_mode_equals_the_single_process_rule(scenarios):
    results = scenarios["equivalence"]
    for key, (tensor, report) in results[0].items():
        d, mode, i = key
        rule, f, kw = RULES[i]
        call = SIZES.index(d) * len(MODES) + MODES.index(mode)  # the cached rule's round
        for other in results[1:]:  # bit-identical on every rank, same report
            assert torch.equal(other[key][0], tensor), key
            assert repr(other[key][1]) == repr(report), key
        assert not report.consensus_failed, (key, report.reason)
        expected = _reference(d, call, rule, f, kw)
        torch.testing.assert_close(tensor, expected, rtol=1e-5, atol=1e-5, msg=str(key))
        # skews: mean sign of x_i - a over the columns where the rows differ (against the
        # aggregate returned, whose values the comparisons see)
        x = updates(d)
        columns = (x != x[0]).any(0)
        signs = torch.sign(x - tensor)[:, columns].double()
        skews = signs.mean(1) if columns.any() else torch.zeros(WORLD, dtype=torch.float64)
        torch.testing.assert_close(torch.tensor(report.skews, dtype=torch.float64), skews, rtol=0, atol=1e-12,
                                   msg=str(key))


def _bad_inputs(rank: int, world: int) -> list:
    cases = {
        "numel": lambda: robust_all_reduce(torch.ones(10 + (rank == 3)), "median", 1),
        "dtype": lambda: robust_all_reduce(torch.ones(10, dtype=torch.float64 if rank == 2 else torch.float32)),
        "f_bound": lambda: robust_all_reduce(torch.ones(10), "median", 2),
        "krum_bound": lambda: robust_all_reduce(torch.ones(10), "krum", 1),
        "f_differs": lambda: robust_all_reduce(torch.ones(10), "median", 1 if rank else 0),
        "mode_differs": lambda: robust_all_reduce(torch.ones(10), mode="replicated" if rank == 1 else "sharded"),
        "unknown_rule_one_rank": lambda: robust_all_reduce(torch.ones(10), "bogus" if rank == 1 else "median", 1),
        "integer_dtype": lambda: robust_all_reduce(torch.ones(10, dtype=torch.int64)),
        "bad_weights": lambda: robust_all_reduce(torch.ones(10), weights=[1.0, -1.0, 1.0, 1.0]),
    }
    out = []
    for name, call in cases.items():
        try:
            call()
            out.append((name, None))
        except ValueError as err:
            out.append((name, str(err)))
    t = torch.full((10,), float(rank))
    robust_all_reduce(t, "median", 1)  # the group is still usable afterwards
    out.append(("after", t.tolist()))
    return out


@pytest.mark.slow
def test_bad_input_raises_on_every_rank_without_hanging(scenarios):
    results = scenarios["bad_inputs"]
    for per_rank in zip(*results):
        name = per_rank[0][0]
        if name == "after":
            assert all(value == [1.5] * 10 for _, value in per_rank)
            continue
        messages = [message for _, message in per_rank]
        assert all(m is not None for m in messages), (name, messages)
    by_name = dict(results[0])
    assert "disagree on numel" in by_name["numel"]
    assert "disagree on dtype" in by_name["dtype"]
    assert "2f < n" in by_name["f_bound"] and "n > 2f + 2" in by_name["krum_bound"]
    assert "disagree on f" in by_name["f_differs"]
    assert "rank(s) [1]" in by_name["unknown_rule_one_rank"]


def _detection(rank: int, world: int) -> dict:
    from fedgspo.robust.attacks import ProtocolAttack

    x = updates(500, spread=1.0)
    out = {}

    def run(name: str, corrupt, **kw) -> None:
        t = x[rank].clone()
        if corrupt is not None and rank in corrupt[0]:
            corrupt[1](t)
        report = robust_all_reduce(t, "trimmed_mean", 1, **kw)
        out[name] = (t, report)

    run("nan", ([2], lambda t: t.fill_(math.nan)))
    # A flipped update among noisy honest ones sits inside the default detection's honest
    # cosine spread (calibrated on real GSPO gradients); a stricter threshold finds it.
    run("sign_flip", ([3], lambda t: t.mul_(-1.0)), z_threshold=1.0)
    run("scaled_excluded", ([0], lambda t: t.mul_(500.0)), exclude_flagged=True)
    run("two_nan", ([0, 1], lambda t: t.fill_(math.inf)))
    run("exclude", None, exclude=[3])
    run("replicated_nan", ([2], lambda t: t.fill_(math.nan)), mode="replicated")
    # Rank 1 publishes a wrong aggregated shard (its audit copy stays honest).
    run("audited_liar", None, mode="audited", z_threshold=1e9,
        tamper=ProtocolAttack("lie_aggregate", 1.0) if rank == 1 else None)
    return out


@pytest.mark.slow
def test_detection_exclusion_and_consensus_failure(scenarios):
    results = scenarios["detection"]
    x = updates(500, spread=1.0)
    tm = build_aggregator("trimmed_mean", 1)
    for name in results[0]:
        assert all(repr(r[name][1]) == repr(results[0][name][1]) for r in results), name
        assert all(torch.equal(r[name][0], results[0][name][0]) for r in results), name
    t, rep = results[0]["nan"]
    assert rep.nonfinite == [2] and 2 in rep.flagged and 2 in rep.excluded and not rep.consensus_failed
    torch.testing.assert_close(t, tm(x[[0, 1, 3]]))
    assert results[0]["replicated_nan"][1].nonfinite == [2]
    torch.testing.assert_close(results[0]["replicated_nan"][0], tm(x[[0, 1, 3]]))
    t, rep = results[0]["sign_flip"]
    assert rep.flagged == [3] and rep.cosines[3] == min(rep.cosines) and rep.z_cosine[3] < -1.0
    t, rep = results[0]["scaled_excluded"]
    assert rep.flagged == [0] and rep.excluded == [0] and rep.weights[0] == 0.0
    torch.testing.assert_close(t, tm(x[[1, 2, 3]]))
    t, rep = results[0]["two_nan"]
    assert rep.consensus_failed and "too few" in rep.reason and torch.equal(t, torch.zeros_like(t))
    t, rep = results[0]["exclude"]
    assert rep.excluded == [3] and not rep.consensus_failed
    torch.testing.assert_close(t, tm(x[[0, 1, 2]]))
    t, rep = results[0]["audited_liar"]  # repaired by every rank, the liar flagged
    assert not rep.consensus_failed and rep.audit_mismatches == [1] and rep.flagged == [1]
    torch.testing.assert_close(t, tm(x))


def _ddp(rank: int, world: int) -> tuple:
    import copy

    from torch.nn.parallel import DistributedDataParallel

    from fedgspo.robust.ddp_hook import RobustHookState, robust_hook

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    local = copy.deepcopy(model)
    ddp = DistributedDataParallel(model, bucket_cap_mb=0.0005)
    state = RobustHookState(rule="median", f=1, z_threshold=1e9)
    ddp.register_comm_hook(state, robust_hook)
    inputs = torch.randn(5, 8, generator=torch.Generator().manual_seed(rank))
    ddp(inputs).square().sum().backward()
    local(inputs).square().sum().backward()
    flat = lambda m: torch.cat([p.grad.reshape(-1) for p in m.parameters()])  # noqa: E731
    return flat(model), flat(local), len(state.reports), state.consensus_failed


@pytest.mark.slow
def test_ddp_comm_hook_applies_the_rule_per_bucket(scenarios):
    results = scenarios["ddp"]
    local = torch.stack([r[1] for r in results])
    expected = build_aggregator("median", 1)(local)
    for robust_grad, _, buckets, failed in results:
        torch.testing.assert_close(robust_grad, expected)
        assert buckets >= 1 and not failed


HALF_RULES = (("trimmed_mean", 1, {}), ("krum", 0, {}), ("geometric_median", 1, {}))


def half_updates() -> torch.Tensor:
    """float16 updates of norm ~1300 (their squares overflow float16's 65504)."""
    return (40.0 * updates(1000, spread=1.0)).half()


def _half(rank: int, world: int) -> dict:
    out = {}
    for mode in MODES:
        for i, (rule, f, kw) in enumerate(HALF_RULES):
            t = half_updates()[rank].clone()
            out[(mode, i)] = (t, robust_all_reduce(t, rule, f, mode=mode, **kw))
    return out


@pytest.mark.slow
def test_half_precision_updates_of_large_norm_aggregate_like_float64(scenarios):
    x = half_updates()
    for (mode, i), (t, report) in scenarios["half"][0].items():
        rule, f, kw = HALF_RULES[i]
        expected = build_aggregator(rule, f, **kw)(x.double())
        assert t.dtype == torch.float16 and torch.isfinite(t).all(), (mode, rule)
        assert not report.flagged and not report.consensus_failed, (mode, rule, report.reason)
        assert all(math.isfinite(c) for c in report.cosines), (mode, rule)
        assert float((t.double() - expected).norm() / expected.norm()) < 2e-3, (mode, rule)
        assert all(torch.equal(r[(mode, i)][0], t) for r in scenarios["half"]), (mode, rule)  # every rank


def test_single_process_is_identity():
    t = torch.arange(5.0)
    report = robust_all_reduce(t, "median", 3)
    assert torch.equal(t, torch.arange(5.0))
    assert report.flagged == [] and not report.consensus_failed and report.world_size == 1
