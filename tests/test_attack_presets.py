"""The attack presets in configs/: they validate, and the sign_flip one trains with its attacker caught."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dist_helpers import train_ranks
from fedgspo.robust.attacks import ATTACKS
from fedgspo.config import load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PRESETS = {"sign_flip": CONFIGS / "attack_sign_flip.yaml", "alie": CONFIGS / "attack_alie.yaml"}


@pytest.mark.parametrize("kind", sorted(PRESETS))
def test_preset_validates_with_one_attacker_of_four(kind):
    cfg = load_config(PRESETS[kind])
    assert cfg.attack is not None and cfg.attack.kind == kind in ATTACKS
    assert cfg.attack.ranks == [3] and cfg.attack.start_step == 0
    assert cfg.aggregation.rule == "trimmed_mean" and cfg.aggregation.f == 1


@pytest.mark.slow
def test_attack_preset_runs_on_four_ranks_and_flags_an_overt_attacker(tmp_path):
    run = tmp_path / "run"
    proc = train_ranks(["--config", str(PRESETS["sign_flip"]), f"run.dir={run}", "train.max_steps=6",
                        "run.progress_bar=false", "run.tensorboard=false", "bookkeeping.enabled=false",
                        "attack.kind=gaussian"], 4, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 6
    assert any(3 in r["flagged"] for r in records), [r["flagged"] for r in records]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lie_aggregate", "lie_vote"])
def test_protocol_liar_in_audited_training_is_flagged_and_weights_agree(tmp_path, kind):
    """A rank lying inside the exchange of a real run: audited mode flags it, flags no honest
    rank, and every rank ends with the same weights."""
    run = tmp_path / "run"
    proc = train_ranks(["--config", str(PRESETS["sign_flip"]), f"run.dir={run}", "train.max_steps=4",
                        "run.tensorboard=false", "bookkeeping.enabled=false", "aggregation.mode=audited",
                        f"attack.kind={kind}", "proof.rate=0"], 4, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["flagged"] == [3] for r in records), [r["flagged"] for r in records]
    summary = json.loads((run / "summary.json").read_text())
    assert len(set(summary["weights_sha256_per_rank"])) == 1
