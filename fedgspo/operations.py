"""The operations of fedgspo on entities, registered by name in the ``CallableRegistry``.

* ``train_with_gspo(config, model, dataset) -> ModelEntity``: one GSPO run on every rank; what
  ``python -m fedgspo.train`` and every pipeline stage execute.
* ``detect_byzantine_entities(detector, reputations) -> list[ReputationEntity]``: the ranks a
  run's detector holds Byzantine; rank 0's bookkeeping versions the detector with it.
* ``create_ai_pipeline(name, *stages) -> AIPipelineEntity``: a pipeline over its stages, in run
  order; :mod:`fedgspo.pipeline` registers it.

Run them with ``CallableRegistry.execute(name, ...)`` to have the entity versions in and out
recorded (:meth:`~fedgspo.entities.callables.CallableRegistry.records`). Importing this module
registers them; it imports neither the trainer nor the recorder.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from fedgspo.entities import (
    AIPipelineEntity,
    ByzantineDetectorEntity,
    DatasetEntity,
    GSPOConfigEntity,
    ModelEntity,
    ReputationEntity,
    TrainingStageEntity,
)
from fedgspo.entities.callables import CallableRegistry
from fedgspo.entities.tree import resolve_stages
from fedgspo.factory import RunInputs, reference_model
from fedgspo.preemption import Preempted

if TYPE_CHECKING:  # fedgspo.config imports the bookkeeping, which runs these operations
    from fedgspo.config import Config

TRAIN_WITH_GSPO = "train_with_gspo"
DETECT_BYZANTINE_ENTITIES = "detect_byzantine_entities"
CREATE_AI_PIPELINE = "create_ai_pipeline"
KIND = "operation"


class RunRecorder(Protocol):
    """What :func:`train_with_gspo` needs of the trainer's recorder."""

    trained_model: ModelEntity | None

    def bind(self, inputs: RunInputs) -> None: ...


class GSPOTrainer(Protocol):
    """What :func:`train_with_gspo` needs of a trainer (:class:`fedgspo.train.Trainer`)."""

    cfg: Config
    recorder: RunRecorder

    def train(self) -> list[dict[str, Any]]: ...

    def close(self, outcome: str | None = None) -> None: ...


@CallableRegistry.register(TRAIN_WITH_GSPO, kind=KIND)
def train_with_gspo(config: GSPOConfigEntity, model: ModelEntity, dataset: DatasetEntity, *,
                    trainer: GSPOTrainer) -> ModelEntity:
    """Train ``model`` on ``dataset`` with ``config`` on every rank; returns the trained model:
    on rank 0 the registry's version (its ``ModelCheckpointEntity`` chain has it as base model
    and its ``ModelLineageEntity`` lists the chain), elsewhere the same version built locally.

    ``trainer`` is the run built from the same config on this rank (policy, data, process
    group). Rank 0 registers ``config``, ``model``, ``dataset`` and, when ``config.beta > 0``,
    a frozen reference model, and links them from the run entity.

    Failure behaviour: a ``config`` whose digest is not the trainer's is a ``ValueError``
    before anything runs (call it on every rank with entities from the same config, or every
    rank raises). A preempted run is closed as ``cancelled`` and any other error as
    ``failed``; the exception is re-raised after the run's files are closed.
    """
    if config.digest != trainer.cfg.digest():
        raise ValueError(f"config entity {config.name!r} (digest {config.digest}) is not the trainer's config")
    trainer.recorder.bind(RunInputs(config, model, dataset, reference_model(model) if config.beta > 0 else None))
    try:
        trainer.train()
    except Preempted:
        trainer.close(outcome="cancelled")
        raise
    except BaseException:
        trainer.close(outcome="failed")
        raise
    trainer.close()
    trained = trainer.recorder.trained_model
    if trained is None:
        raise RuntimeError("the run finished without recording its trained model")
    return trained


@CallableRegistry.register(DETECT_BYZANTINE_ENTITIES, kind=KIND)
def detect_byzantine_entities(detector: ByzantineDetectorEntity,
                              reputations: Sequence[ReputationEntity]) -> list[ReputationEntity]:
    """The reputations of ``detector``'s run that it holds Byzantine: quarantined ranks (the
    reputation tracker quarantines after ``quarantine_after`` flags in its window), by rank.
    Reputations of other runs are ignored."""
    return sorted((r for r in reputations if r.run_id == detector.run_id and r.quarantined), key=lambda r: r.rank)


@CallableRegistry.register(CREATE_AI_PIPELINE, kind=KIND)
def create_ai_pipeline(name: str, *stages: TrainingStageEntity) -> AIPipelineEntity:
    """A pipeline named ``name`` over ``stages``, listed in an order that runs every stage after
    those it depends on. Raises ``MissingDependencyError`` or ``DependencyCycleError``
    (:mod:`fedgspo.entities.tree`) when the stages' dependencies cannot be ordered."""
    return AIPipelineEntity(name=name, stage_ids=[s.lineage_id for s in resolve_stages(stages)])
