"""Robustness of real training runs under simulated Byzantine ranks: detection and final reward.

Every cell of the matrix (attack x rule x f, plus one clean run per rule) is one real run,
launched sequentially as ``torchrun --standalone --nproc_per_node=N -m fedgspo.train ...``.
Each run's ``metrics.jsonl`` yields both figures, so one set of runs fills two tables:

* ``detection``: precision and recall of the per-step ``flagged`` ranks. With attackers ``A``
  active from the attack's ``start_step``: precision = flags on attackers / all flags, recall =
  flags on attackers from ``start_step`` on / (|A| x those steps). Clean runs report their false
  flags per step; every run its honest ranks ever quarantined (false quarantines) and the step
  from which every attacker was quarantined.
* ``robust_training``: final reward (mean ``reward_mean`` of the last ``--window`` steps) per
  attack and rule, as a fraction of the clean run of the same rule (same seed when run as one
  matrix; seeds averaged cell by cell with ``--from-json``).

Rules: any ``aggregation.rule`` name (with ``f`` = the number of attackers), :data:`PLAIN_MEAN`
(the undefended mean) and :data:`DEFAULTS` (the configuration's aggregation section as it is).

Run (default matrix: 4 ranks, 300 steps, 28 runs of ~1 min on 2 CPU cores)::

    python benchmarks/robustness.py
    python benchmarks/robustness.py --quick                     # smoke check, ~3 min
    python benchmarks/robustness.py --attacks sign_flip alie --rules median --f 1 2 --nproc 8
    python benchmarks/robustness.py --from-json benchmarks/results/robustness.json   # tables again
    python benchmarks/robustness.py --from-json seed0/robustness.json seed1/robustness.json  # seeds averaged

Output: both tables (markdown) on stdout, ``<out>/robustness.json`` (machine info, the
resolved config and per-run figures of every run; rewritten after each run, so an
interrupted benchmark keeps what it measured; ``--resume`` goes on from it) and ``<out>/robust_training.png`` (reward
curves under attack; needs matplotlib). Run directories go to ``<out>/runs/<cell>``; an
existing one is replaced; its stderr is kept beside it in ``<cell>.stderr.txt``. A run that
fails (non-zero exit, timeout, missing metrics) is tried again ``--retries`` times, then
recorded with its exit code and first traceback, and the benchmark goes on. Runs are deterministic:
``train.seed`` and the attack seed are fixed.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, markdown_table, write_json  # noqa: E402

#: Attacks that play against the defences (fedgspo/robust/attacks.py).
ADAPTIVE = ("stealth", "alternating", "sleeper", "collusion")
ALL_ATTACKS = ("sign_flip", "scaled", "gaussian", "zero", "nan", "bit_flip", "alie", "ipm", "reward_flip", *ADAPTIVE)
#: Liars inside the exchange (fedgspo.robust.attacks.PROTOCOL), selectable with --attacks; not in
#: the default matrix (``bad_metadata`` stops every run at its first step, on purpose: SECURITY.md).
PROTOCOL_ATTACKS = ("lie_aggregate", "lie_stats", "lie_vote", "bad_metadata")
#: Attacks that change the update visibly (the detection target is >= 0.98 on these).
OVERT = ("sign_flip", "scaled", "gaussian", "nan", "bit_flip")
#: ``plain_mean``: ``mean`` with the defences the trainer lets one switch off switched off:
#: f = n - 1 (flags never fail consensus) and no quarantine. Nonfinite updates are still left
#: out (fedgspo.robust.all_reduce always does). ``mean`` itself keeps both defences.
PLAIN_MEAN = "plain_mean"
#: ``default``: the configuration's own aggregation section, untouched (rule, f, pre-steps,
#: reputation), so the matrix measures what a user gets without choosing anything.
DEFAULTS = "default"
DEFAULT_RULES = (PLAIN_MEAN, DEFAULTS)
NEVER = 10**9
#: Extra cells of the default matrix: larger f for these attacks and rules.
EXTRA_F, EXTRA_ATTACKS, EXTRA_RULES = (2, 3), ("sign_flip", "alie", "collusion"), (DEFAULTS, "median")
#: Less work per rank than configs/default.yaml (2 prompts x 8 completions), so that 8 ranks
#: fit on 2 cores; no bookkeeping or TensorBoard (off the measured path).
BENCH_OVERRIDES = (
    "run.progress_bar=false", "run.tensorboard=false", "run.log_every=1000000", "bookkeeping.enabled=false",
    "task.prompts_per_rank=2", "gspo.num_generations=8",
)


@dataclass(frozen=True)
class Cell:
    """One run of the matrix; ``attack`` None is the clean run. Attackers are the last ``f`` ranks
    (the rule tolerates ``f``, except ``plain_mean``: see :data:`PLAIN_MEAN`)."""

    attack: str | None
    rule: str
    f: int

    @property
    def name(self) -> str:
        return f"{self.attack or 'clean'}-{self.rule}-f{self.f}"

    def attackers(self, nproc: int) -> list[int]:
        return [] if self.attack is None else list(range(nproc - self.f, nproc))

    def rule_overrides(self, nproc: int) -> list[str]:
        if self.rule == DEFAULTS:
            return []
        if self.rule == PLAIN_MEAN:
            return ["aggregation.rule=mean", f"aggregation.f={nproc - 1}",
                    f"aggregation.reputation.window={NEVER}", f"aggregation.reputation.quarantine_after={NEVER}"]
        return [f"aggregation.rule={self.rule}", f"aggregation.f={self.f}"]

    def overrides(self, nproc: int, steps: int, seed: int, extra: Iterable[str] = (),
                  strength: float | None = None) -> list[str]:
        """The run's ``key=value`` overrides on top of :data:`BENCH_OVERRIDES` and ``extra``
        (``--set``: the same for every run); ``strength`` (None: the kind's default) is the
        attack parameter of an attacked run."""
        out = [*BENCH_OVERRIDES, *extra, f"train.max_steps={steps}", f"train.seed={seed}",
               *self.rule_overrides(nproc)]
        if self.attack is not None:
            param = "" if strength is None else f", strength: {strength}"
            out.append(f"attack={{kind: {self.attack}, ranks: {self.attackers(nproc)}, seed: {seed}{param}}}")
        return out


def build_matrix(attacks: Iterable[str], rules: Iterable[str], fs: Iterable[int], extra: bool,
                 nproc: int = 8) -> list[Cell]:
    """Clean runs (one per rule, at the smallest f) first, then attack x rule x f; with
    ``extra`` also :data:`EXTRA_F` for those of :data:`EXTRA_ATTACKS` and :data:`EXTRA_RULES`
    in ``attacks`` and ``rules``, where ``2 f < nproc`` (a minority of attackers)."""
    attacks, rules, fs = list(attacks), list(rules), sorted(set(fs))
    cells = [Cell(None, rule, fs[0]) for rule in rules]
    cells += [Cell(a, rule, f) for f in fs for a in attacks for rule in rules]
    if extra:
        cells += [Cell(a, rule, f) for f in EXTRA_F for a in EXTRA_ATTACKS for rule in EXTRA_RULES
                  if a in attacks and rule in rules and 2 * f < nproc]
    return list(dict.fromkeys(cells))


def error_excerpt(stderr: str, limit: int = 3000) -> str:
    """The first Python traceback in ``stderr`` (torchrun's own summary names no cause), else its tail."""
    start = stderr.find("Traceback (most recent call last)")
    return stderr[start : start + limit] if start >= 0 else stderr[-limit:]


def launch(overrides: list[str], run_dir: Path, nproc: int, timeout: float) -> dict[str, Any]:
    """Run one training with torchrun and ``overrides`` (replacing ``run_dir``; stderr kept in
    ``<run_dir>.stderr.txt``);
    returns command, exit code (None on timeout), wall time and, on failure, the error.
    Never raises for a failed or timed-out run."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "fedgspo.train", f"run.dir={run_dir}", *overrides]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        rc, err = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, err = None, f"timed out after {timeout:.0f} s\n{exc.stderr or ''}"
    run_dir.with_name(run_dir.name + ".stderr.txt").write_text(str(err))
    return {"command": cmd, "returncode": rc, "wall_s": time.perf_counter() - t0,
            "error": None if rc == 0 else error_excerpt(str(err))}


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The per-step records of a run; an empty list when the file is missing."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def window_mean(values: list[float], last: bool, window: int | None = None) -> float:
    """Mean of the first (or ``last``) ``window`` values of a non-empty ``values`` (None: 10 %
    of them; at least one, at most all)."""
    k = max(1, math.ceil(0.1 * len(values))) if window is None else min(max(1, window), len(values))
    part = values[-k:] if last else values[:k]
    return sum(part) / k


def detection_figures(records: list[dict[str, Any]], attackers: list[int], start_step: int = 0) -> dict[str, Any]:
    """Precision / recall of the ``flagged`` lists against ``attackers`` (active from ``start_step``).

    Precision is None for a clean run or when nothing was flagged, recall (flags on attackers
    from ``start_step`` on / attackers x those steps) None for a clean run.
    ``honest_quarantined``: honest ranks quarantined at any step (the false quarantines);
    ``attackers_quarantined_at``: first step after which every attacker was quarantined
    (None: never, or a clean run).
    """
    bad = set(attackers)
    true_flags = sum(len(bad & set(r["flagged"])) for r in records)
    false_flags = sum(len(set(r["flagged"]) - bad) for r in records)
    flags = true_flags + false_flags
    active = [r for r in records if r["step"] >= start_step]
    caught = sum(len(bad & set(r["flagged"])) for r in active)
    held = [r["step"] for r in active if bad and bad <= set(r["quarantined"])]
    return {
        "true_flags": true_flags,
        "false_flags": false_flags,
        "precision": true_flags / flags if flags and bad else None,
        "recall": caught / (len(bad) * len(active)) if bad and active else None,
        "active_steps": len(active),
        "false_flags_per_step": false_flags / len(records) if records else None,
        "consensus_failed_steps": sum(bool(r.get("consensus_failed")) for r in records),
        "quarantined_at_end": records[-1]["quarantined"] if records else [],
        "honest_quarantined": sorted({q for r in records for q in r["quarantined"]} - bad),
        "attackers_quarantined_at": held[0] if held else None,
    }


def run_figures(records: list[dict[str, Any]], attackers: list[int], start_step: int = 0,
                window: int | None = None) -> dict[str, Any]:
    """Reward and detection figures of one completed run (``records`` must not be empty);
    rewards averaged over the first and last ``window`` steps (None: 10 %)."""
    rewards = [r["reward_mean"] for r in records]
    return {
        "steps": len(records),
        "reward_initial": window_mean(rewards, last=False, window=window),
        "reward_final": window_mean(rewards, last=True, window=window),
        "reward_curve": rewards,
        "step_time_s": sum(r["step_time_s"] for r in records) / len(records),
        **detection_figures(records, attackers, start_step),
    }


def run_cell(cell: Cell, runs_dir: Path, nproc: int, steps: int, seed: int, timeout: float,
             retries: int, window: int | None = None, extra: Iterable[str] = (),
             strength: float | None = None) -> dict[str, Any]:
    """Launch one cell (again, up to ``retries`` times, while it fails) and collect its figures
    (rewards over ``window`` steps; recall from the attack's resolved ``start_step`` on).
    ``status`` is ``ok`` or ``failed``; ``failed_attempts`` keeps the errors of failed tries."""
    run_dir, failures = runs_dir / cell.name, []
    for _ in range(retries + 1):
        launched = launch(cell.overrides(nproc, steps, seed, extra, strength), run_dir, nproc, timeout)
        records = read_metrics(run_dir)
        ok = launched["returncode"] == 0 and len(records) == steps
        if ok:
            break
        failures.append({"returncode": launched["returncode"], "error": launched["error"]})
    config_path = run_dir / "config.yaml"
    config = yaml.safe_load(config_path.read_text()) if config_path.exists() else None
    start = ((config or {}).get("attack") or {}).get("start_step", 0)
    return {
        **asdict(cell), "name": cell.name, "attackers": cell.attackers(nproc),
        "status": "ok" if ok else "failed", **launched, "failed_attempts": failures, "config": config,
        "figures": run_figures(records, cell.attackers(nproc), start, window) if ok else None,
    }


def with_window(runs: list[dict[str, Any]], window: int) -> list[dict[str, Any]]:
    """``runs`` with first and last rewards recomputed from each reward curve over ``window`` steps."""
    out = []
    for run in runs:
        fig = run["figures"]
        if fig is not None:
            curve = fig["reward_curve"]
            fig = {**fig, "reward_initial": window_mean(curve, last=False, window=window),
                   "reward_final": window_mean(curve, last=True, window=window)}
        out.append({**run, "figures": fig})
    return out


def with_shares(runs: list[dict[str, Any]], ceilings: dict[int, float] | None = None) -> list[dict[str, Any]]:
    """``runs`` (one seed) with each finished run's final reward as a fraction of the clean run
    of the same rule and seed (:func:`clean_reference`) in ``figures["shares"]``, and, for an
    attacked run with ``f`` in ``ceilings``, of that ceiling in ``figures["ceiling_shares"]``
    (lists of one)."""
    out = []
    for run in runs:
        fig, ref = run["figures"], clean_reference(runs, run["rule"])
        if fig is not None:
            ceiling = (ceilings or {}).get(run["f"]) if run["attack"] is not None else None
            fig = {**fig, "shares": [fig["reward_final"] / ref] if ref else [],
                   "ceiling_shares": [fig["reward_final"] / ceiling] if ceiling else []}
        out.append({**run, "figures": fig})
    return out


def read_ceilings(paths: list[Path], nproc: int) -> dict[int, dict[int, float]]:
    """Per seed, per ``f``: the final reward of the clean ``default`` run with ``nproc - f``
    ranks, from ``robustness.json`` files of clean runs (``--attacks`` with no attack)."""
    out: dict[int, dict[int, float]] = {}
    for path in paths:
        data = json.loads(path.read_text())
        reward = clean_reference(data["runs"], DEFAULTS)
        if reward is not None:
            out.setdefault(data["settings"]["seed"], {})[nproc - data["settings"]["nproc"]] = reward
    return out


def average_seeds(seeds: list[list[dict[str, Any]]],
                  ceilings: list[dict[int, float] | None] | None = None) -> list[dict[str, Any]]:
    """One run per cell from the runs of several seeds: rewards and curves averaged over the
    seeds whose run succeeded, flags pooled (precision and recall over all of them), skipped
    steps summed, per-seed shares of the clean reward and of the ceiling (``ceilings[k]`` for
    ``seeds[k]``) listed (:func:`with_shares`), ``seeds`` the number averaged. A single seed's
    runs are returned with their shares."""
    seeds = [with_shares(runs, (ceilings or [None] * len(seeds))[k]) for k, runs in enumerate(seeds)]
    if len(seeds) == 1:
        return seeds[0]
    by_cell: dict[str, list[dict[str, Any]]] = {}
    for runs in seeds:
        for run in runs:
            by_cell.setdefault(run["name"], []).append(run)
    merged = []
    for group in by_cell.values():
        done = [r for r in group if r["figures"]]
        if not done:
            merged.append({**group[0], "seeds": 0})
            continue
        figs = [r["figures"] for r in done]
        curves = [f["reward_curve"] for f in figs]
        length = min(map(len, curves))
        records_steps = sum(f["steps"] for f in figs)
        true_flags, false_flags = sum(f["true_flags"] for f in figs), sum(f["false_flags"] for f in figs)
        attackers = len(done[0]["attackers"])
        active = [f.get("active_steps", f["steps"]) for f in figs]
        merged.append({**done[0], "seeds": len(done), "figures": {
            "steps": figs[0]["steps"],
            "reward_initial": statistics.mean(f["reward_initial"] for f in figs),
            "reward_final": statistics.mean(f["reward_final"] for f in figs),
            "reward_curve": [statistics.mean(c[i] for c in curves) for i in range(length)],
            "step_time_s": statistics.mean(f["step_time_s"] for f in figs),
            "true_flags": true_flags, "false_flags": false_flags,
            "precision": true_flags / (true_flags + false_flags) if true_flags + false_flags and attackers else None,
            "recall": (sum(f["recall"] * a for f, a in zip(figs, active)) / sum(active)
                       if attackers and sum(active) else None),
            "active_steps": sum(active),
            "false_flags_per_step": false_flags / records_steps,
            "consensus_failed_steps": sum(f["consensus_failed_steps"] for f in figs),
            "quarantined_at_end": sorted({q for f in figs for q in f["quarantined_at_end"]}),
            "honest_quarantined": sorted({q for f in figs for q in f.get("honest_quarantined", [])}),
            "attackers_quarantined_at": [f.get("attackers_quarantined_at") for f in figs],
            "shares": [share for f in figs for share in f["shares"]],
            "ceiling_shares": [share for f in figs for share in f["ceiling_shares"]],
        }})
    return merged


def fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def detection_table(runs: list[dict[str, Any]]) -> str:
    """Markdown: attack, rule, f, precision, recall, false flags per step, skipped steps, ranks
    quarantined at the end, honest ranks ever quarantined, step at which every attacker was."""
    rows = []
    for run in runs:
        fig = run["figures"]
        if fig is None:
            rows.append([run["attack"] or "clean", run["rule"], run["f"], "failed", "", "", "", "", "", ""])
            continue
        rows.append([run["attack"] or "clean", run["rule"], run["f"], fmt(fig["precision"]), fmt(fig["recall"]),
                     fmt(fig["false_flags_per_step"]), fig["consensus_failed_steps"], fig["quarantined_at_end"],
                     fig.get("honest_quarantined", "n/a"), fig.get("attackers_quarantined_at", "n/a")])
    header = ["attack", "rule", "f", "precision", "recall", "false flags/step", "skipped steps", "quarantined",
              "honest quarantined", "attackers quarantined at"]
    return markdown_table(header, rows)


def clean_reference(runs: list[dict[str, Any]], rule: str) -> float | None:
    """Final reward of the clean run of ``rule``, else of ``plain_mean``, else of ``mean``, else
    of any clean run; None if no clean run finished."""
    clean = [r for r in runs if r["attack"] is None and r["figures"]]
    clean.sort(key=lambda r: (r["rule"] != rule, r["rule"] != PLAIN_MEAN, r["rule"] != "mean"))
    return clean[0]["figures"]["reward_final"] if clean else None


def percent(shares: list[float]) -> str:
    """``96%`` for one share, ``96% (90-99%)`` for several: their mean and range."""
    if len(shares) == 1 or min(shares) == max(shares):
        return f"{100 * shares[0]:.0f}%"
    return f"{100 * statistics.mean(shares):.0f}% ({100 * min(shares):.0f}-{100 * max(shares):.0f}%)"


def share_text(fig: dict[str, Any], ref: float | None) -> str:
    """`` (96%)``: the final reward as a share of the clean run; over several seeds the mean and
    range of the per-seed shares (:func:`average_seeds`); with a ceiling also its share of it."""
    shares = fig.get("shares") or ([fig["reward_final"] / ref] if ref else [])
    text = percent(shares) if shares else ""
    if fig.get("ceiling_shares"):
        text += f"; {percent(fig['ceiling_shares'])} of ceiling"
    return f" ({text})" if text else ""


def training_table(runs: list[dict[str, Any]]) -> str:
    """Markdown: one row per (attack, f), one column per rule: reward first -> last window of
    steps and the last as % of the same rule's clean run (:func:`clean_reference`; over several
    seeds the mean and range of each seed's own share: :func:`share_text`)."""
    rules = list(dict.fromkeys(r["rule"] for r in runs))
    refs = {rule: clean_reference(runs, rule) for rule in rules}
    cells = {(r["attack"] or "clean", r["f"], r["rule"]): r["figures"] for r in runs}
    rows = []
    for attack, f in dict.fromkeys((r["attack"] or "clean", r["f"]) for r in runs):
        row: list[Any] = [attack, f]
        for rule in rules:
            fig, ref = cells.get((attack, f, rule), "absent"), refs[rule]
            if fig == "absent":
                row.append("")
            elif fig is None:
                row.append("failed")
            else:
                row.append(f"{fig['reward_initial']:.2f} -> {fig['reward_final']:.2f}{share_text(fig, ref)}")
        rows.append(row)
    return markdown_table(["attack", "f", *rules], rows)


def plot_curves(runs: list[dict[str, Any]], path: Path, window: int = 10) -> Path | None:
    """One panel per rule: moving-average reward curves of the clean run and every attack at
    the smallest f. Returns None (and says so on stderr) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return None
    done = [r for r in runs if r["figures"]]
    rules = list(dict.fromkeys(r["rule"] for r in done))
    if not rules:
        return None
    f_min = min(r["f"] for r in done)
    fig, axes = plt.subplots(1, len(rules), figsize=(5 * len(rules), 4), sharey=True, squeeze=False)
    for ax, rule in zip(axes[0], rules):
        for run in (r for r in done if r["rule"] == rule and r["f"] == f_min):
            curve = run["figures"]["reward_curve"]
            smooth = [sum(curve[max(0, i - window + 1): i + 1]) / len(curve[max(0, i - window + 1): i + 1])
                      for i in range(len(curve))]
            clean = run["attack"] is None
            ax.plot(smooth, label=run["attack"] or "clean", color="black" if clean else None,
                    linewidth=2.5 if clean else 1.0)
        ax.set_title(f"{rule} (f={f_min})")
        ax.set_xlabel("step")
    axes[0][0].set_ylabel(f"reward_mean ({window}-step moving average)")
    axes[0][-1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=4, help="ranks per run (default 4)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 300; quick 20)")
    parser.add_argument("--window", type=int, default=None,
                        help="steps averaged for the first and last reward (default: 50; quick: 10%% of the steps); "
                             "with --from-json, recomputed from the stored curves")
    parser.add_argument("--attacks", nargs="*", choices=ALL_ATTACKS + PROTOCOL_ATTACKS, default=None,
                        help=f"default: all but the protocol liars ({', '.join(PROTOCOL_ATTACKS)}); none given: "
                             "the clean runs only (e.g. --nproc 3: the ceiling of 4 ranks less one attacker)")
    parser.add_argument("--rules", nargs="+", default=None,
                        help=f"default: {' '.join(DEFAULT_RULES)}; {PLAIN_MEAN} is mean without quarantine or "
                             f"consensus check; {DEFAULTS} is the configuration's own aggregation section")
    parser.add_argument("--f", type=int, nargs="+", default=None,
                        help=f"default: 1, plus f={EXTRA_F} for those of {EXTRA_ATTACKS} on {EXTRA_RULES} in the "
                             "matrix (where 2f < nproc)")
    parser.add_argument("--seed", type=int, default=0, help="train.seed and attack seed")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config overrides for every run (e.g. aggregation.worker_momentum=0)")
    parser.add_argument("--strength", type=float, default=None,
                        help="the attack parameter of every attacked run (default: each kind's own, "
                             "fedgspo/robust/attacks.py), e.g. --strength 4: a sign flip four times the gradient")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before a run counts as failed")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke check: sign_flip on {PLAIN_MEAN} and {DEFAULTS}, 20 steps")
    parser.add_argument("--retries", type=int, default=1, help="extra tries of a failed run (default 1)")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the successful runs of <out>/robustness.json; run the rest")
    parser.add_argument("--ceiling", type=Path, nargs="+", default=[],
                        help="with --from-json: robustness.json files of clean runs with nproc - f ranks (one "
                             "per seed and f): each attacked run is also reported as a share of that ceiling, "
                             "the same training without the attackers' ranks")
    parser.add_argument("--from-json", type=Path, nargs="+", default=None,
                        help="run nothing: print the tables and plot of earlier (possibly partial) robustness.json "
                             "files; several (other --seed runs of the matrix) are averaged cell by cell")
    return parser.parse_args(argv)


def matrix_of(args: argparse.Namespace) -> list[Cell]:
    """The cells the command line asks for (see :func:`parse_args`)."""
    if args.quick:
        return build_matrix(args.attacks or ["sign_flip"], args.rules or [PLAIN_MEAN, DEFAULTS], args.f or [1], False)
    return build_matrix(ALL_ATTACKS if args.attacks is None else args.attacks, args.rules or DEFAULT_RULES,
                        args.f or [1], args.f is None, args.nproc)


def finished_runs(json_path: Path) -> dict[str, dict[str, Any]]:
    """The successful runs recorded in ``json_path`` by cell name (none if the file is missing)."""
    if not json_path.exists():
        return {}
    return {r["name"]: r for r in json.loads(json_path.read_text())["runs"] if r["status"] == "ok"}


def run_matrix(cells: list[Cell], args: argparse.Namespace, steps: int, json_path: Path) -> list[dict[str, Any]]:
    """Run ``cells`` one after another, rewriting ``json_path`` after each run. With
    ``args.resume``, cells that already succeeded in ``json_path`` are taken from it (the caller
    keeps the settings unchanged between the two invocations)."""
    settings = {"nproc": args.nproc, "steps": steps, "window": args.window, "seed": args.seed,
                "bench_overrides": list(BENCH_OVERRIDES), "set": list(args.set), "strength": args.strength}
    done = finished_runs(json_path) if args.resume else {}
    runs: list[dict[str, Any]] = []
    for i, cell in enumerate(cells, 1):
        if cell.name in done:
            runs.append(done[cell.name])
            continue
        print(f"[{i}/{len(cells)}] {cell.name}", file=sys.stderr, flush=True)
        runs.append(run_cell(cell, args.out / "runs", args.nproc, steps, args.seed, args.timeout, args.retries,
                             args.window, args.set, args.strength))
        print(f"    {runs[-1]['status']} in {runs[-1]['wall_s']:.0f} s", file=sys.stderr, flush=True)
        write_json(json_path, {"settings": settings, "runs": runs})
    return runs


def report(runs: list[dict[str, Any]], plot_path: Path) -> None:
    """Print both tables and write the plot."""
    print("## detection\n\n" + detection_table(runs) + "\n")
    print("## robust_training (reward first -> last window of steps; % of the same rule's clean run)\n\n"
          + training_table(runs) + "\n")
    plot = plot_curves(runs, plot_path)
    if plot:
        print(f"wrote {plot}")


def main(argv: list[str] | None = None) -> int:
    """Run the matrix (or re-read ``--from-json``), print both tables, write JSON and the plot.
    Exit code 1 if a run failed."""
    args = parse_args(argv)
    if args.from_json:
        files = [json.loads(path.read_text()) for path in args.from_json]
        seeds = [data["runs"] for data in files]
        nproc = files[0]["settings"]["nproc"]
        by_seed = read_ceilings(args.ceiling, nproc)
        ceilings = [by_seed.get(data["settings"]["seed"]) for data in files]
        runs = average_seeds([with_window(r, args.window) for r in seeds] if args.window else seeds, ceilings)
    else:
        json_path = args.out / "robustness.json"
        if args.window is None and not args.quick:
            args.window = 50
        runs = run_matrix(matrix_of(args), args, args.steps or (20 if args.quick else 300), json_path)
        print(f"wrote {json_path}")
    report(runs, args.out / "robust_training.png")
    return 0 if all(r["status"] == "ok" for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
