"""Detection precision and recall on real GSPO gradients: per step and across steps.

n = 8 simulated ranks of the default configuration (statistics from
``detection_calibration.collect``: real per-rank gradients, attacks applied to the last ``f``
rows, coordinate median and trimmed mean with that ``f``), settings prompts_per_rank 2 and 8,
at the initial weights and after ``--train-steps`` Adam steps. For each attack × rule × f the
steps are fed in order to what the trainer runs: :func:`fedgspo.robust.detection.detect` per step
and :class:`~fedgspo.robust.detection.PersistentDeviation` across steps (the reputation tracker's
default), a rank being flagged when either flags it. Reported:

* per step: recall (attacker rows flagged / attacker rows) and precision (attacker rows
  flagged / rows flagged) over all steps, and over the steps after the across-step
  warm-up; false flags per clean step;
* per run: whether the set of ranks flagged in the last step is exactly the attackers.

A second regime, a *tight honest cluster* (what larger batches and real models give, and
what a custom loop calling ``robust_all_reduce`` may see from its first call): n = 8,
honest updates ``mu + N(0, I)`` with a fresh shared ``mu ~ N(0, I)`` every step, d = 20k,
the last f = 2 ranks attacking (``gaussian`` N(0, 10^2), ``scaled`` x10, ``sign_flip``, and
ALIE ``mean - z_max * std`` of the honest rows), coordinate median and trimmed mean. Only the
per-step test is run (every step is a first call). Reported per attack: recall, precision,
the fraction of steps in which exactly the attackers are flagged; and false flags per clean
step over ``--tight-steps`` clean steps per seed and rule.

    python benchmarks/detection.py [--steps 30] [--train-steps 150] [--tight-steps 200]
                                   [--seeds 3] [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, markdown_table, write_json  # noqa: E402
from detection_calibration import ATTACKS, N, OVERT, collect  # noqa: E402

from fedgspo.robust.aggregators import CoordinateMedian, TrimmedMean  # noqa: E402
from fedgspo.robust.attacks import alie_z  # noqa: E402
from fedgspo.robust.detection import (  # noqa: E402
    MIN_SPREAD,
    SPREAD_FACTOR,
    PersistentDeviation,
    RankStatistics,
    detect,
    statistics_from_sums,
)
from fedgspo.robust.reputation import PersistenceConfig  # noqa: E402

RULES = ("median", "trimmed_mean")
TIGHT_ATTACKS = ("gaussian", "scaled", "sign_flip", "alie")
TIGHT_DIM, TIGHT_F = 20_000, 2


def flag_sequence(steps: list[dict], persistence: PersistenceConfig) -> list[set[int]]:
    """Per step, the ranks flagged per step or across steps (as the trainer combines them)."""
    tracker = PersistentDeviation(N, decay=persistence.decay, threshold=persistence.threshold,
                                  warmup=persistence.warmup, cosine_floor=persistence.cosine_floor,
                                  log_floor=persistence.log_floor)
    out = []
    for s in steps:
        per_step = set(detect(RankStatistics(s["distances"], s["cosines"], s["norms"])).flagged)
        out.append(per_step | set(tracker.update(s["cosines"], s["norms"])))
    return out


def score(flags: list[set[int]], bad: set[int]) -> tuple[int, int, int]:
    """(attacker rows flagged, honest rows flagged, attacker rows)."""
    return (sum(len(f & bad) for f in flags), sum(len(f - bad) for f in flags), len(bad) * len(flags))


def evaluate(data: dict, persistence: PersistenceConfig) -> list[dict]:
    rows = []
    warm = persistence.warmup
    for setting, block in data.items():
        recs = block["records"]
        clean = [flag_sequence([r["clean"][rule] for r in recs], persistence) for rule in RULES]
        false_flags = sum(len(f) for seq in clean for f in seq) / sum(len(seq) for seq in clean)
        for kind in ATTACKS:
            for f in (1, 2):
                bad = set(range(N - f, N))
                for rule in RULES:
                    flags = flag_sequence([r[(kind, f)][rule] for r in recs], persistence)
                    tp, fp, total = score(flags, bad)
                    tp_w, fp_w, total_w = score(flags[warm:], bad)
                    rows.append({"setting": setting, "attack": kind, "f": f, "rule": rule,
                                 "recall": tp / total, "precision": tp / (tp + fp) if tp + fp else None,
                                 "recall_after_warmup": tp_w / total_w if total_w else None,
                                 "precision_after_warmup": tp_w / (tp_w + fp_w) if tp_w + fp_w else None,
                                 "identified": flags[-1] == bad, "clean_false_flags_per_step": false_flags})
    return rows


def summarise(rows: list[dict]) -> list[list]:
    """One line per attack: pooled over settings, rules and f."""
    table = []
    for kind in ATTACKS:
        sel = [r for r in rows if r["attack"] == kind]
        def pooled(key: str) -> float | str:
            values = [r[key] for r in sel if r[key] is not None]
            return sum(values) / len(values) if values else "-"
        prec = [r["precision_after_warmup"] for r in sel if r["precision_after_warmup"] is not None]
        table.append([kind, "yes" if kind in OVERT else "no", pooled("recall"), pooled("recall_after_warmup"),
                      min(prec) if prec else "-", f"{sum(r['identified'] for r in sel)}/{len(sel)}"])
    return table


def tight_step(gen: torch.Generator, kind: str | None) -> torch.Tensor:
    """One step of the tight-cluster regime: ``mu + N(0, I)`` rows, the last ``TIGHT_F`` attacked."""
    mu = torch.randn(TIGHT_DIM, generator=gen, dtype=torch.float64)
    x = mu + torch.randn(N, TIGHT_DIM, generator=gen, dtype=torch.float64)
    bad, good = slice(N - TIGHT_F, N), x[: N - TIGHT_F]
    if kind == "gaussian":
        x[bad] = 10.0 * torch.randn(TIGHT_F, TIGHT_DIM, generator=gen, dtype=torch.float64)
    elif kind == "scaled":
        x[bad] *= 10.0
    elif kind == "sign_flip":
        x[bad] *= -1.0
    elif kind == "alie":
        x[bad] = good.mean(0) - alie_z(N, TIGHT_F) * good.std(0, correction=1)
    return x


def tight_flags(x: torch.Tensor, rule: str) -> set[int]:
    """Per-step flags of :func:`detect` against the rule's aggregate of ``x`` (all rows finite)."""
    agg = (CoordinateMedian if rule == "median" else TrimmedMean)(f=TIGHT_F)(x)
    return set(detect(statistics_from_sums(x @ agg, (x * x).sum(1), float(agg @ agg))).flagged)


def tight_cluster(steps: int, seeds: int) -> dict:
    """Recall, precision, steps with exactly the attackers flagged, clean false flags per step."""
    bad = set(range(N - TIGHT_F, N))
    rows, false_flags, clean_steps = [], 0, 0
    for kind in (None, *TIGHT_ATTACKS):
        for rule in RULES:
            tp = fp = exact = total = 0
            for seed in range(seeds):
                gen = torch.Generator().manual_seed(seed)
                for _ in range(steps):
                    flags = tight_flags(tight_step(gen, kind), rule)
                    if kind is None:
                        false_flags, clean_steps = false_flags + len(flags), clean_steps + 1
                        continue
                    tp, fp = tp + len(flags & bad), fp + len(flags - bad)
                    exact, total = exact + (flags == bad), total + 1
            if kind is not None:
                rows.append({"attack": kind, "rule": rule, "recall": tp / (len(bad) * total),
                             "precision": tp / (tp + fp) if tp + fp else None, "exact_steps": exact / total})
    return {"rows": rows, "clean_false_flags_per_step": false_flags / clean_steps, "clean_steps": clean_steps}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30, help="steps per setting")
    p.add_argument("--train-steps", type=int, default=150)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--fresh", action="store_true", help="recompute the cached gradient statistics")
    p.add_argument("--tight-steps", type=int, default=200, help="tight-cluster steps per seed, rule and attack")
    p.add_argument("--seeds", type=int, default=3, help="tight-cluster seeds")
    p.add_argument("--quick", action="store_true", help="12 steps per setting after 5 training steps; 20 tight steps")
    p.add_argument("--out", type=Path, default=RESULTS / "detection.json")
    args = p.parse_args()
    if args.quick:
        args.steps, args.train_steps, args.tight_steps = 12, 5, 20
    torch.set_num_threads(1)
    persistence = PersistenceConfig()
    data = {}
    for ppr in (2, 8):
        for phase, block in collect(ppr, args.steps, args.train_steps, args.lr, args.fresh).items():
            data[f"ppr{ppr}/{phase}"] = block
    rows = evaluate(data, persistence)
    clean = {s: next(r["clean_false_flags_per_step"] for r in rows if r["setting"] == s) for s in data}
    print(f"false flags per clean step: {clean}")
    print(markdown_table(["attack", "overt", "recall (all steps)", f"recall (after {persistence.warmup} steps)",
                          "min precision (after)", "runs identified"], summarise(rows)))
    tight = tight_cluster(args.tight_steps, args.seeds)
    print(f"tight cluster (d = {TIGHT_DIM}, f = {TIGHT_F}, per-step test): false flags per clean step "
          f"{tight['clean_false_flags_per_step']:.3g} over {tight['clean_steps']} steps")
    print(markdown_table(["attack", "rule", "recall", "precision", "steps with exactly the attackers flagged"],
                         [[r["attack"], r["rule"], r["recall"], r["precision"] if r["precision"] is not None else "-",
                           r["exact_steps"]] for r in tight["rows"]]))
    write_json(args.out, {
        "config": {"n": N, "f": [1, 2], "rules": list(RULES), "steps": args.steps, "train_steps": args.train_steps,
                   "persistence": persistence.model_dump(), "spread_factor": SPREAD_FACTOR, "min_spread": MIN_SPREAD,
                   "tight": {"dim": TIGHT_DIM, "f": TIGHT_F, "steps": args.tight_steps, "seeds": args.seeds}},
        "clean_false_flags_per_step": clean, "rows": rows, "tight_cluster": tight})


if __name__ == "__main__":
    main()
