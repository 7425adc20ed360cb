"""A run's training curves as one PNG: reward, loss and per-rank trust over steps.

Reward (mean with a ±std band) and loss come from ``metrics.jsonl``; trust per rank from the
``rank_trust`` lists of the step records when present, else from
:func:`fedgspo.cli.rundir.reputation_history` (a step function through each change). Steps on
which a rank was flagged are marked with an ``x`` on its trust line; quarantined stretches
are shaded.

Failure behaviour: ``ImportError`` without matplotlib (``pip install 'fedgspo[plot]'``);
:class:`~fedgspo.cli.rundir.RunDirError` for a run without step records.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedgspo.cli.rundir import RunDirError, metrics, reputation_history


def _trust_series(run_dir: Path, records: list[dict[str, Any]]) -> dict[int, tuple[list[int], list[float]]]:
    """rank -> (steps, trust)."""
    if any(isinstance(r.get("rank_trust"), list) for r in records):
        series: dict[int, tuple[list[int], list[float]]] = {}
        for r in records:
            for rank, trust in enumerate(r.get("rank_trust") or []):
                steps, values = series.setdefault(rank, ([], []))
                steps.append(r["step"])
                values.append(float(trust))
        return series
    last = records[-1]["step"] if records else 0
    return {rank: ([p.step for p in points] + [last], [p.trust for p in points] + [points[-1].trust])
            for rank, points in reputation_history(run_dir).items() if points}


def plot_run(run_dir: Path, out: Path) -> Path:
    """Write the three-panel PNG of the run in ``run_dir`` to ``out``; returns ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = metrics(run_dir)
    if not records:
        raise RunDirError(f"{run_dir}: no step records in metrics.jsonl to plot")
    steps = [r["step"] for r in records]
    reward = [float(r.get("reward_mean", float("nan"))) for r in records]
    spread = [float(r.get("reward_std", 0.0)) for r in records]
    fig, (ax_r, ax_l, ax_t) = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
    ax_r.plot(steps, reward, color="C0", label="reward_mean")
    ax_r.fill_between(steps, [m - s for m, s in zip(reward, spread)], [m + s for m, s in zip(reward, spread)],
                      color="C0", alpha=0.15, label="± reward_std")
    ax_r.set_ylabel("reward")
    ax_r.legend(loc="lower right", fontsize=8)
    ax_l.plot(steps, [float(r.get("loss", float("nan"))) for r in records], color="0.25")
    ax_l.set_ylabel("loss")
    for rank, (xs, ys) in _trust_series(run_dir, records).items():
        ax_t.step(xs, ys, where="post", label=f"rank {rank}", color=f"C{rank % 10}")
        flagged = [r["step"] for r in records if rank in (r.get("flagged") or [])]
        ax_t.plot(flagged, [1.02] * len(flagged), "x", color=f"C{rank % 10}", markersize=4)
        quarantined = [r["step"] for r in records if rank in (r.get("quarantined") or [])]
        for s in quarantined:
            ax_t.axvspan(s - 0.5, s + 0.5, color=f"C{rank % 10}", alpha=0.08, linewidth=0)
    ax_t.set_ylim(-0.05, 1.08)
    ax_t.set_ylabel("trust")
    ax_t.set_xlabel("step")
    ax_t.legend(loc="lower left", fontsize=8, ncol=4)
    ax_r.set_title(f"{run_dir.name}: reward, loss and per-rank trust (x: flagged, shade: quarantined)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
