"""Rank 0's record of a run: entities in the registry, events on the bus, ``events.jsonl``.

The trainer calls :class:`RunBookkeeper` at fixed points (start, every step, every checkpoint,
finish). On other ranks, or with ``bookkeeping.enabled=false``, the same calls go to a
:class:`~fedgspo.entities.NullRegistry` and a :class:`~fedgspo.entities.events.NullEventBus` and cost
next to nothing, so the training loop has no ``if rank == 0`` branches for bookkeeping.

Cost on the hot path: one event emit (queued, dispatched on the bus's worker thread) and a
few in-memory registry writes per step; SQLite is written behind on a writer thread. A
failing event handler is isolated by the bus and never reaches training.

Failure behaviour: a registry write that loses its version check is retried by the conflict
resolver; one that exhausts the retry budget raises ``OperationRejectedError`` here, which the
trainer lets end the run (bookkeeping that silently diverges from training is worse).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

from fedgspo.entities.conflicts import OperationPriority
from fedgspo.entities import (
    ConfigEntity,
    ByzantineDetectorEntity,
    DatasetEntity,
    GSPOConfigEntity,
    GSPOTrainingRunEntity,
    ModelCheckpointEntity,
    ModelEntity,
    ReputationEntity,
)
from fedgspo.entities.registry import EntityRegistry, NullRegistry
from fedgspo.entities.events import (
    ByzantineRankFlagged,
    CheckpointCreated,
    Event,
    EventBus,
    NullEventBus,
    ReputationChanged,
    StepCompleted,
    TrainingCompleted,
    TrainingStarted,
)
from fedgspo import runfiles

EVENTS_FILENAME = runfiles.EVENTS


class BookkeepingConfig(BaseModel):
    """Registry, events and their files (rank 0)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    enabled: bool = Field(True, description="Record entities and events; off leaves only metrics.")
    registry_path: Path | None = Field(
        None, description="SQLite registry file; default <run dir>/registry.sqlite. Several runs "
        "may share one file (writes are then version-checked transactions, not write-behind).")
    events_file: bool = Field(True, description="Append every event to <run dir>/events.jsonl.")
    hotswap_every: int = Field(
        10, gt=0, description="Steps between hot-swap checks (<run dir>/hotswap.json); each is a broadcast.")


class _EventFile:
    """Bus handler appending events as JSON lines; runs on the bus's worker thread."""

    def __init__(self, path: Path) -> None:
        self._file = path.open("a", buffering=1)

    def __call__(self, event: Event) -> None:
        record = {"type": type(event).__name__, **event.model_dump(mode="json")}
        self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._file.close()


def _reputation_fields(rep: Any) -> dict[str, Any]:
    """ReputationEntity fields from a :class:`fedgspo.robust.reputation.RankReputation`."""
    return {"trust_score": rep.trust, "flag_count": rep.flags, "clean_count": rep.steps - rep.flags,
            "quarantined": rep.quarantined}


class RunBookkeeper:
    """Entities and events of one run. Construct on every rank; only rank 0 records."""

    def __init__(self, cfg: BookkeepingConfig, run_dir: Path, *, rank: int) -> None:
        self.rank = rank
        active = cfg.enabled and rank == 0
        self.bus: EventBus | NullEventBus = EventBus() if active else NullEventBus()
        self._events_file: _EventFile | None = None
        if active and cfg.events_file:
            self._events_file = _EventFile(Path(run_dir) / EVENTS_FILENAME)
            self.bus.subscribe(Event, self._events_file)
        if active:
            shared = cfg.registry_path is not None
            path = cfg.registry_path or runfiles.RunFiles(run_dir).registry
            self.registry: EntityRegistry | NullRegistry = EntityRegistry(
                path, bus=self.bus, write_behind=not shared)
        else:
            self.registry = NullRegistry()
        self.active = active
        self.run_id: UUID | None = None
        self.model_id: UUID | None = None
        self._reputation_ids: dict[int, UUID] = {}
        self._last_reputation: dict[int, tuple] = {}
        self._last_checkpoint: UUID | None = None
        self._detector_id: UUID | None = None

    # -- the calls the trainer makes -----------------------------------------------------------

    def start(self, *, name: str, cfg: Any, model_info: dict[str, Any], dataset_info: dict[str, Any],
              weights_hash: str, world_size: int, rule: str, f: int, resumed_from: str | None = None) -> None:
        """Register config, dataset, model, run, detector and one reputation per rank; or, when
        the run resumes (``resumed_from``: the checkpoint's sha256) and the registry already
        holds it, continue those entities, the next checkpoint descending from that one."""
        if not self.active:
            return
        if resumed_from and self._continue(name, resumed_from, cfg.train.max_steps):
            return
        gspo = cfg.gspo
        config, _dataset, model = self.registry.register_many([
            GSPOConfigEntity(
                name=name, values=cfg.model_dump(mode="json"), digest=cfg.digest(),
                **gspo.model_dump(include=set(GSPOConfigEntity.model_fields) - set(ConfigEntity.model_fields))),
            DatasetEntity(**dataset_info),
            ModelEntity(name=name, weights_hash=weights_hash, precision=cfg.model.dtype, **model_info),
        ])
        run = self.registry.register(GSPOTrainingRunEntity(
            name=name, config_id=config.lineage_id, policy_model_id=model.lineage_id,
            total_steps=cfg.train.max_steps, world_size=world_size, num_byzantine=f,
            aggregation_rule=rule, status="running"))
        detector = self.registry.register(ByzantineDetectorEntity(
            rule=rule, world_size=world_size, num_byzantine=f, z_threshold=cfg.aggregation.z_threshold,
            quarantine_after=cfg.aggregation.reputation.quarantine_after, run_id=run.lineage_id))
        self._detector_id = detector.lineage_id
        reps = self.registry.register_many(ReputationEntity(rank=r, run_id=run.lineage_id)
                                           for r in range(world_size))
        self.run_id, self.model_id = run.lineage_id, model.lineage_id
        self._reputation_ids = {e.rank: e.lineage_id for e in reps}
        self.bus.emit(TrainingStarted(run_id=run.lineage_id, total_steps=cfg.train.max_steps, rank=0))

    def _continue(self, name: str, checkpoint_sha256: str, total_steps: int) -> bool:
        runs = [r for r in self.registry.query(GSPOTrainingRunEntity) if r.name == name]
        if not runs:
            return False
        run = runs[-1]
        self.run_id, self.model_id = run.lineage_id, run.policy_model_id
        self._reputation_ids = {e.rank: e.lineage_id
                                for e in self.registry.query(ReputationEntity, run_id=run.lineage_id)}
        detectors = self.registry.query(ByzantineDetectorEntity, run_id=run.lineage_id)
        self._detector_id = detectors[-1].lineage_id if detectors else None
        parents = self.registry.query(ModelCheckpointEntity, checkpoint_hash=checkpoint_sha256)
        self._last_checkpoint = parents[-1].lineage_id if parents else None
        self.registry.update(self.run_id, lambda e: e.evolve(status="running", total_steps=total_steps),
                             priority=OperationPriority.HIGH)
        self.bus.emit(TrainingStarted(run_id=run.lineage_id, total_steps=total_steps, rank=0))
        return True

    def step(self, step: int, record: dict[str, Any], z_scores: list[float],
             reputations: list[Any] | None = None) -> None:
        """Emit the step's events; version the run and every reputation that changed."""
        if not self.active:
            return
        metrics = {k: float(v) for k, v in record.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
        self.bus.emit(StepCompleted(step=step, rank=0, loss=metrics.get("loss"), metrics=metrics,
                                    duration_s=metrics.get("step_time_s")))
        for r in record.get("flagged", []):
            self.bus.emit(ByzantineRankFlagged(flagged_rank=r, score=z_scores[r] if r < len(z_scores) else 0.0,
                                               step=step, rank=0, reason="robust z-score"))
        self.registry.update(self.run_id, lambda e: e.evolve(step=step + 1), priority=OperationPriority.HIGH)
        for rep in reputations or []:
            self._record_reputation(step, rep)

    def _record_reputation(self, step: int, rep: Any, *, force: bool = False) -> None:
        # A new version only when trust, flags or quarantine moved: clean steps alone are
        # counted in memory and written by `finish`.
        fields = _reputation_fields(rep)
        key = (fields["trust_score"], fields["flag_count"], fields["quarantined"])
        previous = self._last_reputation.get(rep.rank, (1.0, 0, False))
        if key == previous and not force:
            return
        self._last_reputation[rep.rank] = key
        self.registry.update(self._reputation_ids[rep.rank], lambda e: e.evolve(**fields, last_step=step),
                             priority=OperationPriority.HIGH)
        if key == previous:
            return
        old_trust = previous[0]
        self.bus.emit(ReputationChanged(subject_rank=rep.rank, old_trust=old_trust, new_trust=rep.trust,
                                        quarantined=rep.quarantined, step=step, rank=0))

    def rule_changed(self, rule: str, f: int) -> None:
        """A hot swap replaced the aggregation rule: version the run and its detector."""
        if not self.active or self.run_id is None:
            return
        self.registry.update(self.run_id, lambda e: e.evolve(aggregation_rule=rule, num_byzantine=f),
                             priority=OperationPriority.HIGH)
        if self._detector_id is not None:
            self.registry.update(self._detector_id, lambda e: e.evolve(rule=rule, num_byzantine=f),
                                 priority=OperationPriority.HIGH)

    def checkpoint(self, path: Path, step: int, sha256: str, metrics: dict[str, float]) -> UUID | None:
        """Register a checkpoint as the child of the previous one; returns its lineage id."""
        if not self.active:
            return None
        ck = self.registry.register(ModelCheckpointEntity(
            base_model_id=self.model_id, path=str(path), step=step, checkpoint_hash=sha256,
            metrics={k: float(v) for k, v in metrics.items()}, parent_checkpoint_id=self._last_checkpoint))
        self._last_checkpoint = ck.lineage_id
        self.bus.emit(CheckpointCreated(checkpoint_id=ck.lineage_id, path=str(path), step=step, rank=0))
        return ck.lineage_id

    def finish(self, status: str, weights_hash: str | None = None, step: int | None = None,
               reputations: list[Any] | None = None) -> None:
        """Mark the run ``completed`` or ``failed``, the model's final weights and every rank's
        final reputation."""
        if not self.active or self.run_id is None:
            return
        for rep in reputations or []:
            self._record_reputation(step or 0, rep, force=True)
        self.registry.update(self.run_id, lambda e: e.evolve(status=status), priority=OperationPriority.CRITICAL)
        if weights_hash:
            self.registry.update(self.model_id, lambda e: e.evolve(weights_hash=weights_hash),
                                 priority=OperationPriority.NORMAL)
        self.bus.emit(TrainingCompleted(run_id=self.run_id, status=status, rank=0))

    def counters(self) -> dict[str, int]:
        """Rank 0's system figures for the step record: registry conflicts, retries and
        rejections (cumulative), events waiting for dispatch and events dropped; ``{}`` when
        not recording."""
        if not self.active:
            return {}
        registry, bus = self.registry.resolver.metrics(), self.bus.stats()
        return {"registry_conflicts": registry["conflicts"], "registry_retries": registry["retries"],
                "registry_rejections": registry["rejections"], "event_queue_depth": bus["queue_depth"],
                "events_dropped": bus["dropped"]}

    def close(self) -> None:
        """Flush and close the registry (persisting write-behind versions) and the bus."""
        self.registry.close()
        self.bus.close()
        if self._events_file:
            self._events_file.close()
