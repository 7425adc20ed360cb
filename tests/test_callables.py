"""CallableRegistry lookup/execution and HotSwapper (local and across two gloo ranks)."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from fedgspo.entities.callables import HOTSWAP_FILENAME, CallableRegistry, HotSwapper, UnknownCallableError
from fedgspo.entities import ReputationEntity
from fedgspo.entities.events import AlertRaised, EventBus, HotSwapApplied


def _half(x: float) -> float:
    return x / 2


def _double(x: float) -> float:
    return x * 2


async def _async_reward(rep: ReputationEntity) -> ReputationEntity:
    await asyncio.sleep(0)
    return rep.evolve(trust_score=rep.trust_score / 2)


def _cosine(step: int) -> float:
    return 1.0


NAMES = {"t_half": ("reward", _half), "t_double": ("reward", _double), "t_async": ("reward", _async_reward),
         "t_cosine": ("lr_schedule", _cosine)}


@pytest.fixture(autouse=True)
def registered():
    for name, (kind, fn) in NAMES.items():
        CallableRegistry.register(name, kind=kind, replace=True)(fn)
    yield
    for name in NAMES:
        CallableRegistry.unregister(name)


@pytest.fixture
def bus():
    b = EventBus()
    yield b
    b.close()


def test_lookup_and_clear_errors() -> None:
    assert CallableRegistry.get("t_half").fn is _half
    assert {"t_half", "t_double", "t_async"} <= set(CallableRegistry.names("reward"))
    with pytest.raises(UnknownCallableError, match="known: .*t_double.*t_half"):
        CallableRegistry.get("t_missing", kind="reward")
    with pytest.raises(UnknownCallableError, match="unknown lr_schedule callable 't_half'"):
        CallableRegistry.get("t_half", kind="lr_schedule")
    with pytest.raises(ValueError, match="already registered"):
        CallableRegistry.register("t_half")(_double)


def test_execute_sync_and_async_tracks_entities() -> None:
    assert CallableRegistry.execute("t_double", 2.0) == 4.0
    rep = ReputationEntity(rank=1)
    out = CallableRegistry.execute("t_async", rep)
    assert out.trust_score == 0.5
    record = CallableRegistry.records("t_async")[-1]
    assert record.input_ids == (rep.ecs_id,) and record.output_ids == (out.ecs_id,) and record.error is None
    assert asyncio.run(CallableRegistry.aexecute("t_half", 3.0)) == 1.5
    assert asyncio.run(CallableRegistry.aexecute("t_async", rep)).trust_score == 0.5
    with pytest.raises(TypeError):
        CallableRegistry.execute("t_half", "x")
    assert "TypeError" in CallableRegistry.records("t_half")[-1].error


def test_hot_swap_by_request(bus: EventBus) -> None:
    swapper = HotSwapper({"reward": "t_half", "lr_schedule": "t_cosine"}, bus=bus)
    assert swapper["reward"](4.0) == 2.0
    swapper.request("reward", "t_double")
    assert swapper["reward"](4.0) == 2.0  # nothing changes before the step boundary
    assert swapper.sync(step=7) == {"reward": "t_double"}
    assert swapper["reward"](4.0) == 8.0 and swapper.sync(step=8) == {}
    with pytest.raises(UnknownCallableError):
        swapper.request("reward", "t_cosine")
    with pytest.raises(KeyError, match="unknown slot"):
        swapper.request("optimizer", "t_half")
    bus.flush()
    (event,) = bus.history(HotSwapApplied)
    assert (event.slot, event.old_name, event.new_name, event.step) == ("reward", "t_half", "t_double", 7)


def test_hot_swap_from_watched_file(tmp_path: Path, bus: EventBus) -> None:
    swapper = HotSwapper({"reward": "t_half"}, tmp_path, bus=bus)
    path = tmp_path / HOTSWAP_FILENAME
    path.write_text(json.dumps({"reward": "t_double"}))
    assert swapper.sync(step=1) == {"reward": "t_double"}
    assert swapper.sync(step=2) == {}  # an unchanged file is not applied twice
    path.write_text(json.dumps({"reward": "t_nope"}))
    os.utime(path, ns=(1, 1))
    assert swapper.sync(step=3) == {} and swapper.slots == {"reward": "t_double"}
    path.write_text("{not json")
    assert swapper.sync(step=4) == {}
    bus.flush()
    alerts = bus.history(AlertRaised)
    assert len(alerts) == 2 and "t_nope" in alerts[0].message


def _swap_worker(rank: int, world: int, store: str, run_dir: str, out_dir: str) -> None:
    import torch.distributed as dist

    for name, (kind, fn) in NAMES.items():
        CallableRegistry.register(name, kind=kind, replace=True)(fn)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    bus = EventBus()
    swapper = HotSwapper({"reward": "t_half"}, run_dir if rank == 0 else None, bus=bus)
    applied_at = {}
    for step in range(4):
        if rank == 0 and step == 2:
            (Path(run_dir) / HOTSWAP_FILENAME).write_text(json.dumps({"reward": "t_double"}))
        for slot, name in swapper.sync(step).items():
            applied_at[slot] = (name, step)
    bus.close()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(applied_at))
    dist.destroy_process_group()


@pytest.mark.slow
def test_hot_swap_applies_on_all_ranks_at_the_same_step(tmp_path: Path) -> None:
    import torch.multiprocessing as tmp

    tmp.spawn(_swap_worker, args=(2, str(tmp_path / "pg_store"), str(tmp_path), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert results[0] == results[1] == {"reward": ["t_double", 2]}
