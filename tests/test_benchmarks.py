"""The benchmark entry point runs a named quick benchmark and writes the suite JSON."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

RUN = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"


def bench_module(name: str) -> ModuleType:
    """The script ``benchmarks/<name>.py`` imported as a module (benchmarks/ is not a package)."""
    sys.path.insert(0, str(RUN.parent))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(RUN.parent))


def test_list_names_every_benchmark() -> None:
    out = subprocess.run([sys.executable, str(RUN), "--list"], capture_output=True, text=True, check=True).stdout
    for name in ("gspo_overhead", "vs_trl", "profile_step", "aggregation", "entities", "integrity",
                 "robustness", "detection_calibration", "detection"):
        assert name in out


def test_unknown_name_is_a_usage_error() -> None:
    proc = subprocess.run([sys.executable, str(RUN), "nope"], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown benchmark" in proc.stderr


@pytest.mark.slow
def test_quick_benchmark_writes_suite_json(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(RUN), "entities", "--quick", "--results", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "## summary" in proc.stdout
    suite = json.loads((tmp_path / "suite.json").read_text())
    assert suite["quick"] is True and suite["machine"]["torch"]
    (entry,) = suite["runs"]
    assert entry["name"] == "entities" and entry["status"] == "ok"
    assert entry["result"] and (tmp_path / "entities.json").exists()


def test_noniid_digit_assets_load_like_a_local_model(tmp_path: Path) -> None:
    """``benchmarks/make_noniid_digits.py``: the model directory loads with the Auto classes, the
    tokenizer round-trips a prompt character by character, every row's answer is its task's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    make_noniid_digits = bench_module("make_noniid_digits")
    assert make_noniid_digits.main(["--out", str(tmp_path), "--rows", "60"]) == 0
    tok = AutoTokenizer.from_pretrained(tmp_path / "model")
    ids = tok("S3141=").input_ids
    assert len(ids) == 6 and tok.decode(ids) == "S3141="
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "model").config.vocab_size == len(tok)
    rows = [json.loads(line) for line in (tmp_path / "data.jsonl").read_text().splitlines()]
    assert len(rows) == 60 and {r["task"] for r in rows} == {"C", "R", "S"}
    for r in rows:
        digits = r["prompt"][1:-1]
        assert r["answer"] == {"C": digits, "R": digits[::-1], "S": "".join(sorted(digits))}[r["task"]]


def test_robustness_cells_pass_the_attack_strength_to_the_config() -> None:
    """``--strength``: an attacked cell's overrides validate as a config whose attack carries it;
    without it the kind's default is left in effect, and a clean cell has no attack."""
    from fedgspo.config import load_config
    from fedgspo.robust.attacks import strength_of

    Cell = bench_module("robustness").Cell
    flip = Cell("sign_flip", "plain_mean", 1)
    strong = load_config(overrides=flip.overrides(4, 10, 2, strength=4.0)).attack
    assert (strong.kind, strong.ranks, strong.seed, strength_of(strong, 4)) == ("sign_flip", [3], 2, 4.0)
    assert strength_of(load_config(overrides=flip.overrides(4, 10, 2)).attack, 4) == 1.0
    assert load_config(overrides=Cell(None, "default", 1).overrides(4, 10, 2, strength=4.0)).attack is None
