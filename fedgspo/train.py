"""Train a causal LM with GSPO across ranks, combining gradients with a robust all-reduce.

Single process (CPU or one GPU)::

    python -m fedgspo.train                                   # embedded default config
    python -m fedgspo.train --config configs/default.yaml train.max_steps=50

One node, N processes (gloo on CPU, nccl on GPUs)::

    torchrun --standalone --nproc_per_node=2 -m fedgspo.train aggregation.rule=median

Several nodes (run on every node; the first node's address as rendezvous endpoint)::

    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d \\
        --rdzv_endpoint=$HEAD_NODE:29500 --rdzv_id=$JOB_ID -m fedgspo.train --config configs/X.yaml

SLURM: ``sbatch launch/slurm.sbatch [key=value ...]``.

One optimizer step: every ``num_iterations`` steps each rank samples ``num_generations``
completions for its own prompts and scores them; then the GSPO loss is back-propagated into one
flat gradient buffer, the buffer is combined across ranks by ``robust_all_reduce`` and the
optimizer steps. Rank 0 alone writes the run directory.

Exit codes: 0 success, 2 invalid configuration or command line (one line on stderr).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from tqdm import tqdm
from transformers.utils import logging as hf_logging

from fedgspo.aggregators import build_aggregator
from fedgspo.attacks import apply_attack, poison_rewards
from fedgspo.bookkeeping import RunBookkeeper
from fedgspo.checkpoint import save_checkpoint, write_json_atomic
from fedgspo.config import Config, ConfigError, load_config
from fedgspo.distributed import (
    DistContext,
    FlatGradients,
    all_reduce_mean,
    broadcast_object,
    broadcast_parameters,
    destroy_distributed,
    gather_objects,
    init_distributed,
)
from fedgspo.gspo import GSPOStats, group_advantages, gspo_loss_and_stats
from fedgspo.metrics import MetricsLogger
from fedgspo.model import build_model, weights_sha256
from fedgspo.pipeline import load_pipeline, run_pipeline
from fedgspo.rewards import WeightedReward
from fedgspo.reputation import ReputationTracker
from fedgspo.robust import RobustReport, robust_all_reduce
from fedgspo.rollout import Rollout, completion_logps, generate
from fedgspo.swappable import build_swapper, current_reward
from fedgspo.task import DigitTask


@dataclass
class RolloutBatch:
    """One rank's scored rollout, reused for ``num_iterations`` optimizer steps."""

    rollout: Rollout
    advantages: torch.Tensor  # (B,)
    rewards: torch.Tensor  # (B,)
    reward_parts: dict[str, float]  # mean of each reward function's raw score
    seconds: float


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="fedgspo.train", description="Byzantine-robust distributed GSPO training.",
        epilog="Overrides are dotted keys, e.g. train.max_steps=50 aggregation.rule=median.")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--config", type=Path, default=None, help="YAML config (default: embedded)")
    source.add_argument("--pipeline", type=Path, default=None,
                        help="YAML pipeline of GSPO stages run in dependency order (fedgspo/pipeline.py)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides (with --pipeline: applied to every stage)")
    return parser.parse_args(argv)


def resolve_run_dir(cfg: Config, ctx: DistContext) -> Path:
    """Rank 0 picks the run directory (``runs/<name>`` by default) and shares it with all
    ranks. A directory that already holds a run is a :class:`ConfigError` on every rank."""
    error, run_dir = None, None
    if ctx.is_main:
        name = cfg.run.name or time.strftime("gspo-%Y%m%d-%H%M%S")
        run_dir = cfg.run.dir or Path("runs") / name
        if (run_dir / "metrics.jsonl").exists():
            error = f"run.dir: {run_dir} already holds a run; pick another run.name or run.dir"
    error, run_dir = broadcast_object((error, run_dir))
    if error:
        raise ConfigError(error)
    return Path(run_dir)


def tolerated_f(rule: str, f: int | str, world_size: int) -> int:
    """``f`` itself, or for ``"auto"`` the largest f that ``rule`` tolerates among
    ``world_size`` ranks (0 when none is tolerated: then the rule cannot protect this run)."""
    if f != "auto":
        return int(f)
    for candidate in range((world_size - 1) // 2, 0, -1):
        try:
            build_aggregator(rule, candidate).check(world_size)
            return candidate
        except ValueError:
            continue
    return 0


class Trainer:
    """Owns the parts of a run, declared up front: task and rewards, policy and optimizer,
    gradient buffer and robust aggregation, reputation, and rank 0's logger and bookkeeping."""

    def __init__(self, cfg: Config, ctx: DistContext, run_dir: Path) -> None:
        self.cfg, self.ctx, self.run_dir = cfg, ctx, run_dir
        gspo, agg = cfg.gspo, cfg.aggregation
        # Task, policy, optimizer.
        self.task = DigitTask(cfg.task, seed=cfg.train.seed)
        tok = self.task.tokenizer
        self.model = build_model(cfg.model, tok.vocab_size, pad_id=tok.pad_id, bos_id=tok.bos_id,
                                 eos_id=tok.eos_id, seed=cfg.train.seed).to(ctx.device)
        broadcast_parameters(self.model)
        self.model.train()
        self.grads = FlatGradients(list(self.model.parameters()))
        self.optimizer = torch.optim.AdamW(
            self.grads.params, lr=gspo.learning_rate, betas=(gspo.adam_beta1, gspo.adam_beta2),
            weight_decay=gspo.weight_decay)
        # Rank 0's services; on other ranks these are no-ops.
        self.book = RunBookkeeper(cfg.bookkeeping, run_dir, rank=ctx.rank)
        self.logger = MetricsLogger(run_dir, cfg.run.tensorboard) if ctx.is_main else None
        # Hot-swappable parts: reward, aggregation rule, LR schedule.
        self.swapper = build_swapper(
            reward=WeightedReward.from_names([(r.name, r.weight) for r in cfg.task.reward_funcs]),
            aggregator=agg.rule, lr_schedule=gspo.lr_scheduler_type,
            run_dir=run_dir if ctx.is_main else None, bus=self.book.bus, device=ctx.device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: self.swapper["lr_schedule"](s, cfg.train.max_steps, gspo.warmup_steps))
        # Robust aggregation and whom to trust.
        self.rule = agg.rule
        self.f = tolerated_f(self.rule, agg.f, ctx.world_size)
        self.reputation = ReputationTracker(ctx.world_size, agg.reputation)
        self.attack = cfg.attack
        # Sampling differs per rank; everything that must agree across ranks uses the cfg seed.
        self.sampler = torch.Generator(device=ctx.device).manual_seed(cfg.train.seed * 9973 + ctx.rank)
        self.summary: dict | None = None  # set on rank 0 by finish()
        self.step = 0
        if ctx.is_main and ctx.world_size > 1 and self.f == 0 and self.rule != "mean":
            tqdm.write(f"note: {ctx.world_size} ranks leave {self.rule} no Byzantine tolerance "
                       f"(f=0); use 3+ ranks for f=1", file=sys.stderr)

    # -- the step, in named parts --------------------------------------------------------------

    def collect(self, rollout_index: int) -> RolloutBatch:
        """Sample this rank's prompts, generate a group per prompt, score, normalise."""
        t0 = time.perf_counter()
        gspo, tok, rank = self.cfg.gspo, self.task.tokenizer, self.ctx.rank
        prompts = self.task.sample(rank, rollout_index)
        rollout = generate(
            self.model, prompts.input_ids.to(self.ctx.device), prompts.attention_mask.to(self.ctx.device),
            num_generations=gspo.num_generations, max_new_tokens=gspo.max_completion_length,
            temperature=gspo.temperature, eos_id=tok.eos_id, pad_id=tok.pad_id, generator=self.sampler)
        completions = [tok.decode(row) for row in rollout.completion_ids.tolist()]
        repeat = gspo.num_generations
        rewards, parts = current_reward(self.swapper)(
            [p for p in prompts.prompts for _ in range(repeat)], completions,
            answer=[a for a in prompts.answers for _ in range(repeat)])
        rewards_t = torch.tensor(rewards, dtype=torch.float32, device=self.ctx.device)
        # A reward_flip attacker trains on poisoned rewards; the true ones are logged.
        trained_on = poison_rewards(self.attack, rewards_t, rank, rollout_index)
        advantages = group_advantages(trained_on, repeat, scale=gspo.scale_rewards)
        return RolloutBatch(rollout, advantages, rewards_t,
                            {k: sum(v) / len(v) for k, v in parts.items()}, time.perf_counter() - t0)

    def compute_gradients(self, batch: RolloutBatch) -> tuple[torch.Tensor, GSPOStats]:
        """GSPO loss of the batch under the current policy, back-propagated into the buffer."""
        gspo = self.cfg.gspo
        self.grads.zero()
        logps = completion_logps(self.model, batch.rollout, gspo.temperature)
        loss, stats = gspo_loss_and_stats(
            logps, batch.rollout.old_logps, batch.advantages, batch.rollout.completion_mask,
            epsilon=gspo.epsilon, epsilon_high=gspo.epsilon_high, level=gspo.importance_sampling_level,
            ref_logps=None, beta=0.0)
        loss.backward()
        return loss.detach(), stats

    def aggregate(self, step: int) -> RobustReport:
        """Replace this rank's gradient by the robust aggregate of all ranks' (in place), then
        fold the report into every rank's reputation (identically on all ranks)."""
        apply_attack(self.attack, self.grads.buffer, self.ctx.rank, step)
        agg = self.cfg.aggregation
        report = robust_all_reduce(
            self.grads.buffer, **{**agg.all_reduce_kwargs(), "rule": self.rule, "f": self.f},
            weights=self.reputation.weights(agg.trust_weighted))
        self.reputation.update(report)
        return report

    def optimizer_step(self, report: RobustReport) -> torch.Tensor:
        """Clip and apply the aggregated gradient; on consensus failure apply nothing."""
        max_norm = self.cfg.gspo.max_grad_norm
        grad_norm = self.grads.buffer.norm()
        if report.consensus_failed:
            if self.cfg.aggregation.on_consensus_failure == "stop":
                raise ConsensusFailure(report.reason)
        else:
            if max_norm is not None:
                self.grads.buffer.mul_(torch.clamp(max_norm / (grad_norm + 1e-6), max=1.0))
            self.optimizer.step()
        self.scheduler.step()
        return grad_norm

    def apply_swaps(self, step: int) -> None:
        """At a step boundary, on every rank: apply pending hot swaps from rank 0."""
        swaps = self.swapper.sync(step)
        if "aggregator" in swaps:
            self.rule = swaps["aggregator"]
            self.f = tolerated_f(self.rule, self.cfg.aggregation.f, self.ctx.world_size)
        if swaps and self.ctx.is_main:
            tqdm.write(f"step {step}: hot swap {swaps}", file=sys.stderr)

    def summarise(self, step: int, batch: RolloutBatch, loss: torch.Tensor, stats: GSPOStats,
                  grad_norm: torch.Tensor, report: RobustReport, times: dict[str, float]) -> dict:
        """Average this step's figures over ranks (one small all-reduce) into a log record."""
        rewards = batch.rewards
        lengths = batch.rollout.completion_mask.sum(-1)
        local = torch.stack([
            rewards.mean(), (rewards ** 2).mean(), lengths.mean(), loss, stats.clip_frac,
            stats.ratio_mean, stats.kl, *[torch.tensor(v) for v in batch.reward_parts.values()],
        ]).float()
        reward_mean, reward_sq, length, loss_, clip, ratio, kl, *parts = all_reduce_mean(local).tolist()
        record = {
            "step": step, "reward_mean": reward_mean,
            "reward_std": max(reward_sq - reward_mean ** 2, 0.0) ** 0.5,
            "loss": loss_, "clip_frac": clip, "ratio_mean": ratio, "kl": kl, "completion_len": length,
            "grad_norm": float(grad_norm), "lr": self.scheduler.get_last_lr()[0],
            "flagged": report.flagged, "quarantined": self.reputation.quarantined(),
            "consensus_failed": report.consensus_failed,
            "step_time_s": sum(times.values()), **{f"time_{k}_s": v for k, v in times.items()},
        }
        record.update({f"reward/{k}": v for k, v in zip(batch.reward_parts, parts)})
        return record

    # -- the loop ------------------------------------------------------------------------------

    def evaluate(self) -> dict:
        """One rollout on this step's prompts with no update: the reward figures only."""
        t0 = time.perf_counter()
        batch = self.collect(self.step)
        lengths = batch.rollout.completion_mask.sum(-1)
        local = torch.stack([batch.rewards.mean(), (batch.rewards ** 2).mean(), lengths.mean()]).float()
        mean, sq, length = all_reduce_mean(local).tolist()
        return {"step": self.step, "reward_mean": mean, "reward_std": max(sq - mean ** 2, 0.0) ** 0.5,
                "loss": 0.0, "clip_frac": 0.0, "completion_len": length, "flagged": [], "quarantined": [],
                "step_time_s": time.perf_counter() - t0}

    def train(self) -> list[dict]:
        cfg, mu, ctx = self.cfg, self.cfg.gspo.num_iterations, self.ctx
        self.start()
        bar = tqdm(total=cfg.train.max_steps, desc="gspo", dynamic_ncols=True,
                   disable=not (ctx.is_main and cfg.run.progress_bar))
        history: list[dict] = []
        batch: RolloutBatch | None = None
        for step in range(cfg.train.max_steps):
            self.step = step
            if cfg.train.evaluate_only:
                record = self.evaluate()
                self.book.step(step, record, [])
                if self.logger:
                    self.logger.log(record)
                history.append(record)
                bar.update(1)
                continue
            times: dict[str, float] = {}
            with timed(times, "rollout"):
                if step % mu == 0:
                    batch = self.collect(step // mu)
            with timed(times, "backward"):
                loss, stats = self.compute_gradients(batch)
            with timed(times, "aggregate"):
                report = self.aggregate(step)
            with timed(times, "optimizer"):
                grad_norm = self.optimizer_step(report)
            record = self.summarise(step, batch, loss, stats, grad_norm, report, times)
            with timed(times, "bookkeeping"):
                self.book.step(step, record, report.z_scores, self.reputation.ranks)
                if self.logger:
                    self.logger.log(record)
                if (step + 1) % cfg.bookkeeping.hotswap_every == 0:
                    self.apply_swaps(step + 1)
            history.append(record)
            bar.update(1)
            bar.set_postfix(reward=f"{record['reward_mean']:.3f}")
            if ctx.is_main and ((step + 1) % cfg.run.log_every == 0 or step + 1 == cfg.train.max_steps):
                tqdm.write(console_line(record, cfg.train.max_steps), file=sys.stderr)
        bar.close()
        self.finish(history)
        return history

    def start(self) -> None:
        """Rank 0 writes the resolved config and registers the run's entities."""
        if self.ctx.is_main:
            (self.run_dir / "config.yaml").write_text(
                yaml.safe_dump(self.cfg.model_dump(mode="json"), sort_keys=False))
        self.book.start(name=self.run_dir.name, cfg=self.cfg, model_cfg=self.cfg.model,
                        vocab_size=self.task.tokenizer.vocab_size, weights_hash=weights_sha256(self.model),
                        world_size=self.ctx.world_size, f=self.f)

    def finish(self, history: list[dict]) -> None:
        """Every rank reports its weights hash (they must agree); rank 0 writes the final
        checkpoint and ``summary.json`` and closes the run's entities."""
        weights = weights_sha256(self.model)
        per_rank = gather_objects(weights)
        if not self.ctx.is_main:
            return
        if len(set(per_rank)) > 1:
            tqdm.write(f"warning: ranks ended with different weights: {per_rank}", file=sys.stderr)
        final = save_checkpoint(self.run_dir / "checkpoints" / "final", self.model,
                                step=len(history), metadata={"weights_sha256": weights})
        window = min(10, len(history))
        first = sum(r["reward_mean"] for r in history[:window]) / window
        last = sum(r["reward_mean"] for r in history[-window:]) / window
        self.book.checkpoint(final, len(history), weights, {"reward_mean": last})
        self.book.finish("completed", weights, step=len(history), reputations=self.reputation.ranks)
        self.summary = {
            "steps": len(history), "world_size": self.ctx.world_size,
            "reward_first10": first, "reward_last10": last, "weights_sha256": weights,
            "weights_sha256_per_rank": per_rank, "final_checkpoint": str(final),
            "config_sha256": self.cfg.digest(), "seconds": sum(r["step_time_s"] for r in history),
            "reputation": self.reputation.state_dict()["ranks"],
        }
        write_json_atomic(self.run_dir / "summary.json", self.summary)
        tqdm.write(f"done: reward {first:.3f} (first {window} steps) -> {last:.3f} (last {window}); "
                   f"run directory {self.run_dir}", file=sys.stderr)

    def close(self, failed: bool = False) -> None:
        if failed:
            self.book.finish("failed")
        self.book.close()
        if self.logger:
            self.logger.close()


class ConsensusFailure(RuntimeError):
    """Too many ranks were flagged for the rule to produce a trustworthy update."""


@contextlib.contextmanager
def timed(times: dict[str, float], name: str) -> Iterator[None]:
    """Add the wall time of the block to ``times[name]``."""
    t0 = time.perf_counter()
    yield
    times[name] = times.get(name, 0.0) + time.perf_counter() - t0


def console_line(record: dict, max_steps: int) -> str:
    line = (f"step {record['step'] + 1:>5}/{max_steps}  reward {record['reward_mean']:.3f} "
            f"± {record['reward_std']:.3f}  loss {record['loss']:+.4f}  clip {record['clip_frac']:.2f}  "
            f"len {record['completion_len']:.1f}  {record['step_time_s'] * 1000:.0f} ms/step")
    if record["flagged"]:
        line += f"  flagged {record['flagged']}"
    if record["quarantined"]:
        line += f"  quarantined {record['quarantined']}"
    return line


def _configure_threads(cfg: Config, ctx: DistContext) -> None:
    # Oversubscribed CPU ranks thrash; give each rank its share of the cores.
    if ctx.device.type == "cpu":
        torch.set_num_threads(cfg.train.num_threads or max(1, (os.cpu_count() or 1) // ctx.local_world_size))


def run(cfg: Config, ctx: DistContext) -> dict | None:
    """Train one run on every rank; returns its summary on rank 0 (``None`` elsewhere).
    Raises :class:`ConfigError` when the run directory is taken (on every rank)."""
    run_dir = resolve_run_dir(cfg, ctx)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    hf_logging.disable_progress_bar()  # transformers' bar on every checkpoint write
    trainer = Trainer(cfg, ctx, run_dir)
    try:
        trainer.train()
    except BaseException:
        trainer.close(failed=True)
        raise
    trainer.close()
    return trainer.summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.pipeline:
            spec, configs = load_pipeline(args.pipeline, args.overrides)
            first = next(iter(configs.values()))
        else:
            first = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"fedgspo.train: error: {err}", file=sys.stderr)
        return 2
    ctx = init_distributed(first.train.device)
    _configure_threads(first, ctx)
    try:
        if args.pipeline:
            ok = run_pipeline(spec, configs, is_main=ctx.is_main, run_stage=lambda c: run(c, ctx))
        else:
            ok = run(first, ctx) is not None or not ctx.is_main
    except ConfigError as err:
        print(f"fedgspo.train: error: {err}", file=sys.stderr)
        return 2
    destroy_distributed()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
