"""Robust aggregation and training on 4 MPI ranks, torch.distributed initialised from the MPI rank."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from fedgspo import robust_all_reduce
from fedgspo.robust.aggregators import ShardContext, build_aggregator
from fedgspo.config import load_config
from fedgspo.distributed import all_gather_bytes
from fedgspo.train import run

pytestmark = pytest.mark.mpi(min_size=4)

RULES = [("mean", 1, {}), ("median", 1, {}), ("trimmed_mean", 1, {}), ("krum", 0, {}),
         ("geometric_median", 1, {"tol": 0.0, "max_iter": 6}),
         ("centered_clipping", 1, {"tau": 1.0, "iterations": 3})]


def _updates(n: int, d: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(d)
    return 0.5 * torch.randn(d, generator=g) + torch.randn(n, d, generator=g)


def test_process_group_comes_from_the_mpi_rank(dist_ctx):
    from mpi4py import MPI

    assert dist.get_rank() == MPI.COMM_WORLD.Get_rank() == dist_ctx.rank
    assert dist.get_world_size() == MPI.COMM_WORLD.Get_size() == dist_ctx.world_size
    assert dist.get_backend() == "gloo"


@pytest.mark.parametrize("mode", ["sharded", "replicated", "audited"])
@pytest.mark.parametrize("rule,f,options", RULES)
def test_every_mode_equals_the_single_process_rule(dist_ctx, mode, rule, f, options):
    n, d = dist_ctx.world_size, 1001
    stack = _updates(n, d)
    tensor = stack[dist_ctx.rank].clone()
    report = robust_all_reduce(tensor, rule, f, mode=mode, z_threshold=1e9, **options)
    expected = build_aggregator(rule, f, **options).aggregate(stack.double(), ShardContext(round=0)).float()
    assert not report.consensus_failed
    torch.testing.assert_close(tensor, expected, rtol=1e-5, atol=1e-6)
    assert len(set(all_gather_bytes(tensor.numpy().tobytes()))) == 1  # bit-identical on every rank


def test_a_nan_update_is_flagged_and_left_out(dist_ctx):
    n, d = dist_ctx.world_size, 257
    stack = _updates(n, d)
    tensor = stack[dist_ctx.rank].clone()
    if dist_ctx.rank == n - 1:
        tensor[3] = float("nan")
    report = robust_all_reduce(tensor, "trimmed_mean", 1)
    assert n - 1 in report.flagged and n - 1 in report.nonfinite
    assert torch.isfinite(tensor).all()


def test_wrong_f_raises_on_every_rank(dist_ctx):
    with pytest.raises(ValueError, match="f"):
        robust_all_reduce(torch.ones(8), "trimmed_mean", dist_ctx.world_size)


def test_a_short_training_run_ends_with_identical_weights(dist_ctx, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run") if dist_ctx.rank == 0 else None
    cfg = load_config(None, ["train.max_steps=4", "train.device=cpu", "run.progress_bar=false",
                             "run.tensorboard=false", "aggregation.rule=median",
                             f"run.dir={all_gather_bytes(str(run_dir).encode())[0].decode()}"])
    summary = run(cfg, dist_ctx)
    if dist_ctx.rank == 0:
        assert summary["world_size"] == dist_ctx.world_size
        assert len(set(summary["weights_sha256_per_rank"])) == 1
