"""EventBus: dispatch, isolation of failing/slow handlers, bounded queue, parent links."""

from __future__ import annotations

import asyncio
import threading

import pytest

from fedgspo.entities.events import (
    AlertRaised,
    Event,
    EventBus,
    NullEventBus,
    OperationCompleted,
    OperationFailed,
    OperationStarted,
    StepCompleted,
    emit_events,
    get_event_bus,
    on,
    set_event_bus,
)


@pytest.fixture
def bus():
    b = EventBus(max_queue=1000, history_size=50)
    yield b
    b.close()


def test_handlers_receive_their_type_and_subtypes(bus: EventBus) -> None:
    steps, everything = [], []
    bus.on(StepCompleted)(steps.append)
    bus.subscribe(Event, everything.append)
    bus.emit(StepCompleted(step=1, loss=0.5))
    bus.emit(AlertRaised(message="hi"))
    assert bus.flush()
    assert [e.step for e in steps] == [1]
    assert [type(e) for e in everything] == [StepCompleted, AlertRaised]


def test_async_handlers_run(bus: EventBus) -> None:
    seen = []

    async def handler(event: Event) -> None:
        await asyncio.sleep(0.01)
        seen.append(event.step)

    bus.subscribe(StepCompleted, handler)
    for s in range(3):
        bus.emit(StepCompleted(step=s))
    assert bus.flush()
    assert sorted(seen) == [0, 1, 2]


def test_failing_handler_is_isolated(bus: EventBus) -> None:
    seen = []

    def bad(event: Event) -> None:
        raise RuntimeError("boom")

    async def bad_async(event: Event) -> None:
        raise RuntimeError("async boom")

    bus.subscribe(StepCompleted, bad)
    bus.subscribe(StepCompleted, bad_async)
    bus.subscribe(StepCompleted, seen.append)
    for s in range(5):
        assert bus.emit(StepCompleted(step=s))
    assert bus.flush()
    assert len(seen) == 5
    assert bus.stats()["handler_errors"] == 10


def test_slow_handler_never_blocks_emit_and_full_queue_drops() -> None:
    bus = EventBus(max_queue=10)
    gate = threading.Event()
    bus.subscribe(StepCompleted, lambda e: gate.wait(5))
    results = [bus.emit(StepCompleted(step=s)) for s in range(100)]  # blocking here would hang
    stats = bus.stats()
    assert results.count(False) == stats["dropped"] >= 80
    assert stats["emitted"] + stats["dropped"] == 100
    gate.set()
    assert bus.close()


def test_history_is_bounded(bus: EventBus) -> None:
    for s in range(80):
        bus.emit(StepCompleted(step=s))
    history = bus.history(StepCompleted)
    assert len(history) == 50 and history[-1].step == 79
    assert len(bus.history(limit=5)) == 5


def test_emit_after_close_is_an_error() -> None:
    bus = EventBus()
    bus.close()
    with pytest.raises(RuntimeError):
        bus.emit(StepCompleted(step=0))


def test_emit_events_links_parent_and_child(bus: EventBus) -> None:
    @emit_events("inner", bus=bus)
    def inner() -> int:
        return 1

    @emit_events("outer", bus=bus)
    def outer() -> int:
        return inner() + 1

    @emit_events("broken", bus=bus)
    def broken() -> None:
        raise ValueError("nope")

    assert outer() == 2
    with pytest.raises(ValueError):
        broken()
    bus.flush()
    events = bus.history()
    started = {e.operation: e for e in events if isinstance(e, OperationStarted)}
    completed = {e.operation: e for e in events if isinstance(e, OperationCompleted)}
    assert started["outer"].parent_id is None
    assert started["inner"].parent_id == started["outer"].event_id
    assert completed["inner"].parent_id == started["inner"].event_id
    failed = [e for e in events if isinstance(e, OperationFailed)]
    assert len(failed) == 1 and "nope" in failed[0].error and failed[0].parent_id == started["broken"].event_id


def test_emit_events_on_coroutines(bus: EventBus) -> None:
    @emit_events(bus=bus)
    async def work() -> str:
        await asyncio.sleep(0)
        return "ok"

    assert asyncio.run(work()) == "ok"
    bus.flush()
    assert [type(e) for e in bus.history()] == [OperationStarted, OperationCompleted]


def test_module_level_on_uses_default_bus() -> None:
    mine = EventBus()
    previous = set_event_bus(mine)
    try:
        seen = []
        on(AlertRaised)(seen.append)
        get_event_bus().emit(AlertRaised(message="x"))
        mine.flush()
        assert len(seen) == 1
    finally:
        set_event_bus(previous)
        mine.close()


def test_null_bus_does_nothing() -> None:
    bus = NullEventBus()
    assert bus.emit(StepCompleted(step=1)) and bus.flush() and bus.history() == []


def test_events_validate() -> None:
    with pytest.raises(ValueError):
        StepCompleted(step=-1)
