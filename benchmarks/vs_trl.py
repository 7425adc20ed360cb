"""fedgspo against TRL's ``GRPOTrainer`` with ``importance_sampling_level="sequence"`` (GSPO).

Both sides train the same tiny random-init Llama (``fedgspo.gspo.model.build_model``, seed 0) on
the same task (``DigitTask`` prompts; for TRL an in-memory ``datasets.Dataset`` and the char
tokenizer wrapped as a ``PreTrainedTokenizerFast`` built in code), the same weighted reward
functions, group size, completion length, prompts per process and step, learning rate and
Adam betas, ``num_iterations=1``, ``beta=0``, clip range 3e-4 / 4e-4 and TRL's
``loss_type="grpo"`` (fedgspo's reduction). fedgspo runs ``fedgspo.train`` with everything on
(bookkeeping, audit, metrics, checkpoints); TRL logs every step and saves nothing. Nothing is
downloaded.

For 1 and 2 processes (``torchrun``, gloo on CPU, for both), interleaved over repeats, each
side is its own process group and reports

* ``ms/step``: mean wall time of one optimizer step (TRL: ``on_step_begin`` to
  ``on_step_end``; fedgspo: ``Trainer.train_step``), each including rollout, scoring, loss,
  backward, aggregation, optimizer and logging;
* ``tokens/s``: completion tokens generated per second of those steps over all processes
  (prompt tokens not counted), from each side's own logged mean completion length;
* ``run``: the same per wall second of the whole training call (``Trainer.train`` /
  ``fedgspo.train.run``: fedgspo's includes building its trainer, registry and model, and
  the final checkpoint; TRL's trainer is built before the clock starts).

The loss check feeds both implementations identical data — weights, prompts, completions,
masks, advantages and old log-probs perturbed so that the sequence ratios straddle the clip
range — and compares TRL's ``GRPOTrainer._compute_loss`` with :func:`fedgspo.gspo.loss.gspo_loss`
on fedgspo's log-probs: loss values, log-probs and gradients, on equal-length prompts (no
padding) and on a left-padded batch.

``--parity`` compares learning instead of speed: both sides train the same local transformers
model directory (a word-level tokenizer with a chat template and a ~133k-parameter Llama,
written once into a temporary folder by ``tests/hf_fixtures.py``) on the same local JSONL file
(chat prompts "what is a + b", an ``answer`` column) with the same reward function given by
import path (``parity_reward:answer_words``: fedgspo through ``task.reward_funcs`` with this
folder on ``PYTHONPATH``, TRL as the imported function object), for ``--parity-steps``
optimizer steps (600) and each of ``--seeds`` (0 1 2), everything else as above. It reports
both reward curves (per-step means, in the JSON), the mean reward per 100-step window, the
final reward (mean of the last 50 steps) of fedgspo minus TRL's, and each side's wall time.
``--parity --quick``: 60 steps, seed 0.

``--anchor`` measures issue #17's configuration instead, on 1 process with 1 torch thread per
side: a random-init Qwen2-style model (hidden 128, 4 layers), 6-digit reversal, 4 prompts x 8
completions of 8 tokens, ``num_iterations=1``, ``proof.rate=0``. fedgspo runs in three
variants (:data:`ANCHOR_VARIANTS`): ``eager`` (``rollout.compile=off train.compile=false``),
``compiled`` (``rollout.compile=on train.compile=true``) and ``defaults`` (the configuration's
own ``gspo.num_iterations``, ``proof.rate`` and compile settings; TRL then runs with the same
``num_iterations``). Every variant and its TRL run are launched fresh, interleaved, the order
rotated per repeat. The figure is TRL's time per optimizer step divided by fedgspo's in the
same repeat, each side's mean step after ``--warmup`` steps (which hold compilation; the
ratio over all steps is reported too), as median with min and max over repeats.

Needs TRL (the ``bench-trl`` extra), best in its own venv::

    python3 -m venv /work/venv-trl && /work/venv-trl/bin/pip install torch==2.13.0 && \\
        /work/venv-trl/bin/pip install -e ".[bench-trl]"
    /work/venv-trl/bin/python benchmarks/vs_trl.py [--steps 30] [--repeats 3] [--quick]
    /work/venv-trl/bin/python benchmarks/vs_trl.py --parity [--parity-steps 600] [--seeds 0 1 2] [--quick]
    /work/venv-trl/bin/python benchmarks/vs_trl.py --anchor [--steps 30] [--warmup 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, markdown_table, write_json  # noqa: E402

from fedgspo.config import Config, load_config  # noqa: E402
from fedgspo.gspo.loss import group_advantages, gspo_loss  # noqa: E402
from fedgspo.gspo.model import build_model  # noqa: E402
from fedgspo.gspo.rewards import WeightedReward, get_reward  # noqa: E402
from fedgspo.gspo.rollout import completion_logps, generate  # noqa: E402
from fedgspo.gspo.task import DigitTask  # noqa: E402

SIDES = ("fedgspo", "trl")
TARGET = 1.5  # issue #8: fedgspo >= 1.5 x TRL's tokens/s
# What both sides share; fedgspo's names (TRL's are the same where they exist).
SETTINGS = ["gspo.num_iterations=1", "gspo.beta=0.0", "gspo.num_generations=8", "gspo.max_completion_length=6",
            "task.prompts_per_rank=8", "gspo.learning_rate=1e-3", "gspo.adam_beta2=0.99",
            "run.progress_bar=false", "run.log_every=1000000"]
# Learning parity (--parity): the same settings on a local model directory and JSONL file, with
# a reward given by import path (this folder on PYTHONPATH) and one-digit answers.
HERE = Path(__file__).resolve().parent
PARITY_REWARD = "parity_reward:answer_words"
PARITY_SETTINGS = SETTINGS + ["gspo.max_completion_length=4", f"task.reward_funcs=[{{name: {PARITY_REWARD}}}]"]
PARITY_ROWS = 512  # 25 distinct prompts "what is a + b", a, b < 5; answer: the sum
PARITY_MODEL = {"hidden": 64, "layers": 2, "seed": 0}  # 133k parameters
WINDOW, FINAL = 100, 50  # table window and final-reward window, in steps
# --anchor: issue #17's configuration (shared by both sides), then per fedgspo variant its own
# overrides; TRL follows the variant's gspo.num_iterations.
ANCHOR_SETTINGS = SETTINGS + [
    "model.arch=qwen2", "model.hidden_size=128", "model.intermediate_size=512", "model.num_layers=4",
    "model.num_heads=4", "task.name=reverse", "task.min_digits=6", "task.max_digits=6", "task.prompts_per_rank=4",
    "gspo.max_completion_length=8", "proof.rate=0"]
ANCHOR_VARIANTS: dict[str, list[str]] = {
    "eager": ["rollout.compile=off", "train.compile=false"],
    "compiled": ["rollout.compile=on", "train.compile=true"],
    "defaults": [f"gspo.num_iterations={Config().gspo.num_iterations}", f"proof.rate={Config().proof.rate}",
                 f"rollout.compile={Config().rollout.compile}", f"train.compile={Config().train.compile}"],
}
ANCHOR_TARGET = 1.5  # issue #17: TRL / fedgspo time per optimizer step


def shared_config(steps: int, extra: list[str] | None = None) -> Config:
    """The fedgspo configuration both sides are built from."""
    return load_config(None, SETTINGS + [f"train.max_steps={steps}", *(extra or [])])


def trl_tokenizer() -> Any:
    """fedgspo's character tokenizer as a ``PreTrainedTokenizerFast`` (BOS prepended, like
    ``DigitTask`` prompts; decoding concatenates characters)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = DigitTask(load_config(None, []).task, seed=0).tokenizer
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(chars.vocab)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", chars.bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", padding_side="left")


def grpo_args(cfg: Config, out_dir: Path, *, shuffle: bool = False) -> Any:
    """TRL's ``GRPOConfig`` with fedgspo's settings from ``cfg`` (per process and step:
    ``prompts_per_rank`` prompts x ``num_generations`` completions)."""
    from trl import GRPOConfig

    g = cfg.gspo
    return GRPOConfig(
        output_dir=str(out_dir), max_steps=cfg.train.max_steps, seed=cfg.train.seed, use_cpu=True, bf16=False,
        per_device_train_batch_size=cfg.task.prompts_per_rank * g.num_generations,
        num_generations=g.num_generations, max_completion_length=g.max_completion_length,
        num_iterations=g.num_iterations, beta=g.beta, epsilon=g.epsilon, epsilon_high=g.epsilon_high,
        importance_sampling_level=g.importance_sampling_level, loss_type="grpo", scale_rewards="group",
        temperature=g.temperature, learning_rate=g.learning_rate, adam_beta1=g.adam_beta1,
        adam_beta2=g.adam_beta2, weight_decay=g.weight_decay, max_grad_norm=g.max_grad_norm,
        gradient_checkpointing=cfg.model.gradient_checkpointing,  # TRL's default is on; fedgspo's off
        lr_scheduler_type="constant", shuffle_dataset=shuffle, logging_steps=1, report_to="none",
        save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, use_vllm=False)


def trl_trainer(cfg: Config, out_dir: Path, world_size: int) -> Any:
    """A ``GRPOTrainer`` configured like ``cfg`` on the prompts fedgspo's ranks would see."""
    from datasets import Dataset
    from trl import GRPOTrainer

    task = DigitTask(cfg.task, seed=cfg.train.seed)
    tok = task.tokenizer
    rows = [{"prompt": p, "answer": a} for step in range(cfg.train.max_steps) for rank in range(world_size)
            for p, a in zip(*(lambda b: (b.prompts, b.answers))(task.sample(rank, step)))]
    model = build_model(cfg.model, tok.vocab_size, pad_id=tok.pad_id, bos_id=tok.bos_id, eos_id=tok.eos_id,
                        seed=cfg.train.seed)
    args = grpo_args(cfg, out_dir)
    return GRPOTrainer(model=model, args=args, processing_class=trl_tokenizer(), train_dataset=Dataset.from_list(rows),
                       reward_funcs=[get_reward(r.name) for r in cfg.task.reward_funcs])


class StepTimes:
    """A ``TrainerCallback`` keeping the wall time of every optimizer step (generation,
    scoring, loss, backward, optimizer and logging: TRL does them all inside the step)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t0 = 0.0

    def __getattr__(self, name: str) -> Any:  # every other TrainerCallback hook: no-op
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)

    def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
        self._t0 = time.perf_counter()

    def on_step_end(self, *args: Any, **kwargs: Any) -> None:
        self.times.append(time.perf_counter() - self._t0)


@contextmanager
def train_step_times(times: list[float]) -> Iterator[None]:
    """Append the wall time of every ``fedgspo.train.Trainer.train_step`` call to ``times``."""
    from fedgspo.train import Trainer

    original = Trainer.train_step

    def timed(self: Any, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            times.append(time.perf_counter() - t0)

    Trainer.train_step = timed
    try:
        yield
    finally:
        Trainer.train_step = original


def set_threads(world_size: int) -> None:
    """``$FEDGSPO_BENCH_THREADS`` threads when set (``--anchor``: 1), else one thread per process
    when several share the CPU and two for one (as fedgspo.train)."""
    torch.set_num_threads(int(os.environ.get("FEDGSPO_BENCH_THREADS") or (1 if world_size > 1 else 2)))


def timed_train(trainer: Any) -> tuple[float, "StepTimes"] | None:
    """Run ``trainer.train()`` with per-step timing; (wall seconds, step times) on the main
    process, None elsewhere."""
    steps = StepTimes()
    trainer.add_callback(steps)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    return (seconds, steps) if trainer.accelerator.is_main_process else None


def worker_trl(cfg: Config) -> dict[str, float] | None:
    """Train with TRL; rank 0 returns wall seconds and completion tokens."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    set_threads(world)
    with tempfile.TemporaryDirectory(prefix="fedgspo-vs-trl-") as out:
        trainer = trl_trainer(cfg, Path(out), world)
        timed = timed_train(trainer)
        if timed is None:
            return None
        seconds, steps = timed
        batch = cfg.task.prompts_per_rank * cfg.gspo.num_generations * world
        lengths = [r["completions/mean_length"] for r in trainer.state.log_history if "completions/mean_length" in r]
        return {"seconds": seconds, "loop_seconds": sum(steps.times), "steps": len(lengths),
                "tokens": sum(lengths) * batch, "step_times": steps.times}


def train_fedgspo(cfg: Config) -> tuple[float, list[float], list[dict[str, Any]], int] | None:
    """Train ``cfg`` with ``fedgspo.train`` in a fresh run directory (collective); rank 0
    returns (wall seconds, per-step times, metrics records, world size), other ranks None."""
    from fedgspo.distributed import broadcast_json, destroy_distributed, init_distributed
    from fedgspo.telemetry.metrics import read_metrics
    from fedgspo.train import run

    ctx = init_distributed("cpu")
    set_threads(ctx.world_size)
    root = Path(broadcast_json(tempfile.mkdtemp(prefix="fedgspo-vs-trl-") if ctx.is_main else None))
    times: list[float] = []
    t0 = time.perf_counter()
    with train_step_times(times):
        run(cfg.model_copy(update={"run": cfg.run.model_copy(update={"dir": root / "run"})}), ctx)
    seconds = time.perf_counter() - t0
    destroy_distributed()
    if not ctx.is_main:
        return None
    return seconds, times, read_metrics(root / "run"), ctx.world_size


def worker_fedgspo(cfg: Config) -> dict[str, float] | None:
    """Train with ``fedgspo.train``; rank 0 returns wall seconds and completion tokens."""
    trained = train_fedgspo(cfg)
    if trained is None:
        return None
    seconds, times, records, world_size = trained
    batch = cfg.task.prompts_per_rank * cfg.gspo.num_generations * world_size
    lengths = [r["completion_len"] for r in records]
    return {"seconds": seconds, "loop_seconds": sum(times), "steps": len(lengths),
            "tokens": sum(lengths) * batch, "step_times": times}


def launch(side: str, nproc: int, steps: int, variant: str | None = None) -> dict[str, Any]:
    """Run one side in fresh processes (torchrun for ``nproc > 1``) and read its figures;
    ``variant`` names an ``--anchor`` variant (1 torch thread). Raises ``RuntimeError`` with
    the end of stderr when the run fails."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        script = [str(Path(__file__).resolve()), "worker", side, "--steps", str(steps), "--result", out.name]
        script += ["--variant", variant] if variant else []
        prefix = [sys.executable] if nproc == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        env = {**os.environ, "FEDGSPO_BENCH_THREADS": "1"} if variant else None
        proc = subprocess.run(prefix + script, capture_output=True, text=True, env=env)
        if proc.returncode:
            raise RuntimeError(f"{side} on {nproc} process(es) failed:\n{proc.stderr[-4000:]}")
        return json.loads(Path(out.name).read_text())


def parity_workspace(root: Path) -> Path:
    """Write the parity model directory (tokenizer with chat template, tiny Llama) and data
    file under ``root`` with the test fixtures' builders; nothing is downloaded."""
    spec = importlib.util.spec_from_file_location("hf_fixtures", HERE.parent / "tests" / "hf_fixtures.py")
    fixtures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fixtures)
    fixtures.make_model_dir(root / "model", **PARITY_MODEL)
    fixtures.write_jsonl(root / "data.jsonl", fixtures.arithmetic_rows(PARITY_ROWS, chat=True, seed=0))
    return root


def parity_config(steps: int, workspace: Path, seed: int) -> Config:
    """The fedgspo configuration of a parity run (TRL's is derived from it)."""
    return load_config(None, PARITY_SETTINGS + [f"model.path={workspace / 'model'}",
                                                f"task.dataset={workspace / 'data.jsonl'}",
                                                f"train.max_steps={steps}", f"train.seed={seed}"])


def parity_reward_fn() -> Any:
    """The parity reward function object, imported by its path like fedgspo resolves it."""
    module, name = PARITY_REWARD.split(":")
    return getattr(importlib.import_module(module), name)


def parity_trl(cfg: Config) -> dict[str, Any] | None:
    """Train the parity model with TRL; rank 0 returns the per-step reward means and times."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOTrainer

    from fedgspo.gspo.data import DatasetTask

    world = int(os.environ.get("WORLD_SIZE", "1"))
    set_threads(world)
    rows = [json.loads(line) for line in cfg.task.dataset.read_text().splitlines() if line.strip()]
    tok = AutoTokenizer.from_pretrained(cfg.model.path)
    # Both sides must see the same prompt tokens: fedgspo's encoding against TRL's.
    prompts = [r["prompt"] for r in rows[:32]]
    ours = DatasetTask(cfg.task, tok, seed=0, rank=0, world_size=1)._encode(prompts)
    theirs = tok.apply_chat_template(prompts, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    with tempfile.TemporaryDirectory(prefix="fedgspo-vs-trl-") as out:
        trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(cfg.model.path),
                              args=grpo_args(cfg, Path(out), shuffle=True), processing_class=tok,
                              train_dataset=Dataset.from_list(rows), reward_funcs=[parity_reward_fn()])
        timed = timed_train(trainer)
        if timed is None:
            return None
        seconds, steps = timed
        logs = [r for r in trainer.state.log_history if "reward" in r]
        return {"seconds": seconds, "loop_seconds": sum(steps.times), "steps": len(logs),
                "rewards": [r["reward"] for r in logs],
                "completion_len": statistics.fmean(r["completions/mean_length"] for r in logs),
                "prompt_ids_equal": [list(map(int, t)) for t in theirs] == [list(map(int, o)) for o in ours]}


def parity_fedgspo(cfg: Config) -> dict[str, Any] | None:
    """Train the parity model with ``fedgspo.train`` (all bookkeeping on, as in the speed
    comparison); rank 0 returns the per-step reward means and times."""
    trained = train_fedgspo(cfg)
    if trained is None:
        return None
    seconds, times, records, _ = trained
    return {"seconds": seconds, "loop_seconds": sum(times), "steps": len(records),
            "rewards": [r["reward_mean"] for r in records],
            "completion_len": statistics.fmean(r["completion_len"] for r in records)}


def launch_parity(side: str, nproc: int, steps: int, seed: int, workspace: Path) -> dict[str, Any]:
    """One parity run in fresh processes, this folder on ``PYTHONPATH`` (where the reward's
    import path resolves); adds the wall time of the whole process (imports included)."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        script = [str(Path(__file__).resolve()), "worker", side, "--steps", str(steps), "--result", out.name,
                  "--workspace", str(workspace), "--seed", str(seed)]
        prefix = [sys.executable] if nproc == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}
        t0 = time.perf_counter()
        proc = subprocess.run(prefix + script, capture_output=True, text=True, env=env)
        if proc.returncode:
            raise RuntimeError(f"{side} parity on {nproc} process(es) failed:\n{proc.stderr[-4000:]}")
        return {**json.loads(Path(out.name).read_text()), "process_seconds": time.perf_counter() - t0}


def windows(curve: list[float], width: int) -> list[float]:
    """Mean of each ``width``-step window of ``curve`` (the last one may be shorter)."""
    return [statistics.fmean(curve[i:i + width]) for i in range(0, len(curve), width)]


def parity_report(runs: dict[int, dict[int, dict[str, dict[str, Any]]]], steps: int
                  ) -> tuple[dict[str, Any], list[str]]:
    """Windowed curves, final rewards and their difference, per process count and seed; and
    the printed tables."""
    width, last = (WINDOW, FINAL) if steps >= 2 * WINDOW else (max(steps // 3, 1), max(steps // 2, 1))
    result: dict[str, Any] = {"window": width, "final_steps": last, "by_processes": {}}
    text = []
    for nproc, by_seed in runs.items():
        per_seed, curves = {}, {side: [] for side in SIDES}
        for seed, by_side in by_seed.items():
            final = {side: statistics.fmean(by_side[side]["rewards"][-last:]) for side in SIDES}
            per_seed[seed] = {"final": final, "final_diff": final["fedgspo"] - final["trl"],
                              "windows": {side: windows(by_side[side]["rewards"], width) for side in SIDES}}
            for side in SIDES:
                curves[side].append(by_side[side]["rewards"])
        mean_curve = {side: [statistics.fmean(v) for v in zip(*c)] for side, c in curves.items()}
        win = {side: windows(c, width) for side, c in mean_curve.items()}
        diffs = [s["final_diff"] for s in per_seed.values()]
        result["by_processes"][nproc] = {
            "per_seed": per_seed, "mean_curve": mean_curve, "windows": win,
            "final": {side: statistics.fmean(s["final"][side] for s in per_seed.values()) for side in SIDES},
            "final_diff_mean": statistics.fmean(diffs), "final_diff_min": min(diffs), "final_diff_max": max(diffs)}
        seeds = ", ".join(map(str, by_seed))
        text.append(f"\n{nproc} process(es), mean reward per {width}-step window (mean over seeds {seeds})\n")
        text.append(markdown_table(
            ["steps", "fedgspo", "TRL", "fedgspo - TRL"],
            [[f"{i * width + 1}-{min((i + 1) * width, steps)}", f, t, f - t]
             for i, (f, t) in enumerate(zip(win["fedgspo"], win["trl"]))]))
        text.append(f"\n{nproc} process(es), final reward (mean of the last {last} steps) and wall seconds\n")
        rows = []
        for seed, by_side in by_seed.items():
            f, t = (by_side[side] for side in SIDES)
            rows.append([seed, per_seed[seed]["final"]["fedgspo"], per_seed[seed]["final"]["trl"],
                         per_seed[seed]["final_diff"], f["seconds"], t["seconds"], f["process_seconds"],
                         t["process_seconds"], t["prompt_ids_equal"]])
        text.append(markdown_table(["seed", "fedgspo final", "TRL final", "fedgspo - TRL", "fedgspo train s",
                                    "TRL train s", "fedgspo process s", "TRL process s", "same prompt ids"], rows))
    return result, text


def main_parity(args: argparse.Namespace) -> None:
    """Run the learning-parity comparison and write its JSON."""
    import trl

    steps = 60 if args.quick else args.parity_steps
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    nprocs = args.nprocs or [1]
    runs: dict[int, dict[int, dict[str, dict[str, Any]]]] = {n: {} for n in nprocs}
    with tempfile.TemporaryDirectory(prefix="fedgspo-parity-") as tmp:
        workspace = parity_workspace(Path(tmp))
        for i, seed in enumerate(seeds):
            for nproc in nprocs:
                runs[nproc][seed] = {}
                for side in SIDES if i % 2 == 0 else SIDES[::-1]:
                    r = launch_parity(side, nproc, steps, seed, workspace)
                    runs[nproc][seed][side] = r
                    print(f"seed {seed}, {nproc} process(es), {side}: {r['steps']} steps, "
                          f"{r['seconds']:.1f} s, final reward {statistics.fmean(r['rewards'][-50:]):.3f}", flush=True)
    result, text = parity_report(runs, steps)
    print(f"\nlearning parity: fedgspo vs TRL {trl.__version__} GRPOTrainer (GSPO), {steps} steps, "
          f"reward {PARITY_REWARD}, same model directory and JSONL data")
    print("\n".join(text))
    out = args.out or RESULTS / "vs_trl_parity.json"
    write_json(out, {"mode": "parity", "trl": trl.__version__, "steps": steps, "seeds": seeds,
                     "settings": PARITY_SETTINGS, "reward": PARITY_REWARD, "model": PARITY_MODEL,
                     "rows": PARITY_ROWS, "runs": runs, "result": result})
    print(f"wrote {out}")


def loss_check(padded: bool) -> dict[str, float]:
    """TRL's ``_compute_loss`` and fedgspo's ``gspo_loss`` on identical data: the two losses,
    the largest log-prob difference and the relative difference of the gradients."""
    extra = [] if padded else ["task.min_digits=4", "task.max_digits=4"]
    cfg = shared_config(1, extra)
    g = cfg.gspo
    set_threads(1)
    with tempfile.TemporaryDirectory() as out:
        trainer = trl_trainer(cfg, Path(out), 1)
        model = trainer.model
        task = DigitTask(cfg.task, seed=0)
        batch, tok = task.sample(0, 0), task.tokenizer
        roll = generate(model, batch.input_ids, batch.attention_mask, num_generations=g.num_generations,
                        max_new_tokens=g.max_completion_length, temperature=g.temperature, eos_id=tok.eos_id,
                        pad_id=tok.pad_id, generator=torch.Generator().manual_seed(0))
        rewards, _ = WeightedReward.from_names([(r.name, r.weight) for r in cfg.task.reward_funcs])(
            [p for p in batch.prompts for _ in range(g.num_generations)],
            [tok.decode(r) for r in roll.completion_ids.tolist()],
            answer=[a for a in batch.answers for _ in range(g.num_generations)])
        adv = group_advantages(torch.tensor(rewards), g.num_generations)
        old = roll.old_logps + 2e-3 * torch.randn(roll.old_logps.shape, generator=torch.Generator().manual_seed(1))
        old = old * roll.completion_mask
        lp = roll.prompt_length
        inputs = {"prompt_ids": roll.input_ids[:, :lp], "prompt_mask": roll.attention_mask[:, :lp],
                  "completion_ids": roll.completion_ids, "completion_mask": roll.completion_mask.long(),
                  "advantages": adv, "old_per_token_logps": old}
        model.train()
        trainer.current_gradient_accumulation_steps = 1
        model.zero_grad()
        trl_loss = trainer._compute_loss(model, inputs)
        trl_loss.backward()
        trl_grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        model.zero_grad()
        logps, _ = completion_logps(model, roll, g.temperature)
        ours = gspo_loss(logps, old, adv, roll.completion_mask, epsilon=g.epsilon, epsilon_high=g.epsilon_high)
        ours.backward()
        our_grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        trl_logps = trainer._get_per_token_logps_and_entropies(
            model, roll.input_ids, roll.attention_mask, roll.completion_ids.shape[1])[0].detach()
    mask = roll.completion_mask.bool()
    ratio = torch.exp(((logps.detach() - old) * roll.completion_mask).sum(-1) / roll.completion_mask.sum(-1))
    return {"padded": padded, "trl_loss": trl_loss.item(), "fedgspo_loss": ours.item(),
            "loss_abs_diff": abs(trl_loss.item() - ours.item()),
            "logps_max_abs_diff": (trl_logps - logps.detach())[mask].abs().max().item(),
            "grad_rel_diff": ((trl_grad - our_grad).norm() / our_grad.norm().clamp(min=1e-30)).item(),
            "outside_clip_frac": ((ratio < 1 - g.epsilon) | (ratio > 1 + g.epsilon_high)).float().mean().item()}


def table(samples: dict[int, dict[str, list[dict[str, float]]]]) -> tuple[list[list[Any]], dict[int, Any]]:
    """Table rows and per-process-count figures: each side's s/step and tokens/s per repeat,
    and the per-repeat ratios fedgspo / TRL of tokens/s and TRL / fedgspo of s/step."""
    rows, result = [], {}
    for nproc, by_side in samples.items():
        per = {side: {"loop_s_per_step": [r["loop_seconds"] / r["steps"] for r in runs],
                      "run_s_per_step": [r["seconds"] / r["steps"] for r in runs],
                      "tokens_per_s": [r["tokens"] / r["loop_seconds"] for r in runs],
                      "run_tokens_per_s": [r["tokens"] / r["seconds"] for r in runs]} for side, runs in by_side.items()}
        ratios = {key: [f / t for f, t in zip(per["fedgspo"][key], per["trl"][key])]
                  for key in ("tokens_per_s", "run_tokens_per_s")}
        result[nproc] = {"per_side": per, "ratio_fedgspo_over_trl": ratios}
        for side in SIDES:
            cells = [f"{statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})" if side == "fedgspo" else ""
                     for v in ratios.values()]
            rows.append([nproc, side, statistics.median(per[side]["loop_s_per_step"]) * 1e3,
                         statistics.median(per[side]["tokens_per_s"]), cells[0],
                         statistics.median(per[side]["run_s_per_step"]) * 1e3, cells[1]])
    return rows, result


def anchor_config(steps: int, variant: str) -> Config:
    """The ``--anchor`` configuration of fedgspo's ``variant`` (TRL's is derived from it)."""
    return load_config(None, ANCHOR_SETTINGS + ANCHOR_VARIANTS[variant] + [f"train.max_steps={steps}"])


def steady_step(run: dict[str, Any], warmup: int) -> float:
    """Mean seconds per optimizer step after the first ``warmup`` steps (all steps when the
    run is not longer than that)."""
    times = run["step_times"][warmup:] or run["step_times"]
    return statistics.fmean(times)


def main_anchor(args: argparse.Namespace) -> None:
    """Run the ``--anchor`` comparison (1 process) and write its JSON."""
    import trl

    steps, repeats = (8, 2) if args.quick else (args.steps, args.repeats)
    warmup = min(args.warmup, steps - 1)
    # One TRL run per distinct num_iterations, shared by the variants that use it.
    trl_of = {v: f"trl-n{anchor_config(1, v).gspo.num_iterations}" for v in ANCHOR_VARIANTS}
    jobs = [("fedgspo", v, v) for v in ANCHOR_VARIANTS] + [("trl", v, t) for t, v in
                                                            {t: v for v, t in trl_of.items()}.items()]
    samples: dict[str, list[dict[str, Any]]] = {key: [] for _, _, key in jobs}
    loads: list[float] = []
    for rep in range(repeats):
        for side, variant, key in jobs[rep % len(jobs):] + jobs[:rep % len(jobs)]:
            loads.append(os.getloadavg()[0])
            samples[key].append(launch(side, 1, steps, variant))
            print(f"repeat {rep}, {key}: {steady_step(samples[key][-1], warmup) * 1e3:.1f} ms/step, "
                  f"load {loads[-1]:.1f}", flush=True)
    result, rows = {}, []
    for variant in ANCHOR_VARIANTS:
        ours, theirs = samples[variant], samples[trl_of[variant]]
        steady = [steady_step(t, warmup) / steady_step(f, warmup) for f, t in zip(ours, theirs)]
        whole = [steady_step(t, 0) / steady_step(f, 0) for f, t in zip(ours, theirs)]
        result[variant] = {"fedgspo_ms": [steady_step(f, warmup) * 1e3 for f in ours],
                           "trl_ms": [steady_step(t, warmup) * 1e3 for t in theirs],
                           "trl_over_fedgspo": steady, "trl_over_fedgspo_with_warmup": whole}
        rows.append([variant, " ".join(ANCHOR_VARIANTS[variant]), statistics.median(result[variant]["fedgspo_ms"]),
                     statistics.median(result[variant]["trl_ms"]),
                     f"{statistics.median(steady):.2f} ({min(steady):.2f}-{max(steady):.2f})",
                     f"{statistics.median(whole):.2f} ({min(whole):.2f}-{max(whole):.2f})"])
    print(f"\nanchor configuration, fedgspo vs TRL {trl.__version__} GRPOTrainer (GSPO), 1 process, 1 thread, "
          f"{steps} steps (first {warmup} left out) x {repeats} repeats; "
          f"load average {min(loads):.1f}-{max(loads):.1f}\n")
    print(markdown_table(["fedgspo variant", "overrides", "fedgspo ms/step", "TRL ms/step",
                          "TRL / fedgspo per step (range)", "with warm-up steps"], rows))
    met = {v: statistics.median(r["trl_over_fedgspo"]) >= ANCHOR_TARGET for v, r in result.items()}
    print(f"\ntarget TRL / fedgspo >= {ANCHOR_TARGET} per step: "
          + ", ".join(f"{v} {'met' if ok else 'missed'}" for v, ok in met.items()))
    out = args.out or RESULTS / "vs_trl_anchor.json"
    write_json(out, {"mode": "anchor", "trl": trl.__version__, "steps": steps, "warmup": warmup, "repeats": repeats,
                     "settings": ANCHOR_SETTINGS, "variants": ANCHOR_VARIANTS, "load_average_1min": loads,
                     "samples": samples, "result": result, "target": ANCHOR_TARGET, "met": met})
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    worker = sub.add_parser("worker", help="one side, one process group (internal)")
    worker.add_argument("side", choices=SIDES)
    worker.add_argument("--steps", type=int, required=True)
    worker.add_argument("--result", type=Path, required=True)
    worker.add_argument("--workspace", type=Path, help="parity: folder holding model/ and data.jsonl")
    worker.add_argument("--seed", type=int, default=0)
    worker.add_argument("--variant", choices=list(ANCHOR_VARIANTS), help="--anchor: fedgspo's variant")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--nprocs", type=int, nargs="+", help="process counts (default: 1 2; --parity: 1)")
    parser.add_argument("--quick", action="store_true",
                        help="10 steps x 2 repeats (--parity: 60 steps, seed 0; --anchor: 8 steps x 2 repeats)")
    parser.add_argument("--parity", action="store_true", help="learning parity on a local model and JSONL file")
    parser.add_argument("--anchor", action="store_true",
                        help="issue #17's configuration, 1 process: eager, compiled and default fedgspo vs TRL")
    parser.add_argument("--warmup", type=int, default=4, help="--anchor: first steps left out of ms/step")
    parser.add_argument("--parity-steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, nargs="+", help="--parity: training seeds (default: 0 1 2)")
    parser.add_argument("--out", type=Path, help="JSON file (default: results/vs_trl.json, --parity: "
                                                 "results/vs_trl_parity.json, --anchor: results/vs_trl_anchor.json)")
    args = parser.parse_args(argv)
    if args.command == "worker":
        if args.workspace is not None:
            cfg = parity_config(args.steps, args.workspace, args.seed)
            figures = (parity_trl if args.side == "trl" else parity_fedgspo)(cfg)
        else:
            cfg = anchor_config(args.steps, args.variant) if args.variant else shared_config(args.steps)
            figures = (worker_trl if args.side == "trl" else worker_fedgspo)(cfg)
        if figures is not None:
            args.result.write_text(json.dumps(figures))
        return
    if args.parity:
        main_parity(args)
        return
    if args.anchor:
        main_anchor(args)
        return

    import trl

    steps, repeats = (10, 2) if args.quick else (args.steps, args.repeats)
    args.nprocs = args.nprocs or [1, 2]
    args.out = args.out or RESULTS / "vs_trl.json"
    samples: dict[int, dict[str, list[dict[str, float]]]] = {n: {s: [] for s in SIDES} for n in args.nprocs}
    for rep in range(repeats):
        for nproc in args.nprocs:
            for side in SIDES if rep % 2 == 0 else SIDES[::-1]:
                samples[nproc][side].append(launch(side, nproc, steps))
                print(f"repeat {rep}, {nproc} process(es), {side}: {samples[nproc][side][-1]}", flush=True)
    checks = [loss_check(padded=False), loss_check(padded=True)]

    rows, result = table(samples)
    print(f"\nfedgspo vs TRL {trl.__version__} GRPOTrainer (GSPO), {steps} steps x {repeats} repeats, "
          "completion tokens per wall second (medians; ratio per repeat)\n")
    print(markdown_table(["processes", "side", "ms/step", "tokens/s", "x TRL tokens/s (range)",
                          "run ms/step", "run x TRL tokens/s"], rows))
    print("\nloss on identical data (TRL _compute_loss vs fedgspo gspo_loss)\n")
    print(markdown_table(["prompts", "TRL loss", "fedgspo loss", "|diff|", "max |logp diff|", "grad rel diff"],
                         [["left-padded" if c["padded"] else "equal length", c["trl_loss"], c["fedgspo_loss"],
                           c["loss_abs_diff"], c["logps_max_abs_diff"], c["grad_rel_diff"]] for c in checks]))
    met = all(statistics.median(r["ratio_fedgspo_over_trl"]["tokens_per_s"]) >= TARGET for r in result.values())
    print(f"\ntarget fedgspo >= {TARGET} x TRL tokens/s: {'met' if met else 'missed'}")
    write_json(args.out, {"trl": trl.__version__, "steps": steps, "repeats": repeats, "settings": SETTINGS,
                          "samples": samples, "result": result, "loss_check": checks, "target": TARGET, "met": met})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
