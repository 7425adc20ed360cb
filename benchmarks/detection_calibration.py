"""Calibrate :func:`fedgspo.robust.detection.detect` on real per-rank GSPO gradients.

One process simulates ``n = 8`` ranks of the default configuration (tiny llama policy,
:class:`~fedgspo.gspo.task.DigitTask`, the default weighted reward, GSPO loss at the first update
of a rollout). For each setting (``prompts_per_rank`` 2 and 8; initial weights and weights
after ``--train-steps`` Adam steps on the mean gradient of the 8 ranks) and each step it

1. computes the 8 honest flat gradients (rollout, rewards, group advantages, loss, backward);
2. for ``f`` in 1, 2 and every attack, replaces the last ``f`` rows by the attacked ones
   (the local attacks of :mod:`fedgspo.robust.attacks` with their default strengths; ALIE as
   ``mean - z * std`` and IPM as ``-0.1 * mean`` of the honest rows), aggregates the finite
   rows with the coordinate median and the trimmed mean (both with that ``f``), and stores
   the per-rank statistics exactly as :mod:`fedgspo.robust.all_reduce` computes them (float64 sums);
3. evaluates candidate detection rules (among them the adaptive floors' ``spread_factor``:
   how low it can go before honest ranks of these heterogeneous clusters get flagged) on the
   cached statistics: false flags per clean step,
   and per attack recall (attacker rows flagged) and precision (flagged rows that attack),
   plus how often more than ``f`` ranks get flagged (a consensus failure in robust.py).

``reward_flip`` is not simulated separately: at the first update of a rollout (ratio 1) the
flipped rewards give exactly the negated advantages, i.e. the ``sign_flip`` gradient.

Statistics are cached under ``/tmp/fedgspo_detcal`` (``--fresh`` recomputes), so iterating
on the rule is instant. Output: a table on stdout and ``results/detection_calibration.json``.

    python benchmarks/detection_calibration.py [--steps 25] [--train-steps 100] [--fresh] [--quick]
"""

from __future__ import annotations

import argparse
import math
import pickle
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_json  # noqa: E402

from fedgspo.robust.aggregators import CoordinateMedian, TrimmedMean  # noqa: E402
from fedgspo.robust.attacks import _LOCAL, AttackConfig, alie_z, strength_of  # noqa: E402
from fedgspo.config import Config  # noqa: E402
from fedgspo.robust.detection import (  # noqa: E402
    DEFAULT_THRESHOLD,
    Detection,
    RankStatistics,
    _log,
    detect,
    robust_z,
    statistics_from_sums,
)
from fedgspo.gspo.loss import group_advantages, gspo_loss  # noqa: E402
from fedgspo.gspo.model import build_model  # noqa: E402
from fedgspo.gspo.rewards import WeightedReward  # noqa: E402
from fedgspo.gspo.rollout import completion_logps, generate  # noqa: E402
from fedgspo.gspo.task import DigitTask  # noqa: E402

N = 8
CACHE = Path("/tmp/fedgspo_detcal")
LOCAL_ATTACKS = ("sign_flip", "scaled", "gaussian", "zero", "nan", "bit_flip")
ATTACKS = (*LOCAL_ATTACKS, "alie", "ipm")
OVERT = ("sign_flip", "scaled", "gaussian", "nan", "bit_flip")


class Simulator:
    """The default policy, task and reward; per-rank gradients at the current weights."""

    def __init__(self, prompts_per_rank: int, seed: int = 0) -> None:
        cfg = Config()
        cfg.task.prompts_per_rank = prompts_per_rank
        self.cfg = cfg
        self.task = DigitTask(cfg.task, seed=seed)
        tok = self.task.tokenizer
        self.model = build_model(cfg.model, tok.vocab_size, pad_id=tok.pad_id, bos_id=tok.bos_id,
                                 eos_id=tok.eos_id, seed=seed)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.reward = WeightedReward.from_names([(r.name, r.weight) for r in cfg.task.reward_funcs])

    def gradient(self, rank: int, step: int) -> torch.Tensor:
        g, tok = self.cfg.gspo, self.task.tokenizer
        prompts = self.task.sample(rank, step)
        gen = torch.Generator().manual_seed(9973 * step + rank)
        roll = generate(self.model, prompts.input_ids, prompts.attention_mask, num_generations=g.num_generations,
                        max_new_tokens=g.max_completion_length, temperature=g.temperature, eos_id=tok.eos_id,
                        pad_id=tok.pad_id, generator=gen)
        completions = [tok.decode(row) for row in roll.completion_ids.tolist()]
        rep = g.num_generations
        rewards, _ = self.reward([p for p in prompts.prompts for _ in range(rep)], completions,
                                 answer=[a for a in prompts.answers for _ in range(rep)])
        adv = group_advantages(torch.tensor(rewards), rep, scale=g.scale_rewards)
        self.model.zero_grad(set_to_none=False)
        logps, _ = completion_logps(self.model, roll, g.temperature)
        loss = gspo_loss(logps, roll.old_logps, adv, roll.completion_mask, epsilon=g.epsilon,
                         epsilon_high=g.epsilon_high, level=g.importance_sampling_level)
        loss.backward()
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in self.params])

    def honest(self, step: int) -> torch.Tensor:
        return torch.stack([self.gradient(r, step) for r in range(N)])

    def train(self, steps: int, lr: float) -> float:
        """Adam on the mean of the 8 ranks' gradients (clipped at 1, as train.py); mean reward."""
        opt = torch.optim.Adam(self.params, lr=lr, betas=(0.9, 0.99))
        for step in range(steps):
            mean = self.honest(10_000 + step).mean(0)
            mean.mul_(min(1.0, 1.0 / (float(mean.norm()) + 1e-6)))
            offset = 0
            for p in self.params:
                p.grad = mean[offset:offset + p.numel()].view_as(p).clone()
                offset += p.numel()
            opt.step()
        return self.mean_reward()

    @torch.no_grad()
    def mean_reward(self, steps: int = 4) -> float:
        g, tok, total, count = self.cfg.gspo, self.task.tokenizer, 0.0, 0
        for step in range(steps):
            prompts = self.task.sample(0, 50_000 + step)
            roll = generate(self.model, prompts.input_ids, prompts.attention_mask, num_generations=g.num_generations,
                            max_new_tokens=g.max_completion_length, temperature=g.temperature,
                            eos_id=tok.eos_id, pad_id=tok.pad_id, generator=torch.Generator().manual_seed(step))
            comps = [tok.decode(row) for row in roll.completion_ids.tolist()]
            rewards, _ = self.reward([p for p in prompts.prompts for _ in range(g.num_generations)], comps,
                                     answer=[a for a in prompts.answers for _ in range(g.num_generations)])
            total, count = total + sum(rewards), count + len(rewards)
        return total / count


def attacked(honest: torch.Tensor, kind: str, f: int, step: int) -> torch.Tensor:
    x = honest.clone()
    good = honest[: N - f]
    if kind == "alie":
        x[N - f:] = good.mean(0) - alie_z(N, f) * good.std(0, correction=1)
    elif kind == "ipm":
        x[N - f:] = -0.1 * good.mean(0)
    else:
        s = strength_of(AttackConfig(kind=kind, ranks=list(range(N - f, N))), N)
        for r in range(N - f, N):
            _LOCAL[kind](x[r], s, torch.Generator().manual_seed(1_000_003 * step + r))
    return x


def stats_of(x: torch.Tensor, rule: str, f: int) -> dict:
    """Per-rank statistics as robust.py computes them: nonfinite rows are not aggregated."""
    x64 = x.double()
    sq = torch.stack([torch.linalg.vector_norm(row).double().square() for row in x])
    finite = torch.isfinite(sq)
    agg = (CoordinateMedian(f=f) if rule == "median" else TrimmedMean(f=f))(x[finite]).double()
    dots = torch.where(finite, torch.nan_to_num(x64) @ agg, torch.full_like(sq, math.nan))
    s = statistics_from_sums(dots, sq, float(agg @ agg))
    return {"distances": s.distances, "cosines": s.cosines, "norms": s.norms}


def collect(ppr: int, steps: int, train_steps: int, lr: float, fresh: bool) -> dict:
    path = CACHE / f"ppr{ppr}_s{steps}_t{train_steps}.pkl"
    if path.exists() and not fresh:
        return pickle.loads(path.read_bytes())
    CACHE.mkdir(parents=True, exist_ok=True)
    sim = Simulator(ppr)
    out = {}
    for phase in ("init", "trained"):
        t0 = time.perf_counter()
        reward = sim.mean_reward() if phase == "init" else sim.train(train_steps, lr)
        records = []
        for step in range(steps):
            h = sim.honest(step)
            rec = {"clean": {rule: stats_of(h, rule, 1) for rule in ("median", "trimmed_mean")}}
            for f in (1, 2):
                for kind in ATTACKS:
                    x = attacked(h, kind, f, step)
                    rec[(kind, f)] = {rule: stats_of(x, rule, f) for rule in ("median", "trimmed_mean")}
            records.append(rec)
        out[phase] = {"records": records, "mean_reward": reward, "seconds": time.perf_counter() - t0,
                      "dim": int(h.shape[1])}
        print(f"ppr={ppr} {phase}: mean reward {reward:.3f}, {time.perf_counter() - t0:.0f}s", flush=True)
    path.write_bytes(pickle.dumps(out))
    return out


def detect_legacy(stats: RankStatistics, threshold: float = 3.5, log_floor: float = 0.1,
                  cosine_floor: float = 0.05) -> Detection:
    """The previous rule, for comparison: two-sided norm z, distance z, cosine z (MAD floors 0.1/0.05)."""
    z_d = robust_z(_log(stats.distances), floor=log_floor)
    z_n = robust_z(_log(stats.norms), floor=log_floor)
    z_c = robust_z(stats.cosines, floor=cosine_floor)
    flagged = [i for i in range(len(z_d)) if not all(math.isfinite(v) for v in (z_d[i], z_n[i], z_c[i]))
               or z_d[i] > threshold or abs(z_n[i]) > threshold or z_c[i] < -threshold]
    return Detection(z_d, z_c, z_n, flagged)


def flags(stats: dict, rule: dict) -> list[int]:
    s = RankStatistics(stats["distances"], stats["cosines"], stats["norms"])
    if rule["name"] == "legacy":
        return detect_legacy(s).flagged
    return detect(s, **{k: v for k, v in rule.items() if k != "name"}).flagged


def evaluate(data: dict, rule: dict) -> dict:
    """Clean false flags and per-attack recall/precision/consensus failures of one rule."""
    res: dict = {}
    for phase, block in data.items():
        recs = block["records"]
        clean = [flags(r["clean"][agg], rule) for r in recs for agg in ("median", "trimmed_mean")]
        cell = {"false_flags_per_step": sum(map(len, clean)) / len(clean),
                "steps_with_false_flag": sum(bool(c) for c in clean) / len(clean)}
        for kind in ATTACKS:
            tp = fp = total = over = cases = 0
            for f in (1, 2):
                bad = set(range(N - f, N))
                for r in recs:
                    for agg in ("median", "trimmed_mean"):
                        fl = set(flags(r[(kind, f)][agg], rule))
                        tp, fp, total = tp + len(fl & bad), fp + len(fl - bad), total + f
                        over, cases = over + (len(fl) > f), cases + 1
            cell[kind] = {"recall": tp / total, "precision": tp / (tp + fp) if tp + fp else None,
                          "consensus_fail": over / cases}
        res[phase] = cell
    return res


def honest_summary(data: dict) -> dict:
    out = {}
    for phase, block in data.items():
        cos, ratio = [], []
        for r in block["records"]:
            s = r["clean"]["median"]
            cos += s["cosines"]
            med = sorted(s["norms"])[N // 2]
            ratio += [v / med for v in s["norms"] if med > 0]
        cos.sort(), ratio.sort()
        q = lambda v, p: v[min(len(v) - 1, int(p * len(v)))]  # noqa: E731
        out[phase] = {"cos_min": cos[0], "cos_p01": q(cos, 0.01), "cos_p05": q(cos, 0.05), "cos_median": q(cos, 0.5),
                      "norm_ratio_max": ratio[-1], "norm_ratio_p99": q(ratio, 0.99), "norm_ratio_min": ratio[0],
                      "mean_reward": block["mean_reward"], "dim": block["dim"]}
    return out


RULES = [
    {"name": "legacy"},  # the previous rule: two-sided norm z, log floor 0.1, cosine floor 0.05
    {"name": "default"},  # fedgspo.robust.detection defaults (adaptive floors)
    {"name": "constant floors", "spread_factor": None},  # the caps alone, no adaptation
    {"name": "spread_factor 4", "spread_factor": 4.0},
    {"name": "spread_factor 2", "spread_factor": 2.0},
    {"name": "log_floor 0.5", "log_floor": 0.5},
    {"name": "log_floor 0.3", "log_floor": 0.3},
    {"name": "cos_bound -0.5", "cosine_bound": -0.5},
    {"name": "cos_bound 0", "cosine_bound": 0.0},
    {"name": "cos_floor 0.1", "cosine_floor": 0.1},
    {"name": "no distance", "use_distance": False},
    {"name": "threshold 3.0", "threshold": 3.0},
]


def _fmt(v: float | None) -> str:
    return "  - " if v is None else f"{v:.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=25, help="clean steps per setting")
    p.add_argument("--train-steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--fresh", action="store_true")
    p.add_argument("--quick", action="store_true", help="3 clean steps per setting after 5 training steps")
    p.add_argument("--out", type=Path, default=RESULTS / "detection_calibration.json")
    args = p.parse_args()
    if args.quick:
        args.steps, args.train_steps = 3, 5
    torch.set_num_threads(1)
    data = {ppr: collect(ppr, args.steps, args.train_steps, args.lr, args.fresh) for ppr in (2, 8)}
    results = {"rules": [], "honest": {f"ppr{ppr}": honest_summary(d) for ppr, d in data.items()}}
    print(f"honest statistics: {results['honest']}")
    head = f"{'rule':16s} {'setting':14s} {'FF/step':>7s} " + " ".join(f"{k[:9]:>14s}" for k in ATTACKS)
    print(head + "\n" + " " * 39 + "   (recall/precision per attack; '-': nothing flagged)")
    for rule in RULES:
        row = {"rule": rule, "settings": {}}
        for ppr, d in data.items():
            ev = evaluate(d, rule)
            for phase, cell in ev.items():
                row["settings"][f"ppr{ppr}/{phase}"] = cell
                cols = " ".join(f"{cell[k]['recall']:.2f}/{_fmt(cell[k]['precision'])}".rjust(14) for k in ATTACKS)
                print(f"{rule['name']:16s} {f'ppr{ppr}/{phase}':14s} {cell['false_flags_per_step']:7.3f} {cols}")
        results["rules"].append(row)
    results["config"] = {"n": N, "f": [1, 2], "steps": args.steps, "train_steps": args.train_steps, "lr": args.lr,
                         "aggregators": ["median", "trimmed_mean"], "default_threshold": DEFAULT_THRESHOLD,
                         "overt": list(OVERT)}
    write_json(args.out, results)


if __name__ == "__main__":
    main()
