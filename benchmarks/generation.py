"""Generation throughput: the compiled static-cache decode against the eager loop and ``model.generate``.

Three ways to sample the same batch (the digit task's prompts, ``--prompts`` x
``--generations`` completions of ``--new-tokens`` tokens each, temperature 1), on the same
random-init model, in one process:

* ``compiled``: ``fedgspo.gspo.rollout.generate(compile="on")``, prefill and one-token step
  compiled over static caches (``fedgspo/gspo/static_decode.py``);
* ``eager``: the same function with ``compile="off"``, the reference loop;
* ``hf``: transformers' ``model.generate`` (sampling, ``num_return_sequences``, dynamic cache).

Every completion runs to full length (EOS is never a stop: fedgspo gets an id outside the
vocabulary, ``model.generate`` a ``min_new_tokens``), so each call makes
``rows x new_tokens`` tokens. Compilation happens before timing and is reported on its own
(``compile s``: the first two calls, which compile the step and the prefill, with the
break-even number of decode steps it implies). Then, for each of
``--repeats`` repeats, each variant runs ``--calls`` calls in turn (the order rotates every
repeat); the ratios compiled / eager and compiled / hf of tokens per second are taken per
repeat and reported as median with min and max. Sizes: ``default`` (the built-in model of
``ModelConfig()``), ``anchor`` (Qwen2-style, hidden 128, 4 layers: TRL's configuration of
issue #17) and ``30m`` (a ~30M-parameter Llama).

    python benchmarks/generation.py                 # 5 repeats x 5 calls, every size
    python benchmarks/generation.py --quick         # 3 repeats x 2 calls
    python benchmarks/generation.py --sizes anchor --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, markdown_table, write_json  # noqa: E402

from fedgspo.config import TaskConfig  # noqa: E402
from fedgspo.gspo.model import ModelConfig, build_model, trainable_numel  # noqa: E402
from fedgspo.gspo.rollout import generate  # noqa: E402
from fedgspo.gspo.task import DigitTask  # noqa: E402

SIZES: dict[str, ModelConfig] = {
    "default": ModelConfig(),
    "anchor": ModelConfig(arch="qwen2", hidden_size=128, intermediate_size=512, num_layers=4, num_heads=4),
    "30m": ModelConfig(hidden_size=512, intermediate_size=1536, num_layers=9, num_heads=8),
}
VARIANTS = ("compiled", "eager", "hf")
GOAL = 2.0  # issue #17: compiled >= 2x the eager loop's tokens/s at the anchor size


def sampler(variant: str, model: torch.nn.Module, task: DigitTask, args: argparse.Namespace,
            device: torch.device) -> Callable[[int], None]:
    """One generate call of ``variant`` on the batch of rollout ``index``."""
    tok = task.tokenizer

    def call(index: int) -> None:
        batch = task.sample(0, index)
        ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
        generator = torch.Generator(device).manual_seed(index)
        if variant == "hf":
            model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                           num_return_sequences=args.generations, max_new_tokens=args.new_tokens,
                           min_new_tokens=args.new_tokens, pad_token_id=tok.pad_id, eos_token_id=tok.eos_id)
        else:
            generate(model, ids, mask, num_generations=args.generations, max_new_tokens=args.new_tokens,
                     temperature=1.0, eos_id=-1, pad_id=tok.pad_id, generator=generator,
                     compile="on" if variant == "compiled" else "off")
    return call


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_size(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    """Compile time, then interleaved repeats of every variant; tokens/s samples and ratios."""
    task = DigitTask(TaskConfig(min_digits=6, max_digits=6, prompts_per_rank=args.prompts), seed=0)
    tok = task.tokenizer
    model = build_model(SIZES[name], tok.vocab_size, pad_id=tok.pad_id, bos_id=tok.bos_id, eos_id=tok.eos_id,
                        seed=0).to(device).eval()
    calls = {v: sampler(v, model, task, args, device) for v in VARIANTS}
    t0 = time.perf_counter()
    calls["compiled"](0)  # compiles the one-token step (the first prefill of a shape runs uncompiled)
    calls["compiled"](0)  # compiles the prefill
    synchronize(device)
    compile_s = time.perf_counter() - t0
    for variant in ("eager", "hf"):
        calls[variant](0)
    tokens = args.prompts * args.generations * args.new_tokens * args.calls
    rates: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for repeat in range(args.repeats):
        order = VARIANTS[repeat % 3:] + VARIANTS[:repeat % 3]
        for variant in order:
            synchronize(device)
            t0 = time.perf_counter()
            for i in range(args.calls):
                calls[variant](1 + i)
            synchronize(device)
            rates[variant].append(tokens / (time.perf_counter() - t0))
    vs_eager = [c / e for c, e in zip(rates["compiled"], rates["eager"])]
    vs_hf = [c / h for c, h in zip(rates["compiled"], rates["hf"])]
    saved_per_step = statistics.median(1 / e - 1 / c for c, e in zip(rates["compiled"], rates["eager"]))
    saved_per_step *= args.prompts * args.generations  # seconds per decode step of the whole batch
    return {
        "size": name, "parameters": trainable_numel(model), "compile_s": compile_s,
        "tokens_per_s": {v: statistics.median(r) for v, r in rates.items()}, "samples": rates,
        "compiled_vs_eager": spread(vs_eager), "compiled_vs_hf": spread(vs_hf),
        "saved_ms_per_decode_step": 1e3 * saved_per_step,
        "break_even_decode_steps": compile_s / saved_per_step if saved_per_step > 0 else None,
    }


def spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def ratio_cell(r: dict[str, float]) -> str:
    return f"{r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calls", type=int, default=5, help="generate calls per timed sample")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="3 repeats x 2 calls")
    parser.add_argument("--out", type=Path, default=RESULTS / "generation.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.calls = 3, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results = [measure_size(name, args, device) for name in args.sizes]
    header = ["size", "parameters", "compiled tok/s", "eager tok/s", "hf tok/s", "compiled/eager (min-max)",
              "compiled/hf (min-max)", "compile s", "break-even steps"]
    rows = [[r["size"], r["parameters"], r["tokens_per_s"]["compiled"], r["tokens_per_s"]["eager"],
             r["tokens_per_s"]["hf"], ratio_cell(r["compiled_vs_eager"]), ratio_cell(r["compiled_vs_hf"]),
             r["compile_s"], "-" if r["break_even_decode_steps"] is None else round(r["break_even_decode_steps"])]
            for r in results]
    print(f"\n{args.prompts} prompts x {args.generations} completions x {args.new_tokens} tokens, {device}, "
          f"{torch.get_num_threads()} threads, {args.repeats} repeats x {args.calls} calls\n")
    print(markdown_table(header, rows))
    anchor = next((r for r in results if r["size"] == "anchor"), None)
    if anchor is not None:
        print(f"\nanchor: compiled / eager median {anchor['compiled_vs_eager']['median']:.2f} (goal >= {GOAL})")
    path = write_json(args.out, {"config": {k: v for k, v in vars(args).items() if k != "out"}, "goal": GOAL,
                                 "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
