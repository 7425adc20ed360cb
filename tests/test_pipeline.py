"""Multi-stage pipelines: validation, dependency order, checkpoint hand-over, stage entities."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fedgspo.config import ConfigError
from fedgspo.entities import AIPipelineEntity, GSPOTrainingRunEntity, TrainingStageEntity
from fedgspo.entities.registry import EntityRegistry
from fedgspo.pipeline import load_pipeline
from fedgspo.train import main

ROOT = Path(__file__).resolve().parents[1]
FAST = {"train.max_steps": 4, "run.progress_bar": False, "task.prompts_per_rank": 2, "gspo.num_generations": 4}


def write(tmp_path: Path, stages: list[dict], **extra) -> Path:
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump({"name": "p", "dir": str(tmp_path / "out"), "stages": stages, **extra}))
    return path


def test_shipped_pipeline_validates():
    spec, configs = load_pipeline(ROOT / "configs" / "pipelines" / "curriculum.yaml")
    assert list(configs) == ["warmup", "main", "evaluation"]
    assert configs["main"].task.name == "reverse" and configs["evaluation"].train.evaluate_only


def test_order_follows_dependencies(tmp_path):
    path = write(tmp_path, [{"name": "b", "depends_on": ["a"]}, {"name": "a"}])
    _, configs = load_pipeline(path)
    assert list(configs) == ["a", "b"]


@pytest.mark.parametrize("stages, message", [
    ([{"name": "a", "depends_on": ["b"]}, {"name": "b", "depends_on": ["a"]}], "cycle"),
    ([{"name": "a", "depends_on": ["zzz"]}], "zzz"),
    ([{"name": "a", "overrides": {"train.max_steps": -1}}], "stage a: train.max_steps"),
    ([{"name": "a"}, {"name": "a"}], "repeated: a"),
])
def test_bad_pipelines_are_config_errors(tmp_path, stages, message):
    with pytest.raises(ConfigError, match=message):
        load_pipeline(write(tmp_path, stages))


def test_pipeline_runs_stages_from_previous_checkpoint(tmp_path):
    path = write(tmp_path, [
        {"name": "warmup", "overrides": FAST, "completion_criteria": {"steps": 4}},
        {"name": "main", "depends_on": ["warmup"], "overrides": {**FAST, "task.name": "reverse"}},
        {"name": "eval", "depends_on": ["main"], "overrides": {**FAST, "train.evaluate_only": True}},
    ])
    assert main(["--pipeline", str(path)]) == 0
    out = tmp_path / "out"
    for stage in ("warmup", "main", "eval"):
        assert (out / stage / "summary.json").is_file()
    main_cfg = yaml.safe_load((out / "main" / "config.yaml").read_text())
    assert Path(main_cfg["model"]["path"]) == out / "warmup" / "checkpoints" / "final"
    reg = EntityRegistry(out / "registry.sqlite")
    try:
        (pipe,) = reg.query(AIPipelineEntity)
        stages = {s.name: s for s in reg.query(TrainingStageEntity)}
        assert [reg.get(i).name for i in pipe.stage_ids] == ["warmup", "main", "eval"]
        assert {s.status for s in stages.values()} == {"completed"}
        assert stages["main"].depends_on == [stages["warmup"].lineage_id]
        assert len(reg.query(GSPOTrainingRunEntity)) == 3
    finally:
        reg.close()


def test_unmet_criteria_stop_the_pipeline(tmp_path):
    path = write(tmp_path, [
        {"name": "a", "overrides": FAST, "completion_criteria": {"reward_last10": 99.0}},
        {"name": "b", "depends_on": ["a"], "overrides": FAST},
    ])
    assert main(["--pipeline", str(path)]) == 1
    assert not (tmp_path / "out" / "b").exists()
