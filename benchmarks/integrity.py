"""Cost of the integrity layer: checkpoints, rollout proofs, update authentication.

Usage::

    python benchmarks/integrity.py [--repeats 5] [--out benchmarks/results/integrity.json]

Default model (``ModelConfig()``, vocabulary 17) on CPU, one thread. Prints a table (median of
``--repeats``) and writes it with machine info as JSON. Also measures the honest noise the
proof tolerances must absorb: KV-cached decoding vs one prefill, float32. Timings are
reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fedgspo.integrity.auth import UpdateAuthenticator, generate_keyring, tensor_digest
from fedgspo.checkpoint import CheckpointConfig, CheckpointManager, load_checkpoint, verify_checkpoint
from fedgspo.config import ModelConfig, TaskConfig
from fedgspo.gspo.model import build_model
from fedgspo.integrity.proof import ProofConfig, build_proofs, check_proofs, decode_hidden, prefill, prefill_from_outputs
from fedgspo.gspo.rollout import completion_logps, generate
from fedgspo.gspo.task import DigitTask


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def bench_checkpoint(repeats: int) -> dict[str, float]:
    model = build_model(ModelConfig(), 17, pad_id=0, bos_id=1, eos_id=2, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(input_ids=torch.tensor([[1, 5, 6]])).logits.mean().backward()
    opt.step()
    with tempfile.TemporaryDirectory() as tmp:
        mgr = CheckpointManager(Path(tmp), CheckpointConfig(every=1, keep_last=2))
        step = iter(range(1, 10_000))
        save = median_ms(lambda: mgr.save(next(step), model, opt, None, {"reputation": torch.ones(8)}), repeats)
        path = mgr.parent.path
        verify = median_ms(lambda: verify_checkpoint(path), repeats)
        load = median_ms(lambda: load_checkpoint(path, model, opt), repeats)
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return {"checkpoint_save_ms": save, "checkpoint_verify_ms": verify, "checkpoint_load_ms": load,
            "checkpoint_bytes": size, "model_parameters": sum(p.numel() for p in model.parameters())}


def bench_proof(repeats: int) -> dict[str, float]:
    task = DigitTask(TaskConfig(), seed=0)
    model = build_model(ModelConfig(), task.tokenizer.vocab_size, pad_id=0, bos_id=1, eos_id=2, seed=0)
    cfg = ProofConfig()
    prompts = task.sample(0, 0)
    gen = torch.Generator().manual_seed(0)
    ro = generate(model, prompts.input_ids, prompts.attention_mask, num_generations=8, max_new_tokens=6,
                  temperature=1.0, eos_id=2, pad_id=0, generator=gen)
    rows = ro.input_ids.shape[0]
    ids, mask, lp = ro.input_ids, ro.attention_mask, ro.prompt_length
    positions = (mask.cumsum(-1) - 1).clamp(min=0)

    def train_forward(hidden: bool) -> object:
        return model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                     output_hidden_states=hidden)

    # Prover options: hidden states from the first training forward (free), or a separate prefill.
    forward_plain = median_ms(lambda: completion_logps(model, ro, 1.0), repeats)
    forward_hidden = median_ms(lambda: train_forward(True), repeats)
    out = train_forward(True)
    from_outputs = median_ms(lambda: build_proofs(prefill_from_outputs(out.hidden_states[-1], out.logits, ids, lp,
                                                                       1.0).hidden, ro.completion_mask, cfg), repeats)
    separate = median_ms(lambda: build_proofs(prefill(model, ids, mask, lp, 1.0).hidden, ro.completion_mask, cfg),
                         repeats)
    decode = decode_hidden(model, ids, mask, lp)
    proofs = build_proofs(decode, ro.completion_mask, cfg)

    def verify(sel: slice) -> list:
        ref = prefill(model, ids[sel], mask[sel], lp, 1.0)
        return check_proofs(ref, ids[sel, lp:], ro.completion_mask[sel], ro.old_logps[sel], proofs[sel], cfg,
                            eos_id=2, pad_id=0)

    verify_batch = median_ms(lambda: verify(slice(None)), repeats)
    verify_one = median_ms(lambda: verify(slice(0, 1)), repeats)
    ref = prefill(model, ids, mask, lp, 1.0)
    real = ro.completion_mask.bool()
    checks = verify(slice(None))
    return {
        "rollout_rows": rows, "proof_bytes_per_completion": statistics.mean(len(p) for p in proofs),
        "train_forward_ms": forward_plain, "train_forward_hidden_states_ms": forward_hidden,
        "prove_from_train_forward_ms": from_outputs, "prove_separate_prefill_ms": separate,
        "verify_batch_ms": verify_batch, "verify_per_proof_batched_ms": verify_batch / rows,
        "verify_single_proof_ms": verify_one,
        "noise_hidden_max_abs": float((decode - ref.hidden).abs()[real].max()),
        "noise_logp_max_abs": float((ro.old_logps - ref.logps).abs()[real].max()),
        "honest_worst_value_error_ratio": max(c.max_value_error for c in checks),
        "honest_worst_overlap": min(c.min_overlap for c in checks),
        "honest_rejects": sum(not c.ok for c in checks),
    }


def bench_hmac(repeats: int, world_size: int = 4, megabytes: int = 64) -> dict[str, float]:
    auth = [UpdateAuthenticator(generate_keyring(world_size), r) for r in range(2)]
    auth[1].keyring.pairs.update(auth[0].keyring.pairs)
    update = torch.randn(megabytes * (1 << 20) // 4)
    tags = auth[0].sign_full(update, 1)
    digest = median_ms(lambda: tensor_digest(update), repeats) / megabytes
    sign = median_ms(lambda: auth[0].sign_full(update, 1), repeats) / megabytes
    verify = median_ms(lambda: auth[1].verify_full(update, 0, 1, tags[1]), repeats) / megabytes
    shards = list(update.chunk(world_size))
    sign_shards = median_ms(lambda: auth[0].sign_shards(shards, 1), repeats) / megabytes
    return {"sha256_ms_per_mb": digest, "sign_full_ms_per_mb": sign, "verify_full_ms_per_mb": verify,
            "sign_shards_ms_per_mb": sign_shards, "hmac_world_size": world_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/integrity.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {**bench_checkpoint(args.repeats), **bench_proof(args.repeats), **bench_hmac(args.repeats)}
    width = max(map(len, results))
    for name, value in results.items():
        print(f"{name:<{width}}  {value:.4g}" if isinstance(value, float) else f"{name:<{width}}  {value}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"results": results, "machine": {
        "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "threads": torch.get_num_threads()}}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
