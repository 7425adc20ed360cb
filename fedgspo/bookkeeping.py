"""Rank 0's record of a run: entities in the registry, events on the bus, ``events.jsonl``.

The trainer calls :class:`RunBookkeeper` at fixed points (start, every step, every checkpoint,
finish). On other ranks, or with ``bookkeeping.enabled=false``, the same calls go to a
:class:`~fedgspo.entities.NullRegistry` and a :class:`~fedgspo.entities.events.NullEventBus` and cost
next to nothing, so the training loop has no ``if rank == 0`` branches for bookkeeping.

Cost: one event emit (queued, dispatched on the bus's worker thread) and a few in-memory
registry writes per step; SQLite is written behind on a writer thread. In a run, the
:class:`~fedgspo.recorder.Recorder` makes these calls on its own writer thread, not the
training thread. A failing event handler is isolated by the bus and never reaches training.

Events form a tree: ``TrainingStarted`` is the parent of every ``StepCompleted`` and of
``TrainingCompleted``; a step's ``ByzantineRankFlagged``, ``ReputationChanged`` and
``CheckpointCreated`` events have that step's ``StepCompleted`` as parent. Every event of the
run's bus is also emitted on the process-wide default bus
(:func:`fedgspo.entities.events.get_event_bus`), where module-level ``@fedgspo.on(...)``
handlers run on that bus's own thread: a slow or failing user handler delays or breaks only
itself (its errors and drops are counted, see :meth:`RunBookkeeper.counters`).

Writes run as operations of the conflict resolver with their priorities: the run's step and
status, the model's weights and the reputations as training state (HIGH,
:class:`~fedgspo.entities.conflicts.StructuralOperation`); checkpoint records, the model's
lineage and the detector's verdicts NORMAL; marking pruned checkpoints LOW. Every version
written is kept for :meth:`RunBookkeeper.take_writes` (the recorder audits them).

Failure behaviour: a registry write that loses its version check is retried by the conflict
resolver; one that exhausts the retry budget raises ``OperationRejectedError`` here, which the
trainer lets end the run (bookkeeping that silently diverges from training is worse).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, NamedTuple
from uuid import UUID, uuid4

from pydantic import BaseModel, ConfigDict, Field

from fedgspo.entities.base import Entity
from fedgspo.entities.callables import CallableRegistry
from fedgspo.entities.conflicts import (
    LowPriorityOperation,
    NormalOperation,
    Operation,
    OperationPriority,
    StructuralOperation,
)
from fedgspo.entities import (
    ByzantineDetectorEntity,
    GSPOTrainingRunEntity,
    ModelCheckpointEntity,
    ModelEntity,
    ModelLineageEntity,
    ReputationEntity,
)
from fedgspo.entities.registry import EntityRegistry, NullRegistry
from fedgspo.factory import EntityFactory, RunInputs
from fedgspo.operations import DETECT_BYZANTINE_ENTITIES
from fedgspo.entities.events import (
    ByzantineRankFlagged,
    CheckpointCreated,
    Event,
    EventBus,
    NullEventBus,
    ReputationChanged,
    get_event_bus,
    StepCompleted,
    TrainingCompleted,
    TrainingStarted,
)
from fedgspo import runfiles

EVENTS_FILENAME = runfiles.EVENTS
#: How long closing a run waits for user hooks to take the run's last events.
HOOKS_CLOSE_TIMEOUT_S = 10.0


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
    hooks: bool = Field(
        True, description="Also deliver the run's events to module-level @fedgspo.on handlers (the default bus).")
    writer_queue: int = Field(
        4096, gt=0, description="Bookkeeping calls waiting for rank 0's writer thread before the training "
        "thread waits for room; a crash loses at most the calls queued since the last checkpoint.")


class _EventFile:
    """Bus handler appending events as JSON lines; runs on the bus's worker thread."""

    def __init__(self, path: Path) -> None:
        self._file = path.open("a", buffering=1)

    def __call__(self, event: Event) -> None:
        record = {"type": type(event).__name__, **event.model_dump(mode="json")}
        self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._file.close()


class ReputationSnapshot(NamedTuple):
    """The figures of a :class:`fedgspo.robust.reputation.RankReputation` the registry keeps,
    copied at the step they belong to (the tracker's objects change on the next step)."""

    rank: int
    trust: float
    steps: int
    flags: int
    quarantined: bool


def snapshot_reputations(reputations: list[Any]) -> list[ReputationSnapshot]:
    """Copies of the registry's reputation figures, safe to record on another thread."""
    return [ReputationSnapshot(r.rank, r.trust, r.steps, r.flags, r.quarantined) for r in reputations]


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
        self.hooks: EventBus | NullEventBus = NullEventBus()
        if active and cfg.hooks:
            default = get_event_bus()
            if default is not self.bus:
                self.hooks = default
                self.bus.subscribe(Event, default.emit)
        self._writes: list[dict[str, Any]] = []
        if active:
            shared = cfg.registry_path is not None
            path = cfg.registry_path or runfiles.RunFiles(run_dir).registry
            self.registry: EntityRegistry | NullRegistry = EntityRegistry(
                path, bus=self.bus, write_behind=not shared, on_write=self._written)
        else:
            self.registry = NullRegistry()
        self.active = active
        self.run_id: UUID | None = None
        self.model_id: UUID | None = None
        self.trained_model: ModelEntity | None = None  # the model's version after finish("completed")
        self._run_event: UUID | None = None
        self._step_events: dict[int, UUID] = {}
        self._checkpointed_step: int | None = None
        self._last_metrics: dict[str, float] = {}
        self._reputation_ids: dict[int, UUID] = {}
        self._last_reputation: dict[int, tuple] = {}
        self._last_checkpoint: UUID | None = None
        self._checkpoint_ids: dict[str, UUID] = {}  # path -> lineage_id of the checkpoints of this model
        self._lineage_id: UUID | None = None
        self._detector_id: UUID | None = None

    def _written(self, entity: Entity, data: str) -> None:
        """The registry's write hook: one audit line's worth per version (type, ids, sha256)."""
        self._writes.append({"type": entity.type_name(), "lineage_id": str(entity.lineage_id),
                             "version": entity.version, "ecs_id": str(entity.ecs_id),
                             "sha256": hashlib.sha256(data.encode()).hexdigest()})

    def take_writes(self) -> list[dict[str, Any]]:
        """The entity versions written since the last call (type, lineage_id, version, ecs_id
        and the sha256 of the stored JSON), oldest first; call from the thread that writes."""
        writes, self._writes = self._writes, []
        return writes

    def _apply(self, op: Operation) -> Entity:
        """Commit ``op`` through the registry's conflict resolver (Pre-ECS staging, OCC)."""
        return self.registry.resolver.execute(op)

    # -- the calls the trainer makes -----------------------------------------------------------

    def start(self, *, name: str, cfg: Any, inputs: RunInputs, world_size: int, rule: str, f: int,
              resumed_from: str | None = None) -> None:
        """Register the run's inputs (config, data set, model, reference), the run linked to
        them, its detector, one reputation per rank and the model's checkpoint lineage; or,
        when the run resumes (``resumed_from``: the checkpoint's sha256) and the registry
        already holds it, continue those entities, the next checkpoint descending from that one."""
        if not self.active:
            return
        if resumed_from and self._continue(name, resumed_from, cfg.train.max_steps):
            return
        factory = EntityFactory(cfg, name)
        self.registry.register_many([inputs.config, inputs.dataset, inputs.model,
                                     *([inputs.reference] if inputs.reference else [])])
        run = self.registry.register(factory.run(inputs, world_size=world_size, rule=rule, f=f))
        detector = self.registry.register(factory.detector(run.lineage_id, world_size=world_size, rule=rule, f=f))
        reps = self.registry.register_many(factory.reputations(run.lineage_id, world_size))
        lineage = self.registry.register(factory.lineage(inputs.model))
        self.run_id, self.model_id = run.lineage_id, inputs.model.lineage_id
        self._detector_id, self._lineage_id = detector.lineage_id, lineage.lineage_id
        self._reputation_ids = {e.rank: e.lineage_id for e in reps}
        self._started(run.config_id, cfg.train.max_steps)

    def _started(self, config_id: UUID | None, total_steps: int) -> None:
        started = TrainingStarted(run_id=self.run_id, model_id=self.model_id, config_id=config_id,
                                  total_steps=total_steps, rank=0)
        self._run_event = started.event_id
        self.bus.emit(started)

    def _step_event(self, step: int) -> UUID:
        """The event_id of step ``step``'s ``StepCompleted``, fixed before it is emitted (a
        checkpoint is recorded before its step's event)."""
        found = self._step_events.get(step)
        if found is None:
            found = self._step_events[step] = uuid4()
            for old in [s for s in self._step_events if s < step - 1]:
                del self._step_events[old]
        return found

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
        lineages = self.registry.query(ModelLineageEntity, root_model_id=run.policy_model_id)
        self._lineage_id = lineages[-1].lineage_id if lineages else None
        checkpoints = self.registry.query(ModelCheckpointEntity, base_model_id=run.policy_model_id)
        self._checkpoint_ids = {c.path: c.lineage_id for c in checkpoints}
        parents = [c for c in checkpoints if c.checkpoint_hash == checkpoint_sha256]
        self._last_checkpoint = parents[-1].lineage_id if parents else None
        self._apply(StructuralOperation("run.resume", self.run_id,
                                        lambda e: e.evolve(status="running", total_steps=total_steps)))
        self._started(run.config_id, total_steps)
        return True

    def step(self, step: int, record: dict[str, Any], z_scores: list[float],
             reputations: list[Any] | None = None) -> None:
        """Emit the step's events; version the run and every reputation that changed, and the
        detector when the ranks it holds Byzantine changed.
        ``reputations``: objects with the fields of :class:`ReputationSnapshot`."""
        if not self.active:
            return
        metrics = {k: float(v) for k, v in record.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
        self._last_metrics = metrics
        event_id = self._step_event(step)
        self.bus.emit(StepCompleted(event_id=event_id, parent_id=self._run_event, run_id=self.run_id, step=step,
                                    rank=0, loss=metrics.get("loss"), metrics=metrics,
                                    duration_s=metrics.get("step_time_s"),
                                    checkpoint_triggered=self._checkpointed_step == step + 1))
        for r in record.get("flagged", []):
            self.bus.emit(ByzantineRankFlagged(flagged_rank=r, score=z_scores[r] if r < len(z_scores) else 0.0,
                                               step=step, rank=0, reason="robust z-score", parent_id=event_id))
        self._apply(StructuralOperation("run.step", self.run_id, lambda e: e.evolve(step=step + 1)))
        if any([self._record_reputation(step, rep) for rep in reputations or []]):
            self._detect()

    def _record_reputation(self, step: int, rep: Any, *, force: bool = False) -> bool:
        """Version the rank's reputation when trust, flags or quarantine moved (clean steps
        alone are counted in memory and written by ``finish``); returns whether they moved."""
        fields = _reputation_fields(rep)
        key = (fields["trust_score"], fields["flag_count"], fields["quarantined"])
        previous = self._last_reputation.get(rep.rank, (1.0, 0, False))
        if key == previous and not force:
            return False
        self._last_reputation[rep.rank] = key
        self._apply(StructuralOperation("reputation.update", self._reputation_ids[rep.rank],
                                        lambda e: e.evolve(**fields, last_step=step)))
        if key == previous:
            return False
        self.bus.emit(ReputationChanged(subject_rank=rep.rank, old_trust=previous[0], new_trust=rep.trust,
                                        quarantined=rep.quarantined, step=step, rank=0,
                                        parent_id=self._step_event(step)))
        return True

    def _detect(self) -> None:
        """Version the detector when the ranks it holds Byzantine (``detect_byzantine_entities``
        over the run's reputations) changed (NORMAL: a verification result)."""
        if self._detector_id is None:
            return
        detector = self.registry.get(self._detector_id)
        reps = [self.registry.get(i) for i in self._reputation_ids.values()]
        found = [r.rank for r in CallableRegistry.execute(DETECT_BYZANTINE_ENTITIES, detector, reps)]
        if found != detector.byzantine_ranks:
            self._apply(NormalOperation("detector.verdict", self._detector_id,
                                        lambda e: e.evolve(byzantine_ranks=found)))

    def rule_changed(self, rule: str, f: int) -> None:
        """A hot swap replaced the aggregation rule: version the run and its detector."""
        if not self.active or self.run_id is None:
            return
        self._apply(StructuralOperation("run.rule", self.run_id,
                                        lambda e: e.evolve(aggregation_rule=rule, num_byzantine=f)))
        if self._detector_id is not None:
            self._apply(NormalOperation("detector.rule", self._detector_id,
                                        lambda e: e.evolve(rule=rule, num_byzantine=f)))

    def checkpoint(self, path: Path, step: int, sha256: str, metrics: dict[str, float],
                   pruned: list[Path] | None = None) -> UUID | None:
        """Register a checkpoint as the child of the previous one and append it to the model's
        lineage (NORMAL), then mark the ``pruned`` checkpoints (LOW: clean-up); returns its
        lineage id. ``step`` counts the steps done, so its event's parent is step ``step - 1``'s
        event. A pruned path this run never registered is skipped."""
        if not self.active:
            return None
        ck = self.registry.register(ModelCheckpointEntity(
            base_model_id=self.model_id, path=str(path), step=step, checkpoint_hash=sha256,
            metrics={k: float(v) for k, v in metrics.items()}, parent_checkpoint_id=self._last_checkpoint))
        self._last_checkpoint = ck.lineage_id
        self._checkpoint_ids[ck.path] = ck.lineage_id
        if self._lineage_id is not None:
            self._apply(NormalOperation("lineage.append", self._lineage_id,
                                        lambda e: e.evolve(checkpoint_ids=[*e.checkpoint_ids, ck.lineage_id])))
        for gone in pruned or []:
            target = self._checkpoint_ids.pop(str(gone), None)
            if target is not None:
                self._apply(LowPriorityOperation("checkpoint.prune", target, lambda e: e.evolve(pruned=True)))
        self._checkpointed_step = step
        parent = self._step_event(step - 1) if step > 0 else self._run_event
        self.bus.emit(CheckpointCreated(run_id=self.run_id, checkpoint_id=ck.lineage_id, path=str(path),
                                        step=step, rank=0, parent_id=parent))
        return ck.lineage_id

    def finish(self, status: str, weights_hash: str | None = None, step: int | None = None,
               reputations: list[Any] | None = None, metrics: dict[str, float] | None = None,
               final_checkpoint_id: UUID | None = None) -> None:
        """Mark the run ``completed`` or ``failed``, the model's final weights (kept as
        :attr:`trained_model`) and every rank's final reputation. ``TrainingCompleted`` carries
        the last step's figures updated with ``metrics``, and the final checkpoint's id."""
        if not self.active or self.run_id is None:
            return
        for rep in reputations or []:
            self._record_reputation(step or 0, rep, force=True)
        self._apply(Operation("run.status", self.run_id, lambda e: e.evolve(status=status),
                              priority=OperationPriority.CRITICAL))
        if weights_hash:
            self.trained_model = self._apply(StructuralOperation(  # type: ignore[assignment]
                "model.weights", self.model_id, lambda e: e.evolve(weights_hash=weights_hash)))
        self.bus.emit(TrainingCompleted(
            run_id=self.run_id, model_id=self.model_id, status=status, rank=0, step=step,
            parent_id=self._run_event, final_metrics={**self._last_metrics, **(metrics or {})},
            final_checkpoint_id=final_checkpoint_id))

    def counters(self) -> dict[str, int]:
        """Rank 0's system figures for the step record: registry conflicts, retries and
        rejections (cumulative), events waiting for dispatch, events dropped and handler
        errors on the run's bus, and on the default bus, where user hooks run, events dropped
        (queue full), handler errors and slow handler calls; ``{}`` when not recording."""
        if not self.active:
            return {}
        registry, bus, hooks = self.registry.resolver.metrics(), self.bus.stats(), self.hooks.stats()
        return {"registry_conflicts": registry["conflicts"], "registry_retries": registry["retries"],
                "registry_rejections": registry["rejections"], "event_queue_depth": bus["queue_depth"],
                "events_dropped": bus["dropped"], "event_handler_errors": bus["handler_errors"],
                "hook_events_dropped": hooks.get("dropped", 0), "hook_errors": hooks.get("handler_errors", 0),
                "hook_slow_calls": hooks.get("slow_handlers", 0)}

    def flush(self) -> None:
        """Persist the registry's write-behind versions and write the events emitted so far to
        ``events.jsonl`` (user hooks are not waited for: they may be slow)."""
        self.registry.flush()
        self.bus.flush()

    def close(self) -> None:
        """Flush and close the registry (persisting write-behind versions) and the bus; wait up
        to :data:`HOOKS_CLOSE_TIMEOUT_S` for user hooks to take the run's last events. The
        default bus stays open."""
        self.registry.close()
        self.bus.close()
        self.hooks.flush(HOOKS_CLOSE_TIMEOUT_S)
        if self._events_file:
            self._events_file.close()
