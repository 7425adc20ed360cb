"""AI entities: models, checkpoints, configs, runs, pipelines, datasets and rank reputation.

Each class validates its own ranges on construction (``pydantic.ValidationError`` names the
field). References to other entities are ``lineage_id`` values, so a reference follows the
referenced thing across its updates; use ``registry.get(ref)`` to read the latest version.
"""

from __future__ import annotations

from typing import Any, Literal
from uuid import UUID

from pydantic import Field, model_validator

from fedgspo.entities.base import Entity

def _check_f_bound(num_byzantine: int, world_size: int) -> None:
    """Robust aggregation needs 2f < n whenever f > 0."""
    if num_byzantine and 2 * num_byzantine >= world_size:
        raise ValueError(f"cannot tolerate num_byzantine={num_byzantine} with world_size={world_size} (2f >= n)")


RunStatus = Literal["pending", "running", "completed", "failed", "cancelled"]
Precision = Literal["float32", "bfloat16", "float16", "float8", "int8", "int4"]


class ModelEntity(Entity):
    """A model architecture and, once known, its weights."""

    name: str = Field(min_length=1)
    model_type: str = Field(min_length=1, description="Architecture family, e.g. 'llama'.")
    vocab_size: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    num_layers: int = Field(gt=0)
    weights_hash: str | None = Field(None, description="Digest of the weights; None if untrained.")
    precision: Precision = "float32"


class ModelCheckpointEntity(Entity):
    """A saved state of a model; ``parent_checkpoint_id`` links the checkpoint chain."""

    base_model_id: UUID = Field(description="lineage_id of the ModelEntity.")
    path: str = Field(min_length=1)
    step: int = Field(ge=0)
    checkpoint_hash: str | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    parent_checkpoint_id: UUID | None = Field(None, description="lineage_id of the previous checkpoint.")
    pruned: bool = Field(False, description="True once its files were deleted (the entity still links the chain).")


class ConfigEntity(Entity):
    """A named configuration snapshot; ``digest`` identifies the full config it came from."""

    name: str = Field(min_length=1)
    values: dict[str, Any] = Field(default_factory=dict)
    digest: str | None = None


class GSPOConfigEntity(ConfigEntity):
    """The GSPO hyper-parameters of a run, with the same ranges as ``fedgspo.config.GSPOConfig``.

    No defaults: every field is copied from the run's config (``gspo`` section), so the entity
    cannot drift from what the run used."""

    num_generations: int = Field(ge=2)
    num_iterations: int = Field(ge=1)
    epsilon: float = Field(gt=0, lt=1)
    epsilon_high: float | None = Field(gt=0)
    beta: float = Field(ge=0)
    learning_rate: float = Field(gt=0)
    max_completion_length: int = Field(gt=0)
    temperature: float = Field(gt=0)
    importance_sampling_level: Literal["sequence", "token"]


class TrainingRunEntity(Entity):
    """One training run: its config, models, progress and status."""

    name: str = Field(min_length=1)
    config_id: UUID = Field(description="lineage_id of the ConfigEntity.")
    policy_model_id: UUID = Field(description="lineage_id of the policy ModelEntity.")
    reference_model_id: UUID | None = Field(None, description="lineage_id of the frozen KL reference (beta > 0).")
    dataset_id: UUID | None = Field(None, description="lineage_id of the DatasetEntity trained on.")
    step: int = Field(0, ge=0)
    total_steps: int = Field(gt=0)
    status: RunStatus = "pending"

    @model_validator(mode="after")
    def _step_in_range(self) -> "TrainingRunEntity":
        if self.step > self.total_steps:
            raise ValueError(f"step ({self.step}) > total_steps ({self.total_steps})")
        return self


class GSPOTrainingRunEntity(TrainingRunEntity):
    """A distributed GSPO run: world size, tolerated Byzantine ranks and aggregation rule."""

    world_size: int = Field(1, ge=1)
    num_byzantine: int = Field(0, ge=0, description="f, the Byzantine ranks tolerated.")
    aggregation_rule: str = "mean"

    @model_validator(mode="after")
    def _f_bound(self) -> "GSPOTrainingRunEntity":
        _check_f_bound(self.num_byzantine, self.world_size)
        return self


class AIPipelineEntity(Entity):
    """An ordered set of stages (lineage_ids of TrainingStageEntity)."""

    name: str = Field(min_length=1)
    stage_ids: list[UUID] = Field(default_factory=list)


class TrainingStageEntity(Entity):
    """One pipeline stage; it may start once every stage in ``depends_on`` has completed."""

    name: str = Field(min_length=1)
    depends_on: list[UUID] = Field(default_factory=list, description="lineage_ids of stages.")
    completion_criteria: dict[str, float] = Field(
        default_factory=dict, description="metric name -> value that marks the stage complete."
    )
    status: RunStatus = "pending"

    def is_complete(self, metrics: dict[str, float]) -> bool:
        """True when every criterion's metric reached its value (higher is better)."""
        return all(metrics.get(k, float("-inf")) >= v for k, v in self.completion_criteria.items())


class ModelLineageEntity(Entity):
    """The checkpoint chain of one model, oldest first."""

    root_model_id: UUID
    checkpoint_ids: list[UUID] = Field(default_factory=list)


class DatasetEntity(Entity):
    """A dataset or synthetic task by name, with size and content digest."""

    name: str = Field(min_length=1)
    source: str = Field("synthetic", description="Local path or 'synthetic'.")
    split: str = "train"
    num_examples: int | None = Field(None, ge=0)
    content_hash: str | None = None


class ByzantineDetectorEntity(Entity):
    """How Byzantine ranks are detected: aggregation rule, n, f and the flagging threshold.

    Every field comes from the run's config (no defaults here that could drift from it)."""

    rule: str = Field(min_length=1, description="The rule's spec, e.g. 'trimmed_mean(f=1)'.")
    world_size: int = Field(ge=1)
    num_byzantine: int = Field(ge=0)
    z_threshold: float = Field(gt=0)
    quarantine_after: int = Field(ge=1, description="Flags within the reputation window before quarantine.")
    run_id: UUID | None = Field(None, description="lineage_id of the TrainingRunEntity.")
    byzantine_ranks: list[int] = Field(default_factory=list, description="Ranks held Byzantine (quarantined) now.")

    @model_validator(mode="after")
    def _f_bound(self) -> "ByzantineDetectorEntity":
        _check_f_bound(self.num_byzantine, self.world_size)
        return self


class ReputationEntity(Entity):
    """Trust in one rank of one run: one lineage per (run, rank), updated at step boundaries."""

    rank: int = Field(ge=0)
    run_id: UUID | None = Field(None, description="lineage_id of the TrainingRunEntity.")
    trust_score: float = Field(1.0, ge=0, le=1)
    flag_count: int = Field(0, ge=0)
    clean_count: int = Field(0, ge=0)
    quarantined: bool = False
    last_step: int | None = Field(None, ge=0)
