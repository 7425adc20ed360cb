"""Multi-stage pipelines: several GSPO stages from one YAML file, run in dependency order.

A pipeline file names a base config and its stages; each stage's ``overrides`` (dotted keys,
as on the command line) make that stage's config, and a stage starts from the final
checkpoint of the stage it depends on (the last one listed)::

    name: digits-curriculum
    base_config: configs/default.yaml        # optional; default: the embedded default
    stages:
      - name: warmup
        overrides: {task.name: copy, train.max_steps: 300}
        completion_criteria: {reward_last10: 1.0}
      - name: main
        depends_on: [warmup]
        overrides: {task.name: reverse, train.max_steps: 600}

Every stage config is validated before anything runs (a bad stage is a :class:`ConfigError`,
exit code 2); a dependency cycle or a missing dependency is one too. The pipeline directory
(``runs/<name>`` or ``dir``) holds one run directory per stage and one shared registry with
the ``AIPipelineEntity``, a ``TrainingStageEntity`` per stage and every stage's run entities.

Failure behaviour: a stage whose ``completion_criteria`` (keys of the stage's ``summary.json``,
higher is better) are not met is marked ``failed`` and the stages after it do not run.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedgspo.config import Config, ConfigError, apply_overrides, format_validation_error, read_yaml, set_dotted
from fedgspo.distributed import broadcast_json
from fedgspo.entities import TrainingStageEntity
from fedgspo.entities.callables import CallableRegistry
from fedgspo.entities.conflicts import OperationPriority
from fedgspo.entities.registry import EntityRegistry, NullRegistry
from fedgspo.entities.tree import (
    DependencyCycleError,
    MissingDependencyError,
    build_ai_training_pipeline,
    topological_order,
)
from fedgspo.operations import CREATE_AI_PIPELINE
from fedgspo import runfiles

PIPELINE_REGISTRY = runfiles.REGISTRY


class StageSpec(BaseModel):
    """One stage: its overrides on the base config, dependencies and completion criteria."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    depends_on: list[str] = Field(default_factory=list)
    overrides: dict[str, Any] = Field(default_factory=dict, description="Dotted key -> value.")
    completion_criteria: dict[str, float] = Field(default_factory=dict)


class PipelineSpec(BaseModel):
    """A pipeline file."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    base_config: Path | None = None
    dir: Path | None = Field(None, description="Pipeline directory; default runs/<name>.")
    stages: list[StageSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> "PipelineSpec":
        names = [s.name for s in self.stages]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"stage names must be unique, repeated: {', '.join(dupes)}")
        return self

    @property
    def directory(self) -> Path:
        return self.dir or Path("runs") / self.name


def load_pipeline(path: Path, overrides: list[str] | None = None) -> tuple[PipelineSpec, dict[str, Config]]:
    """Read and validate a pipeline file and every stage's config, in run order.

    ``overrides`` apply to every stage after the stage's own. Raises :class:`ConfigError`
    (one line) naming the stage and field at fault, a cycle or a missing dependency.
    """
    try:
        spec = PipelineSpec.model_validate(read_yaml(path))
    except ValidationError as err:
        raise ConfigError(f"{path}: {format_validation_error(err)}") from None
    try:
        order = topological_order({s.name: s.depends_on for s in spec.stages})
    except (DependencyCycleError, MissingDependencyError) as err:
        raise ConfigError(f"{path}: {err}") from None
    stages = {s.name: s for s in spec.stages}
    configs: dict[str, Config] = {}
    for name in order:
        data = read_yaml(spec.base_config) if spec.base_config else {}
        for key, value in stages[name].overrides.items():
            set_dotted(data, key, value)
        data = apply_overrides(data, list(overrides or []))
        try:
            configs[name] = Config.model_validate(data)
        except ValidationError as err:
            raise ConfigError(f"stage {name}: {format_validation_error(err)}") from None
    return spec, configs


def stage_config(cfg: Config, spec: PipelineSpec, stage: StageSpec) -> Config:
    """The stage's config placed in the pipeline: its run directory, the shared registry and,
    unless the stage names a model, the final checkpoint of its (last) dependency."""
    directory = spec.directory
    model = cfg.model
    if stage.depends_on and model.path is None:
        model = model.model_copy(update={"path": runfiles.RunFiles(directory / stage.depends_on[-1]).final_checkpoint})
    return cfg.model_copy(update={
        "model": model,
        "run": cfg.run.model_copy(update={"dir": directory / stage.name, "name": stage.name}),
        "bookkeeping": cfg.bookkeeping.model_copy(update={"registry_path": directory / PIPELINE_REGISTRY}),
    })


def run_pipeline(spec: PipelineSpec, configs: dict[str, Config], *, is_main: bool,
                 run_stage: Callable[[Config], dict[str, Any] | None]) -> bool:
    """Run the stages in order, every rank together: the ``create_ai_pipeline`` operation makes
    the pipeline entity over the stage entities, and the stages run in the dependency order of
    its tree (:func:`~fedgspo.entities.tree.build_ai_training_pipeline`), built on every rank
    (rank 0 alone registers the entities and versions each stage's status, NORMAL priority).

    ``run_stage(cfg)`` trains one stage (through ``train_with_gspo``) and returns its summary
    on rank 0. Returns ``True`` when every stage met its completion criteria; stops at the
    first that did not.
    """
    stages = {s.name: s for s in spec.stages}
    if is_main:
        spec.directory.mkdir(parents=True, exist_ok=True)
    registry = EntityRegistry(spec.directory / PIPELINE_REGISTRY) if is_main else NullRegistry()
    try:
        entities: dict[str, TrainingStageEntity] = {}
        for name in configs:
            entities[name] = TrainingStageEntity(
                name=name, depends_on=[entities[d].lineage_id for d in stages[name].depends_on],
                completion_criteria=stages[name].completion_criteria)
        pipeline = CallableRegistry.execute(CREATE_AI_PIPELINE, spec.name, *entities.values())
        tree = build_ai_training_pipeline(pipeline, entities.values())
        registry.register_many([*entities.values(), pipeline])
        by_id = {e.lineage_id: name for name, e in entities.items()}
        for stage_id in tree.dependency_order(pipeline.stage_ids):
            name = by_id[stage_id]
            registry.update(stage_id, lambda e: e.evolve(status="running"), name="stage.running",
                            priority=OperationPriority.NORMAL)
            summary = run_stage(stage_config(configs[name], spec, stages[name])) or {}
            metrics = {k: float(v) for k, v in summary.items() if isinstance(v, (int, float))}
            done = broadcast_json(bool(is_main and entities[name].is_complete(metrics))) is True
            registry.update(stage_id, lambda e: e.evolve(status="completed" if done else "failed"),
                            name="stage.status", priority=OperationPriority.NORMAL)
            if not done:
                return False
        return True
    finally:
        registry.close()
