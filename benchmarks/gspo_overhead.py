"""What a fedgspo step costs over a bare hand-written GSPO loop, and what bookkeeping costs.

Three variants train the same tiny model on the same task with the same batch, group size and
steps, in the same process, interleaved over repeats:

* ``bare``: a hand-written loop — rollout, rewards, advantages, ``gspo_loss``, backward, a
  plain ``dist.all_reduce`` of each gradient (when distributed), AdamW step. No logging.
* ``fedgspo-nobook``: ``fedgspo.train`` with ``bookkeeping.enabled=false`` (robust all-reduce,
  reputation, metrics.jsonl; no registry, no events).
* ``fedgspo``: ``fedgspo.train`` with everything on (registry, events, metrics, TensorBoard).

Reported: wall time per optimizer step of the whole run (set-up, every step, final
checkpoint: what a user waits for), the median over repeats, and ratios to ``bare`` and to
``fedgspo-nobook`` measured in the same run. Run on one process or under torchrun::

    python benchmarks/step_overhead.py --steps 200 --repeats 3
    torchrun --standalone --nproc_per_node=2 benchmarks/step_overhead.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, markdown_table, write_json  # noqa: E402

from fedgspo.config import Config, load_config  # noqa: E402
from fedgspo.distributed import DistContext, broadcast_object, init_distributed  # noqa: E402
from fedgspo.gspo import group_advantages, gspo_loss  # noqa: E402
from fedgspo.model import build_model  # noqa: E402
from fedgspo.rewards import WeightedReward  # noqa: E402
from fedgspo.rollout import completion_logps, generate  # noqa: E402
from fedgspo.task import DigitTask  # noqa: E402
from fedgspo.train import run  # noqa: E402


def bare_loop(cfg: Config, ctx: DistContext) -> None:
    """A minimal GSPO loop with a plain all-reduce."""
    gspo = cfg.gspo
    task = DigitTask(cfg.task, seed=cfg.train.seed)
    tok = task.tokenizer
    model = build_model(cfg.model, tok.vocab_size, pad_id=tok.pad_id, bos_id=tok.bos_id,
                        eos_id=tok.eos_id, seed=cfg.train.seed).to(ctx.device)
    opt = torch.optim.AdamW(model.parameters(), lr=gspo.learning_rate,
                            betas=(gspo.adam_beta1, gspo.adam_beta2))
    reward = WeightedReward.from_names([(r.name, r.weight) for r in cfg.task.reward_funcs])
    gen = torch.Generator().manual_seed(ctx.rank)
    for step in range(cfg.train.max_steps):
        if step % gspo.num_iterations == 0:
            batch = task.sample(ctx.rank, step // gspo.num_iterations)
            roll = generate(model, batch.input_ids, batch.attention_mask, num_generations=gspo.num_generations,
                            max_new_tokens=gspo.max_completion_length, temperature=gspo.temperature,
                            eos_id=tok.eos_id, pad_id=tok.pad_id, generator=gen)
            completions = [tok.decode(r) for r in roll.completion_ids.tolist()]
            g = gspo.num_generations
            rewards, _ = reward([p for p in batch.prompts for _ in range(g)], completions,
                                answer=[a for a in batch.answers for _ in range(g)])
            adv = group_advantages(torch.tensor(rewards), g)
        opt.zero_grad()
        logps, _ = completion_logps(model, roll, gspo.temperature)
        gspo_loss(logps, roll.old_logps, adv, roll.completion_mask,
                  epsilon=gspo.epsilon, epsilon_high=gspo.epsilon_high).backward()
        if dist.is_initialized():
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad /= ctx.world_size
        torch.nn.utils.clip_grad_norm_(model.parameters(), gspo.max_grad_norm)
        opt.step()


def fedgspo_loop(cfg: Config, ctx: DistContext, run_dir: Path) -> None:
    """``fedgspo.train`` on ``cfg`` writing to ``run_dir``."""
    run(cfg.model_copy(update={"run": cfg.run.model_copy(update={"dir": run_dir})}), ctx)


def seconds_per_step(fn: Callable[[], None], steps: int) -> float:
    """Wall time of ``fn()`` divided by ``steps``, fenced by barriers when distributed."""
    if dist.is_initialized():
        dist.barrier()
    t0 = time.perf_counter()
    fn()
    if dist.is_initialized():
        dist.barrier()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "step_overhead.json")
    args = parser.parse_args()

    ctx = init_distributed("cpu")
    torch.set_num_threads(1 if ctx.world_size > 1 else 2)
    base = [f"train.max_steps={args.steps}", "run.progress_bar=false", "run.log_every=1000000"]
    variants = {"fedgspo-nobook": base + ["bookkeeping.enabled=false", "run.tensorboard=false"],
                "fedgspo": base}
    samples: dict[str, list[float]] = {"bare": [], **{k: [] for k in variants}}
    root = Path(broadcast_object(tempfile.mkdtemp(prefix="fedgspo-overhead-") if ctx.is_main else None))
    for rep in range(args.repeats):
        cfg = load_config(None, base)
        samples["bare"].append(seconds_per_step(lambda: bare_loop(cfg, ctx), args.steps))
        for tag, overrides in variants.items():
            tagged = load_config(None, overrides)
            samples[tag].append(seconds_per_step(
                lambda: fedgspo_loop(tagged, ctx, root / f"{tag}-{rep}"), args.steps))
    if not ctx.is_main:
        return
    med = {k: statistics.median(v) for k, v in samples.items()}
    rows = [[k, med[k] * 1e3, min(v) * 1e3, max(v) * 1e3, med[k] / med["bare"], med[k] / med["fedgspo-nobook"]]
            for k, v in samples.items()]
    print(f"\nwall time per step, {ctx.world_size} process(es), {args.steps} steps x {args.repeats} repeats "
          f"(median over repeats)\n")
    print(markdown_table(["variant", "ms/step", "min", "max", "x bare", "x nobook"], rows))
    write_json(args.out, {"world_size": ctx.world_size, "steps": args.steps, "repeats": args.repeats,
                          "samples_s": samples, "median_s": med,
                          "ratio_vs_bare": {k: v / med["bare"] for k, v in med.items()},
                          "bookkeeping_overhead": med["fedgspo"] / med["fedgspo-nobook"]})
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
