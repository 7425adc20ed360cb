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

Exit codes: 0 success, 2 invalid configuration or command line (one line on stderr), 75 stopped
by SIGTERM or SIGUSR1 after writing a checkpoint (requeue and resume with
``checkpoint.resume=auto``; see :mod:`fedgspo.preemption`).
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

from fedgspo.checkpoint import CheckpointError, CheckpointManager, load_site_state, save_site_state
from fedgspo.config import Config, ConfigError, load_config
from fedgspo.distributed import (
    DistContext,
    FlatGradients,
    all_gather_bytes,
    all_gather_single,
    all_reduce_mean,
    broadcast_json,
    broadcast_parameters,
    collective_device,
    destroy_distributed,
    init_distributed,
    participant_ids,
)
from fedgspo.faults import FaultInjector
from fedgspo.federation.federation import Federation
from fedgspo.federation.sites import SiteError, SiteLayout
from fedgspo.gspo.data import Task
from fedgspo.gspo.loss import GSPOStats, backward_in_micro_batches, group_advantages
from fedgspo.gspo.model import (
    ModelError,
    autocast,
    build_model,
    compile_forward,
    load_policy,
    trainable_numel,
    weights_sha256,
)
from fedgspo.gspo.rollout import Rollout, completion_logps, generate
from fedgspo.gspo.task import PromptBatch
from fedgspo.integrity.audit import (
    CHECKPOINT,
    CHECKPOINT_SKIPPED,
    DETECTION,
    HOT_SWAP,
    PREEMPTED,
    PROOF_FAILURE,
    QUARANTINE,
    RELEASE,
    REQUEST_REJECTED,
    RESUME,
)
from fedgspo.integrity.auth import AuthError, UpdateAuthenticator, load_keyring, poll_requests
from fedgspo.integrity.proof import RolloutClaim, build_proofs, cross_verify
from fedgspo.entities.callables import CallableRegistry
from fedgspo.factory import EntityFactory
from fedgspo.operations import TRAIN_WITH_GSPO
from fedgspo.pipeline import load_pipeline, run_pipeline
from fedgspo.preemption import EXIT_PREEMPTED, SIGNALS, Preempted, StopSignals
from fedgspo.preflight import Prepared, prepare
from fedgspo.recorder import open_recorder
from fedgspo.robust.all_reduce import RobustReport, robust_all_reduce
from fedgspo.robust.attacks import apply_attack, poison_rewards, protocol_tamper
from fedgspo.robust.reputation import ReputationTracker
from fedgspo.runfiles import RunFiles, sha256_file
from fedgspo.swappable import build_swapper, current_reward
from fedgspo.telemetry.resources import RESOURCE_KEYS, resource_usage


@dataclass
class RolloutBatch:
    """One rank's scored rollout, reused for ``num_iterations`` optimizer steps."""

    rollout: Rollout
    advantages: torch.Tensor  # (B,)
    rewards: torch.Tensor  # (B,)
    reward_parts: dict[str, tuple[float, int]]  # per reward function: sum and count of its non-None scores
    index: int  # rollout number (the task's step)
    ref_logps: torch.Tensor | None  # (B, T) under the frozen reference; None when beta = 0


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
        if RunFiles(run_dir).holds_run() and cfg.checkpoint.resume != "auto":
            error = (f"run.dir: {run_dir} already holds a run; pick another run.name or run.dir, "
                     "or continue it with checkpoint.resume=auto")
    error, run_dir = broadcast_json([error, None if run_dir is None else str(run_dir)])
    if error:
        raise ConfigError(str(error))
    if not isinstance(run_dir, str):
        raise ConfigError("run.dir: rank 0 shared no run directory")
    return Path(run_dir)


class Trainer:
    """Owns the parts of a run, declared up front: task and rewards, policy and optimizer,
    gradient buffer and robust aggregation, reputation, and rank 0's logger and bookkeeping."""

    def __init__(self, cfg: Config, ctx: DistContext, run_dir: Path, prepared: Prepared) -> None:
        self.cfg, self.ctx, self.files = cfg, ctx, RunFiles(run_dir)
        gspo, agg = cfg.gspo, cfg.aggregation
        # Task and tokenizer (checked before the run directory existed), policy, optimizer.
        self.task, self.tokenizer = prepared.task, prepared.tokenizer
        self.model = build_policy(cfg, self.task).to(ctx.device)
        broadcast_parameters(self.model)
        self.model.train()
        # The loss forward, compiled with train.compile (shares the policy's parameters).
        self.loss_forward = compile_forward(self.model) if cfg.train.compile else self.model
        # Rollouts this run expects: what rollout.compile="auto" weighs against compiling.
        self.expected_rollouts = -(-cfg.train.max_steps // gspo.num_iterations)
        # Only trainable parameters (LoRA: the adapters) are in the buffer the ranks exchange.
        self.grads = FlatGradients(list(self.model.parameters()))
        # Sites: a plain mean inside each, the robust exchange between them (one participant
        # per site), every step or every federated.local_steps steps (collective: builds groups).
        self.fed = Federation(cfg.federated, rank=ctx.rank, world_size=ctx.world_size,
                              local_world_size=ctx.local_world_size, params=self.grads.params)
        # The KL reference is the starting policy, frozen; only built when the KL is on. With
        # LoRA it is the base model itself, with the adapters switched off.
        self.reference = (copy.deepcopy(self.model).eval().requires_grad_(False)
                          if gspo.beta > 0 and cfg.model.lora is None else None)
        self.optimizer = torch.optim.AdamW(
            self.grads.params, lr=gspo.learning_rate, betas=(gspo.adam_beta1, gspo.adam_beta2),
            weight_decay=gspo.weight_decay)
        # Rank 0's record of the run (a no-op recorder elsewhere); first, so an unusable
        # Prometheus port stops the run before anything is written.
        sec = cfg.security
        keyring = load_keyring(sec.key_file) if sec.key_file else None
        self.recorder = open_recorder(cfg, ctx, self.files, keyring)
        self.tracer = self.recorder.tracer
        self.authenticator = (UpdateAuthenticator(keyring, self.fed.site, run_id=run_dir.name)
                              if keyring and sec.authenticate_updates and self.fed.num_sites > 1
                              and self.fed.is_leader else None)
        self.checkpoints = CheckpointManager(run_dir, cfg.checkpoint, rank=ctx.rank)
        # Hot-swappable parts: reward, aggregation rule, LR schedule.
        self.swapper = build_swapper(
            reward=prepared.reward,
            aggregator=agg.rule_for(self.fed.num_sites), lr_schedule=gspo.lr_scheduler_type,
            run_dir=self.recorder.hotswap_root, bus=self.recorder.bus)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: self.swapper["lr_schedule"](s, cfg.train.max_steps, gspo.warmup_steps))
        # Robust aggregation and whom to trust: the rule object lives for the run (it keeps
        # state across steps) and is rebuilt only by a hot swap or a resume.
        # Participants of the cross-site exchange are sites (ranks when every rank is a site).
        self.aggregator = agg.build(self.fed.num_sites)
        # Reputation belongs to participants, not rank numbers (which a restart may reorder).
        try:
            self.participants = self.fed.participants(participant_ids(ctx.local_rank))
        except ValueError as err:
            raise ConfigError(str(err)) from None
        self.reputation = ReputationTracker(
            self.fed.num_sites, agg.reputation, participants=self.participants,
            phases=gspo.num_iterations if self.fed.local_steps == 1 else 1)
        self.attack = cfg.attack
        # Sampling differs per rank; everything that must agree across ranks uses the cfg seed.
        self.sampler = torch.Generator(device=ctx.device).manual_seed(cfg.train.seed * 9973 + ctx.rank)
        self.summary: dict | None = None  # set on rank 0 by finish()
        self.step = 0
        self.batch: RolloutBatch | None = None  # the rollout the current steps train on
        self.proving = cfg.proof.rate > 0 and ctx.world_size > 1
        self.proof_failed: list[int] = []  # sites whose rollout proofs failed for the current batch
        self.proof_schedule = cfg.proof.schedule(ctx.world_size)  # whose rollouts are checked; all ranks agree
        self.stop_requested = False
        # A scheduler's signal on any rank stops every rank after the same step (agreed in
        # summarise's all-reduce); preempted_by names it.
        self.signals = StopSignals()
        self.preempted_by: str | None = None
        self.faults = FaultInjector(ctx.rank)
        if self.fed.num_sites > 1 and self.aggregator.f == 0 and self.aggregator.name != "mean":
            self.recorder.say(f"note: {self.fed.num_sites} participants leave {self.aggregator.name} no Byzantine "
                              f"tolerance (f=0); use 3+ ranks (or sites) for f=1")

    # -- the step, in named parts --------------------------------------------------------------

    def collect(self, rollout_index: int) -> RolloutBatch:
        """Sample this rank's prompts, generate a group per prompt, score, normalise."""
        gspo, rank = self.cfg.gspo, self.ctx.rank
        prompts = self.task.sample(rank, rollout_index)
        rollout = self.generate(prompts, gspo.num_generations, sampler=self.sampler,
                                expected_calls=self.expected_rollouts)
        with self.tracer.span("reward"):
            rewards, parts = self.score(prompts, rollout, gspo.num_generations)
        rewards_t = torch.tensor(rewards, dtype=torch.float32, device=self.ctx.device)
        # A reward_flip attacker trains on poisoned rewards; the true ones are logged.
        trained_on = poison_rewards(self.attack, rewards_t, self.fed.site, rollout_index)
        advantages = group_advantages(trained_on, gspo.num_generations, scale=gspo.scale_rewards)
        return RolloutBatch(rollout, advantages, rewards_t, parts, rollout_index, self.reference_logps(rollout))

    def generate(self, prompts: PromptBatch, num_generations: int, *, sampler: torch.Generator | None,
                 greedy: bool = False, expected_calls: int = 1) -> Rollout:
        """``num_generations`` completions per prompt with the run's sampling settings (top-k 1
        when ``greedy``); ``expected_calls`` of the kind in this run decide whether
        ``rollout.compile=auto`` compiles the decode step."""
        gspo = self.cfg.gspo
        with autocast(self.cfg.model, self.ctx.device):
            return generate(
                self.model, prompts.input_ids.to(self.ctx.device), prompts.attention_mask.to(self.ctx.device),
                num_generations=num_generations, max_new_tokens=gspo.max_completion_length,
                temperature=gspo.temperature, eos_id=self.task.eos_id, pad_id=self.task.pad_id, generator=sampler,
                top_k=1 if greedy else gspo.top_k, top_p=gspo.top_p, repetition_penalty=gspo.repetition_penalty,
                stop_strings=gspo.stop_strings, tokenizer=self.tokenizer, max_batch=gspo.generation_batch_size,
                compile=self.cfg.rollout.compile, expected_calls=expected_calls,
                min_bucket=self.cfg.rollout.min_bucket, min_decode_steps=self.cfg.rollout.auto_min_decode_steps)

    def score(self, prompts: PromptBatch, rollout: Rollout, repeat: int
              ) -> tuple[list[float], dict[str, tuple[float, int]]]:
        """Rewards of the completions (TRL's call: prompts, completions and every other data
        column, each repeated per completion) and, per reward function, the sum and count of
        its scores that were not ``None``."""
        completions = self.task.decode(rollout.completion_ids.tolist())
        columns = {k: [v for v in values for _ in range(repeat)] for k, values in prompts.columns.items()}
        rewards, parts = current_reward(self.swapper)(
            [p for p in prompts.prompts for _ in range(repeat)], completions, **columns)
        return rewards, {name: (sum(s for s in scores if s is not None), sum(s is not None for s in scores))
                         for name, scores in parts.items()}

    def compute_gradients(self, batch: RolloutBatch, *, prove: bool) -> tuple[torch.Tensor, GSPOStats]:
        """GSPO loss of the batch under the current policy, back-propagated into the buffer in
        micro-batches of ``train.micro_batch_size`` rows (the same gradient as one batch). With
        ``prove`` (the first update of a rollout), the same forwards' hidden states make this
        rank's rollout proofs, which the ranks then check for one another."""
        gspo, rollout = self.cfg.gspo, batch.rollout
        self.grads.zero()
        hidden: list[torch.Tensor] = []

        def logps_of(rows: slice) -> torch.Tensor:
            with autocast(self.cfg.model, self.ctx.device):
                logps, states = completion_logps(self.loss_forward, rollout.rows(rows), gspo.temperature, hidden=prove)
            if prove:
                hidden.append(states)
            return logps.float()

        loss, stats = backward_in_micro_batches(
            logps_of, rollout.old_logps, batch.advantages, rollout.completion_mask,
            micro_batch_size=self.cfg.train.micro_batch_size or rollout.old_logps.shape[0],
            epsilon=gspo.epsilon, epsilon_high=gspo.epsilon_high, level=gspo.importance_sampling_level,
            ref_logps=batch.ref_logps, beta=gspo.beta)
        if prove:
            self.verify_rollouts(batch, torch.cat(hidden))
        return loss, stats

    @torch.no_grad()
    def reference_logps(self, rollout: Rollout) -> torch.Tensor | None:
        """Completion log-probs under the frozen reference policy, once per rollout (the
        reference never changes); ``None`` when beta = 0."""
        if self.cfg.gspo.beta == 0:
            return None
        with autocast(self.cfg.model, self.ctx.device):
            if self.reference is not None:
                return completion_logps(self.reference, rollout, self.cfg.gspo.temperature)[0].float()
            with self.model.disable_adapter():
                return completion_logps(self.model, rollout, self.cfg.gspo.temperature)[0].float()

    def verify_rollouts(self, batch: RolloutBatch, hidden: torch.Tensor) -> None:
        """Commit to this rank's rollout and check a sampled part of a neighbour's (collective),
        when the proof schedule selects the neighbour's rollout (``proof.adaptive_every``).
        Ranks whose proofs fail are left out of aggregation until their next rollout. The
        neighbour's prompts are checked too where this rank can draw them (the digit task);
        a data set's shard is private to its rank. The prefill runs through the loss forward
        (compiled with ``train.compile``)."""
        roll, gspo = batch.rollout, self.cfg.gspo
        claim = RolloutClaim(roll.input_ids, roll.attention_mask, roll.completion_mask, roll.old_logps,
                             roll.prompt_length, build_proofs(hidden, roll.completion_mask, self.cfg.proof))
        expected = None
        if self.cfg.task.dataset is None:
            expected = lambda r: self.task.sample(r, batch.index).input_ids.repeat_interleave(  # noqa: E731
                gspo.num_generations, dim=0)
        result = cross_verify(
            self.loss_forward, claim, step=batch.index, cfg=self.cfg.proof, temperature=gspo.temperature,
            eos_id=self.task.eos_id, pad_id=self.task.pad_id, stop_strings=gspo.stop_strings,
            tokenizer=self.tokenizer, expected_prompt_ids=expected, schedule=self.proof_schedule)
        self.proof_schedule.record(result.examined, result.failed)
        self.proof_failed = sorted({self.fed.layout.site_of(r) for r in result.failed})
        for r in result.failed:
            self.recorder.audit(PROOF_FAILURE, {"subject_rank": r, "rollout": batch.index}, step=self.step, rank=r)

    def aggregate(self, step: int) -> RobustReport:
        """Average the gradient inside the site; with per-step sync (``local_steps == 1``) then
        replace it by the robust aggregate across sites (:meth:`cross_site`). With local steps
        the sites train on their own until the round ends (a report of no exchange)."""
        self.fed.mean_in_site(self.grads.buffer)
        if self.fed.local_steps > 1:
            n = self.fed.num_sites
            return RobustReport([0.0] * n, [0.0] * n, [], rule=self.aggregator.spec(), world_size=n)
        return self.cross_site(self.grads.buffer, step, phase=step % self.cfg.gspo.num_iterations)

    def end_round(self, step: int) -> tuple[RobustReport, dict[str, float]]:
        """Close a round of local steps: the sites' pseudo-gradients are robust-aggregated and
        the outer optimizer applies the result on every rank (the round is dropped on a
        consensus failure). Returns the exchange's report and the round's figures."""
        delta = self.fed.pseudo_gradient()
        report = self.cross_site(delta, step, phase=0)
        return report, self.fed.apply_round(delta, report.consensus_failed)

    def cross_site(self, update: torch.Tensor, step: int, *, phase: int) -> RobustReport:
        """Replace ``update`` on every rank by the robust aggregate of the sites' (in place; the
        leaders exchange, then share inside their site), then fold the report into every
        rank's reputation (identically on all ranks). Attacks act on the site's message."""
        agg, fed = self.cfg.aggregation, self.fed
        weights = self.reputation.weights(agg.trust_weighted)
        usable = sum(w > 0 and r not in self.proof_failed for r, w in enumerate(weights))
        rule = agg.fitted(self.aggregator, self.swapper.slots["aggregator"], usable)
        report = None
        if fed.is_leader:
            fed.compensate(update)
            apply_attack(self.attack, update, fed.site, step, group=fed.groups.cross)
            try:
                report = robust_all_reduce(
                    update, rule, **agg.all_reduce_kwargs(), group=fed.groups.cross,
                    compression=fed.cfg.compression,
                    weights=weights, exclude=self.proof_failed,
                    authenticator=self.authenticator, step=step if self.authenticator else None,
                    tamper=protocol_tamper(self.attack, fed.site, step, group=fed.groups.cross))
            except ValueError as err:  # raised alike on every leader: the exchange's own checks
                raise ExchangeError(f"step {step}: {err}") from None
            fed.count_cross(update, agg.mode)
        report = fed.share(update, report)
        self.recorder.audit_auth_failures(report.auth_failed, step=step, mode=report.mode)
        measured = set(report.flagged) | set(self.proof_failed)
        was_quarantined = set(self.reputation.quarantined())
        # Deviations across steps count as flags (averaged per update of a rollout).
        flagged = self.reputation.update(dataclasses.replace(report, flagged=sorted(measured)), phase=phase)
        report = dataclasses.replace(report, flagged=flagged)
        for r in flagged:
            self.recorder.audit(DETECTION, {
                "subject_rank": r, "z": report.z_scores[r] if r < len(report.z_scores) else None,
                "nonfinite": r in report.nonfinite, "persistent": r not in measured}, step=step, rank=r)
        for r in set(self.reputation.quarantined()) - was_quarantined:
            self.recorder.audit(QUARANTINE, {"subject_rank": r, "trust": self.reputation.ranks[r].trust},
                                step=step, rank=r)
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
        for request in poll_requests(self.recorder.inbox, step):
            if request.action == "stop":
                self.stop_requested = True
            elif request.action in ("quarantine", "release"):
                self.hold_or_release(request.action, request.args.get("rank"), step)
            elif request.action == "hotswap":
                for slot, name in request.args["swaps"].items():
                    self.swapper.request(slot, name)
        swaps = self.swapper.sync(step)
        if swaps:
            self.recorder.audit(HOT_SWAP, swaps, step=step)
            self.recorder.say(f"step {step}: hot swap {swaps}")
        if "aggregator" in swaps:
            self.use_rule(swaps["aggregator"])

    def hold_or_release(self, action: str, rank: object, step: int) -> None:
        """An operator's quarantine (held until released) or release of ``rank``; a rank outside
        the world is rejected and audited, never applied."""
        try:
            (self.reputation.hold if action == "quarantine" else self.reputation.release)(rank)
        except ValueError as err:
            self.recorder.audit(REQUEST_REJECTED, {"action": action, "reason": str(err)}, step=step)
            self.recorder.say(f"step {step}: operator {action} rejected: {err}")
            return
        self.recorder.audit(QUARANTINE if action == "quarantine" else RELEASE,
                            {"subject_rank": rank, "by": "operator"}, step=step, rank=rank)
        self.recorder.say(f"step {step}: operator {action} of rank {rank}")

    def use_rule(self, name: str) -> None:
        """Aggregate with rule ``name`` from now on (hot swap, resume); the run's entities follow."""
        self.aggregator = self.cfg.aggregation.build(self.fed.num_sites, rule=name)
        self.recorder.rule_changed(self.aggregator.spec(), self.aggregator.f)

    def save_checkpoint(self, step: int, record: dict, *, now: bool = False) -> None:
        """Every ``checkpoint.every`` steps, or ``now`` (collective): model, optimizer, schedule,
        RNG and reputation; rank 0 audits it, registers it as the child of the previous one and
        marks the checkpoints the save pruned."""
        if not (now or self.checkpoints.due(step)):
            return
        extra = {"reputation": self.reputation.state_dict(), "proof_schedule": self.proof_schedule.state_dict(),
                 "rule": self.swapper.slots["aggregator"],
                 "federated": self.fed.global_state(), "site_states": self.save_site_states(step)}
        info = self.checkpoints.save(step, self.model, self.optimizer, self.scheduler, extra, {"sampler": self.sampler})
        if info is None:
            return
        self.recorder.audit(CHECKPOINT, {"path": str(info.path), "sha256": info.sha256,
                                         "weights_sha256": info.weights_sha256, "parent": info.parent}, step=step)
        self.recorder.checkpoint(info.path, info.step, info.sha256, {"reward_mean": record["reward_mean"]},
                                 pruned=self.checkpoints.pruned)

    def save_site_states(self, step: int) -> list[str]:
        """Each site's leader writes its site's own state (collective); returns the sha256 of
        every site's, in site order ([] when sites hold nothing of their own)."""
        if not self.fed.has_site_state:
            return []
        mine = b""
        if self.fed.is_leader:
            mine = save_site_state(self.files.root, self.fed.site, step, self.fed.site_state(self.optimizer),
                                   keep_last=self.cfg.checkpoint.keep_last + 1).encode()
        hashes = all_gather_bytes(mine)
        return [_hex_digest(hashes[leader]) for leader in self.fed.layout.leaders]

    def resume(self) -> int:
        """Restore the newest verified checkpoint when ``checkpoint.resume`` asks for one
        (collective); returns the step to continue from (0 for a fresh start)."""
        resumed = self.checkpoints.load_latest_verified(self.model, self.optimizer, self.scheduler,
                                                        {"sampler": self.sampler})
        for path, reason in self.checkpoints.skipped:
            self.recorder.audit(CHECKPOINT_SKIPPED, {"path": path, "reason": reason}, step=0)
            self.recorder.say(f"warning: skipped corrupt checkpoint {path}: {reason}")
        if resumed is None:
            return 0
        extra = resumed.extra_state
        self.reputation.load_state_dict(extra["reputation"])
        self.proof_schedule.load_state_dict(extra.get("proof_schedule"))
        self.swapper.slots["aggregator"] = extra["rule"]
        self.aggregator = self.cfg.aggregation.build(self.fed.num_sites, rule=extra["rule"])
        try:
            self.fed.load_global_state(extra.get("federated"))
            if self.fed.has_site_state:
                hashes = extra.get("site_states") or []
                if len(hashes) != self.fed.num_sites:
                    raise ValueError(f"the checkpoint records {len(hashes)} site states for {self.fed.num_sites} sites")
                self.fed.load_site_state(load_site_state(self.files.root, self.fed.site, resumed.info.step,
                                                         hashes[self.fed.site]), self.optimizer)
        except ValueError as err:
            raise CheckpointError(f"{resumed.info.path}: {err}") from None
        self.recorder.audit(RESUME, {"path": str(resumed.info.path), "sha256": resumed.info.sha256},
                            step=resumed.info.step)
        self.recorder.say(f"resumed from {resumed.info.path} (step {resumed.info.step})")
        return resumed.info.step

    def summarise(self, step: int, batch: RolloutBatch, loss: torch.Tensor, stats: GSPOStats,
                  grad_norm: torch.Tensor, report: RobustReport, times: dict[str, float]) -> dict:
        """Average this step's figures over ranks (one small all-reduce) into a log record, with
        every rank's robustness figures (``rank_*`` lists) and rank 0's system counters."""
        rewards = batch.rewards
        lengths = batch.rollout.completion_mask.sum(-1)
        local = torch.stack([
            rewards.mean(), (rewards ** 2).mean(), lengths.mean(), loss, stats.clip_frac,
            stats.ratio_mean, stats.kl, *[torch.tensor(float(self.signals.received == s.name)) for s in SIGNALS],
            *[torch.tensor(float(x)) for part in batch.reward_parts.values() for x in part],
        ]).float()
        reward_mean, reward_sq, length, loss_, clip, ratio, kl, *rest = all_reduce_mean(local).tolist()
        signalled, parts = rest[:len(SIGNALS)], rest[len(SIGNALS):]
        self.preempted_by = next((s.name for s, v in zip(SIGNALS, signalled) if v > 0), self.preempted_by)
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
            "flagged_frac": len(report.flagged) / self.fed.num_sites, **self.fed.take_bytes(),
            "rank_z_score": report.z_scores, "rank_skew": report.skews, "rank_norm": report.norms,
            "rank_cosine": report.cosines,
            "rank_trust": [r.trust for r in ranks], "rank_flags": [r.flags for r in ranks],
            "rank_quarantined": [int(r.quarantined) for r in ranks],
            **self.resources(), **self.recorder.counters(),
        }
        record.update(part_means("reward/", batch.reward_parts, parts))
        return record

    def resources(self) -> dict[str, list[float]]:
        """Every rank's memory, CPU and GPU figures (:mod:`fedgspo.telemetry.resources`) as
        ``rank_<key>`` lists, by rank: one float all-gather (collective)."""
        local = torch.tensor(list(resource_usage(self.ctx.device).values()), dtype=torch.float64)
        if self.ctx.world_size == 1:
            return {f"rank_{key}": [value] for key, value in zip(RESOURCE_KEYS, local.tolist())}
        device = collective_device()
        gathered = torch.empty(self.ctx.world_size * local.numel(), dtype=torch.float64, device=device)
        all_gather_single(gathered, local.to(device))
        per_key = gathered.view(self.ctx.world_size, len(RESOURCE_KEYS)).T.tolist()
        return {f"rank_{key}": values for key, values in zip(RESOURCE_KEYS, per_key)}

    @torch.no_grad()
    def evaluate_split(self) -> dict[str, float]:
        """``eval/*`` figures over ``eval.num_prompts`` prompts of the eval split on every rank
        (one completion each, greedy unless ``eval.greedy`` is off), averaged over ranks."""
        sums: dict[str, tuple[float, int]] = {}
        reward_sum = length_sum = count = 0.0
        for prompts in self.task.eval_batches(self.cfg.eval.num_prompts):
            rollout = self.generate(prompts, 1, sampler=self.sampler, greedy=self.cfg.eval.greedy,
                                    expected_calls=self.cfg.train.max_steps // max(self.cfg.eval.every, 1))
            rewards, parts = self.score(prompts, rollout, 1)
            reward_sum, count = reward_sum + sum(rewards), count + len(rewards)
            length_sum += float(rollout.completion_mask.sum())
            for name, (total, n) in parts.items():
                old = sums.get(name, (0.0, 0))
                sums[name] = (old[0] + total, old[1] + n)
        local = torch.tensor([reward_sum, length_sum, count, *[float(x) for part in sums.values() for x in part]])
        reward_total, length_total, n, *parts_total = all_reduce_mean(local).tolist()
        return {"eval/reward_mean": reward_total / max(n, 1), "eval/completion_len": length_total / max(n, 1),
                **part_means("eval/reward/", sums, parts_total)}

    # -- the loop ------------------------------------------------------------------------------

    def train(self) -> list[dict]:
        """The loop: resume, then one recipe per optimizer step until ``max_steps`` or a stop."""
        cfg = self.cfg
        first = self.resume()
        self.start(first)
        # A bar only where a person watches: a log file (SLURM, CI, > run.log) gets the console
        # lines every run.log_every steps and no carriage-return frames.
        bar = tqdm(total=cfg.train.max_steps, initial=first, desc="gspo", dynamic_ncols=True,
                   disable=not (self.ctx.is_main and cfg.run.progress_bar and sys.stderr.isatty()))
        history: list[dict] = []
        with self.signals:
            for step in range(first, cfg.train.max_steps):
                self.step = step
                with self.tracer.span("step", step=step):
                    record = self.evaluate() if cfg.train.evaluate_only else self.train_step(step)
                history.append(record)
                bar.update(1)
                bar.set_postfix(reward=f"{record['reward_mean']:.3f}")
                if (step + 1) % cfg.run.log_every == 0 or step + 1 == cfg.train.max_steps:
                    self.recorder.say(console_line(record, cfg.train.max_steps))
                if self.stop_requested and self.fed.mid_round(step, cfg.train.max_steps):
                    self.end_round(step)  # a stopped run ends, like a finished one, with one set of weights
                if self.stop_requested or self.preempted_by:
                    self.save_checkpoint(step + 1, record, now=True)
                    if self.preempted_by:
                        bar.close()
                        self.recorder.audit(PREEMPTED, {"signal": self.preempted_by}, step=step + 1)
                        raise Preempted(self.preempted_by, step + 1)
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
        # Proofs are checked against this rank's weights: only while every rank holds the same.
        prove = step % mu == 0 and self.proving and self.fed.round_starts(step)
        with phase(times, "backward"):
            loss, stats = self.compute_gradients(self.batch, prove=prove)
        with phase(times, "aggregate"):
            report = self.aggregate(step)
        with phase(times, "optimizer"):
            grad_norm = self.optimizer_step(report)
        round_figures: dict[str, float] = {}
        if self.fed.round_ends(step, self.cfg.train.max_steps):
            with phase(times, "outer"):
                report, round_figures = self.end_round(step)
        record = self.summarise(step, self.batch, loss, stats, grad_norm, report, times)
        record.update(round_figures)
        if self.cfg.eval.every and (step + 1) % self.cfg.eval.every == 0:
            with phase(times, "eval"):
                record.update(self.evaluate_split())
            record["time_eval_s"] = times["eval"]
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
        """A step record's outputs on rank 0: events and registry versions, metrics, alerts."""
        self.recorder.publish(record, z_scores, self.reputation.ranks)

    def start(self, first_step: int) -> None:
        """Rank 0 writes the resolved config, audits the start and registers the run with the
        input entities bound to its recorder (:func:`fedgspo.operations.train_with_gspo`)."""
        fed = self.fed
        every = "step" if fed.local_steps == 1 else f"{fed.local_steps} steps (one round)"
        self.recorder.say(f"policy: {sum(p.numel() for p in self.model.parameters()):,} parameters, "
                          f"{trainable_numel(self.model):,} trained and exchanged every {every}")
        if not fed.layout.trivial or fed.local_steps > 1 or fed.cfg.compression != "none":
            self.recorder.say(f"federation: {fed.num_sites} sites {[list(s) for s in fed.layout.sites]}, "
                              f"local_steps={fed.local_steps}, compression={fed.cfg.compression}"
                              f"{' with error feedback' if fed.feedback else ''}")
        parent = self.checkpoints.parent
        self.recorder.start(
            first_step=first_step, world_size=self.ctx.world_size, participants=self.participants,
            weights_sha256=weights_sha256(self.model),
            rule=self.aggregator.spec(), f=self.aggregator.f, resumed_from=parent.sha256 if parent else None)

    def finish(self, history: list[dict], first_step: int) -> None:
        """Every rank reports its weights hash (they must agree: bytes, never pickle); rank 0
        writes the final checkpoint and ``summary.json`` and closes the run's entities."""
        per_rank = [_hex_digest(blob) for blob in all_gather_bytes(weights_sha256(self.model).encode())]
        self.summary = self.recorder.finish(
            self.model, tokenizer=self.tokenizer, merge_lora=self.cfg.checkpoint.final_lora == "merged",
            steps=first_step + len(history), first_step=first_step, world_size=self.ctx.world_size,
            rule=self.aggregator.spec(), f=self.aggregator.f,
            seconds=sum(r["step_time_s"] for r in history), weights_per_rank=per_rank,
            reputation=self.reputation.state_dict()["ranks"], reputations=self.reputation.ranks)

    def close(self, outcome: str | None = None) -> None:
        """Close rank 0's record; ``outcome`` ("failed", "cancelled") marks a run that did not
        finish."""
        self.recorder.close(outcome)


def build_policy(cfg: Config, task: Task) -> torch.nn.Module:
    """The policy with its training options (precision, checkpointing, LoRA): the local model
    of ``model.path`` for a data set; for the digit task a tiny model built for its characters,
    or ``model.path`` checked against them. Raises ``ModelError`` (one line)."""
    if cfg.task.dataset is not None:
        return load_policy(cfg.model, seed=cfg.train.seed, tokenizer=False)[0]
    tok = task.tokenizer
    return build_model(cfg.model, tok.vocab_size, pad_id=tok.pad_id, bos_id=tok.bos_id, eos_id=tok.eos_id,
                       seed=cfg.train.seed)


def dataset_info(cfg: Config, task: Task) -> dict:
    """``DatasetEntity`` fields of the run's data as rank 0 sees it (its own file and shard)."""
    if cfg.task.dataset is None:
        return {"name": f"digits/{cfg.task.name}", "source": "synthetic"}
    path = Path(task.path)
    return {"name": path.name, "source": str(path), "split": cfg.task.split, "num_examples": len(task.rows),
            "content_hash": sha256_file(path) if path.is_file() else None}


def part_means(prefix: str, parts: dict[str, tuple[float, int]], totals: list[float]) -> dict[str, float]:
    """``{prefix + name: sum / count}`` from the flattened (sum, count) pairs ``totals`` of the
    reward functions ``parts`` (in its order); a function that scored nothing is left out."""
    return {f"{prefix}{name}": totals[2 * i] / totals[2 * i + 1]
            for i, name in enumerate(parts) if totals[2 * i + 1] > 0}


def _hex_digest(blob: bytes) -> str:
    """A peer's sha256 as 64 lower-case hex characters; anything else reads as ``"invalid"``."""
    text = blob.decode("ascii", errors="replace")
    return text if len(text) == 64 and all(c in "0123456789abcdef" for c in text) else "invalid"


class ConsensusFailure(RuntimeError):
    """Too many ranks were flagged for the rule to produce a trustworthy update."""


class ExchangeError(RuntimeError):
    """The robust exchange refused a call on every participant: their metadata disagree (a
    participant's wrong numel, dtype, f or configuration, e.g. a Byzantine one's: SECURITY.md)."""


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
    """Train one run on every rank through the ``train_with_gspo`` operation, its config, model
    and data set entities built from ``cfg`` on each rank (:class:`fedgspo.factory.EntityFactory`);
    returns its summary on rank 0 (``None`` elsewhere). Raises :class:`ConfigError` when the
    run directory is taken (on every rank)."""
    hf_logging.disable_progress_bar()  # transformers' bar on every checkpoint write
    try:
        SiteLayout.from_config(cfg.federated, ctx.world_size, ctx.local_world_size)
    except SiteError as err:
        raise ConfigError(str(err)) from None
    prepared = prepare(cfg, ctx)
    run_dir = resolve_run_dir(cfg, ctx)
    try:
        trainer = Trainer(cfg, ctx, run_dir, prepared)
    except ModelError as err:
        raise ConfigError(str(err)) from None
    factory = EntityFactory(cfg, run_dir.name)
    try:
        inputs = factory.inputs(trainer.model.config, weights_sha256(trainer.model), dataset_info(cfg, prepared.task))
    except BaseException:
        trainer.close(outcome="failed")
        raise
    CallableRegistry.execute(TRAIN_WITH_GSPO, inputs.config, inputs.model, inputs.dataset, trainer=trainer)
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
    except (ConsensusFailure, ExchangeError) as err:
        # Raised on every rank alike (with local steps, a site's other ranks then fail in the
        # broadcast of the report: their leader's line names the cause).
        print(f"fedgspo.train: error: {err}", file=sys.stderr)
        return 1
    except Preempted as stop:
        if ctx.is_main:
            print(f"fedgspo.train: {stop}", file=sys.stderr)
        destroy_distributed()
        return EXIT_PREEMPTED
    destroy_distributed()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
