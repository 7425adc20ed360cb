"""Bring your own model, tokenizer, data and reward: end to end on 2 gloo ranks, and every bad
input as a one-line error with exit code 2 and no run directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hf_fixtures as H
from dist_helpers import train_ranks
from fedgspo.telemetry.metrics import read_metrics

REWARD_MODULE = '''
def sevens(prompts, completions, answer, label, **kwargs):
    """Reward the word "7": learnable in a few dozen steps by a tiny model. Takes the data
    columns (answer, label) as keyword arguments, as TRL passes them."""
    assert len(answer) == len(label) == len(completions)
    return [(c[0]["content"] if isinstance(c, list) else c).split().count("7") / 4 for c in completions]


def seen_rows(prompts, completions, answer, label, **kwargs):
    """Log every prompt this rank scored, to show which rows a rank reads."""
    import os
    with open(os.environ["SEEN_LOG"] + os.environ["RANK"], "a") as fh:
        fh.writelines(p + "\\n" for p in prompts)
    return [0.0] * len(completions)


def raises(prompts, completions, **kwargs):
    raise RuntimeError("boom")


def too_few(prompts, completions, **kwargs):
    return [1.0]
'''

FAST = ["run.progress_bar=false", "run.log_every=10", "gspo.max_completion_length=4", "task.prompts_per_rank=4"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("byo")
    H.make_model_dir(root / "model")
    H.write_jsonl(root / "data.jsonl", H.arithmetic_rows(64))
    H.write_jsonl(root / "eval.jsonl", H.arithmetic_rows(8, seed=1))
    (root / "user_rewards.py").write_text(REWARD_MODULE)
    return root


def launch(root: Path, args: list[str], *, nproc: int = 2, env: dict[str, str] | None = None,
           torchrun: bool = False) -> subprocess.CompletedProcess:
    """``fedgspo.train`` on ``nproc`` ranks in ``root``, which is on the ranks' import path:
    forked ranks (:func:`dist_helpers.train_ranks`), or torchrun itself with ``torchrun``."""
    environ = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **(env or {})}
    if not torchrun:
        return train_ranks([*FAST, *args], nproc, env=environ, cwd=root, timeout=600)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "fedgspo.train", *FAST, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=environ, cwd=root)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The error line the ranks printed (the same on each), having exited 2. torchrun reports
    the first worker's exit code, ends the others (which may not have printed yet) and fails
    with its own code."""
    lines = [line for line in proc.stderr.splitlines() if line.startswith("fedgspo.train: error: ")]
    assert proc.returncode != 0 and "exitcode: 2" in proc.stderr, proc.stderr[-2000:]
    assert lines and len(set(lines)) == 1, proc.stderr[-2000:]
    return lines[0]


@pytest.mark.slow
def test_two_ranks_train_a_local_model_on_chat_data_with_an_imported_reward(workspace: Path) -> None:
    run = workspace / "full"
    proc = launch(workspace, [f"run.dir={run}", f"model.path={workspace / 'model'}",
                              f"task.dataset={workspace / 'data.jsonl'}", f"task.eval_dataset={workspace / 'eval.jsonl'}",
                              "task.reward_funcs=[{name: user_rewards:sevens}]", "train.max_steps=40",
                              "gspo.learning_rate=3e-3", "eval.every=20", "eval.num_prompts=4"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_metrics(run)
    first = sum(r["reward_mean"] for r in records[:10]) / 10
    last = sum(r["reward_mean"] for r in records[-10:]) / 10
    assert last > first + 0.2, (first, last)
    assert "eval/reward_mean" in records[19] and "eval/reward/user_rewards:sevens" in records[39]
    summary = json.loads((run / "summary.json").read_text())
    assert len(set(summary["weights_sha256_per_rank"])) == 1
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = run / "checkpoints" / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert tokenizer.chat_template and model.config.vocab_size == len(tokenizer)


@pytest.mark.slow
def test_lora_trains_and_exchanges_only_the_adapters(workspace: Path) -> None:
    run = workspace / "lora"
    proc = launch(workspace, [f"run.dir={run}", f"model.path={workspace / 'model'}",
                              f"task.dataset={workspace / 'data.jsonl'}", "task.reward_funcs=[{name: user_rewards.sevens}]",
                              "model.lora={r: 4, alpha: 8}", "train.max_steps=4", "checkpoint.every=2",
                              "gspo.learning_rate=1e-2", "train.micro_batch_size=8"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(workspace / "model")
    adapter_numel = sum(p.numel() for p in get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
                        .parameters() if p.requires_grad)
    assert f"{adapter_numel:,} trained and exchanged every step" in proc.stderr
    # The final checkpoint is the adapter alone; the base weights never changed.
    saved = load_file(run / "checkpoints" / "final" / "adapter_model.safetensors")
    assert sum(t.numel() for t in saved.values()) == adapter_numel
    assert any(float(t.abs().sum()) > 0 for k, t in saved.items() if "lora_B" in k)  # B starts at zero
    from peft import PeftModel

    original = AutoModelForCausalLM.from_pretrained(workspace / "model")
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(workspace / "model"),
                                      run / "checkpoints" / "final")
    base_weights = {k: v for k, v in original.state_dict().items()}
    for name, tensor in tuned.get_base_model().state_dict().items():
        if "lora_" not in name:
            key = name.replace("base_layer.", "")
            assert torch.equal(tensor, base_weights[key]), name


@pytest.mark.slow
def test_by_file_partition_reads_only_the_ranks_own_file(workspace: Path) -> None:
    sites = workspace / "sites"
    for rank in range(2):
        rows = [{"prompt": f"what is {rank} + {i % 5}", "answer": str(rank), "label": rank} for i in range(8)]
        H.write_jsonl(sites / f"site_{rank}.jsonl", rows)
    log = workspace / "seen_"
    proc = launch(workspace, [f"run.dir={workspace / 'by_file'}", f"model.path={workspace / 'model'}",
                              f"task.dataset={sites / 'site_{rank}.jsonl'}", "task.partition=by_file",
                              "task.reward_funcs=[{name: user_rewards:seen_rows}]", "train.max_steps=4"],
                  env={"SEEN_LOG": str(log)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in range(2):
        prompts = set((workspace / f"seen_{rank}").read_text().splitlines())
        assert prompts and all(p.startswith(f"what is {rank} +") for p in prompts), prompts
    # A rank whose file is missing stops every rank before anything is written.
    (sites / "site_1.jsonl").unlink()
    proc = launch(workspace, [f"run.dir={workspace / 'by_file_missing'}", f"model.path={workspace / 'model'}",
                              f"task.dataset={sites / 'site_{rank}.jsonl'}", "task.partition=by_file",
                              "task.reward_funcs=[{name: user_rewards:seen_rows}]", "train.max_steps=2"],
                  env={"SEEN_LOG": str(log)}, torchrun=True)
    line = one_error_line(proc)
    assert "rank 1" in line and "site_1.jsonl" in line
    assert not (workspace / "by_file_missing").exists()


@pytest.mark.slow
def test_sites_with_their_own_files_train_lora_with_local_steps(workspace: Path) -> None:
    sites = workspace / "fed_sites"
    for rank in range(2):
        H.write_jsonl(sites / f"site_{rank}.jsonl", H.arithmetic_rows(8))
    run = workspace / "federated_lora"
    proc = launch(workspace, [f"run.dir={run}", f"model.path={workspace / 'model'}",
                              f"task.dataset={sites / 'site_{rank}.jsonl'}", "task.partition=by_file",
                              "task.reward_funcs=[{name: user_rewards.sevens}]", "model.lora={r: 2, alpha: 4}",
                              "federated.local_steps=2", "federated.compression=int8", "federated.error_feedback=true",
                              "train.max_steps=4", "gspo.learning_rate=1e-2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trained and exchanged every 2 steps (one round)" in proc.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert len(set(summary["weights_sha256_per_rank"])) == 1
    rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds if "round" in r] == [0, 1]


def _bad_inputs(root: Path) -> list[tuple[list[str], str]]:
    H.make_model_dir(root / "model")
    (root / "no_tokenizer").mkdir()
    (root / "no_tokenizer" / "config.json").write_text((root / "model" / "config.json").read_text())
    H.write_jsonl(root / "data.jsonl", H.arithmetic_rows(8))
    (root / "broken.jsonl").write_text('{"prompt": "what is 1 + 1", "answer": "2"}\n{"prompt": oops}\n')
    H.write_jsonl(root / "no_prompt.jsonl", [{"question": "what is 1", "answer": "1"}])
    (root / "user_rewards.py").write_text(REWARD_MODULE)
    model, data = f"model.path={root / 'model'}", f"task.dataset={root / 'data.jsonl'}"
    return [
        ([f"model.path={root / 'missing'}"], "model.path"),
        ([f"model.path={root / 'no_tokenizer'}", data], "no tokenizer"),
        ([model, f"task.dataset={root / 'missing.jsonl'}"], "missing.jsonl"),
        ([model, f"task.dataset={root / 'broken.jsonl'}"], "broken.jsonl line 2"),
        ([model, f"task.dataset={root / 'no_prompt.jsonl'}"], "prompt"),
        ([model, data, "task.reward_funcs=[{name: no_such_reward}]"], "no_such_reward"),
        ([model, data, "task.reward_funcs=[{name: user_rewards:nope}]"], "user_rewards:nope"),
        ([model, data, "task.reward_funcs=[{name: no_module.at_all:fn}]"], "no_module.at_all"),
        ([model, data, "task.reward_funcs=[{name: user_rewards:raises}]"], "user_rewards:raises"),
        ([model, data, "task.reward_funcs=[{name: user_rewards:too_few}]"], "user_rewards:too_few"),
    ]


def test_every_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture) -> None:
    from fedgspo.train import main

    monkeypatch.syspath_prepend(str(tmp_path))
    cases = _bad_inputs(tmp_path)
    capsys.readouterr()  # what making the fixtures printed
    for i, (args, named) in enumerate(cases):
        run = tmp_path / f"run{i}"
        assert main([f"run.dir={run}", *FAST, *args]) == 2, args
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and err[0].startswith("fedgspo.train: error: "), (args, err)
        assert named in err[0], (named, err[0])
        assert not run.exists(), args


def test_micro_batches_train_like_one_batch(tmp_path: Path) -> None:
    from fedgspo.train import main

    hashes = []
    for size in (None, 5):
        run = tmp_path / f"mb{size}"
        extra = [f"train.micro_batch_size={size}"] if size else []
        assert main([f"run.dir={run}", "train.max_steps=2", "gspo.num_iterations=1", *FAST, *extra]) == 0
        hashes.append([r["loss"] for r in read_metrics(run)])
    assert hashes[0] == pytest.approx(hashes[1], abs=1e-6)


def test_math_recipe_runs_as_written_with_a_local_model_and_data(tmp_path: Path) -> None:
    """configs/math_lora.yaml with only model.path and task.dataset changed (and a short run)."""
    from fedgspo.train import main

    H.make_model_dir(tmp_path / "model")
    H.write_jsonl(tmp_path / "gsm.jsonl", [{**r, "answer": f"so #### {r['answer']}"} for r in H.arithmetic_rows(16)])
    config = Path(__file__).resolve().parents[1] / "configs" / "math_lora.yaml"
    assert main(["--config", str(config), f"run.dir={tmp_path / 'run'}", f"model.path={tmp_path / 'model'}",
                 f"task.dataset={tmp_path / 'gsm.jsonl'}", "train.max_steps=2", "gspo.max_completion_length=8",
                 "eval.every=2", "eval.num_prompts=2", "run.progress_bar=false"]) == 0
    records = read_metrics(tmp_path / "run")
    assert {"reward/math_answer", "reward/format_reward", "eval/reward_mean"} <= set(records[-1])
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "checkpoints" / "final")  # merged LoRA


def test_lora_run_resumes_from_its_adapter_checkpoint(tmp_path: Path) -> None:
    from fedgspo.train import main

    H.make_model_dir(tmp_path / "model")
    H.write_jsonl(tmp_path / "data.jsonl", H.arithmetic_rows(16))
    common = [f"run.dir={tmp_path / 'run'}", f"model.path={tmp_path / 'model'}", f"task.dataset={tmp_path / 'data.jsonl'}",
              "task.reward_funcs=[{name: answer_match}]", "model.lora={r: 2, alpha: 4}", "checkpoint.every=2",
              "gspo.learning_rate=1e-2", *FAST]
    assert main([*common, "train.max_steps=4"]) == 0
    assert (tmp_path / "run" / "checkpoints" / "step_00000004" / "adapter_model.safetensors").is_file()
    assert main([*common, "train.max_steps=6", "checkpoint.resume=auto"]) == 0
    steps = [r["step"] for r in read_metrics(tmp_path / "run")]
    assert steps == [0, 1, 2, 3, 4, 5]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["resumed_at"] == 4 and summary["steps"] == 6
