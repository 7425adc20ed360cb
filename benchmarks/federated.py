"""Federated training: per-step sync against local steps (H) and int8, clean and under attack,
and the time to a reward target over a modelled slow link between sites.

Every run is a real training, ``torchrun --standalone --nproc_per_node=4 -m fedgspo.train``,
each rank its own site (four sites), same seed, same number of inner steps. From each run's
``metrics.jsonl``:

* cross-site bytes per inner step: the mean of ``comm_bytes`` (rank 0's messages, by the
  exchange's message sizes: :func:`fedgspo.robust.shard_exchange.sent_bytes`);
* wall time per inner step: the median ``step_time_s`` (localhost gloo: compute dominates);
* reward: the mean ``reward_mean`` of the last ``--window`` inner steps, as a fraction of the
  per-step sync run (clean table) or of the clean run of the same H and compression (attack
  table, where the plain mean is the undefended reference).

Slow link: the measured compute time of each step (step time minus its exchange phases) plus,
per cross-site exchange, ``bytes / bandwidth + rounds x latency`` (``--bandwidth-mbit``,
``--latency-ms``; :data:`EXCHANGE_ROUNDS` message rounds per robust exchange). The time to a
reward target is this modelled time summed up to the first step whose moving mean reward
(``--window`` steps) reaches ``--target`` x the per-step sync run's final reward.

Run::

    python benchmarks/federated.py                 # 320 inner steps, 18 runs (~40 min on 2 cores)
    python benchmarks/federated.py --quick         # 60 steps, the clean runs and one attack

Output: the tables (markdown) on stdout and ``<out>/federated.json`` (machine info, every run's
overrides and figures; rewritten after each run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine_info, markdown_table, write_json  # noqa: E402
from robustness import BENCH_OVERRIDES, NEVER, launch, read_metrics, window_mean  # noqa: E402

from fedgspo.federation.config import FederatedConfig  # noqa: E402

NPROC = 4
#: Message rounds of one robust exchange over a slow link: metadata rows, data, results.
EXCHANGE_ROUNDS = 3
ATTACKS = ("sign_flip", "gaussian", "alie")
RULES = ("median", "trimmed_mean", "mean")


@dataclass(frozen=True)
class Setting:
    """One run: local steps, compression, rule and (optionally) the attack of site 3."""

    local_steps: int
    compression: str = "none"
    error_feedback: bool = False
    rule: str = "trimmed_mean"
    attack: str | None = None
    outer: str = "nesterov"

    @property
    def name(self) -> str:
        sync = "sync" if self.local_steps == 1 else f"H{self.local_steps}"
        codec = "" if self.compression == "none" else f"-{self.compression}{'-ef' if self.error_feedback else ''}"
        outer = "" if self.outer == "nesterov" or self.local_steps == 1 else f"-{self.outer}"
        return f"{sync}{outer}{codec}-{self.rule}-{self.attack or 'clean'}"

    @property
    def clean(self) -> "Setting":
        return Setting(self.local_steps, self.compression, self.error_feedback, self.rule, outer=self.outer)

    def overrides(self, steps: int, seed: int) -> list[str]:
        out = [*BENCH_OVERRIDES, f"train.max_steps={steps}", f"train.seed={seed}", "federated.site_size=1",
               f"federated.local_steps={self.local_steps}", f"federated.compression={self.compression}",
               f"federated.error_feedback={str(self.error_feedback).lower()}", f"aggregation.rule={self.rule}",
               f"federated.outer_optimizer={self.outer}"]
        if self.rule == "mean":  # the undefended reference: no tolerance, nobody quarantined
            out += [f"aggregation.reputation.window={NEVER}", f"aggregation.reputation.quarantine_after={NEVER}"]
        if self.attack:
            out.append(f"attack={{kind: {self.attack}, ranks: [{NPROC - 1}], seed: {seed}}}")
        return out


def settings(quick: bool) -> list[Setting]:
    """Clean runs first (per-step sync; H = 4, 8, 16 with either outer optimizer; H = 8 with
    int8, with and without error feedback), then one bad site of four at H = 8 under each
    attack and rule (the configuration's default outer optimizer)."""
    outer = FederatedConfig().outer_optimizer
    clean = [Setting(1), *[Setting(h, outer=o) for h in (4, 8, 16) for o in ("nesterov", "average")],
             Setting(8, "int8", outer=outer), Setting(8, "int8", True, outer=outer)]
    attacks = ATTACKS[:1] if quick else ATTACKS
    rules = ("median", "mean") if quick else RULES
    attacked = [Setting(8, rule=rule, attack=a, outer=outer) for a in attacks for rule in rules]
    extra_clean = [s.clean for s in attacked if s.clean not in clean]
    return clean + list(dict.fromkeys(extra_clean)) + attacked


def run_figures(records: list[dict[str, Any]], window: int, link: tuple[float, float]) -> dict[str, Any]:
    """Bytes, times, reward and the modelled slow-link time per step of one run."""
    bandwidth, latency = link
    modelled = []
    for r in records:
        compute = r["step_time_s"] - r.get("time_aggregate_s", 0.0) - r.get("time_outer_s", 0.0)
        crossed = r.get("comm_bytes", 0) > 0
        modelled.append(compute + (r.get("comm_bytes", 0) / bandwidth + EXCHANGE_ROUNDS * latency if crossed else 0.0))
    rewards = [r["reward_mean"] for r in records]
    return {
        "cross_bytes_per_step": statistics.fmean(r.get("comm_bytes", 0) for r in records),
        "step_time_s": statistics.median(r["step_time_s"] for r in records),
        "reward": window_mean(rewards, last=True, window=window),
        "rewards": rewards, "modelled_step_s": modelled,
        "flagged_steps": sum(bool(r["flagged"]) for r in records),
        "quarantined": records[-1]["quarantined"] if records else [],
    }


def time_to_target(figures: dict[str, Any], target: float, window: int) -> float | None:
    """Modelled seconds until the moving mean reward first reaches ``target`` (None: never)."""
    rewards, times, elapsed = figures["rewards"], figures["modelled_step_s"], 0.0
    for i, t in enumerate(times):
        elapsed += t
        if i + 1 >= window and statistics.fmean(rewards[i + 1 - window:i + 1]) >= target:
            return elapsed
    return None


def run_key(setting: Setting, seed: int) -> str:
    return f"{setting.name}-s{seed}"


def by_seed(runs: dict[str, dict[str, Any]], setting: Setting, seeds: list[int]) -> dict[int, dict[str, Any]]:
    """The figures of ``setting``'s finished runs, by seed."""
    found = {seed: runs.get(run_key(setting, seed), {}).get("figures") for seed in seeds}
    return {seed: fig for seed, fig in found.items() if fig is not None}


def spread(values: list[float]) -> str:
    """Mean, with the range over seeds when there are several."""
    if not values:
        return "-"
    mean = statistics.fmean(values)
    return f"{mean:.0%}" if len(values) == 1 else f"{mean:.0%} ({min(values):.0%}–{max(values):.0%})"


def clean_table(runs: dict[str, dict[str, Any]], cells: list[Setting], seeds: list[int], target: float,
                window: int) -> str:
    """Clean runs against per-step sync of the same seed, averaged over seeds."""
    base = by_seed(runs, Setting(1), seeds)
    rows = []
    for setting in cells:
        figs = {s: f for s, f in by_seed(runs, setting, seeds).items() if s in base}
        if setting.attack or not figs:
            continue
        goal = {s: target * base[s]["reward"] for s in figs}
        tt = {s: time_to_target(f, goal[s], window) for s, f in figs.items()}
        tt_base = {s: time_to_target(base[s], goal[s], window) for s in figs}
        faster = [tt_base[s] / tt[s] for s in figs if tt[s] and tt_base[s]]
        rows.append([setting.name, f"{statistics.fmean(f['cross_bytes_per_step'] for f in figs.values()) / 1e3:.1f}",
                     f"{statistics.fmean(base[s]['cross_bytes_per_step'] / max(f['cross_bytes_per_step'], 1) for s, f in figs.items()):.1f}x",
                     f"{statistics.fmean(f['step_time_s'] / base[s]['step_time_s'] for s, f in figs.items()):.2f}",
                     f"{statistics.fmean(f['reward'] for f in figs.values()):.3f}",
                     spread([f["reward"] / base[s]["reward"] for s, f in figs.items()]),
                     f"{sum(v is None for v in tt.values())} of {len(tt)}",
                     f"{statistics.fmean(faster):.1f}x" if faster else "-"])
    return markdown_table(["run", "cross-site kB/step", "fewer bytes", "step time vs sync", "reward",
                           "of sync", "target never reached", "slow link: faster to target"], rows)


def attack_table(runs: dict[str, dict[str, Any]], cells: list[Setting], seeds: list[int]) -> str:
    """Runs under attack against the clean run of the same rule, H and seed."""
    rows = []
    for setting in cells:
        figs, clean = by_seed(runs, setting, seeds), by_seed(runs, setting.clean, seeds)
        if not setting.attack or not figs:
            continue
        rows.append([setting.attack, setting.rule, f"H{setting.local_steps}",
                     f"{statistics.fmean(f['reward'] for f in figs.values()):.3f}",
                     spread([f["reward"] / clean[s]["reward"] for s, f in figs.items() if s in clean]),
                     f"{statistics.fmean(f['flagged_steps'] for f in figs.values()):.0f}",
                     sorted({r for f in figs.values() for r in f["quarantined"]})])
    return markdown_table(["attack (site 3 of 4)", "rule", "H", "reward", "of clean", "steps flagged",
                           "quarantined"], rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=320, help="a multiple of 16: every H closes whole rounds")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--only", nargs="+", default=None, help="run only these settings (names)")
    parser.add_argument("--resume", action="store_true", help="keep the finished runs of <out>/federated.json")
    parser.add_argument("--window", type=int, default=50)
    parser.add_argument("--target", type=float, default=0.9, help="fraction of sync's final reward")
    parser.add_argument("--bandwidth-mbit", type=float, default=100.0)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    steps, window = (60, 20) if args.quick else (args.steps, args.window)
    link = (args.bandwidth_mbit * 1e6 / 8, args.latency_ms / 1e3)
    json_path = args.out / "federated.json"
    runs: dict[str, dict[str, Any]] = (json.loads(json_path.read_text())["runs"]
                                       if args.resume and json_path.exists() else {})
    payload: dict[str, Any] = {"machine": machine_info(), "nproc": NPROC, "steps": steps, "window": window,
                               "link": {"bandwidth_mbit": args.bandwidth_mbit, "latency_ms": args.latency_ms},
                               "runs": runs}
    cells = settings(args.quick)
    todo = [c for c in cells if args.only is None or c.name in args.only]
    for seed in args.seeds:
        for setting in todo:
            key = run_key(setting, seed)
            if runs.get(key, {}).get("figures") is not None:
                continue
            run_dir = args.out / "federated_runs" / key
            launched = launch(setting.overrides(steps, seed), run_dir, NPROC, args.timeout)
            records = read_metrics(run_dir)
            ok = launched["returncode"] == 0 and len(records) == steps
            runs[key] = {"setting": {k: getattr(setting, k) for k in Setting.__dataclass_fields__}, "seed": seed,
                         **launched, "figures": run_figures(records, window, link) if ok else None}
            print(f"{key}: {'ok' if ok else 'FAILED ' + str(launched['error'])[:300]}", flush=True)
            write_json(json_path, payload)
    print(f"\nClean runs (4 sites of one rank, trimmed mean), against per-step sync; seeds {args.seeds}:\n")
    print(clean_table(runs, cells, args.seeds, args.target, window))
    print("\nOne bad site of four, H = 8, against the clean run of the same rule, H and seed:\n")
    print(attack_table(runs, cells, args.seeds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
