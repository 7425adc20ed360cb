"""Conflict resolver: OCC retries, Pre-ECS staging, priorities, pre-emption, rejection, stress."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest

from fedgspo.entities.conflicts import (
    LowPriorityOperation,
    NormalOperation,
    Operation,
    OperationPriority,
    OperationRejectedError,
    ResolverConfig,
    StructuralOperation,
    with_conflict_resolution,
)
from fedgspo.entities import EntityRegistry, ReputationEntity, TrainingStageEntity
from fedgspo.entities.events import EventBus, OperationRejected


@pytest.fixture
def bus():
    b = EventBus()
    yield b
    b.close()


def _registry(bus: EventBus | None = None, path: Path | None = None, **cfg) -> EntityRegistry:
    return EntityRegistry(path, bus=bus, resolver_config=ResolverConfig(**cfg) if cfg else None)


def _bump(e: ReputationEntity) -> ReputationEntity:
    return e.evolve(flag_count=e.flag_count + 1)


def test_operation_classes_carry_their_priority() -> None:
    args = dict(name="x", target=None, mutate=_bump)
    assert StructuralOperation(**args).priority is OperationPriority.HIGH
    assert NormalOperation(**args).priority is OperationPriority.NORMAL
    assert LowPriorityOperation(**args).priority is OperationPriority.LOW
    assert OperationPriority.CRITICAL > OperationPriority.HIGH > OperationPriority.BACKGROUND


def test_conflict_is_retried_on_the_new_head() -> None:
    reg = _registry()
    e = reg.register(ReputationEntity(rank=0))
    calls = []

    def racing(x: ReputationEntity) -> ReputationEntity:
        calls.append(x.version)
        if len(calls) == 1:
            reg.commit(reg.get(e.lineage_id).evolve(clean_count=7))  # someone else commits first
        return _bump(x)

    out = reg.update(e.lineage_id, racing)
    assert calls == [0, 1] and out.version == 2 and (out.flag_count, out.clean_count) == (1, 7)
    m = reg.resolver.metrics()
    assert (m["conflicts"], m["retries"], m["commits"], m["rejections"]) == (1, 1, 1, 0)


def test_pre_ecs_protects_committed_versions_from_in_place_edits() -> None:
    reg = _registry()
    s = reg.register(TrainingStageEntity(name="s", completion_criteria={"acc": 0.5}))

    def in_place(x: TrainingStageEntity) -> TrainingStageEntity:
        x.completion_criteria["acc"] = 0.9
        return x

    new = reg.update(s.lineage_id, in_place)
    assert new.completion_criteria == {"acc": 0.9} and reg.get(s.ecs_id).completion_criteria == {"acc": 0.5}


def test_invalid_results_and_failed_checks_are_rejected_and_reported(bus: EventBus) -> None:
    reg = _registry(bus)
    e = reg.register(ReputationEntity(rank=0))
    with pytest.raises(OperationRejectedError, match="staged"):
        reg.update(e.lineage_id, lambda x: ReputationEntity(rank=1))
    with pytest.raises(OperationRejectedError, match="too trusting") as err:
        reg.update(e.lineage_id, _bump, check=lambda x: (_ for _ in ()).throw(ValueError("too trusting")))
    assert isinstance(err.value.__cause__, ValueError)
    with pytest.raises(OperationRejectedError, match="TypeError"):
        reg.update(e.lineage_id, lambda x: 3)
    bus.flush()
    assert reg.resolver.metrics()["rejections"] == 3 and len(bus.history(OperationRejected)) == 3
    assert reg.get(e.lineage_id).version == 0


def test_retry_budget_exhausted_is_reported(bus: EventBus) -> None:
    reg = _registry(bus, max_retries=2, base_delay_s=1e-4)
    e = reg.register(ReputationEntity(rank=0))

    def always_loses(x: ReputationEntity) -> ReputationEntity:
        reg.commit(reg.get(e.lineage_id).evolve(clean_count=x.clean_count + 1), occ=False)
        return _bump(x)

    with pytest.raises(OperationRejectedError, match="retry budget") as err:
        reg.update(e.lineage_id, always_loses, priority=OperationPriority.LOW)
    assert err.value.attempts == 3
    bus.flush()
    (event,) = bus.history(OperationRejected)
    assert event.priority == "LOW" and event.attempts == 3 and event.target == e.lineage_id


def test_occ_off_is_last_writer_wins() -> None:
    reg = _registry()
    e = reg.register(ReputationEntity(rank=0))

    def racing(x: ReputationEntity) -> ReputationEntity:
        reg.commit(reg.get(e.lineage_id).evolve(clean_count=5))
        return _bump(x)

    out = reg.resolver.execute(Operation("lww", e.lineage_id, racing), occ=False)
    assert out.version == 2 and out.clean_count == 0 and reg.resolver.metrics()["conflicts"] == 0


def test_decorator_runs_through_the_resolver() -> None:
    reg = _registry()
    e = reg.register(ReputationEntity(rank=0))

    @with_conflict_resolution(pre_ecs=True, occ=True, priority=OperationPriority.HIGH)
    def flag(rep: ReputationEntity, step: int) -> ReputationEntity:
        return rep.evolve(flag_count=rep.flag_count + 1, last_step=step)

    out = flag(reg, e.lineage_id, 4)
    assert (out.version, out.flag_count, out.last_step) == (1, 1, 4)


def test_queued_higher_priority_goes_before_lower() -> None:
    reg = _registry(base_delay_s=0.3, max_delay_s=0.3)
    e = reg.register(ReputationEntity(rank=0))
    order: list[str] = []
    backing_off = threading.Event()

    def high(x: ReputationEntity) -> ReputationEntity:
        order.append("high")
        if len(order) == 1:
            reg.commit(reg.get(e.lineage_id), occ=False)  # force one conflict -> backoff
            backing_off.set()
        return _bump(x)

    def low(x: ReputationEntity) -> ReputationEntity:
        order.append("low")
        return _bump(x)

    t_high = threading.Thread(target=reg.update, args=(e.lineage_id, high), kwargs={"priority": OperationPriority.HIGH})
    t_high.start()
    backing_off.wait(5)
    time.sleep(0.05)  # the high operation is now sleeping in its backoff (0.15 to 0.3 s)
    reg.update(e.lineage_id, low, priority=OperationPriority.LOW)
    t_high.join(5)
    # low is admitted only once high was admitted again; it may still lose the OCC race to it
    assert order[:3] == ["high", "high", "low"]


def test_starving_operation_runs_alone() -> None:
    reg = _registry(exclusive_after=1)
    e = reg.register(ReputationEntity(rank=0))
    attempts: list[int] = []
    others: list[threading.Thread] = []

    def starving(x: ReputationEntity) -> ReputationEntity:
        attempts.append(x.version)
        if len(attempts) == 1:
            reg.commit(reg.get(e.lineage_id), occ=False)  # lose once -> next attempt is exclusive
        else:
            critical = {"priority": OperationPriority.CRITICAL}
            t = threading.Thread(target=reg.update, args=(e.lineage_id, _bump), kwargs=critical)
            t.start()
            others.append(t)
            t.join(0.1)
            assert t.is_alive()  # even CRITICAL waits while the exclusive attempt runs
        return x.evolve(clean_count=1)

    out = reg.update(e.lineage_id, starving, priority=OperationPriority.BACKGROUND)
    others[0].join(5)
    assert out.version == 2 and attempts == [0, 1]
    head = reg.get(e.lineage_id)
    assert (head.version, head.clean_count, head.flag_count) == (3, 1, 1)


@pytest.mark.parametrize("grace,preempted", [(0.0, 1), (30.0, 0)])
def test_preemption_only_after_grace_period(grace: float, preempted: int) -> None:
    reg = _registry()
    e = reg.register(ReputationEntity(rank=0))
    entered, release = threading.Event(), threading.Event()

    def slow_low(x: ReputationEntity) -> ReputationEntity:
        entered.set()
        release.wait(5)
        return x.evolve(clean_count=x.clean_count + 1)

    op = LowPriorityOperation("cleanup", e.lineage_id, slow_low, grace_period_s=grace)
    t = threading.Thread(target=reg.resolver.execute, args=(op,))
    t.start()
    entered.wait(5)
    time.sleep(0.01)
    reg.resolver.execute(StructuralOperation("train", e.lineage_id, _bump))
    release.set()
    t.join(5)
    head = reg.get(e.lineage_id)
    assert (head.flag_count, head.clean_count, head.version) == (1, 1, 2)
    m = reg.resolver.metrics()
    assert m["preemptions"] == preempted and m["preemptions"] + m["conflicts"] == 1


@pytest.mark.parametrize("write_behind", [False, True])
def test_stress_concurrent_updates_lose_nothing(tmp_path: Path, write_behind: bool) -> None:
    """8 threads x 2,000 updates of 4 shared entities at mixed priorities, on a SQLite file."""
    bus = EventBus()
    reg = EntityRegistry(tmp_path / "registry.sqlite", bus=bus, write_behind=write_behind)
    targets = [reg.register(ReputationEntity(rank=r)).lineage_id for r in range(4)]
    threads, per_thread = 8, 2000
    committed, rejected = [0] * threads, [0] * threads
    priorities = list(OperationPriority)

    def worker(i: int) -> None:
        rng = random.Random(i)
        for _ in range(per_thread):
            try:
                reg.update(rng.choice(targets), _bump, priority=rng.choice(priorities))
                committed[i] += 1
            except OperationRejectedError:
                rejected[i] += 1

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(120)
    assert not any(t.is_alive() for t in pool), "deadlock: a worker did not finish"
    total = threads * per_thread
    assert sum(committed) + sum(rejected) == total
    heads = [reg.get(t) for t in targets]
    assert sum(h.flag_count for h in heads) == sum(committed)  # no lost update
    assert sum(h.version for h in heads) == sum(committed)
    assert sum(committed) >= 0.999 * total
    m = reg.resolver.metrics()
    assert m["rejections"] == sum(rejected) and m["queue_depth"] == 0
    bus.flush()
    assert len(bus.history(OperationRejected)) == min(sum(rejected), 10000)
    print(f"stress: committed={sum(committed)} rejected={sum(rejected)} metrics={m}")
    reg.close()
    bus.close()
    with EntityRegistry(tmp_path / "registry.sqlite") as reopened:
        assert [reopened.get(t) for t in targets] == heads
