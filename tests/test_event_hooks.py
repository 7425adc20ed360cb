"""Module-level hooks: ``@fedgspo.on(EventType)`` sees a run's events, linked run -> step ->
checkpoint/detection, with their ids; a failing or stuck hook never holds up training."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

import fedgspo
import fedgspo.bookkeeping as bookkeeping
from fedgspo.bookkeeping import BookkeepingConfig, RunBookkeeper
from fedgspo.entities.events import EventBus, set_event_bus
from fedgspo.telemetry.metrics import read_metrics
from fedgspo.train import main

RUN = ["train.max_steps=4", "checkpoint.every=2", "run.progress_bar=false", "run.tensorboard=false",
       "task.prompts_per_rank=2", "gspo.num_generations=4"]


@pytest.fixture
def default_bus():
    """A fresh process-wide bus for the test, the previous one restored after."""
    bus = EventBus()
    previous = set_event_bus(bus)
    yield bus
    set_event_bus(previous)
    bus.close(timeout=1)


def test_a_module_level_hook_sees_the_run_as_a_tree(tmp_path, default_bus):
    seen: list[fedgspo.Event] = []

    @fedgspo.on(fedgspo.Event)
    def record(event: fedgspo.Event) -> None:
        seen.append(event)

    assert main([f"run.dir={tmp_path / 'run'}", *RUN]) == 0
    started = [e for e in seen if isinstance(e, fedgspo.TrainingStarted)]
    steps = [e for e in seen if isinstance(e, fedgspo.StepCompleted)]
    checkpoints = [e for e in seen if isinstance(e, fedgspo.CheckpointCreated)]
    completed = [e for e in seen if isinstance(e, fedgspo.TrainingCompleted)]
    assert len(started) == 1 and len(completed) == 1 and [e.step for e in steps] == [0, 1, 2, 3]
    run = started[0]
    assert run.run_id is not None and run.model_id is not None and run.config_id is not None
    assert all(e.parent_id == run.event_id and e.run_id == run.run_id for e in steps)
    by_step = {e.step: e for e in steps}
    assert [by_step[s].checkpoint_triggered for s in range(4)] == [False, True, False, True]
    assert [c.step for c in checkpoints] == [2, 4, 4]  # every 2 steps, then the final one
    for c in checkpoints:
        assert c.parent_id == by_step[c.step - 1].event_id and c.run_id == run.run_id
    end = completed[0]
    assert end.parent_id == run.event_id and end.status == "completed" and end.model_id == run.model_id
    assert end.final_checkpoint_id == checkpoints[-1].checkpoint_id
    assert {"reward_last10", "loss", "reward_mean"} <= set(end.final_metrics)
    last = read_metrics(tmp_path / "run")[-1]
    assert last["hook_errors"] == 0 and last["hook_events_dropped"] == 0


def test_failing_and_stuck_hooks_are_counted_and_never_hold_up_training(tmp_path, monkeypatch):
    bus = EventBus(max_queue=2)
    previous = set_event_bus(bus)
    gate = threading.Event()
    monkeypatch.setattr(bookkeeping, "HOOKS_CLOSE_TIMEOUT_S", 0.1)

    @fedgspo.on(fedgspo.Event)
    def broken(event: fedgspo.Event) -> None:
        raise ValueError("user bug")

    @fedgspo.on(fedgspo.Event)
    def stuck(event: fedgspo.Event) -> None:
        gate.wait()

    try:
        assert main([f"run.dir={tmp_path / 'run'}", *RUN]) == 0
        assert [r["step"] for r in read_metrics(tmp_path / "run")] == [0, 1, 2, 3]
        stats = bus.stats()
        assert stats["handler_errors"] >= 1 and stats["dropped"] >= 1
    finally:
        gate.set()
        set_event_bus(previous)
        bus.close(timeout=5)


def test_hook_failures_are_in_the_bookkeepers_counters(tmp_path, default_bus):
    @fedgspo.on(fedgspo.StepCompleted)
    def broken(event: fedgspo.Event) -> None:
        raise ValueError("user bug")

    book = RunBookkeeper(BookkeepingConfig(), tmp_path, rank=0)
    book.bus.emit(fedgspo.StepCompleted(step=0))
    book.bus.flush()
    default_bus.flush()
    assert book.counters()["hook_errors"] == 1 and book.counters()["event_handler_errors"] == 0
    book.close()


def test_hooks_off_delivers_nothing(tmp_path, default_bus):
    seen: list[fedgspo.Event] = []
    default_bus.subscribe(fedgspo.Event, seen.append)
    book = RunBookkeeper(BookkeepingConfig(hooks=False), tmp_path, rank=0)
    book.bus.emit(fedgspo.StepCompleted(step=0))
    book.close()
    default_bus.flush()
    assert seen == [] and "hook_errors" in book.counters()


def test_importing_fedgspo_leaves_the_event_system_unloaded():
    code = ("import sys, fedgspo; assert 'fedgspo.entities.events' not in sys.modules; "
            "assert fedgspo.on is fedgspo.entities.events.on; print('ok')")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "ok\n"
