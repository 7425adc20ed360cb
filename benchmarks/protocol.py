"""Protocol-level attacks against each mode of the robust all-reduce: what each mode catches.

One liar among 4 gloo ranks lies *inside* the exchange (``attack.kind`` ``lie_aggregate``,
``lie_vote``, ``lie_stats`` framing rank 3, ``bad_metadata``) for ``--calls`` calls of
``robust_all_reduce`` with the trimmed mean on random updates. For every (attack, mode) the
table reports, over the calls:

* ``correct``: calls whose result equals the rule applied locally to all updates (the liar's
  own update is honest) on every rank, bit for bit across ranks;
* ``liar flagged`` / ``honest flagged``: calls where the liar / any honest rank was flagged;
* ``raised``: calls that raised the same ``ValueError`` on every rank (bad metadata).

    python benchmarks/protocol.py [--calls 20] [--quick]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from common import RESULTS, markdown_table, write_json  # noqa: E402
from dist_helpers import run_ranks, values  # noqa: E402

WORLD, LIAR, TARGET, D = 4, 1, 3, 4099
ATTACKS = ("lie_aggregate", "lie_vote", "lie_stats", "bad_metadata")
MODES = ("sharded", "replicated", "audited")


def _calls(rank: int, world_size: int, calls: int) -> dict[str, list[tuple[bool, bool, bool, bool, bytes]]]:
    """Per (attack, mode): for each call (correct here, liar flagged, honest flagged, raised,
    result bytes for the cross-rank comparison)."""
    from fedgspo import robust_all_reduce
    from fedgspo.robust.aggregators import build_aggregator
    from fedgspo.robust.aggregators import ShardContext
    from fedgspo.robust.attacks import AttackConfig, protocol_tamper

    out: dict[str, list] = {}
    for attack in ATTACKS:
        cfg = AttackConfig(kind=attack, ranks=[LIAR], **({"target": TARGET} if attack == "lie_stats" else {}))
        for mode in MODES:
            rows = []
            for call in range(calls):
                g = torch.Generator().manual_seed(call)
                stack = 0.5 * torch.randn(D, generator=g) + torch.randn(world_size, D, generator=g)
                expected = build_aggregator("trimmed_mean", 1).aggregate(stack, ShardContext(round=0))
                tensor = stack[rank].clone()
                try:
                    report = robust_all_reduce(tensor, "trimmed_mean", 1, mode=mode,
                                               tamper=protocol_tamper(cfg, rank, call))
                except ValueError:
                    rows.append((False, False, False, True, b""))
                    continue
                flagged = set(report.flagged)
                rows.append((torch.allclose(tensor, expected, rtol=1e-5, atol=1e-6), LIAR in flagged,
                             bool(flagged - {LIAR}), False, tensor.numpy().tobytes()))
            out[f"{attack}/{mode}"] = rows
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="3 calls per cell")
    parser.add_argument("--out", type=Path, default=RESULTS / "protocol.json")
    args = parser.parse_args(argv)
    calls = 3 if args.quick else args.calls
    per_rank = values(run_ranks(_calls, WORLD, calls, timeout=1800))
    rows, cells = [], {}
    for key in per_rank[0]:
        attack, mode = key.split("/")
        results = [r[key] for r in per_rank]
        agree = [len({results[k][c][4] for k in range(WORLD)}) == 1 for c in range(calls)]
        cell = {"correct": sum(all(results[k][c][0] for k in range(WORLD)) and agree[c] for c in range(calls)),
                "liar_flagged": sum(results[0][c][1] for c in range(calls)),
                "honest_flagged": sum(results[0][c][2] for c in range(calls)),
                "raised": sum(all(results[k][c][3] for k in range(WORLD)) for c in range(calls))}
        cells[key] = cell
        rows.append([attack, mode, *(f"{cell[k]}/{calls}" for k in ("correct", "liar_flagged", "honest_flagged",
                                                                      "raised"))])
    print(f"## protocol: one liar (rank {LIAR}) of {WORLD} gloo ranks, trimmed mean, d = {D}, {calls} calls per cell")
    print(markdown_table(["attack", "mode", "correct", "liar flagged", "honest flagged", "raised"], rows))
    write_json(args.out, {"world": WORLD, "liar": LIAR, "target": TARGET, "d": D, "calls": calls, "cells": cells})


if __name__ == "__main__":
    main()
