"""Federated training: sites, the outer optimizer, compression of the cross-site exchange, and
whole runs of 2 sites x 2 ranks (and uneven sites) on gloo."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dist_helpers import run_ranks, train_ranks, values
from fedgspo.federation.config import FederatedConfig
from fedgspo.federation.outer import OuterOptimizer
from fedgspo.federation.sites import SiteError, SiteLayout
from fedgspo.robust import robust_all_reduce
from fedgspo.robust.compression import INT8_CHUNK, ErrorFeedback, decode_int8, encode_int8, round_trip
from fedgspo.robust.shard_exchange import Layout, sent_bytes
from fedgspo.telemetry.metrics import read_metrics

FAST = ["run.progress_bar=false", "run.log_every=100", "task.prompts_per_rank=2", "gspo.num_generations=4"]


# -- sites ---------------------------------------------------------------------------------------

def test_sites_from_size_list_and_auto():
    cfg = FederatedConfig(site_size=2)
    assert SiteLayout.from_config(cfg, 4, 4).sites == ((0, 1), (2, 3))
    explicit = SiteLayout.from_config(FederatedConfig(sites=[[3], [2, 0], [1]]), 4, 4)
    assert explicit.sites == ((0, 2), (1,), (3,)) and explicit.leaders == [0, 1, 3] and explicit.site_of(2) == 0
    # auto: one site per node when the job spans nodes, every rank its own site on one node
    assert SiteLayout.from_config(FederatedConfig(), 8, 4).sites == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert SiteLayout.from_config(FederatedConfig(), 4, 4).trivial


@pytest.mark.parametrize("cfg", [FederatedConfig(site_size=3), FederatedConfig(sites=[[0, 1], [1, 2, 3]]),
                                 FederatedConfig(sites=[[0, 1], [2]])])
def test_sites_that_do_not_partition_the_ranks_are_refused(cfg):
    with pytest.raises(SiteError):
        SiteLayout.from_config(cfg, 4, 4)


def test_config_refuses_error_feedback_without_compression():
    with pytest.raises(ValueError, match="error_feedback"):
        FederatedConfig(error_feedback=True)


# -- compression ---------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3 * INT8_CHUNK + 5), st.floats(1e-6, 1e6), st.integers(0, 2**31 - 1))
def test_int8_round_trip_error_is_at_most_half_a_step(numel, scale, seed):
    x = torch.randn(numel, generator=torch.Generator().manual_seed(seed)) * scale
    y = decode_int8(encode_int8(x), numel)
    chunks = math.ceil(numel / INT8_CHUNK)
    padded = torch.zeros(chunks * INT8_CHUNK)
    padded[:numel] = x
    step = (padded.view(chunks, -1).abs().amax(1) / 127).repeat_interleave(INT8_CHUNK)[:numel]
    assert torch.all((x - y).abs() <= step / 2 * (1 + 1e-5) + 1e-30)
    assert encode_int8(x).numel() == numel + 4 * chunks


def test_hostile_int8_payload_decodes_finite_and_bounded():
    payload = encode_int8(torch.randn(600))
    scales = payload[:12].view(torch.float32)
    scales[0], scales[1], scales[2] = float("nan"), float("-inf"), -3.0
    decoded = decode_int8(payload, 600)
    assert torch.isfinite(decoded).all() and decoded[: 3 * INT8_CHUNK].abs().max() == 0
    with pytest.raises(ValueError, match="payload"):
        decode_int8(payload[:-1], 600)


def test_error_feedback_loses_nothing_in_the_long_run():
    updates = [torch.randn(1000, generator=torch.Generator().manual_seed(i)) * 1e-3 for i in range(20)]
    feedback = ErrorFeedback("int8", 1000)
    sent = [round_trip("int8", feedback.compensate(u)) for u in updates]
    # what arrived plus what is still carried equals what was meant, up to float32 rounding
    assert torch.allclose(sum(sent) + feedback.residual, sum(updates), atol=1e-6)


def test_sent_bytes_of_the_layouts():
    n, d = 4, 10_000
    small = (n - 1) * (7 + 3 * n + 2) * 8  # metadata row, statistics (3n + 2)
    assert sent_bytes(Layout("sharded", d, torch.float32), n) == 2 * (n - 1) * 2500 * 4 + small
    assert sent_bytes(Layout("sharded", d, torch.bfloat16), n) == 2 * (n - 1) * 2500 * 2 + small
    assert sent_bytes(Layout("replicated", d, torch.float32, "int8"), n) == (n - 1) * (d + 4 * 40) + small
    assert sent_bytes(Layout("sharded", d, torch.float32, "int8"), n) == 2 * (n - 1) * (2500 + 4 * 10) + small
    assert sent_bytes(Layout("sharded", d, torch.float32), 1) == 0


def _compressed_reduce(rank: int, world: int, codec: str, mode: str) -> tuple[list[float], list[float]]:
    torch.manual_seed(100 + rank)
    x = torch.randn(1000) + (30.0 if rank == 3 else 0.0)
    report = robust_all_reduce(x, "median", f=1, mode=mode, compression=codec)
    return x.tolist(), report.flagged


@pytest.mark.slow
@pytest.mark.parametrize(("codec", "mode"), [("int8", "replicated"), ("int8", "sharded"), ("bf16", "sharded")])
def test_compressed_robust_all_reduce_runs_the_rule_on_decoded_updates(codec, mode):
    results = values(run_ranks(_compressed_reduce, 4, codec, mode))
    rows = []
    for r in range(4):
        torch.manual_seed(100 + r)
        rows.append(torch.randn(1000) + (30.0 if r == 3 else 0.0))
    # numpy's median of the decoded updates (the mean of the two middle values for n = 4);
    # sharded int8 encodes each rank's 4 shards on their own and sends the median's shards as int8
    def shardwise(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([round_trip("int8", part) for part in x.view(4, -1)])

    if codec == "int8" and mode == "sharded":
        decoded, atol = torch.stack([shardwise(row) for row in rows]), 1e-6
    elif codec == "int8":
        decoded, atol = torch.stack([round_trip("int8", row) for row in rows]), 1e-6
    else:
        decoded, atol = torch.stack([row.to(torch.bfloat16) for row in rows]).float(), 2e-2
    expected = torch.from_numpy(np.median(decoded.numpy(), axis=0))
    if codec == "int8" and mode == "sharded":
        expected = shardwise(expected)
    for result, flagged in results:
        assert torch.allclose(torch.tensor(result), expected, atol=atol)
        assert flagged == [3]
    assert results[0][0] == results[1][0] == results[2][0] == results[3][0]


def test_int8_is_refused_in_the_audited_exchange():
    with pytest.raises(ValueError, match="audited"):
        robust_all_reduce(torch.zeros(4), "median", mode="audited", compression="int8")


# -- the outer optimizer -------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [FederatedConfig(local_steps=4, outer_optimizer="nesterov"),
                                 FederatedConfig(local_steps=4, outer_optimizer="nesterov", outer_lr=0.3),
                                 FederatedConfig(local_steps=4)])
def test_outer_step_matches_torch_sgd(cfg):
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    reference = [torch.nn.Parameter(p.detach().clone()) for p in params]
    sgd = torch.optim.SGD(reference, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    outer = OuterOptimizer(cfg, params)
    for round_ in range(3):
        with torch.no_grad():  # local training moves the weights away from the round's start
            for p in params:
                p.add_(torch.randn_like(p) * 0.1)
        delta = outer.pseudo_gradient()
        offset = 0
        for p in reference:
            p.grad = delta[offset:offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        sgd.step()
        outer.step(delta)
        for p, q in zip(params, reference):
            assert torch.allclose(p, q, atol=1e-6), round_


# -- whole runs ----------------------------------------------------------------------------------

def _launch(run, nproc: int, *overrides: str, env: dict | None = None, restarts: int = 0):
    """A run of ``nproc`` ranks (torchrun when it restarts failed ranks, else forked ranks)."""
    args = [f"run.dir={run}", *FAST, *overrides]
    if restarts:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               f"--max-restarts={restarts}", "-m", "fedgspo.train", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})
    else:
        proc = train_ranks(args, nproc, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((run / "summary.json").read_text()), read_metrics(run)


@pytest.mark.slow
def test_two_sites_of_two_ranks_with_local_steps_and_int8(tmp_path):
    summary, records = _launch(tmp_path / "r", 4, "federated.site_size=2", "federated.local_steps=4",
                               "federated.compression=int8", "federated.error_feedback=true",
                               "train.max_steps=8", "aggregation.rule=mean")
    hashes = summary["weights_sha256_per_rank"]
    assert len(set(hashes)) == 1 and hashes[0] == summary["weights_sha256"]
    rounds = [r for r in records if "round" in r]
    assert [r["step"] for r in rounds] == [3, 7] and [r["round"] for r in rounds] == [0, 1]
    assert all(r["comm_bytes"] > 0 for r in rounds)
    assert all(r["comm_bytes"] == 0 and r["comm_bytes_intra"] > 0 for r in records if "round" not in r)
    assert all(len(r["rank_trust"]) == 2 for r in records)  # two participants: the sites


@pytest.mark.slow
def test_local_steps_resume_mid_round_reproduces_the_uninterrupted_run(tmp_path):
    common = ["federated.site_size=2", "federated.local_steps=4", "federated.compression=int8",
              "federated.error_feedback=true", "train.max_steps=8", "checkpoint.every=2",
              "checkpoint.resume=auto", "aggregation.rule=mean"]
    clean, _ = _launch(tmp_path / "clean", 4, *common)
    resumed, _ = _launch(tmp_path / "killed", 4, *common, env={"FEDGSPO_FAULT": "kill:1:7"}, restarts=1)
    assert resumed["resumed_at"] == 6  # two steps into the round of steps 4..7
    assert resumed["weights_sha256"] == clean["weights_sha256"]
    assert (tmp_path / "killed" / "sites" / "site1" / "step_00000006" / "manifest.json").is_file()


@pytest.mark.slow
def test_a_bad_site_is_flagged_and_quarantined(tmp_path):
    # three sites of unequal size; site 2 (rank 3) sends noise as its pseudo-gradient. Once it is
    # quarantined the two others are too few for f = 1: the median goes on with f = 0.
    summary, records = _launch(
        tmp_path / "r", 4, "federated.sites=[[0,1],[2],[3]]", "federated.local_steps=2", "train.max_steps=10",
        "aggregation.rule=median", "attack.kind=gaussian", "attack.ranks=[2]", "attack.strength=1.0",
        "aggregation.reputation.quarantine_after=2")
    rounds = [r for r in records if "round" in r]
    assert [r["flagged"] for r in rounds[:2]] == [[2], [2]]  # flagged until quarantined, then left out
    assert all(r["quarantined"] == [2] and not r["consensus_failed"] for r in rounds[1:])
    assert all(r["flagged"] in ([], [2]) for r in rounds)
    assert len(set(summary["weights_sha256_per_rank"])) == 1


@pytest.mark.slow
def test_one_site_per_rank_and_one_step_is_the_per_rank_trainer(tmp_path):
    base = ["train.max_steps=6", "aggregation.rule=median", "attack.kind=sign_flip", "attack.ranks=[2]"]
    default, _ = _launch(tmp_path / "default", 3, *base)
    explicit, records = _launch(tmp_path / "explicit", 3, *base, "federated.sites=[[0],[1],[2]]",
                                "federated.local_steps=1")
    assert explicit["weights_sha256"] == default["weights_sha256"]
    assert all("round" not in r and r["comm_bytes_intra"] == 0 for r in records)


def test_local_steps_in_one_process_close_a_round_at_the_last_step(tmp_path):
    from fedgspo.train import main

    run = tmp_path / "r"
    assert main([f"run.dir={run}", *FAST, "train.max_steps=6", "federated.local_steps=4"]) == 0
    records = read_metrics(run)
    assert [(r["step"], r["round"]) for r in records if "round" in r] == [(3, 0), (5, 1)]
    assert all(r["comm_bytes"] == 0 for r in records)  # one site: nothing crosses
