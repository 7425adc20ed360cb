"""The run as operations on entities: ``train_with_gspo`` behind ``python -m fedgspo.train``,
checkpoints chained to the trained model, priorities of the bookkeeping's writes, every entity
write audited, and ``fedgspo lineage`` reading the model's lineage entity."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from uuid import UUID

import pytest

from fedgspo.cli.main import main as cli
from fedgspo.config import load_config
from fedgspo.entities import (
    DatasetEntity,
    Entity,
    GSPOConfigEntity,
    GSPOTrainingRunEntity,
    ModelCheckpointEntity,
    ModelEntity,
    ModelLineageEntity,
    ReputationEntity,
)
from fedgspo.entities.callables import CallableRegistry
from fedgspo.entities.conflicts import ConflictResolver, LowPriorityOperation, OperationPriority
from fedgspo.entities.registry import EntityRegistry
from fedgspo.entities.tree import EdgeType, build_model_lineage_tree
from fedgspo.factory import EntityFactory
from fedgspo.integrity.audit import ENTITY_WRITE, RUN_START, verify_audit_log
from fedgspo.operations import TRAIN_WITH_GSPO, detect_byzantine_entities, train_with_gspo
from fedgspo.train import main

FAST = ["train.max_steps=6", "run.progress_bar=false", "run.log_every=3", "task.prompts_per_rank=2",
        "gspo.num_generations=4"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """One tiny run (KL on, a checkpoint every 2 steps, 1 kept) with every resolver operation
    it executed recorded as (name, priority, class name)."""
    run = tmp_path_factory.mktemp("ops") / "run"
    executed: list[tuple[str, OperationPriority, str]] = []
    original = ConflictResolver.execute

    def spy(self: ConflictResolver, op, **kwargs):  # noqa: ANN001
        executed.append((op.name, op.priority, type(op).__name__))
        return original(self, op, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ConflictResolver, "execute", spy)
        assert main([f"run.dir={run}", "gspo.beta=0.04", "checkpoint.every=2", "checkpoint.keep_last=1", *FAST]) == 0
    record = CallableRegistry.records(TRAIN_WITH_GSPO)[-1]
    return SimpleNamespace(run=run, executed=executed, record=record,
                           summary=json.loads((run / "summary.json").read_text()))


def _registry(run: Path) -> EntityRegistry:
    return EntityRegistry(run / "registry.sqlite")


def test_the_command_line_runs_train_with_gspo_and_returns_the_trained_model(trained: SimpleNamespace) -> None:
    record = trained.record
    assert record.error is None and len(record.input_ids) == 3 and len(record.output_ids) == 1
    reg = _registry(trained.run)
    try:
        config, model, dataset = (reg.get(i) for i in record.input_ids)
        assert isinstance(config, GSPOConfigEntity) and isinstance(model, ModelEntity)
        assert isinstance(dataset, DatasetEntity) and config.beta == 0.04
        out = reg.get(record.output_ids[0])
        assert out.lineage_id == model.lineage_id and out.version > model.version
        assert out.weights_hash == trained.summary["weights_sha256"]
        (run,) = reg.query(GSPOTrainingRunEntity)
        assert (run.config_id, run.policy_model_id, run.dataset_id) == (
            config.lineage_id, model.lineage_id, dataset.lineage_id)
        reference = reg.get(run.reference_model_id)  # beta > 0: the frozen start, its own lineage
        assert isinstance(reference, ModelEntity) and reference.lineage_id != model.lineage_id
        assert reference.weights_hash == model.weights_hash and len(reg.history(reference.lineage_id)) == 1
    finally:
        reg.close()


def test_checkpoints_chain_to_the_trained_model(trained: SimpleNamespace) -> None:
    reg = _registry(trained.run)
    try:
        model = reg.get(trained.record.output_ids[0])
        (lineage,) = reg.query(ModelLineageEntity, root_model_id=model.lineage_id)
        checkpoints = reg.query(ModelCheckpointEntity)
        by_id = {c.lineage_id: c for c in checkpoints}
        chain = [by_id[i] for i in lineage.checkpoint_ids]
        assert [c.step for c in chain] == [2, 4, 6, 6] and Path(chain[-1].path).name == "final"
        assert all(c.base_model_id == model.lineage_id for c in chain)
        assert [c.parent_checkpoint_id for c in chain] == [None, *[c.lineage_id for c in chain[:-1]]]
        assert [c.pruned for c in chain] == [True, True, False, False]  # keep_last=1
        tree = build_model_lineage_tree(lineage, checkpoints)
        assert list(tree.edges(EdgeType.LINEAGE)) == list(zip(lineage.checkpoint_ids, lineage.checkpoint_ids[1:]))
    finally:
        reg.close()


def test_writes_run_at_their_priorities_and_pruning_is_low(trained: SimpleNamespace) -> None:
    ops = {(name, priority, kind) for name, priority, kind in trained.executed}
    assert ("run.step", OperationPriority.HIGH, "StructuralOperation") in ops
    assert ("lineage.append", OperationPriority.NORMAL, "NormalOperation") in ops
    assert ("model.weights", OperationPriority.HIGH, "StructuralOperation") in ops
    prunes = [op for op in trained.executed if op[0] == "checkpoint.prune"]
    assert prunes == [("checkpoint.prune", OperationPriority.LOW, LowPriorityOperation.__name__)] * 2
    assert all(priority == OperationPriority.LOW for name, priority, _ in trained.executed if name == "checkpoint.prune")


def test_every_entity_write_is_audited_in_order(trained: SimpleNamespace) -> None:
    audit = trained.run / "audit.jsonl"
    verify_audit_log(audit)
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    assert records[0]["kind"] == RUN_START and records[1]["kind"] == ENTITY_WRITE
    audited = {w["ecs_id"]: w for r in records if r["kind"] == ENTITY_WRITE for w in r["payload"]["writes"]}
    reg = _registry(trained.run)
    try:
        versions = [v for head in reg.query(Entity) for v in reg.history(head.lineage_id)]
    finally:
        reg.close()
    assert {str(v.ecs_id) for v in versions} == set(audited)
    for v in versions:
        assert audited[str(v.ecs_id)]["sha256"] == hashlib.sha256(v.model_dump_json().encode()).hexdigest()
        assert audited[str(v.ecs_id)]["type"] == type(v).__name__


def test_lineage_command_reads_the_models_lineage_entity(trained: SimpleNamespace, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained.run, run)
    assert cli(["lineage", str(run)]) == 0
    full = capsys.readouterr().out
    assert "step_00000002 (step 2" in full and "gone" in full  # pruned: marked gone
    reg = _registry(run)
    try:
        (run_entity,) = reg.query(GSPOTrainingRunEntity)
        (lineage,) = reg.query(ModelLineageEntity, root_model_id=run_entity.policy_model_id)
        reg.update(lineage.lineage_id, lambda e: e.evolve(checkpoint_ids=e.checkpoint_ids[2:]))
    finally:
        reg.close()
    assert cli(["lineage", str(run)]) == 0
    trimmed = capsys.readouterr().out
    assert "step_00000002" not in trimmed and "step_00000006" in trimmed and "final" in trimmed


def test_factory_copies_the_config_and_needs_no_registry() -> None:
    cfg = load_config(None, ["gspo.epsilon=0.001", "aggregation.reputation.quarantine_after=7", "train.max_steps=9"])
    factory = EntityFactory(cfg, "r")
    hf = SimpleNamespace(model_type="llama", vocab_size=16, hidden_size=8, num_hidden_layers=1)
    inputs = factory.inputs(hf, "ab" * 32, {"name": "digits/copy", "source": "synthetic"})
    assert inputs.config.epsilon == 0.001 and inputs.config.digest == cfg.digest()
    assert inputs.model.precision == cfg.model.dtype and inputs.reference is None
    run = factory.run(inputs, world_size=4, rule="median", f=1)
    assert run.total_steps == 9 and run.dataset_id == inputs.dataset.lineage_id
    assert factory.detector(run.lineage_id, world_size=4, rule="median", f=1).quarantine_after == 7


def test_train_with_gspo_refuses_entities_of_another_config() -> None:
    cfg = load_config(None, [])
    other = EntityFactory(load_config(None, ["gspo.beta=0.1"]), "r")
    hf = SimpleNamespace(model_type="llama", vocab_size=16, hidden_size=8, num_hidden_layers=1)
    inputs = other.inputs(hf, None, {"name": "d"})
    trainer = SimpleNamespace(cfg=cfg, recorder=None)
    with pytest.raises(ValueError, match="not the trainer's config"):
        train_with_gspo(inputs.config, inputs.model, inputs.dataset, trainer=trainer)


def test_detect_byzantine_entities_returns_the_quarantined_reputations_of_the_run() -> None:
    cfg = load_config(None, [])
    run_id, other = UUID(int=1), UUID(int=2)
    detector = EntityFactory(cfg, "r").detector(run_id, world_size=4, rule="median", f=1)
    reps = [ReputationEntity(rank=2, run_id=run_id, quarantined=True), ReputationEntity(rank=1, run_id=run_id),
            ReputationEntity(rank=0, run_id=run_id, quarantined=True), ReputationEntity(rank=3, run_id=other,
                                                                                        quarantined=True)]
    assert [r.rank for r in detect_byzantine_entities(detector, reps)] == [0, 2]


def test_pipelines_run_create_ai_pipeline_in_the_trees_order(tmp_path: Path) -> None:
    from fedgspo.entities import AIPipelineEntity, TrainingStageEntity
    from fedgspo.operations import CREATE_AI_PIPELINE
    from fedgspo.pipeline import load_pipeline, run_pipeline

    path = tmp_path / "pipe.yaml"
    path.write_text(json.dumps({"name": "p", "dir": str(tmp_path / "p"), "stages": [
        {"name": "main", "depends_on": ["warmup"]}, {"name": "warmup"}]}))
    spec, configs = load_pipeline(path)
    ran: list[str] = []
    assert run_pipeline(spec, configs, is_main=True,
                        run_stage=lambda c: ran.append(c.run.name) or {"reward_last10": 1.0})
    assert ran == ["warmup", "main"]
    record = CallableRegistry.records(CREATE_AI_PIPELINE)[-1]
    assert record.error is None and len(record.input_ids) == 2
    with EntityRegistry(tmp_path / "p" / "registry.sqlite") as reg:
        (pipeline,) = reg.query(AIPipelineEntity)
        assert pipeline.ecs_id == record.output_ids[0]
        assert [reg.get(s).name for s in pipeline.stage_ids] == ["warmup", "main"]
        assert {s.status for s in reg.query(TrainingStageEntity)} == {"completed"}


def test_the_registry_reports_every_version_it_writes(tmp_path: Path) -> None:
    seen: list[tuple[UUID, int, str]] = []
    with EntityRegistry(tmp_path / "r.sqlite", on_write=lambda e, data: seen.append((e.ecs_id, e.version, data))) as reg:
        rep = reg.register(ReputationEntity(rank=0))
        new = reg.update(rep.lineage_id, lambda e: e.evolve(trust_score=0.5))
    assert [(i, v) for i, v, _ in seen] == [(rep.ecs_id, 0), (new.ecs_id, 1)]
    assert json.loads(seen[1][2])["trust_score"] == 0.5
