"""Wall time of robust_all_reduce per rule and mode against dist.all_reduce of the same tensor.

Run (CPU, gloo)::

    torchrun --standalone --nproc_per_node=4 benchmarks/aggregation.py --sizes 1000000 10000000

Every op runs ``--warmup`` untimed rounds (which also compile the kernels), then ``--reps``
rounds in which all ops run back to back, each barrier-fenced (``time.perf_counter``). The
table shows the median time per op and the median over rounds of its ratio to
``dist.all_reduce`` of the same tensor and to the communication floor. The communication floor
(``comm_floor``) is what the sharded exchange costs with no local work: ``all_to_all_single``
of the update, then every rank's shard and statistics sent point to point to every rank
(:func:`fedgspo.robust.shard_exchange.publish`). ``a2a+all_gather`` is the same bytes with
gloo's ring ``all_gather_single`` as the second step (the previous floor). Rank 0 prints a
table and writes JSON (machine, versions, times, ratios) to
``benchmarks/results/aggregation.json``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from fedgspo.robust.all_reduce import robust_all_reduce
from fedgspo.robust.shard_exchange import all_gather_single, publish, stats_width

# (label, rule, f, mode, options); f is reduced to what the world size allows.
CASES: list[tuple[str, str, int, str, dict[str, float | int]]] = [
    ("trimmed_mean", "trimmed_mean", 1, "sharded", {}),
    ("median", "median", 1, "sharded", {}),
    ("mean", "mean", 1, "sharded", {}),
    ("krum", "krum", 1, "sharded", {}),
    ("multi_krum", "multi_krum", 1, "sharded", {}),
    ("geometric_median", "geometric_median", 1, "sharded", {}),
    ("centered_clipping", "centered_clipping", 1, "sharded", {"tau": 10.0, "iterations": 3}),
    ("trimmed_mean/replicated", "trimmed_mean", 1, "replicated", {}),
    ("trimmed_mean/audited", "trimmed_mean", 1, "audited", {}),
]


def timed_round_robin(
    ops: dict[str, Callable[[], None]], reset: Callable[[], None], reps: int, warmup: int
) -> dict[str, list[float]]:
    """Seconds of every op per round; each round runs all ops back to back (barrier-fenced).

    Interleaving keeps each op's samples and the all-reduce's taken under the same load, so
    per-round ratios stay meaningful on a shared machine.
    """
    samples: dict[str, list[float]] = {name: [] for name in ops}
    for i in range(warmup + reps):
        for name, fn in ops.items():
            reset()
            dist.barrier()
            start = time.perf_counter()
            fn()
            dist.barrier()
            if i >= warmup:
                samples[name].append(time.perf_counter() - start)
    return samples


def tolerable_f(rule: str, f: int, n: int) -> int:
    bound = {"krum": lambda k: n > 2 * k + 2, "multi_krum": lambda k: n > 2 * k + 2}.get(rule, lambda k: 2 * k < n)
    while f > 0 and not bound(f):
        f -= 1
    return f


def bench_size(d: int, reps: int, warmup: int) -> dict[str, dict[str, float]]:
    """Median ms per op and the medians of its per-round ratios to all_reduce and the comm floor."""
    n, rank = dist.get_world_size(), dist.get_rank()
    x = torch.randn(d, generator=torch.Generator().manual_seed(rank))
    t = torch.empty_like(x)

    def reset() -> None:
        t.copy_(x)

    s = -(-d // n)
    send, recv = torch.randn(n * s), torch.empty(n * s)
    shard, out = torch.randn(s), torch.empty(n * s)
    stats = torch.randn(stats_width(n), dtype=torch.float64)

    def floor() -> None:
        dist.all_to_all_single(recv, send)
        publish(shard, stats, None, n, into=out.view(n, s))

    def ring_floor() -> None:
        dist.all_to_all_single(recv, send)
        all_gather_single(out, shard)

    ops: dict[str, Callable[[], None]] = {
        "all_reduce": lambda: dist.all_reduce(t), "comm_floor": floor, "a2a+all_gather": ring_floor,
    }
    for label, rule, f, mode, options in CASES:
        k = tolerable_f(rule, f, n)
        ops[label] = functools.partial(robust_all_reduce, t, rule, k, mode=mode, **options)
    samples = timed_round_robin(ops, reset, reps, warmup)
    def ratio(a: list[float], b: list[float]) -> float:
        return statistics.median([x / y for x, y in zip(a, b)])

    return {
        name: {
            "ms": 1e3 * statistics.median(v),
            "vs_all_reduce": ratio(v, samples["all_reduce"]),
            "vs_comm_floor": ratio(v, samples["comm_floor"]),
        }
        for name, v in samples.items()
    }


def machine() -> dict[str, object]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "world_size": dist.get_world_size(),
        "backend": dist.get_backend(),
        "threads_per_rank": torch.get_num_threads(),
        "load_average_1_5_15min": os.getloadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "aggregation.json")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    results = {str(d): bench_size(d, args.reps, args.warmup) for d in args.sizes}
    if dist.get_rank() == 0:
        print(f"{'d':>10} {'operation':<26} {'ms':>9} {'x all_reduce':>13} {'x comm floor':>13}")
        for d, rows in results.items():
            for name, row in rows.items():
                print(f"{d:>10} {name:<26} {row['ms']:9.1f} {row['vs_all_reduce']:13.2f} {row['vs_comm_floor']:13.2f}")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"machine": machine(), "reps": args.reps, "warmup": args.warmup, "results": results}
        args.out.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.out}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
