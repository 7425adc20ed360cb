"""A scheduler's signal mid-run: every rank stops after the same step with a verified
checkpoint, the audit log says why, the exit code asks for a requeue, and a resume continues."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedgspo.checkpoint import verify_checkpoint
from fedgspo.preemption import EXIT_PREEMPTED, StopSignals
from fedgspo.telemetry.metrics import read_metrics

ARGS = ["run.progress_bar=false", "run.log_every=1000", "task.prompts_per_rank=2", "gspo.num_generations=4",
        "checkpoint.every=1000", "gspo.num_iterations=1"]


def test_stop_signals_record_the_first_signal_and_restore_handlers():
    before = signal.getsignal(signal.SIGUSR1)
    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal changes nothing
        assert signals.received == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is before


def _wait_for_steps(run: Path, steps: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= steps:
            return
        time.sleep(0.2)
    raise AssertionError(f"no {steps} steps before the deadline: {proc.poll()} {proc.stderr.read()[-3000:]}")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_on_one_rank_checkpoints_every_rank_and_resume_continues(tmp_path, sig):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--max-restarts=0", "-m", "fedgspo.train", f"run.dir={run}", "train.max_steps=400", *ARGS]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_steps(run, 5, proc)
    worker = subprocess.run(["pgrep", "-f", "-P", str(proc.pid), "fedgspo.train"], capture_output=True,
                            text=True).stdout.split()[-1]  # one rank: the stop must reach the other too
    sent = time.time()
    os.kill(int(worker), sig)
    err = proc.communicate(timeout=240)[1]
    elapsed = time.time() - sent
    assert f"exitcode: {EXIT_PREEMPTED}" in err or proc.returncode == EXIT_PREEMPTED, err[-3000:]
    steps = len(read_metrics(run))
    checkpoint = run / "checkpoints" / f"step_{steps:08d}"
    verify_checkpoint(checkpoint)
    audit = [json.loads(line) for line in (run / "audit.jsonl").read_text().splitlines()]
    # the last record of the run's own, before the audited entity writes that close it
    last = [r for r in audit if r["kind"] != "entity_write"][-1]
    assert last["kind"] == "preempted" and last["payload"]["signal"] == sig.name
    assert not (run / "summary.json").exists() and steps < 400 and elapsed < 60
    resumed = subprocess.run([*cmd[:-len(ARGS) - 1], f"train.max_steps={steps + 3}", *ARGS, "checkpoint.resume=auto"],
                             capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_at"] == steps and summary["steps"] == steps + 3
