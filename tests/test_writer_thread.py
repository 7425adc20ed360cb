"""Rank 0's bookkeeping off the training thread: the writer keeps order, flushes on demand,
waits rather than drops, and hands its errors back to the training thread."""

from __future__ import annotations

import json
import threading
from types import SimpleNamespace

import pytest

from fedgspo.config import load_config
from fedgspo.factory import EntityFactory
from fedgspo.integrity.audit import CHECKPOINT, DETECTION, ENTITY_WRITE, RUN_START, verify_audit_log
from fedgspo.recorder import Recorder
from fedgspo.robust.reputation import RankReputation
from fedgspo.runfiles import RunFiles
from fedgspo.telemetry.metrics import MetricsLogger, read_metrics
from fedgspo.writer import BackgroundWriter


def test_calls_run_in_order_and_flush_waits_for_them():
    writer, seen = BackgroundWriter(max_queue=8), []
    for i in range(100):
        writer.submit(seen.append, i)
    writer.flush()
    assert seen == list(range(100))
    assert writer.stats()["done"] == 100 and writer.close() is None


def test_a_full_queue_waits_and_loses_nothing():
    writer, gate, seen = BackgroundWriter(max_queue=1), threading.Event(), []
    writer.submit(gate.wait)
    opener = threading.Timer(0.2, gate.set)
    opener.start()
    for i in range(5):
        writer.submit(seen.append, i)
    writer.flush()
    opener.join()
    assert seen == list(range(5)) and writer.stats()["full_waits"] >= 1
    writer.close()


def test_an_error_is_raised_once_on_the_callers_thread_and_stops_the_writer():
    writer, seen = BackgroundWriter(), []

    def fail() -> None:
        raise OSError("disk full")

    writer.submit(fail)
    writer.submit(seen.append, 1)
    with pytest.raises(OSError, match="disk full"):
        writer.flush()
    assert writer.failed and seen == []
    writer.flush()  # raised once
    assert writer.close() is None

    other = BackgroundWriter()
    other.submit(fail)
    assert isinstance(other.close(), OSError)  # close hands back what was not raised
    with pytest.raises(RuntimeError, match="closed"):
        other.submit(seen.append, 2)


def _recorder(tmp_path, *overrides: str) -> Recorder:
    cfg = load_config(None, ["run.tensorboard=false", *overrides])
    files = RunFiles(tmp_path / "run")
    files.root.mkdir()
    return Recorder(cfg, files, MetricsLogger(files.root, tensorboard=False), None)


def _start(recorder: Recorder, world_size: int = 2) -> None:
    hf = SimpleNamespace(model_type="tiny", vocab_size=16, hidden_size=8, num_hidden_layers=1)
    recorder.bind(EntityFactory(recorder.cfg, "run").inputs(hf, "0" * 64, {"name": "digits/x", "source": "synthetic"}))
    recorder.start(first_step=0, world_size=world_size, participants=[f"p{r}" for r in range(world_size)],
                   weights_sha256="0" * 64, rule="median", f=0, resumed_from=None)


def _record(step: int) -> dict:
    return {"step": step, "reward_mean": 0.5, "loss": 0.1, "step_time_s": 0.01, "flagged": [1],
            "rank_trust": [1.0, 0.5]}


def test_flush_puts_every_queued_record_on_disk(tmp_path):
    recorder = _recorder(tmp_path)
    _start(recorder)
    reps = [RankReputation(rank=0), RankReputation(rank=1, trust=0.5, flags=1, steps=1)]
    for step in range(20):
        recorder.publish(_record(step), [0.0, 4.0], reps)
        recorder.audit(DETECTION, {"subject_rank": 1}, step=step, rank=1)
    recorder.flush()
    files = recorder.files
    assert [r["step"] for r in read_metrics(files.root)] == list(range(20))
    kinds = [json.loads(line)["kind"] for line in files.audit.read_text().splitlines()]
    assert [k for k in kinds if k != ENTITY_WRITE] == [RUN_START] + [DETECTION] * 20
    events = [json.loads(line)["type"] for line in files.events.read_text().splitlines()]
    assert events.count("StepCompleted") == 20 and events.count("ByzantineRankFlagged") == 20
    recorder.close("cancelled")


def test_the_record_and_reputations_are_copied_when_queued(tmp_path):
    recorder = _recorder(tmp_path)
    _start(recorder)
    rep = RankReputation(rank=0)
    record = _record(0)
    recorder.publish(record, [0.0], [rep])
    record["reward_mean"], rep.trust = 99.0, 0.0  # the trainer moves on
    recorder.close("cancelled")
    assert read_metrics(recorder.files.root)[0]["reward_mean"] == 0.5
    changed = [json.loads(line) for line in recorder.files.events.read_text().splitlines()
               if json.loads(line)["type"] == "ReputationChanged"]
    assert changed == []  # trust 1.0 at the step, unchanged: no version, no event


def test_audit_order_and_chain_survive_the_writer(tmp_path):
    recorder = _recorder(tmp_path)
    _start(recorder)
    for step in range(5):
        recorder.audit(DETECTION, {"subject_rank": 1}, step=step, rank=1)
        recorder.queued_audit.append(CHECKPOINT, {"n": step}, step=step)  # the inbox's path
    recorder.close("cancelled")
    summary = verify_audit_log(recorder.files.audit)
    records = [json.loads(line) for line in recorder.files.audit.read_text().splitlines()]
    assert summary.records == 13 and summary.head_checked
    assert [r["kind"] for r in records].count(ENTITY_WRITE) == 2  # the start's entities, the run's status
    steps = [r["step"] for r in records if r["kind"] != ENTITY_WRITE]
    assert steps == [0] + [s for s in range(5) for _ in range(2)]


def test_a_write_error_reaches_the_training_thread_at_the_next_call(tmp_path):
    recorder = _recorder(tmp_path)
    _start(recorder)

    def broken(record: dict) -> None:
        raise OSError("metrics disk full")

    recorder.logger.log = broken  # type: ignore[method-assign]
    recorder.publish(_record(0), [0.0, 0.0], [])
    with pytest.raises(OSError, match="metrics disk full"):
        recorder.flush()
    recorder.close("failed")  # the run's own error comes first: close does not raise
    assert recorder.files.audit.is_file()


def test_a_clean_close_raises_an_error_not_yet_seen(tmp_path):
    recorder = _recorder(tmp_path)
    _start(recorder)

    def late() -> None:
        raise OSError("late")

    recorder.writer.submit(late)
    with pytest.raises(OSError, match="late"):
        recorder.close()
