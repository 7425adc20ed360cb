"""The examples run: a custom loop and a DDP model with robust aggregation (2 gloo ranks, one
sending NaN gradients), and a TRL-style reward function trained with."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_custom_loop_single_process() -> None:
    out = run([sys.executable, str(EXAMPLES / "custom_loop.py"), "--steps", "11"])
    assert "steps with a flagged rank: 0/11" in out


@pytest.mark.slow
def test_custom_loop_two_ranks_flags_the_nan_rank() -> None:
    out = run([*TORCHRUN, str(EXAMPLES / "custom_loop.py"), "--steps", "20", "--attack-rank", "1"])
    losses = [float(x) for x in re.findall(r"loss ([0-9.]+)", out)]
    assert "steps with a flagged rank: 20/20" in out and losses[-1] < losses[0] / 4


@pytest.mark.slow
def test_ddp_hook_two_ranks_flags_the_nan_rank() -> None:
    out = run([*TORCHRUN, str(EXAMPLES / "ddp_hook.py"), "--steps", "6", "--attack-rank", "1"])
    assert "flagged in the last step: [1]" in out


@pytest.mark.slow
def test_trl_style_reward_is_registered_and_trained_with(tmp_path: Path) -> None:
    out = run([sys.executable, str(EXAMPLES / "trl_style_reward.py"), f"run.dir={tmp_path / 'run'}",
               "train.max_steps=2", "run.progress_bar=false", "task.prompts_per_rank=2", "gspo.num_generations=4"])
    assert "weighted reward of two sample completions: [2.0, 0.0]" in out
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert {"reward/first_digit_right", "reward/digit_accuracy"} <= set(record)
