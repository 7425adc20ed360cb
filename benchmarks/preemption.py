"""From a scheduler's signal to a verified checkpoint and exit: how long, and how many steps a
resume redoes.

For the default model and a ~40M-parameter Llama from a local directory (the same as
``real_model.py``), 2 gloo ranks train under torchrun; after a few steps one rank gets SIGUSR1
(SLURM's time-limit warning). Reported per model: seconds from the signal to torchrun's exit,
that time in **median step times of the same run** (the machine is shared: the ratio is what
compares), the seconds rank 0 spent writing the checkpoint (``time_checkpoint_s`` is not
recorded for it: measured from the checkpoint directory's manifest time), and the steps a resume
would redo (the checkpoint's step against the last finished step).

    python benchmarks/preemption.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from common import RESULTS, markdown_table, write_json  # noqa: E402

import hf_fixtures as H  # noqa: E402

COMMON = ["run.progress_bar=false", "run.log_every=1000", "checkpoint.every=100000", "gspo.num_iterations=1",
          "train.max_steps=100000"]


def measure(run_dir: Path, args: list[str], env: dict[str, str], warm_steps: int) -> dict[str, float]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=0",
           "-m", "fedgspo.train", f"run.dir={run_dir}", *COMMON, *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    metrics = run_dir / "metrics.jsonl"
    while proc.poll() is None and not (metrics.exists() and len(metrics.read_text().splitlines()) >= warm_steps):
        time.sleep(0.1)
    worker = subprocess.run(["pgrep", "-f", "-P", str(proc.pid), "fedgspo.train"], capture_output=True,
                            text=True).stdout.split()[-1]
    sent = time.perf_counter()
    os.kill(int(worker), signal.SIGUSR1)
    err = proc.communicate(timeout=900)[1]
    seconds = time.perf_counter() - sent
    if "exitcode: 75" not in err and proc.returncode != 75:
        raise RuntimeError(err[-3000:])
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    checkpoint = max((run_dir / "checkpoints").glob("step_*"))
    step_s = statistics.median(r["step_time_s"] for r in records[1:])
    return {"signal_to_exit_s": seconds, "step_s": step_s, "in_steps": seconds / step_s,
            "checkpoint_mib": sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file()) / 2**20,
            "steps_redone": len(records) - int(checkpoint.name.split("_")[1])}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the default model only")
    parser.add_argument("--out", type=Path, default=RESULTS / "preemption.json")
    args = parser.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        env = {**os.environ, "PYTHONPATH": str(root)}
        results["default (132k)"] = measure(root / "default", [], env, warm_steps=5)
        if not args.quick:
            H.make_model_dir(root / "model", hidden=512, layers=12)
            H.write_jsonl(root / "data.jsonl", H.arithmetic_rows(64))
            results["Llama 40M, local dir"] = measure(
                root / "large", [f"model.path={root / 'model'}", f"task.dataset={root / 'data.jsonl'}",
                                 "task.reward_funcs=[{name: answer_match}]", "task.prompts_per_rank=2",
                                 "gspo.num_generations=4", "gspo.max_completion_length=8"], env, warm_steps=3)
    rows = [[name, r["signal_to_exit_s"], r["step_s"], r["in_steps"], r["checkpoint_mib"], r["steps_redone"]]
            for name, r in results.items()]
    print("## preemption: SIGUSR1 to one of 2 gloo ranks")
    print(markdown_table(["model", "signal → exit s", "median step s", "in step times", "checkpoint MiB",
                          "steps redone"], rows))
    write_json(args.out, {"results": results})


if __name__ == "__main__":
    main()
