"""A run survives losing a rank: torchrun restarts the group, training resumes from the newest
verified checkpoint, and the lineage records the resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fedgspo.checkpoint import list_checkpoints, read_manifest
from fedgspo.faults import FaultInjector, InjectedFault, parse_faults
from fedgspo.telemetry.metrics import read_metrics
from fedgspo.train import main

FAST = ["run.progress_bar=false", "task.prompts_per_rank=2", "gspo.num_generations=4"]


def test_fault_parsing_and_first_attempt_only():
    assert parse_faults("kill:1:25, raise:0:3") == [parse_faults("kill:1:25")[0], parse_faults("raise:0:3")[0]]
    with pytest.raises(ValueError, match="kind:rank:step"):
        parse_faults("kill:1")
    with pytest.raises(ValueError, match="unknown fault kind"):
        parse_faults("explode:0:1")
    FaultInjector(0, {"FEDGSPO_FAULT": "raise:0:3", "TORCHELASTIC_RESTART_COUNT": "1"}).check(3)
    with pytest.raises(InjectedFault):
        FaultInjector(0, {"FEDGSPO_FAULT": "raise:0:3"}).check(3)


def test_resume_auto_continues_and_links_lineage(tmp_path, monkeypatch):
    run = tmp_path / "run"
    args = [f"run.dir={run}", "train.max_steps=12", "checkpoint.every=4", "checkpoint.resume=auto", *FAST]
    monkeypatch.setenv("FEDGSPO_FAULT", "raise:0:10")
    with pytest.raises(InjectedFault):
        main(args)
    monkeypatch.delenv("FEDGSPO_FAULT")
    assert main(args) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_at"] == 8 and summary["steps"] == 12
    steps = [r["step"] for r in read_metrics(run)]
    assert sorted(set(steps)) == list(range(12)) and steps.count(8) == 2 and steps.count(9) == 2
    chain = {p.name: read_manifest(p)["parent"] for p in list_checkpoints(run)}
    assert chain["step_00000012"]["step"] == 8 and chain["step_00000008"]["step"] == 4


def test_corrupt_newest_checkpoint_falls_back(tmp_path):
    run = tmp_path / "run"
    args = [f"run.dir={run}", "checkpoint.every=4", "checkpoint.resume=auto", *FAST]
    assert main([*args, "train.max_steps=8"]) == 0
    newest = run / "checkpoints" / "step_00000008" / "model.safetensors"
    data = bytearray(newest.read_bytes())
    data[-1] ^= 0xFF
    newest.write_bytes(bytes(data))
    assert main([*args, "train.max_steps=10"]) == 0
    assert json.loads((run / "summary.json").read_text())["resumed_at"] == 4
    kinds = [json.loads(line)["kind"] for line in (run / "audit.jsonl").read_text().splitlines()]
    assert "checkpoint_skipped" in kinds and "resume" in kinds


@pytest.mark.slow
def test_sigkilled_rank_restarts_and_completes(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "FEDGSPO_FAULT": "kill:1:25"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--max-restarts=2", "-m", "fedgspo.train", f"run.dir={run}", "train.max_steps=40",
           "checkpoint.every=10", "checkpoint.resume=auto", *FAST]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 40 and summary["resumed_at"] == 20
    hashes = summary["weights_sha256_per_rank"]
    assert hashes[0] == hashes[1]
    steps = [r["step"] for r in read_metrics(run)]
    redone = len(steps) - len(set(steps))
    assert sorted(set(steps)) == list(range(40)) and 0 < redone <= 10
    assert subprocess.run([sys.executable, "-m", "fedgspo.cli.main", "verify", str(run)]).returncode == 0
    assert subprocess.run([sys.executable, "-m", "fedgspo.cli.main", "audit", "verify", str(run)]).returncode == 0
    chain = {p.name: read_manifest(p)["parent"] for p in list_checkpoints(run)}
    assert chain["step_00000030"]["step"] == 20
