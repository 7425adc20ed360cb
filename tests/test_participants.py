"""Reputation belongs to participants, not rank numbers: a restart that reorders ranks, or an
elastic resume with fewer ranks, keeps every participant's record."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dist_helpers import run_ranks, values
from fedgspo.robust.all_reduce import RobustReport
from fedgspo.robust.reputation import ReputationConfig, ReputationTracker


def _flag(tracker: ReputationTracker, ranks: list[int], steps: int) -> None:
    n = len(tracker.ranks)
    for _ in range(steps):
        tracker.update(RobustReport([0.0] * n, [0.0] * n, ranks))


def test_reordered_and_shrunk_worlds_keep_each_participants_record():
    cfg = ReputationConfig(quarantine_after=2)
    old = ReputationTracker(4, cfg, participants=["a", "b", "c", "d"])
    _flag(old, [3], 3)  # d is quarantined
    reordered = ReputationTracker(4, cfg, participants=["d", "a", "b", "c"])
    reordered.load_state_dict(old.state_dict())
    assert reordered.quarantined() == [0] and reordered.ranks[0].participant == "d"
    assert reordered.ranks[0].flags == 3 and [r.rank for r in reordered.ranks] == [0, 1, 2, 3]
    shrunk = ReputationTracker(3, cfg, participants=["a", "d", "e"])
    shrunk.load_state_dict(old.state_dict())
    assert shrunk.quarantined() == [1] and shrunk.ranks[2].flags == 0  # e is new: a fresh record
    with pytest.raises(ValueError):
        ReputationTracker(2, participants=["a", "a"])


def _train(rank: int, world_size: int, run_dir: str, ids: list[str], extra: list[str]) -> dict | None:
    os.environ["FEDGSPO_PARTICIPANT_ID"] = ids[rank]
    from fedgspo.config import load_config
    from fedgspo.distributed import DistContext
    from fedgspo.train import run

    import torch

    cfg = load_config(None, [f"run.dir={run_dir}", "run.progress_bar=false", "run.tensorboard=false",
                             "task.prompts_per_rank=2", "gspo.num_generations=4", "checkpoint.every=4",
                             "checkpoint.resume=auto", "aggregation.rule=median", *extra])
    return run(cfg, DistContext(rank, world_size, rank, world_size, torch.device("cpu")))


@pytest.mark.slow
def test_restart_with_reordered_ranks_and_elastic_resume_keep_reputation(tmp_path: Path) -> None:
    run_dir = str(tmp_path / "run")
    attack = ["attack={kind: gaussian, ranks: [3], strength: 100.0}", "aggregation.reputation.quarantine_after=2"]
    first = values(run_ranks(_train, 4, run_dir, ["a", "b", "c", "d"], ["train.max_steps=4", *attack], timeout=300))[0]
    assert first["reputation"][3]["participant"] == "d" and first["reputation"][3]["quarantined"]
    # Restart: the rendezvous hands d rank 0. Its record follows it; nobody attacks now.
    second = values(run_ranks(_train, 4, run_dir, ["d", "a", "b", "c"], ["train.max_steps=8"], timeout=300))[0]
    by_participant = {r["participant"]: r for r in second["reputation"]}
    assert second["reputation"][0]["participant"] == "d" and by_participant["d"]["flags"] >= 2
    assert all(by_participant[p]["flags"] == 0 for p in "abc")
    # Elastic resume with 3 of the 4 participants.
    third = values(run_ranks(_train, 3, run_dir, ["b", "d", "a"], ["train.max_steps=12"], timeout=300))[0]
    assert [r["participant"] for r in third["reputation"]] == ["b", "d", "a"]
    assert {r["participant"]: r for r in third["reputation"]}["d"]["flags"] == by_participant["d"]["flags"]
    starts = [json.loads(line) for line in (tmp_path / "run" / "audit.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "run_start"]
    assert [s["payload"]["participants"] for s in starts] == [list("abcd"), list("dabc"), list("bda")]
