"""What a fedgspo step costs over a bare hand-written GSPO loop, and what bookkeeping costs.

Three variants train the same tiny model on the same task with the same batch, group size and
steps, with the same process count, in the same benchmark run, interleaved over repeats (the
order rotates every repeat so that none always runs first):

* ``bare``: a hand-written loop — rollout, rewards, advantages, ``gspo_loss``, backward, one
  plain ``dist.all_reduce`` of the flattened gradients (when distributed), clip, AdamW step.
  No logging.
* ``fedgspo-nobook``: ``fedgspo.train`` with ``bookkeeping.enabled=false`` (robust all-reduce,
  reputation, metrics.jsonl; no registry, no events, no TensorBoard).
* ``fedgspo-plain``: ``fedgspo.train`` with every piece of bookkeeping on, but doing what
  the bare loop does on the wire: ``aggregation.rule=mean`` and no rollout proofs
  (``proof.rate=0``). The like-for-like comparison: what the framework itself costs.
  Several processes only (in one process there is nothing to aggregate or verify, so it is
  ``fedgspo``).
* ``fedgspo``: ``fedgspo.train`` with everything on (registry, events, audit log, metrics,
  TensorBoard, periodic checkpoints) and the defaults' robust aggregation and, on several
  ranks, rollout proofs.

Two figures per variant and repeat: ``step``, the mean wall time of one optimizer step inside
the loop (``Trainer.train_step`` for fedgspo; a mean, since a rollout comes every
``num_iterations`` steps), and ``run``, the wall time of the whole run
divided by the steps (set-up, every step, final checkpoint: what a user waits for). Ratios are
taken per repeat (same repeat, adjacent runs) and the median over repeats is reported with its
min-max spread. Run on one process or under torchrun::

    python benchmarks/gspo_overhead.py --steps 200 --repeats 5
    torchrun --standalone --nproc_per_node=2 benchmarks/gspo_overhead.py --quick
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
from profile_step import PhaseTimer, instrumented  # noqa: E402

from fedgspo.config import Config, load_config  # noqa: E402
from fedgspo.distributed import DistContext, broadcast_json, init_distributed  # noqa: E402
from fedgspo.gspo.loss import group_advantages, gspo_loss  # noqa: E402
from fedgspo.gspo.model import build_model  # noqa: E402
from fedgspo.gspo.rewards import WeightedReward  # noqa: E402
from fedgspo.gspo.rollout import completion_logps, generate  # noqa: E402
from fedgspo.gspo.task import DigitTask  # noqa: E402
from fedgspo.train import run  # noqa: E402

VARIANTS = ("bare", "fedgspo-nobook", "fedgspo-plain", "fedgspo")
TARGET = 1.05  # issue #8: fedgspo with all bookkeeping <= 1.05 x the bare loop per step


def all_reduce_flat(params: list[torch.nn.Parameter], world_size: int) -> None:
    """Average gradients across ranks with one all-reduce of their concatenation."""
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= world_size
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad.copy_(g.view_as(p))


def bare_loop(cfg: Config, ctx: DistContext) -> list[float]:
    """A minimal GSPO loop with a plain all-reduce; returns the wall time of every step."""
    gspo = cfg.gspo
    task = DigitTask(cfg.task, seed=cfg.train.seed)
    tok = task.tokenizer
    model = build_model(cfg.model, tok.vocab_size, pad_id=tok.pad_id, bos_id=tok.bos_id,
                        eos_id=tok.eos_id, seed=cfg.train.seed).to(ctx.device)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=gspo.learning_rate, betas=(gspo.adam_beta1, gspo.adam_beta2))
    reward = WeightedReward.from_names([(r.name, r.weight) for r in cfg.task.reward_funcs])
    gen = torch.Generator().manual_seed(ctx.rank)
    g = gspo.num_generations
    times = []
    for step in range(cfg.train.max_steps):
        t0 = time.perf_counter()
        if step % gspo.num_iterations == 0:
            batch = task.sample(ctx.rank, step // gspo.num_iterations)
            roll = generate(model, batch.input_ids, batch.attention_mask, num_generations=g,
                            max_new_tokens=gspo.max_completion_length, temperature=gspo.temperature,
                            eos_id=tok.eos_id, pad_id=tok.pad_id, generator=gen)
            completions = [tok.decode(r) for r in roll.completion_ids.tolist()]
            rewards, _ = reward([p for p in batch.prompts for _ in range(g)], completions,
                                answer=[a for a in batch.answers for _ in range(g)])
            adv = group_advantages(torch.tensor(rewards), g)
        opt.zero_grad()
        logps, _ = completion_logps(model, roll, gspo.temperature)
        gspo_loss(logps, roll.old_logps, adv, roll.completion_mask,
                  epsilon=gspo.epsilon, epsilon_high=gspo.epsilon_high).backward()
        if dist.is_initialized():
            all_reduce_flat(params, ctx.world_size)
        torch.nn.utils.clip_grad_norm_(params, gspo.max_grad_norm)
        opt.step()
        times.append(time.perf_counter() - t0)
    return times


def fedgspo_loop(cfg: Config, ctx: DistContext, run_dir: Path) -> list[float]:
    """``fedgspo.train`` on ``cfg`` writing to ``run_dir``; returns the wall time of every
    ``Trainer.train_step``."""
    timer = PhaseTimer()
    with instrumented(timer):
        run(cfg.model_copy(update={"run": cfg.run.model_copy(update={"dir": run_dir})}), ctx)
    return [s["step"] for s in timer.steps]


def timed_run(fn: Callable[[], list[float]], steps: int, skip: int) -> dict[str, float]:
    """``run``: wall time of ``fn()`` per step, fenced by barriers when distributed;
    ``step``: mean of the step times ``fn`` returns, after the first ``skip``."""
    if dist.is_initialized():
        dist.barrier()
    t0 = time.perf_counter()
    step_times = fn()
    if dist.is_initialized():
        dist.barrier()
    return {"run": (time.perf_counter() - t0) / steps, "step": statistics.mean(step_times[skip:] or step_times)}


def spread(values: list[float]) -> dict[str, float]:
    """Median, min and max of ``values``."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip", type=int, default=4, help="warm-up steps left out of the step means")
    parser.add_argument("--quick", action="store_true", help="40 steps x 3 repeats")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON output (default: results/gspo_overhead_<N>p.json)")
    args = parser.parse_args(argv)
    steps, repeats = (40, 3) if args.quick else (args.steps, args.repeats)

    ctx = init_distributed("cpu")
    torch.set_num_threads(1 if ctx.world_size > 1 else 2)
    base = [f"train.max_steps={steps}", "run.progress_bar=false", "run.log_every=1000000"]
    configs = {"bare": load_config(None, base),
               "fedgspo-nobook": load_config(None, base + ["bookkeeping.enabled=false", "run.tensorboard=false"]),
               "fedgspo-plain": load_config(None, base + ["aggregation.rule=mean", "proof.rate=0"]),
               "fedgspo": load_config(None, base)}
    variants = VARIANTS if ctx.world_size > 1 else tuple(v for v in VARIANTS if v != "fedgspo-plain")
    samples: dict[str, list[dict[str, float]]] = {k: [] for k in variants}
    root = Path(broadcast_json(tempfile.mkdtemp(prefix="fedgspo-overhead-") if ctx.is_main else None))
    for rep in range(repeats):
        shift = rep % len(variants)
        for tag in variants[shift:] + variants[:shift]:
            cfg = configs[tag]
            fn = (lambda: bare_loop(cfg, ctx)) if tag == "bare" else (
                lambda: fedgspo_loop(cfg, ctx, root / f"{tag}-{rep}"))
            samples[tag].append(timed_run(fn, steps, args.skip))
    if not ctx.is_main:
        return
    result = {tag: {kind: {"ms": spread([s[kind] * 1e3 for s in samples[tag]]),
                           "x_bare": spread([s[kind] / b[kind] for s, b in zip(samples[tag], samples["bare"])]),
                           "x_nobook": spread([s[kind] / n[kind]
                                               for s, n in zip(samples[tag], samples["fedgspo-nobook"])])}
                    for kind in ("step", "run")}
              for tag in variants}
    rows = [[tag, r["step"]["ms"]["median"], r["step"]["x_bare"]["median"],
             f"{r['step']['x_bare']['min']:.2f}-{r['step']['x_bare']['max']:.2f}", r["step"]["x_nobook"]["median"],
             r["run"]["ms"]["median"], r["run"]["x_bare"]["median"]]
            for tag, r in result.items()]
    print(f"\nGSPO step overhead, {ctx.world_size} process(es), {steps} steps x {repeats} repeats "
          f"(medians over repeats of ratios within a repeat)\n")
    print(markdown_table(["variant", "ms/step", "x bare", "x bare range", "x nobook",
                          "run ms/step", "run x bare"], rows))
    full = result["fedgspo"]["step"]["x_bare"]["median"]
    plain = result.get("fedgspo-plain", result["fedgspo"])["step"]["x_bare"]["median"]
    print(f"\ntarget fedgspo <= {TARGET} x bare per step: {'met' if full <= TARGET else 'missed'} ({full:.3f}); "
          f"like for like (fedgspo-plain): {'met' if plain <= TARGET else 'missed'} ({plain:.3f})")
    out = args.out or RESULTS / f"gspo_overhead_{ctx.world_size}p.json"
    write_json(out, {"world_size": ctx.world_size, "steps": steps, "repeats": repeats, "skip": args.skip,
                     "samples_s": samples, "result": result, "target": TARGET, "met": full <= TARGET,
                     "met_like_for_like": plain <= TARGET})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
