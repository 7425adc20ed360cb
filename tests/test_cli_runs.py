"""The run-directory commands of the fedgspo CLI on real runs: runs, show, lineage, reputation,
events and plot, and their one-line errors (exit 2)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_cli import one_line_error

from fedgspo.cli.main import main
from fedgspo.cli.lineage import render_png
from fedgspo.cli.rundir import checkpoint_lineage, follow_events, list_runs, run_info
from fedgspo.train import main as train

FAST = ["run.progress_bar=false", "run.log_every=100", "task.prompts_per_rank=2", "gspo.num_generations=4",
        "checkpoint.every=2"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``runs/main``: 4 steps, then resumed to 6 (checkpoints every 2 steps, keep_last 2)."""
    root = tmp_path_factory.mktemp("cli") / "runs"
    run = root / "main"
    assert train([f"run.dir={run}", "train.max_steps=4", "checkpoint.keep_last=2", *FAST]) == 0
    assert train([f"run.dir={run}", "train.max_steps=6", "checkpoint.keep_last=2", "checkpoint.resume=auto",
                  *FAST]) == 0
    return root


def out_lines(capsys: pytest.CaptureFixture) -> list[str]:
    return capsys.readouterr().out.splitlines()


def test_runs_lists_status_steps_and_reward(runs: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["runs", str(runs)]) == 0
    header, row, footer = out_lines(capsys)
    assert header.split() == ["RUN", "STATUS", "STEPS", "REWARD", "RANKS", "STARTED"]
    name, status, steps, reward, ranks, *_ = row.split()
    assert (name, status, steps, ranks) == ("main", "completed", "6/6", "1")
    assert 0.0 <= float(reward) <= 2.0
    assert footer == f"1 run(s) in {runs}"


def test_status_running_and_crashed_from_file_ages(tmp_path: Path) -> None:
    run = tmp_path / "partial"
    run.mkdir()
    (run / "config.yaml").write_text("train: {max_steps: 10}\n")
    (run / "metrics.jsonl").write_text(json.dumps({"step": 0, "reward_mean": 0.5, "extra": [1]}) + "\n{\"st")
    info = run_info(run)
    assert (info.status, info.steps, info.total_steps, info.last_reward) == ("running", 1, 10, 0.5)
    old = time.time() - 3600
    for f in run.iterdir():
        os.utime(f, (old, old))
    assert run_info(run).status == "crashed"
    assert [i.status for i in list_runs(tmp_path, stale_after_s=1e9)] == ["running"]


def test_show_summarises_the_run(runs: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["show", str(runs / "main")]) == 0
    text = capsys.readouterr().out
    assert "status       completed, step 6/6, 1 rank(s)" in text
    assert "rule auto->trimmed_mean/sharded" in text and "task copy" in text
    assert "reward       " in text and "(first 6 steps) ->" in text
    assert "flagged      none" in text and "quarantined  none" in text
    assert "step_00000006 (step 6)" in text and "final (step 6)" in text
    assert "(all ranks agree)" in text


def test_lineage_text_marks_the_resume_and_pruned_checkpoints(runs: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["lineage", str(runs / "main")]) == 0
    lines = out_lines(capsys)
    assert lines[0] == "run main"
    text = "\n".join(lines)
    assert "step_00000002 (step 2" in text and "gone)" in text  # pruned by keep_last=2
    assert "(resumed) step_00000006" in text
    # The first final (step 4) was overwritten by the resumed run's: both are in the tree.
    assert sum("final (step" in line for line in lines) == 2


def test_lineage_dot_and_png(runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    dot, png = tmp_path / "lineage.dot", tmp_path / "lineage.png"
    assert main(["lineage", str(runs / "main"), "--dot", str(dot), "--png", str(png)]) == 0
    source = dot.read_text()
    assert source.startswith("digraph lineage {") and source.rstrip().endswith("}")
    assert source.count("->") == 4 and 'label="resumed", style=dashed' in source
    assert png.read_bytes().startswith(PNG_MAGIC)
    forced = tmp_path / "forced.png"
    assert render_png(checkpoint_lineage(runs / "main"), forced, engine="matplotlib") == "matplotlib"
    assert forced.read_bytes().startswith(PNG_MAGIC) and forced.stat().st_size > 5000


def test_lineage_and_reputation_without_registry(runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    copy = tmp_path / "main"
    shutil.copytree(runs / "main", copy, ignore=shutil.ignore_patterns("registry.sqlite*"))
    lineage = checkpoint_lineage(copy)
    labels = {n.label for n in lineage.nodes.values()}
    assert {"step_00000004", "step_00000006", "final"} <= labels
    assert main(["reputation", str(copy)]) == 0
    assert out_lines(capsys)[1].split() == ["0", "1.000", "0", "no"]


def test_reputation_table_and_history(runs: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["reputation", str(runs / "main"), "--history"]) == 0
    lines = out_lines(capsys)
    assert lines[0].split() == ["RANK", "TRUST", "FLAGS", "QUARANTINED"]
    assert lines[1].split() == ["0", "1.000", "0", "no"]
    assert lines[2].startswith("rank 0: step 0: 1.000")


def test_events_filtered_and_raw(runs: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["events", str(runs / "main"), "--kind", "trainingstarted", "--kind", "CheckpointCreated"]) == 0
    lines = out_lines(capsys)
    assert sum("TrainingStarted" in line for line in lines) == 2  # start and resume
    assert sum("CheckpointCreated" in line for line in lines) == 5  # steps 2, 4, final, 6, final
    assert main(["events", str(runs / "main"), "--json", "--kind", "StepCompleted"]) == 0
    assert [json.loads(line)["step"] for line in out_lines(capsys)] == list(range(6))


def test_events_follow_sees_appended_events_and_stops(runs: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "followed"
    shutil.copytree(runs / "main", run)
    existing = len((run / "events.jsonl").read_text().splitlines())
    follow = follow_events(run, poll_s=0.05, max_seconds=10)
    assert len([next(follow) for _ in range(existing)]) == existing
    with (run / "events.jsonl").open("a") as f:
        f.write(json.dumps({"type": "AlertRaised", "step": 7}) + "\n" + '{"type": "Torn')
        f.flush()
        assert next(follow) == {"type": "AlertRaised", "step": 7}
        f.write('"}\n')
    assert next(follow) == {"type": "Torn"}
    follow.close()
    appender = threading.Timer(0.2, lambda: (run / "events.jsonl").open("a").write('{"type": "Late"}\n'))
    appender.start()
    started = time.monotonic()
    assert main(["events", str(run), "--follow", "--poll", "0.05", "--max-seconds", "1", "--kind", "late"]) == 0
    appender.join()
    assert time.monotonic() - started < 5
    assert [line.split()[1] for line in out_lines(capsys)] == ["Late"]


def test_plot_writes_a_png(runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import matplotlib.image

    out = tmp_path / "curves.png"
    assert main(["plot", str(runs / "main"), "--out", str(out)]) == 0
    assert out_lines(capsys) == [f"wrote {out}"]
    assert out.read_bytes().startswith(PNG_MAGIC)
    height, width, _ = matplotlib.image.imread(out).shape
    assert height >= width > 500


@pytest.mark.parametrize("argv, message", [
    (["show", "{tmp}/missing"], "{tmp}/missing: no such directory"),
    (["lineage", "{tmp}"], "{tmp}: not a run directory"),
    (["reputation", "{tmp}/missing"], "no such directory"),
    (["events", "{tmp}"], "not a run directory"),
    (["plot", "{tmp}"], "not a run directory"),
    (["runs", "{tmp}/missing"], "{tmp}/missing: no such directory"),
])
def test_errors_are_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture, argv: list[str],
                                    message: str) -> None:
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    assert message.format(tmp=tmp_path) in one_line_error(capsys)


def test_missing_matplotlib_is_one_line_exit_2(runs: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else find_spec(name, *a))
    assert main(["plot", str(runs / "main")]) == 2
    assert "plot needs matplotlib: pip install 'fedgspo[plot]'" in one_line_error(capsys)


def test_every_command_has_help(capsys: pytest.CaptureFixture) -> None:
    for name in ["runs", "show", "lineage", "reputation", "events", "plot"]:
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        assert "usage: fedgspo " + name in capsys.readouterr().out


@pytest.mark.slow
def test_two_ranks_with_an_attacker_show_flags_quarantine_and_trust(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "attacked"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "fedgspo.train", f"run.dir={run}", "train.max_steps=6", "attack.kind=nan", "attack.ranks=[1]", *FAST]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main(["show", str(run)]) == 0
    text = capsys.readouterr().out
    assert "flagged      rank 1: 6 step(s)" in text and "quarantined  rank 1" in text
    assert main(["reputation", str(run)]) == 0
    rank1 = out_lines(capsys)[2].split()
    assert rank1[0] == "1" and float(rank1[1]) < 0.6 and rank1[2:4] == ["6", "yes"]
    assert main(["plot", str(run), "--out", str(tmp_path / "p.png")]) == 0


@pytest.mark.slow
def test_lineage_of_a_pipeline_stage(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec = tmp_path / "pipe.yaml"
    spec.write_text(f"name: tiny\ndir: {tmp_path / 'pipe'}\nstages:\n"
                    "  - {name: warmup, overrides: {train.max_steps: 2}}\n"
                    "  - {name: main, depends_on: [warmup], overrides: {train.max_steps: 2}}\n")
    assert train(["--pipeline", str(spec), *FAST]) == 0
    assert main(["runs", str(tmp_path / "pipe")]) == 0
    assert [line.split()[:2] for line in out_lines(capsys)[1:3]] == [["warmup", "completed"], ["main", "completed"]]
    assert main(["lineage", str(tmp_path / "pipe" / "main")]) == 0
    text = capsys.readouterr().out
    assert text.startswith("pipeline tiny, stage main")
    assert "(then) stage main (completed) [this run]" in text
    assert "(final) warmup/final (started from" in text and "(starts) step_00000002 (step 2" in text
