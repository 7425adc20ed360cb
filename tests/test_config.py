"""Config loading, dotted overrides and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedgspo.config import Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_default_yaml_is_the_embedded_default():
    assert load_config(ROOT / "configs" / "default.yaml") == Config()


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    load_config(path)


def test_overrides_parse_yaml_values():
    cfg = load_config(None, ["train.max_steps=50", "aggregation.rule=median", "gspo.epsilon=3e-4",
                             "run.tensorboard=false", "task.reward_funcs=[{name: exact_match}]"])
    assert cfg.train.max_steps == 50 and cfg.aggregation.rule == "median"
    assert cfg.gspo.epsilon == 3e-4 and cfg.run.tensorboard is False
    assert [r.name for r in cfg.task.reward_funcs] == ["exact_match"]


@pytest.mark.parametrize("override, message", [
    ("train.max_steps=-1", "train.max_steps: Input should be greater than 0"),
    ("aggregation.rule=nope", "aggregation.rule: Input should be"),
    ("train.nope=1", "train.nope: unknown key"),
    ("model.nope=1", "model.nope: unknown key"),
    ("task.reward_funcs=[{name: x, wieght: 1}]", "task.reward_funcs.0.wieght: unknown key"),
    ("attack.kind=nope", "attack.kind"),
    ("checkpoint.every=3", "checkpoint.every (3) must be a multiple"),
    ("gspo=3", "gspo: Input should be a valid dictionary"),
    ("max_steps", "not of the form"),
    ("task.min_digits=9", "min_digits (9) > max_digits"),
])
def test_bad_override_is_one_line_error(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    text = str(info.value)
    assert message in text and "\n" not in text


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_digest_is_stable_and_sensitive():
    assert Config().digest() == Config().digest()
    assert load_config(None, ["train.seed=1"]).digest() != Config().digest()
