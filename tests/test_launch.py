"""The launch scripts parse, and the SLURM template renders the torchrun command we expect.

The sbatch file runs with stand-in ``srun`` and ``scontrol`` on PATH that print their
arguments, in the environment SLURM would give a 2-node job.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

LAUNCH = Path(__file__).parent.parent / "launch"


@pytest.mark.parametrize("script", ["slurm.sbatch", "local.sh"])
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(LAUNCH / script)], check=True)


def _fake_bin(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\necho "SRUN $*"\n')
    (bin_dir / "scontrol").write_text('#!/usr/bin/env bash\n[[ "$1 $2" == "show hostnames" ]] && printf "node07\\nnode08\\n"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return bin_dir


def _render(tmp_path: Path, **env: str) -> list[str]:
    full_env = {**os.environ, "PATH": f"{_fake_bin(tmp_path)}:{os.environ['PATH']}",
                "SLURM_JOB_NODELIST": "node[07-08]", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_ID": "4242", **env}
    out = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"), "--config", "configs/default.yaml",
                          "train.max_steps=10"], env=full_env, capture_output=True, text=True, check=True).stdout
    srun = [line for line in out.splitlines() if line.startswith("SRUN ")]
    assert len(srun) == 1, out
    return shlex.split(srun[0])[1:]


def test_slurm_template_renders_one_torchrun_per_node(tmp_path):
    args = _render(tmp_path, SLURM_GPUS_PER_NODE="a100:4")
    assert args[:2] == ["--ntasks-per-node=1", "torchrun"]
    assert "--nnodes=2" in args and "--nproc_per_node=4" in args
    assert "--rdzv_backend=c10d" in args and "--rdzv_endpoint=node07:29500" in args
    assert "--rdzv_id=4242" in args
    assert args[-7:] == ["-m", "fedgspo.train", "--config", "configs/default.yaml", "train.max_steps=10",
                         "run.dir=runs/fedgspo-4242", "checkpoint.resume=auto"]


def test_slurm_template_cpu_nodes_use_nproc(tmp_path):
    args = _render(tmp_path, GPUS_PER_NODE="0", NPROC_PER_NODE="3", RDZV_PORT="29611")
    assert "--nproc_per_node=3" in args and "--rdzv_endpoint=node07:29611" in args


def test_slurm_template_passes_a_signal_on_and_requeues(tmp_path):
    """SIGUSR1 (the time-limit warning) reaches srun, and the job requeues itself."""
    import signal
    import time

    bin_dir = _fake_bin(tmp_path)
    log = tmp_path / "calls"
    (bin_dir / "srun").write_text(f'#!/usr/bin/env bash\ntrap \'echo "srun got USR1" >> {log}; exit 75\' USR1\n'
                                  f'echo started >> {log}\nwhile true; do sleep 0.1; done\n')
    (bin_dir / "scontrol").write_text(f'#!/usr/bin/env bash\n[[ "$1 $2" == "show hostnames" ]] && echo node07 '
                                      f'|| echo "scontrol $*" >> {log}\n')
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node07",
           "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_ID": "77", "GPUS_PER_NODE": "0"}
    proc = subprocess.Popen(["bash", str(LAUNCH / "slurm.sbatch")], env=env, stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 20
    while not (log.exists() and "started" in log.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 75, out
    assert log.read_text().splitlines()[1:] == ["srun got USR1", "scontrol requeue 77"]
