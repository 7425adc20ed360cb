"""launch/slurm.sbatch under a real SLURM (one node, CPU ranks): a job completes, and a job
signalled before its time limit checkpoints, requeues itself and finishes from its checkpoint.

Needs a running slurmctld/slurmd whose node is idle (CI starts one with ``.ci/slurm-up``);
skipped otherwise.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _slurm_up() -> bool:
    if shutil.which("sbatch") is None:
        return False
    out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True)
    return out.returncode == 0 and any(s in out.stdout for s in ("idle", "mix"))


pytestmark = [pytest.mark.slow, pytest.mark.slurm,
              pytest.mark.skipif(not _slurm_up(), reason="no SLURM with an idle node here")]

FAST = ["run.progress_bar=false", "run.log_every=1000", "task.prompts_per_rank=2", "gspo.num_generations=4",
        "gspo.num_iterations=1", "checkpoint.every=1000"]


def submit(tmp_path: Path, args: list[str]) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "GPUS_PER_NODE": "0", "NPROC_PER_NODE": "2"}
    out = subprocess.run(["sbatch", "--parsable", "--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2",
                          f"--output={tmp_path}/slurm-%j.out", f"--chdir={REPO}", "--job-name=fedgspo-test",
                          str(REPO / "launch" / "slurm.sbatch"), *args],
                         env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip().split(";")[0]


def job_state(job: str) -> tuple[str, int]:
    """(JobState, Restarts) from scontrol; ("GONE", 0) once SLURM forgot the job."""
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    state = re.search(r"JobState=(\w+)", out)
    restarts = re.search(r"Restarts=(\d+)", out)
    return (state.group(1) if state else "GONE", int(restarts.group(1)) if restarts else 0)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def test_job_completes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    job = submit(tmp_path, [f"run.dir={run}", "train.max_steps=10", *FAST])
    wait_for(lambda: job_state(job)[0] in ("COMPLETED", "FAILED", "CANCELLED", "GONE"), 300, "the job")
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert job_state(job)[0] in ("COMPLETED", "GONE"), log[-3000:]
    assert json.loads((run / "summary.json").read_text())["steps"] == 10, log[-3000:]


def test_signalled_job_checkpoints_requeues_and_finishes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    job = submit(tmp_path, [f"run.dir={run}", "train.max_steps=300", *FAST])
    metrics = run / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 5, 300, "5 steps")
    # What SLURM does before the time limit with --signal=B:USR1@120.
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
    wait_for(lambda: job_state(job)[1] >= 1, 120, "the requeue")
    wait_for(lambda: (run / "summary.json").exists(), 600, "the requeued job to finish")
    summary = json.loads((run / "summary.json").read_text())
    audit = [json.loads(line) for line in (run / "audit.jsonl").read_text().splitlines()]
    kinds = [r["kind"] for r in audit]
    assert "preempted" in kinds and "resume" in kinds[kinds.index("preempted"):]
    stopped = next(r for r in audit if r["kind"] == "preempted")["step"]
    assert summary["resumed_at"] == stopped and summary["steps"] == 300
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert "requeueing job" in log and "(requeue 1)" in log  # one log, appended across the requeue
