"""A model of tens of millions of parameters from a local directory: full fine-tuning against
LoRA, one forward/backward against micro-batches.

A Llama of ~40M parameters (hidden 512, 12 layers; the word-level tokenizer of
``tests/hf_fixtures.py``, so nearly all parameters are in the blocks) and a JSONL file of chat
prompts are written to a temporary directory; each variant then trains it with
``python -m fedgspo.train`` in its own process (1 rank, gloo not needed) and reports

* ``tokens/s``: completion tokens per second of the steps (median of the run's
  ``tokens_per_s`` after the first step), and its **ratio** to the full fine-tuning baseline
  measured in the same run (this machine is shared: only ratios compare);
* ``peak RSS``: the process's maximum resident set size;
* ``exchanged``: elements (and fp32 bytes) of the flat buffer the ranks robust-aggregate each
  step: every parameter for full fine-tuning, the adapters alone with LoRA.

    python benchmarks/real_model.py [--steps 12] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from common import RESULTS, markdown_table, write_json  # noqa: E402

import hf_fixtures as H  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

REWARD = '''
def length_target(prompts, completions, **kwargs):
    return [-abs(len((c[0]["content"] if isinstance(c, list) else c).split()) - 8) / 8 for c in completions]
'''

#: Runs one training in this process and prints its peak RSS (KiB) as the last line.
CHILD = """
import resource, runpy, sys
sys.argv = ["fedgspo.train", *sys.argv[1:]]
try:
    runpy.run_module("fedgspo.train", run_name="__main__")
except SystemExit as stop:
    if stop.code:
        raise
print("peak_rss_kib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""

VARIANTS = {
    "full": [],
    "full, micro-batch 8": ["train.micro_batch_size=8"],
    "LoRA r=16": ["model.lora={r: 16, alpha: 32}"],
    "LoRA r=16, micro-batch 8": ["model.lora={r: 16, alpha: 32}", "train.micro_batch_size=8"],
}


def build(root: Path, hidden: int, layers: int) -> None:
    H.make_model_dir(root / "model", hidden=hidden, layers=layers)
    H.write_jsonl(root / "data.jsonl", H.arithmetic_rows(256))
    (root / "bench_reward.py").write_text(REWARD)


def run_variant(root: Path, name: str, extra: list[str], steps: int) -> dict[str, float]:
    run_dir = root / name.replace(" ", "_").replace(",", "").replace("=", "")
    cmd = [sys.executable, "-c", CHILD, f"run.dir={run_dir}", f"model.path={root / 'model'}",
           f"task.dataset={root / 'data.jsonl'}", "task.reward_funcs=[{name: bench_reward:length_target}]",
           f"train.max_steps={steps}", "task.prompts_per_rank=4", "gspo.num_generations=8",
           "gspo.max_completion_length=32", "gspo.num_iterations=1", "run.progress_bar=false",
           "run.tensorboard=false", "checkpoint.every=0", "alerts.enabled=false", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(root)},
                          timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    peak = int(proc.stdout.strip().splitlines()[-1].split()[1])
    exchanged = int(re.search(r"([\d,]+) trained and exchanged", proc.stderr).group(1).replace(",", ""))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in records[1:]),
            "ms_per_step": 1000 * statistics.median(r["step_time_s"] for r in records[1:]),
            "peak_rss_mib": peak / 1024, "exchanged_elements": exchanged, "exchanged_mib": exchanged * 4 / 2**20}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--quick", action="store_true", help="a 4-layer, 256-wide model and 4 steps")
    parser.add_argument("--out", type=Path, default=RESULTS / "real_model.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.hidden, args.layers = 4, 256, 4
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build(root, args.hidden, args.layers)
        params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(root / "model").parameters())
        results = {name: run_variant(root, name, extra, args.steps) for name, extra in VARIANTS.items()}
    base = results["full"]
    rows = [[name, r["tokens_per_s"], r["tokens_per_s"] / base["tokens_per_s"], r["ms_per_step"],
             r["peak_rss_mib"], r["peak_rss_mib"] / base["peak_rss_mib"], f"{r['exchanged_elements']:,}",
             r["exchanged_mib"]] for name, r in results.items()]
    print(f"## real_model: {params / 1e6:.1f}M-parameter Llama, 32 sequences x 32 tokens per step, "
          f"{args.steps} steps, 1 process")
    print(markdown_table(["variant", "tokens/s", "÷ full", "ms/step", "peak RSS MiB", "÷ full",
                          "exchanged elements", "exchanged MiB (fp32)"], rows))
    write_json(args.out, {"parameters": params, "steps": args.steps, "hidden": args.hidden, "layers": args.layers,
                          "results": results})


if __name__ == "__main__":
    main()
