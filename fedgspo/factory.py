"""EntityFactory: a run's entities built from its :class:`~fedgspo.config.Config`.

Every value an entity holds that the config decides (GSPO hyper-parameters, precision, world
size, detector threshold, quarantine rule, total steps, data split) is copied from the config
here, so no entity declares a default of its own that could drift from the run. The factory
needs no registry: the input entities of :func:`fedgspo.operations.train_with_gspo` are built
the same way on every rank, and only rank 0 registers them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from uuid import UUID

from fedgspo.entities import (
    ByzantineDetectorEntity,
    ConfigEntity,
    DatasetEntity,
    GSPOConfigEntity,
    GSPOTrainingRunEntity,
    ModelEntity,
    ModelLineageEntity,
    ReputationEntity,
)
from fedgspo.entities.base import IDENTITY_FIELDS

if TYPE_CHECKING:  # fedgspo.config imports the bookkeeping, which builds entities here
    from fedgspo.config import Config

_GSPO_FIELDS = set(GSPOConfigEntity.model_fields) - set(ConfigEntity.model_fields)


@dataclass(frozen=True)
class RunInputs:
    """What a run trains: its config, starting model and data set, and the frozen KL reference
    (a model entity of its own, the starting weights) when ``gspo.beta > 0``."""

    config: GSPOConfigEntity
    model: ModelEntity
    dataset: DatasetEntity
    reference: ModelEntity | None = None


class EntityFactory:
    """Builds the entities of run ``name`` from ``cfg``; pure (no registry, no I/O)."""

    def __init__(self, cfg: Config, name: str) -> None:
        self.cfg, self.name = cfg, name

    def config(self) -> GSPOConfigEntity:
        """The run's config: the full resolved values, their digest and the GSPO fields."""
        return GSPOConfigEntity(name=self.name, values=self.cfg.model_dump(mode="json"), digest=self.cfg.digest(),
                                **self.cfg.gspo.model_dump(include=_GSPO_FIELDS))

    def model(self, hf_config: Any, weights_hash: str | None) -> ModelEntity:
        """The policy from its transformers config (``model_type``, ``vocab_size``,
        ``hidden_size``, ``num_hidden_layers``) and the digest of its weights."""
        return ModelEntity(name=self.name, model_type=hf_config.model_type, vocab_size=hf_config.vocab_size,
                           hidden_size=hf_config.hidden_size, num_layers=hf_config.num_hidden_layers,
                           weights_hash=weights_hash, precision=self.cfg.model.dtype)

    @staticmethod
    def dataset(info: dict[str, Any]) -> DatasetEntity:
        """The data set from its description (name, source, split, size, content hash);
        ``pydantic.ValidationError`` for a field out of range."""
        return DatasetEntity(**info)

    def inputs(self, hf_config: Any, weights_hash: str | None, dataset_info: dict[str, Any]) -> RunInputs:
        """Config, starting model and data set of the run (the reference is added by
        :func:`fedgspo.operations.train_with_gspo` when the KL is on)."""
        return RunInputs(self.config(), self.model(hf_config, weights_hash), self.dataset(dataset_info))

    def run(self, inputs: RunInputs, *, world_size: int, rule: str, f: int) -> GSPOTrainingRunEntity:
        """The run entity, linked to its config, policy, data set and reference."""
        return GSPOTrainingRunEntity(
            name=self.name, config_id=inputs.config.lineage_id, policy_model_id=inputs.model.lineage_id,
            dataset_id=inputs.dataset.lineage_id,
            reference_model_id=inputs.reference.lineage_id if inputs.reference else None,
            total_steps=self.cfg.train.max_steps, world_size=world_size, num_byzantine=f, aggregation_rule=rule,
            status="running")

    def detector(self, run_id: UUID, *, world_size: int, rule: str, f: int) -> ByzantineDetectorEntity:
        """The run's Byzantine detector: rule, n, f, z threshold and quarantine rule."""
        agg = self.cfg.aggregation
        return ByzantineDetectorEntity(rule=rule, world_size=world_size, num_byzantine=f, z_threshold=agg.z_threshold,
                                       quarantine_after=agg.reputation.quarantine_after, run_id=run_id)

    @staticmethod
    def reputations(run_id: UUID, world_size: int) -> list[ReputationEntity]:
        """One fresh reputation per rank of the run."""
        return [ReputationEntity(rank=r, run_id=run_id) for r in range(world_size)]

    @staticmethod
    def lineage(model: ModelEntity) -> ModelLineageEntity:
        """The (empty) checkpoint chain of ``model``."""
        return ModelLineageEntity(root_model_id=model.lineage_id)


def reference_model(model: ModelEntity) -> ModelEntity:
    """The frozen KL reference of a run starting from ``model``: a new lineage holding the
    starting weights (the policy's lineage moves on as it trains)."""
    fields = model.model_dump(exclude=set(IDENTITY_FIELDS))
    return ModelEntity(**{**fields, "name": f"{model.name}/reference"})


def trained_version(model: ModelEntity, weights_hash: str) -> ModelEntity:
    """``model`` with its final weights as the next version of its lineage, built locally (what
    ranks without a registry return from a run)."""
    return model.evolve(weights_hash=weights_hash).next_version(model.ecs_id, model.version)
