"""End to end: the trainer in one process and under torchrun with 2 gloo ranks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fedgspo.telemetry.metrics import read_metrics
from fedgspo.robust.config import tolerated_f
from fedgspo.train import main

FAST = ["train.max_steps=6", "run.progress_bar=false", "run.log_every=3", "task.prompts_per_rank=2",
        "gspo.num_generations=4"]
REQUIRED = {"step", "reward_mean", "reward_std", "loss", "clip_frac", "completion_len", "step_time_s"}


def test_single_process_run_writes_run_directory(tmp_path):
    run = tmp_path / "run"
    assert main([f"run.dir={run}", *FAST]) == 0
    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(6))
    assert REQUIRED <= set(records[0])
    assert (run / "config.yaml").is_file()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "checkpoints" / "final" / "model.safetensors").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6


def test_existing_run_directory_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    assert main([f"run.dir={run}", *FAST]) == 0
    assert main([f"run.dir={run}", *FAST]) == 2
    assert "already holds a run" in capsys.readouterr().err


@pytest.mark.parametrize("override", ["train.max_steps=-1", "aggregation.rule=nope"])
def test_bad_override_exits_2_with_one_line(tmp_path, override):
    proc = subprocess.run([sys.executable, "-m", "fedgspo.train", f"run.dir={tmp_path / 'r'}", override],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fedgspo.train: error: ")
    assert override.split("=")[0] in lines[0]
    assert not (tmp_path / "r").exists()


def test_tolerated_f():
    assert tolerated_f("trimmed_mean", "auto", 2) == 0
    assert tolerated_f("trimmed_mean", "auto", 4) == 1
    assert tolerated_f("median", "auto", 5) == 2
    assert tolerated_f("median", 1, 5) == 1


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["trimmed_mean", "median"])
def test_two_ranks_end_with_identical_weights(tmp_path, rule):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "fedgspo.train", f"run.dir={run}", f"aggregation.rule={rule}", *FAST]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2
    hashes = summary["weights_sha256_per_rank"]
    assert len(hashes) == 2 and hashes[0] == hashes[1] == summary["weights_sha256"]
    assert len(read_metrics(run)) == 6


def test_registry_holds_the_run(tmp_path):
    from fedgspo.entities import (GSPOConfigEntity, GSPOTrainingRunEntity, ModelCheckpointEntity,
                                  ModelEntity, ReputationEntity)
    from fedgspo.entities.registry import EntityRegistry

    run = tmp_path / "run"
    assert main([f"run.dir={run}", *FAST]) == 0
    reg = EntityRegistry(run / "registry.sqlite")
    try:
        (run_entity,) = reg.query(GSPOTrainingRunEntity)
        assert run_entity.status == "completed" and run_entity.step == 6
        assert reg.get(run_entity.config_id).digest is not None
        model = reg.get(run_entity.policy_model_id)
        assert isinstance(model, ModelEntity) and model.weights_hash
        assert len(reg.query(GSPOConfigEntity)) == 1
        (ck,) = reg.query(ModelCheckpointEntity)
        assert ck.base_model_id == model.lineage_id and ck.step == 6
        (rep,) = reg.query(ReputationEntity)
        assert rep.rank == 0 and rep.clean_count == 6
        assert len(reg.history(run_entity.lineage_id)) == 1 + 6 + 1  # registered, 6 steps, completed
    finally:
        reg.close()
    events = [json.loads(line)["type"] for line in (run / "events.jsonl").read_text().splitlines()]
    assert events[0] == "TrainingStarted" and events.count("StepCompleted") == 6
    assert "CheckpointCreated" in events and events[-1] == "TrainingCompleted"


@pytest.mark.slow
def test_concurrent_runs_share_one_registry(tmp_path):
    from fedgspo.entities import GSPOTrainingRunEntity
    from fedgspo.entities.registry import EntityRegistry

    shared = tmp_path / "sweep.sqlite"
    procs = [subprocess.Popen([sys.executable, "-m", "fedgspo.train", f"run.dir={tmp_path / f'run{i}'}",
                               f"bookkeeping.registry_path={shared}", f"train.seed={i}",
                               *FAST[1:], "train.max_steps=12"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    reg = EntityRegistry(shared)
    try:
        runs = reg.query(GSPOTrainingRunEntity)
        assert sorted(r.name for r in runs) == ["run0", "run1"]
        for r in runs:  # every step's version of each run survived the other run's writes
            assert r.status == "completed" and r.step == 12
            assert [v.version for v in reg.history(r.lineage_id)] == list(range(14))
    finally:
        reg.close()


@pytest.mark.parametrize("override, message", [
    ("security.key_file={tmp}/missing.json", "missing.json"),
    ("checkpoint.resume={tmp}/no-such-checkpoint", "checkpoint.resume"),
])
def test_unusable_key_file_or_resume_path_is_one_line(tmp_path, override, message):
    proc = subprocess.run([sys.executable, "-m", "fedgspo.train", f"run.dir={tmp_path / 'r'}",
                           override.format(tmp=tmp_path), *FAST], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], proc.stderr


def test_kl_to_the_starting_policy_is_logged_when_beta_is_set(tmp_path):
    run = tmp_path / "run"
    assert main([f"run.dir={run}", "gspo.beta=0.04", *FAST]) == 0
    kls = [r["kl"] for r in read_metrics(run)]
    assert kls[0] == pytest.approx(0.0, abs=1e-6)  # the policy starts as the reference
    assert max(kls) > 0.0


@pytest.mark.slow
def test_readme_first_run_tolerates_a_byzantine_rank_and_logs_plainly(tmp_path):
    """The README's first command in small form: 4 ranks, defaults. Its summary has f >= 1, and
    with stderr going to a file there is no progress-bar frame in it."""
    run, log = tmp_path / "run", tmp_path / "run.log"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
           "-m", "fedgspo.train", f"run.dir={run}", "train.max_steps=8", "run.log_every=4"]
    with log.open("w") as err:
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=err, timeout=300)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["f"] >= 1 and summary["rule"] == "trimmed_mean(f=1)"
    assert "\r" not in text
    assert sum(line.startswith("step ") for line in text.splitlines()) == 2
