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
import copy
import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from tqdm import tqdm
from transformers.utils import logging as hf_logging

from fedgspo.robust.aggregators import build_aggregator
from fedgspo.telemetry.alerts import AlertMonitor
from fedgspo.robust.attacks import apply_attack, poison_rewards
from fedgspo.bookkeeping import RunBookkeeper
from fedgspo.integrity.audit import (
    CHECKPOINT,
    CHECKPOINT_SKIPPED,
    DETECTION,
    HOT_SWAP,
    PROOF_FAILURE,
    QUARANTINE,
    RESUME,
    RUN_END,
    RUN_START,
    AuditLog,
)
from fedgspo.integrity.auth import (
    AuthError,
    RequestInbox,
    UpdateAuthenticator,
    audit_auth_failures,
    load_keyring,
    poll_requests,
)
from fedgspo.checkpoint import CheckpointError, CheckpointManager, save_checkpoint, write_json_atomic
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
from fedgspo.faults import FaultInjector
from fedgspo.gspo.loss import GSPOStats, group_advantages, gspo_loss_and_stats
from fedgspo.telemetry.metrics import MetricsLogger, read_metrics
from fedgspo.gspo.model import build_model, weights_sha256
from fedgspo.pipeline import load_pipeline, run_pipeline
from fedgspo.integrity.proof import RolloutClaim, build_proofs, cross_verify
from fedgspo.gspo.rewards import WeightedReward
from fedgspo.robust.reputation import ReputationTracker
from fedgspo.robust.all_reduce import RobustReport, robust_all_reduce
from fedgspo.gspo.rollout import Rollout, completion_logps, generate
from fedgspo.swappable import build_swapper, current_reward
from fedgspo.gspo.task import DigitTask
from fedgspo.telemetry.tracing import StepTracer


@dataclass
class RolloutBatch:
    """One rank's scored rollout, reused for ``num_iterations`` optimizer steps."""

    rollout: Rollout
    advantages: torch.Tensor  # (B,)
    rewards: torch.Tensor  # (B,)
    reward_parts: dict[str, float]  # mean of each reward function's raw score
    index: int
    ref_logps: torch.Tensor | None  # (B, T) under the frozen reference; None when beta = 0  # rollout number (the task's step)


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
        if (run_dir / "metrics.jsonl").exists() and cfg.checkpoint.resume != "auto":
            error = (f"run.dir: {run_dir} already holds a run; pick another run.name or run.dir, "
                     "or continue it with checkpoint.resume=auto")
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
        # The KL reference is the starting policy, frozen; only built when the KL is on.
        self.reference = copy.deepcopy(self.model).eval().requires_grad_(False) if gspo.beta > 0 else None
        self.optimizer = torch.optim.AdamW(
            self.grads.params, lr=gspo.learning_rate, betas=(gspo.adam_beta1, gspo.adam_beta2),
            weight_decay=gspo.weight_decay)
        # Rank 0's services; on other ranks these are no-ops or None. The metrics logger
        # first: an unusable Prometheus port stops the run before anything is written.
        self.logger = open_metrics_logger(cfg, ctx, run_dir)
        self.book = RunBookkeeper(cfg.bookkeeping, run_dir, rank=ctx.rank)
        self.alerts = AlertMonitor(cfg.alerts, run_dir, self.book.bus) if ctx.is_main and cfg.alerts.enabled else None
        self.tracer = StepTracer(cfg.tracing, run_dir if ctx.is_main else None, run_name=run_dir.name)
        sec = cfg.security
        self.keyring = load_keyring(sec.key_file) if sec.key_file else None
        self.authenticator = (UpdateAuthenticator(self.keyring, ctx.rank, run_id=run_dir.name)
                              if self.keyring and sec.authenticate_updates and ctx.world_size > 1 else None)
        admin_key = self._admin_key()
        self.audit = AuditLog(run_dir, key=admin_key) if ctx.is_main else None
        self.inbox = (RequestInbox(run_dir, admin_key, self.audit, max_age_s=cfg.security.request_max_age_s)
                      if ctx.is_main and admin_key else None)
        self.checkpoints = CheckpointManager(run_dir, cfg.checkpoint, rank=ctx.rank)
        # Hot-swappable parts: reward, aggregation rule, LR schedule.
        # With keys, swaps come only as signed operator requests; without, from hotswap.json.
        self.swapper = build_swapper(
            reward=WeightedReward.from_names([(r.name, r.weight) for r in cfg.task.reward_funcs]),
            aggregator=agg.rule, lr_schedule=gspo.lr_scheduler_type,
            run_dir=run_dir if ctx.is_main and admin_key is None else None, bus=self.book.bus, device=ctx.device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: self.swapper["lr_schedule"](s, cfg.train.max_steps, gspo.warmup_steps))
        # Robust aggregation and whom to trust.
        self.rule = agg.rule
        self.f = tolerated_f(self.rule, agg.f, ctx.world_size)
        self.reputation = ReputationTracker(ctx.world_size, agg.reputation, phases=gspo.num_iterations)
        self.attack = cfg.attack
        # Sampling differs per rank; everything that must agree across ranks uses the cfg seed.
        self.sampler = torch.Generator(device=ctx.device).manual_seed(cfg.train.seed * 9973 + ctx.rank)
        self.summary: dict | None = None  # set on rank 0 by finish()
        self.step = 0
        self.batch: RolloutBatch | None = None  # the rollout the current steps train on
        self.proving = cfg.proof.rate > 0 and ctx.world_size > 1
        self.proof_failed: list[int] = []  # ranks whose rollout proofs failed for the current batch
        self.stop_requested = False
        self.faults = FaultInjector(ctx.rank)
        if ctx.is_main and ctx.world_size > 1 and self.f == 0 and self.rule != "mean":
            tqdm.write(f"note: {ctx.world_size} ranks leave {self.rule} no Byzantine tolerance "
                       f"(f=0); use 3+ ranks for f=1", file=sys.stderr)

    # -- the step, in named parts --------------------------------------------------------------

    def collect(self, rollout_index: int) -> RolloutBatch:
        """Sample this rank's prompts, generate a group per prompt, score, normalise."""
        gspo, tok, rank = self.cfg.gspo, self.task.tokenizer, self.ctx.rank
        prompts = self.task.sample(rank, rollout_index)
        rollout = generate(
            self.model, prompts.input_ids.to(self.ctx.device), prompts.attention_mask.to(self.ctx.device),
            num_generations=gspo.num_generations, max_new_tokens=gspo.max_completion_length,
            temperature=gspo.temperature, eos_id=tok.eos_id, pad_id=tok.pad_id, generator=self.sampler)
        completions = [tok.decode(row) for row in rollout.completion_ids.tolist()]
        repeat = gspo.num_generations
        with self.tracer.span("reward"):
            rewards, parts = current_reward(self.swapper)(
                [p for p in prompts.prompts for _ in range(repeat)], completions,
                answer=[a for a in prompts.answers for _ in range(repeat)])
        rewards_t = torch.tensor(rewards, dtype=torch.float32, device=self.ctx.device)
        # A reward_flip attacker trains on poisoned rewards; the true ones are logged.
        trained_on = poison_rewards(self.attack, rewards_t, rank, rollout_index)
        advantages = group_advantages(trained_on, repeat, scale=gspo.scale_rewards)
        return RolloutBatch(rollout, advantages, rewards_t, {k: sum(v) / len(v) for k, v in parts.items()},
                            rollout_index, self.reference_logps(rollout))

    def compute_gradients(self, batch: RolloutBatch, *, prove: bool) -> tuple[torch.Tensor, GSPOStats]:
        """GSPO loss of the batch under the current policy, back-propagated into the buffer.
        With ``prove`` (the first update of a rollout), the same forward's hidden states make
        this rank's rollout proofs, which the ranks then check for one another."""
        gspo = self.cfg.gspo
        self.grads.zero()
        logps, hidden = completion_logps(self.model, batch.rollout, gspo.temperature, hidden=prove)
        if prove:
            self.verify_rollouts(batch, hidden)
        loss, stats = gspo_loss_and_stats(
            logps, batch.rollout.old_logps, batch.advantages, batch.rollout.completion_mask,
            epsilon=gspo.epsilon, epsilon_high=gspo.epsilon_high, level=gspo.importance_sampling_level,
            ref_logps=batch.ref_logps, beta=gspo.beta)
        loss.backward()
        return loss.detach(), stats

    @torch.no_grad()
    def reference_logps(self, rollout: Rollout) -> torch.Tensor | None:
        """Completion log-probs under the frozen reference policy, once per rollout (the
        reference never changes); ``None`` when beta = 0."""
        if self.reference is None:
            return None
        return completion_logps(self.reference, rollout, self.cfg.gspo.temperature)[0]

    def verify_rollouts(self, batch: RolloutBatch, hidden: torch.Tensor) -> None:
        """Commit to this rank's rollout and check a sampled part of a neighbour's (collective).
        Ranks whose proofs fail are left out of aggregation until their next rollout."""
        roll, tok = batch.rollout, self.task.tokenizer
        claim = RolloutClaim(roll.input_ids, roll.attention_mask, roll.completion_mask, roll.old_logps,
                             roll.prompt_length, build_proofs(hidden, roll.completion_mask, self.cfg.proof))
        result = cross_verify(
            self.model, claim, step=batch.index, cfg=self.cfg.proof, temperature=self.cfg.gspo.temperature,
            eos_id=tok.eos_id, pad_id=tok.pad_id,
            expected_prompt_ids=lambda r: self.task.sample(r, batch.index).input_ids.repeat_interleave(
                self.cfg.gspo.num_generations, dim=0))
        self.proof_failed = result.failed
        for r in result.failed:
            self._audit(PROOF_FAILURE, {"subject_rank": r, "rollout": batch.index}, rank=r)

    def aggregate(self, step: int) -> RobustReport:
        """Replace this rank's gradient by the robust aggregate of all ranks' (in place), then
        fold the report into every rank's reputation (identically on all ranks)."""
        apply_attack(self.attack, self.grads.buffer, self.ctx.rank, step)
        agg = self.cfg.aggregation
        report = robust_all_reduce(
            self.grads.buffer, **{**agg.all_reduce_kwargs(), "rule": self.rule, "f": self.f},
            weights=self.reputation.weights(agg.trust_weighted), exclude=self.proof_failed,
            authenticator=self.authenticator, step=step if self.authenticator else None)
        audit_auth_failures(self.audit, report.auth_failed, step=step, mode=report.mode)
        if self.proof_failed:
            report = dataclasses.replace(report, flagged=sorted(set(report.flagged) | set(self.proof_failed)))
        was_quarantined = set(self.reputation.quarantined())
        # Deviations across steps count as flags (averaged per update of a rollout).
        persistent = self.reputation.update(report, phase=step % self.cfg.gspo.num_iterations)
        if persistent:
            report = dataclasses.replace(report, flagged=sorted(set(report.flagged) | set(persistent)))
        for r in report.flagged:
            self._audit(DETECTION, {"subject_rank": r, "z": report.z_scores[r] if r < len(report.z_scores) else None,
                                    "nonfinite": r in report.nonfinite, "persistent": r in persistent}, rank=r)
        for r in set(self.reputation.quarantined()) - was_quarantined:
            self._audit(QUARANTINE, {"subject_rank": r, "trust": self.reputation.ranks[r].trust}, rank=r)
        return report

    def optimizer_step(self, report: RobustReport) -> torch.Tensor:
        """Clip and apply the aggregated gradient; on consensus failure apply nothing."""
        max_norm = self.cfg.gspo.max_grad_norm
        grad_norm = self.grads.buffer.norm()
        if not report.consensus_failed:
            if max_norm is not None:
                self.grads.buffer.mul_(torch.clamp(max_norm / (grad_norm + 1e-6), max=1.0))
            self.optimizer.step()
        self.scheduler.step()
        return grad_norm

    def apply_operator_actions(self, step: int) -> None:
        """At a step boundary, on every rank (collective): signed operator requests (stop,
        quarantine, hot swap), then pending hot swaps, all from rank 0."""
        for request in poll_requests(self.inbox, step):
            if request.action == "stop":
                self.stop_requested = True
            elif request.action == "quarantine":
                rank = int(request.args["rank"])
                self.reputation.ranks[rank].quarantined = True
                self._audit(QUARANTINE, {"subject_rank": rank, "by": "operator"}, rank=rank)
            elif request.action == "hotswap":
                for slot, name in request.args["swaps"].items():
                    self.swapper.request(slot, name)
        swaps = self.swapper.sync(step)
        if swaps:
            self._audit(HOT_SWAP, swaps)
        if "aggregator" in swaps:
            self.rule = swaps["aggregator"]
            self.f = tolerated_f(self.rule, self.cfg.aggregation.f, self.ctx.world_size)
        if swaps and self.ctx.is_main:
            tqdm.write(f"step {step}: hot swap {swaps}", file=sys.stderr)

    def save_checkpoint(self, step: int, record: dict, *, now: bool = False) -> None:
        """Every ``checkpoint.every`` steps, or ``now`` (collective): model, optimizer, schedule,
        RNG and reputation; rank 0 audits it and registers it as the child of the previous one."""
        save = self.checkpoints.save if now else self.checkpoints.maybe_save
        info = save(step, self.model, self.optimizer, self.scheduler,
                    {"reputation": self.reputation.state_dict(), "rule": self.rule}, {"sampler": self.sampler})
        if info is None:
            return
        self._audit(CHECKPOINT, {"path": str(info.path), "sha256": info.sha256,
                                 "weights_sha256": info.weights_sha256, "parent": info.parent})
        self.book.checkpoint(info.path, info.step, info.sha256, {"reward_mean": record["reward_mean"]})

    def resume(self) -> int:
        """Restore the newest verified checkpoint when ``checkpoint.resume`` asks for one
        (collective); returns the step to continue from (0 for a fresh start)."""
        resumed = self.checkpoints.load_latest_verified(self.model, self.optimizer, self.scheduler,
                                                        {"sampler": self.sampler})
        for path, reason in self.checkpoints.skipped:
            self._audit(CHECKPOINT_SKIPPED, {"path": path, "reason": reason})
            if self.ctx.is_main:
                tqdm.write(f"warning: skipped corrupt checkpoint {path}: {reason}", file=sys.stderr)
        if resumed is None:
            return 0
        self.reputation.load_state_dict(resumed.extra_state["reputation"])
        self.rule = resumed.extra_state["rule"]
        self.f = tolerated_f(self.rule, self.cfg.aggregation.f, self.ctx.world_size)
        self._audit(RESUME, {"path": str(resumed.info.path), "sha256": resumed.info.sha256}, step=resumed.info.step)
        if self.ctx.is_main:
            tqdm.write(f"resumed from {resumed.info.path} (step {resumed.info.step})", file=sys.stderr)
        return resumed.info.step

    def _admin_key(self) -> bytes | None:
        """The run's admin key from ``security.key_file`` (rank 0 only holds it), else None."""
        if self.keyring is None or not self.ctx.is_main or not self.keyring.admin:
            return None
        return self.keyring.admin_key()

    def _audit(self, kind: str, payload: dict, *, step: int | None = None, rank: int = 0) -> None:
        if self.audit is not None:
            self.audit.append(kind, payload, step=self.step if step is None else step, rank=rank)

    def summarise(self, step: int, batch: RolloutBatch, loss: torch.Tensor, stats: GSPOStats,
                  grad_norm: torch.Tensor, report: RobustReport, times: dict[str, float]) -> dict:
        """Average this step's figures over ranks (one small all-reduce) into a log record, with
        every rank's robustness figures (``rank_*`` lists) and rank 0's system counters."""
        rewards = batch.rewards
        lengths = batch.rollout.completion_mask.sum(-1)
        local = torch.stack([
            rewards.mean(), (rewards ** 2).mean(), lengths.mean(), loss, stats.clip_frac,
            stats.ratio_mean, stats.kl, *[torch.tensor(v) for v in batch.reward_parts.values()],
        ]).float()
        reward_mean, reward_sq, length, loss_, clip, ratio, kl, *parts = all_reduce_mean(local).tolist()
        step_time, ranks = sum(times.values()), self.reputation.ranks
        record = {
            "step": step, "reward_mean": reward_mean,
            "reward_std": max(reward_sq - reward_mean ** 2, 0.0) ** 0.5,
            "loss": loss_, "clip_frac": clip, "ratio_mean": ratio, "kl": kl, "completion_len": length,
            "grad_norm": float(grad_norm), "lr": self.scheduler.get_last_lr()[0],
            "flagged": report.flagged, "quarantined": self.reputation.quarantined(),
            "consensus_failed": report.consensus_failed,
            "step_time_s": step_time, **{f"time_{k}_s": v for k, v in times.items()},
            "tokens_per_s": length * rewards.numel() * self.ctx.world_size / step_time,
            "flagged_frac": len(report.flagged) / self.ctx.world_size,
            "rank_z_score": report.z_scores, "rank_trust": [r.trust for r in ranks],
            "rank_flags": [r.flags for r in ranks], "rank_quarantined": [int(r.quarantined) for r in ranks],
            **self.book.counters(),
        }
        record.update({f"reward/{k}": v for k, v in zip(batch.reward_parts, parts)})
        return record

    # -- the loop ------------------------------------------------------------------------------

    def train(self) -> list[dict]:
        """The loop: resume, then one recipe per optimizer step until ``max_steps`` or a stop."""
        cfg, ctx = self.cfg, self.ctx
        first = self.resume()
        self.start(first)
        bar = tqdm(total=cfg.train.max_steps, initial=first, desc="gspo", dynamic_ncols=True,
                   disable=not (ctx.is_main and cfg.run.progress_bar))
        history: list[dict] = []
        for step in range(first, cfg.train.max_steps):
            self.step = step
            with self.tracer.span("step", step=step):
                record = self.evaluate() if cfg.train.evaluate_only else self.train_step(step)
            history.append(record)
            bar.update(1)
            bar.set_postfix(reward=f"{record['reward_mean']:.3f}")
            if ctx.is_main and ((step + 1) % cfg.run.log_every == 0 or step + 1 == cfg.train.max_steps):
                tqdm.write(console_line(record, cfg.train.max_steps), file=sys.stderr)
            if self.stop_requested:
                self.save_checkpoint(step + 1, record, now=True)
                break
        bar.close()
        self.finish(history, first)
        return history

    def train_step(self, step: int) -> dict:
        """Rollout (every ``num_iterations`` steps), gradients, robust aggregation, optimizer
        step, checkpoint, then rank 0's records and alerts and, at the step boundary, operator
        actions. Each phase is timed and, with tracing on, a span."""
        self.faults.check(step)
        mu, phase = self.cfg.gspo.num_iterations, self.tracer.phase
        times: dict[str, float] = {}
        with phase(times, "rollout"):
            if step % mu == 0:
                self.batch = self.collect(step // mu)
        with phase(times, "backward"):
            loss, stats = self.compute_gradients(self.batch, prove=step % mu == 0 and self.proving)
        with phase(times, "aggregate"):
            report = self.aggregate(step)
        with phase(times, "optimizer"):
            grad_norm = self.optimizer_step(report)
        record = self.summarise(step, self.batch, loss, stats, grad_norm, report, times)
        with phase(times, "checkpoint"):
            self.save_checkpoint(step + 1, record)
        record["time_checkpoint_s"] = times["checkpoint"]
        with self.tracer.span("bookkeeping"):
            self.publish(record, report.z_scores)
        if report.consensus_failed and self.cfg.aggregation.on_consensus_failure == "stop":
            raise ConsensusFailure(report.reason)
        if (step + 1) % self.cfg.bookkeeping.hotswap_every == 0:
            self.apply_operator_actions(step + 1)
        return record

    def evaluate(self) -> dict:
        """One rollout on this step's prompts with no update: the reward figures only."""
        t0 = time.perf_counter()
        batch = self.collect(self.step)
        lengths = batch.rollout.completion_mask.sum(-1)
        local = torch.stack([batch.rewards.mean(), (batch.rewards ** 2).mean(), lengths.mean()]).float()
        mean, sq, length = all_reduce_mean(local).tolist()
        record = {"step": self.step, "reward_mean": mean, "reward_std": max(sq - mean ** 2, 0.0) ** 0.5,
                  "loss": 0.0, "clip_frac": 0.0, "completion_len": length, "flagged": [], "quarantined": [],
                  "step_time_s": time.perf_counter() - t0}
        self.publish(record, [])
        return record

    def publish(self, record: dict, z_scores: list[float]) -> None:
        """Rank 0's outputs of a step record (no-ops elsewhere): events and registry versions,
        metrics files and endpoint, alerts."""
        self.book.step(record["step"], record, z_scores, self.reputation.ranks)
        if self.logger:
            self.logger.log(record)
        if self.alerts:
            self.alerts.observe(record)

    def start(self, first_step: int) -> None:
        """Rank 0 writes the resolved config, audits the start and registers the run."""
        weights = weights_sha256(self.model)
        if self.ctx.is_main:
            (self.run_dir / "config.yaml").write_text(
                yaml.safe_dump(self.cfg.model_dump(mode="json"), sort_keys=False))
        self._audit(RUN_START, {"config_sha256": self.cfg.digest(), "world_size": self.ctx.world_size,
                                "weights_sha256": weights, "first_step": first_step}, step=first_step)
        parent = self.checkpoints.parent
        self.book.start(name=self.run_dir.name, cfg=self.cfg, model_cfg=self.cfg.model,
                        vocab_size=self.task.tokenizer.vocab_size, weights_hash=weights,
                        world_size=self.ctx.world_size, f=self.f,
                        resumed_from=parent.sha256 if parent else None)

    def finish(self, history: list[dict], first_step: int) -> None:
        """Every rank reports its weights hash (they must agree); rank 0 writes the final
        checkpoint and ``summary.json`` and closes the run's entities."""
        weights = weights_sha256(self.model)
        per_rank = gather_objects(weights)
        if not self.ctx.is_main:
            return
        if len(set(per_rank)) > 1:
            tqdm.write(f"warning: ranks ended with different weights: {per_rank}", file=sys.stderr)
        steps = first_step + len(history)
        final = save_checkpoint(self.run_dir / "checkpoints" / "final", self.model,
                                step=steps, metadata={"weights_sha256": weights})
        # The whole run's curve, across resumes: the last record of each step wins.
        curve = list({r["step"]: r["reward_mean"] for r in read_metrics(self.run_dir)}.values())
        window = min(10, len(curve))
        first, last = sum(curve[:window]) / window, sum(curve[-window:]) / window
        self.book.checkpoint(final, steps, weights, {"reward_mean": last})
        self.book.finish("completed", weights, step=steps, reputations=self.reputation.ranks)
        self._audit(RUN_END, {"weights_sha256": weights, "final_checkpoint": str(final)}, step=steps)
        self.summary = {
            "steps": steps, "world_size": self.ctx.world_size, "resumed_at": first_step,
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
        if self.alerts:
            self.alerts.close()
        self.tracer.close()


class ConsensusFailure(RuntimeError):
    """Too many ranks were flagged for the rule to produce a trustworthy update."""


def open_metrics_logger(cfg: Config, ctx: DistContext, run_dir: Path) -> MetricsLogger | None:
    """Rank 0's :class:`MetricsLogger` (``None`` elsewhere), collectively: a Prometheus port
    that rank 0 cannot bind is a :class:`ConfigError` on every rank."""
    logger, error = None, None
    if ctx.is_main:
        try:
            logger = MetricsLogger(run_dir, cfg.run.tensorboard, cfg.metrics)
        except OSError as err:
            error = f"metrics.prometheus_port: cannot serve on {cfg.metrics.prometheus_port} ({err.strerror or err})"
    error = broadcast_object(error)
    if error:
        raise ConfigError(error)
    return logger


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
    except (ConfigError, AuthError, CheckpointError) as err:
        # Raised identically on every rank: a taken run directory, an unusable key file, or
        # an explicit checkpoint.resume path that does not verify.
        print(f"fedgspo.train: error: {err}", file=sys.stderr)
        return 2
    destroy_distributed()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
