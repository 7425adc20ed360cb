"""Where a default fedgspo step spends its time: rollout, loss, backward, aggregation,
optimizer, bookkeeping.

Runs ``fedgspo.train`` on the default configuration (everything on; dotted overrides change
it, e.g. ``rollout.compile=on train.compile=true``) with the trainer's own methods wrapped by
timers, so the phases are the real code paths, not a re-implementation:

* ``generate``: KV-cached sampling (``fedgspo.gspo.rollout.generate``);
* ``rewards``: decoding, reward functions, advantages (the rest of ``Trainer.collect``);
* ``logps``: the policy forward of the loss (``completion_logps``);
* ``proofs``: rollout proofs checked across ranks (``Trainer.verify_rollouts``, 2+ ranks);
* ``loss``: ``gspo_loss_and_stats``; ``backward``: the rest of ``compute_gradients``;
* ``aggregate``: ``Trainer.aggregate`` (robust all-reduce, reputation, audit of flags);
* ``optimizer``: ``Trainer.optimizer_step`` (clip, AdamW, schedule);
* ``bookkeeping``: the rest of ``train_step`` (the step's record and its all-reduce, registry,
  events, metrics.jsonl, TensorBoard, periodic checkpoints, operator actions).

Prints the mean ms per step of each phase and its share of the step, and optionally the top
torch operators (``--torch-ops``)::

    python benchmarks/profile_step.py [--steps 60] [--torch-ops 15] [--threads 1] [key=value ...]
    torchrun --standalone --nproc_per_node=2 benchmarks/profile_step.py
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, markdown_table, write_json  # noqa: E402

import fedgspo.gspo.loss as loss_mod  # noqa: E402
import fedgspo.train as train_mod  # noqa: E402
from fedgspo.config import Config, load_config  # noqa: E402
from fedgspo.distributed import DistContext, broadcast_json, init_distributed  # noqa: E402

# (owner, attribute, phase) of every wrapped callable; nested phases are subtracted from
# their parent so the shares add up to the step.
WRAPPED: list[tuple[Any, str, str]] = [
    (train_mod.Trainer, "train_step", "step"),
    (train_mod.Trainer, "collect", "collect"),
    (train_mod, "generate", "generate"),
    (train_mod.Trainer, "compute_gradients", "gradients"),
    (train_mod, "completion_logps", "logps"),
    (train_mod.Trainer, "verify_rollouts", "proofs"),
    (loss_mod, "gspo_loss_and_stats", "loss"),
    (train_mod.Trainer, "aggregate", "aggregate"),
    (train_mod.Trainer, "optimizer_step", "optimizer"),
]
PHASES = ["generate", "rewards", "logps", "proofs", "loss", "backward", "aggregate", "optimizer", "bookkeeping"]


class PhaseTimer:
    """Accumulates wall time per phase for the current step; one dict per finished step."""

    def __init__(self) -> None:
        self.current: dict[str, float] = defaultdict(float)
        self.steps: list[dict[str, float]] = []

    def wrap(self, fn: Callable[..., Any], phase: str) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.current[phase] += time.perf_counter() - t0
                if phase == "step":
                    self.steps.append(self.split(self.current))
                    self.current = defaultdict(float)
        return timed

    @staticmethod
    def split(raw: dict[str, float]) -> dict[str, float]:
        """Exclusive phase times of one step from the nested raw ones."""
        return {
            "generate": raw["generate"],
            "rewards": raw["collect"] - raw["generate"],
            "logps": raw["logps"],
            "loss": raw["loss"],
            "proofs": raw["proofs"],
            "backward": raw["gradients"] - raw["logps"] - raw["proofs"] - raw["loss"],
            "aggregate": raw["aggregate"],
            "optimizer": raw["optimizer"],
            "bookkeeping": raw["step"] - raw["collect"] - raw["gradients"] - raw["aggregate"] - raw["optimizer"],
            "step": raw["step"],
        }


@contextmanager
def instrumented(timer: PhaseTimer) -> Iterator[None]:
    """Wrap :data:`WRAPPED` with ``timer`` for the duration of the block."""
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in WRAPPED]
    try:
        for owner, name, phase in WRAPPED:
            setattr(owner, name, timer.wrap(getattr(owner, name), phase))
        yield
    finally:
        for owner, name, fn in originals:
            setattr(owner, name, fn)


def summarise(steps: list[dict[str, float]], skip: int) -> dict[str, dict[str, float]]:
    """Mean ms per step of every phase over the steps after the first ``skip`` (a rollout
    every ``num_iterations`` steps makes medians of per-step phase times meaningless), and its
    share of the total."""
    kept = steps[skip:] or steps
    total = sum(s["step"] for s in kept)
    return {phase: {"mean_ms": sum(s[phase] for s in kept) / len(kept) * 1e3,
                    "share": sum(s[phase] for s in kept) / total}
            for phase in [*PHASES, "step"]}


def torch_ops_table(cfg: Config, ctx: DistContext, top: int) -> str:
    """Top ``top`` torch operators by self CPU time over a run of ``cfg``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train_mod.run(cfg, ctx)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--skip", type=int, default=4, help="warm-up steps left out")
    parser.add_argument("--torch-ops", type=int, default=0, help="also print the top N torch operators")
    parser.add_argument("--quick", action="store_true", help="20 steps")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per process (default: 1 with several processes, else 2)")
    parser.add_argument("overrides", nargs="*", help="config overrides (default: the embedded default)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    steps = 20 if args.quick else args.steps

    ctx = init_distributed("cpu")
    torch.set_num_threads(args.threads or (1 if ctx.world_size > 1 else 2))
    overrides = [f"train.max_steps={steps}", "run.progress_bar=false", "run.log_every=1000000", *args.overrides]
    root = Path(broadcast_json(tempfile.mkdtemp(prefix="fedgspo-profile-") if ctx.is_main else None))
    timer = PhaseTimer()
    with instrumented(timer):
        train_mod.run(load_config(None, overrides + [f"run.dir={root / 'phases'}"]), ctx)
    table = None
    if args.torch_ops:
        cfg = load_config(None, overrides + [f"run.dir={root / 'torch-ops'}"])
        table = torch_ops_table(cfg, ctx, args.torch_ops)
    if not ctx.is_main:
        return
    result = summarise(timer.steps, args.skip)
    rows = [[p, v["mean_ms"], f"{100 * v['share']:.1f} %"] for p, v in result.items()]
    print(f"\nphases of a step ({'overrides: ' + ' '.join(args.overrides) if args.overrides else 'default config'}), "
          f"{ctx.world_size} process(es) x {torch.get_num_threads()} thread(s), {steps} steps "
          f"(first {args.skip} left out)\n")
    print(markdown_table(["phase", "ms/step", "share"], rows))
    if table:
        print("\n" + table)
    out = args.out or RESULTS / f"profile_step_{ctx.world_size}p.json"
    write_json(out, {"world_size": ctx.world_size, "threads": torch.get_num_threads(), "steps": steps,
                     "skip": args.skip, "overrides": overrides,
                     "phases": result, "per_step_s": timer.steps})
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
