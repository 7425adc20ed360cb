"""EntityRegistry: versions, history, queries, SQLite persistence, concurrent processes, client."""

from __future__ import annotations

import multiprocessing as mp
import os
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedgspo.entities.conflicts import VersionConflict
from fedgspo.entities import (
    REGISTRY_FILENAME,
    ConfigEntity,
    Entity,
    EntityExists,
    EntityNotFound,
    EntityRegistry,
    ModelCheckpointEntity,
    ModelEntity,
    NullRegistry,
    RegistryClient,
    RegistryWriteError,
    ReputationEntity,
    TrainingStageEntity,
)


@pytest.fixture
def registry(tmp_path: Path):
    with EntityRegistry.open(tmp_path) as reg:
        yield reg


def _bump(e: ReputationEntity) -> ReputationEntity:
    return e.evolve(flag_count=e.flag_count + 1)


def test_register_get_update_history(registry: EntityRegistry) -> None:
    v0 = registry.register(ReputationEntity(rank=2))
    v1 = registry.update(v0.lineage_id, _bump)
    v2 = registry.update(v0.ecs_id, _bump)  # any version's ecs_id resolves to the lineage head
    assert (v1.version, v2.version, v2.flag_count) == (1, 2, 2)
    assert registry.resolver.metrics()["conflicts"] == 0
    assert registry.get(v0.lineage_id) is v2
    assert registry.get(v0.ecs_id) == v0 and registry.get(str(v1.ecs_id)) == v1
    assert [e.version for e in registry.history(v0.lineage_id)] == [0, 1, 2]
    assert registry.lineage(v1.ecs_id) == [v0, v1]


def test_register_twice_and_unknown_ids(registry: EntityRegistry) -> None:
    e = registry.register(ReputationEntity(rank=0))
    with pytest.raises(EntityExists):
        registry.register(e)
    with pytest.raises(EntityNotFound):
        registry.get(uuid.uuid4())
    with pytest.raises(ValueError, match="update"):
        registry.register(e.next_version(e.ecs_id, 0))
    assert e.lineage_id in registry and uuid.uuid4() not in registry


def test_commit_rejects_stale_version(registry: EntityRegistry) -> None:
    v0 = registry.register(ReputationEntity(rank=0))
    registry.commit(v0.evolve(flag_count=1))
    with pytest.raises(VersionConflict):
        registry.commit(v0.evolve(flag_count=5))
    forced = registry.commit(v0.evolve(flag_count=5), occ=False)
    assert forced.version == 2 and forced.previous_ecs_id == registry.history(v0.lineage_id)[1].ecs_id


def test_query_by_type_and_field(registry: EntityRegistry) -> None:
    reps = registry.register_many(ReputationEntity(rank=r) for r in range(4))
    registry.register(ConfigEntity(name="c"))
    registry.update(reps[2].lineage_id, lambda e: e.evolve(quarantined=True))
    assert [e.rank for e in registry.query(ReputationEntity)] == [0, 1, 2, 3]
    assert [e.rank for e in registry.query(ReputationEntity, quarantined=True)] == [2]
    assert len(registry.query(Entity)) == 5


def test_reopened_file_shows_everything(tmp_path: Path) -> None:
    with EntityRegistry.open(tmp_path) as reg:
        model = reg.register(ModelEntity(name="m", model_type="llama", vocab_size=16, hidden_size=8, num_layers=1))
        ck0 = reg.register(ModelCheckpointEntity(base_model_id=model.lineage_id, path="c0", step=0))
        ck1 = reg.register(
            ModelCheckpointEntity(
                base_model_id=model.lineage_id, path="c1", step=5, parent_checkpoint_id=ck0.lineage_id
            )
        )
        latest = reg.update(ck1.lineage_id, lambda c: c.evolve(metrics={"reward": 0.5}))
    assert (tmp_path / REGISTRY_FILENAME).exists()
    with EntityRegistry.open(tmp_path) as reg:
        assert reg.get(ck1.lineage_id) == latest
        assert reg.history(ck1.lineage_id) == [ck1, latest]
        assert reg.get(reg.get(ck1.lineage_id).parent_checkpoint_id) == ck0
        assert len(reg.query(ModelCheckpointEntity)) == 2


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.dictionaries(st.text(min_size=1, max_size=8), st.floats(allow_nan=False, allow_infinity=False), max_size=5),
    st.lists(st.text(min_size=1, max_size=10), min_size=1, max_size=6),
)
def test_sqlite_round_trip_is_equal(tmp_path: Path, criteria: dict[str, float], names: list[str]) -> None:
    path = tmp_path / f"{uuid.uuid4().hex}.sqlite"
    with EntityRegistry(path) as reg:
        v = reg.register(TrainingStageEntity(name=names[0], completion_criteria=criteria))
        written = [v]
        for n in names[1:]:
            v = reg.update(v.lineage_id, lambda e, n=n: e.evolve(name=n))
            written.append(v)
    with EntityRegistry(path) as reg:
        assert reg.history(v.lineage_id) == written
        assert reg.get(v.lineage_id) == written[-1]
        assert [e.version for e in written] == list(range(len(names)))


def test_null_registry_accepts_and_forgets() -> None:
    reg = NullRegistry()
    e = ReputationEntity(rank=0)
    assert reg.register(e) is e and reg.update(e.lineage_id, _bump) is None
    assert reg.query(ReputationEntity) == []
    with pytest.raises(EntityNotFound):
        reg.get(e.lineage_id)


# -- several processes on one file -----------------------------------------------------------------
def _increment_worker(path: str, lineage: str, n: int, barrier, conflicts) -> None:
    with EntityRegistry(path) as reg:
        reg.get(lineage)
        barrier.wait()
        for _ in range(n):
            reg.update(lineage, _bump)
        reg.register(ReputationEntity(rank=100 + os.getpid() % 1000))
        conflicts.put(reg.resolver.metrics()["conflicts"])


@pytest.mark.slow
def test_two_processes_never_lose_an_update(tmp_path: Path) -> None:
    path = tmp_path / REGISTRY_FILENAME
    with EntityRegistry(path) as reg:
        shared = reg.register(ReputationEntity(rank=0))
    ctx = mp.get_context("spawn")
    n = 500
    barrier, conflicts = ctx.Barrier(2), ctx.Queue()
    args = (str(path), str(shared.lineage_id), n, barrier, conflicts)
    procs = [ctx.Process(target=_increment_worker, args=args) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    with EntityRegistry(path) as reg:
        head = reg.get(shared.lineage_id)
        assert head.flag_count == 2 * n and head.version == 2 * n
        assert [e.version for e in reg.history(shared.lineage_id)] == list(range(2 * n + 1))
        assert len(reg.query(ReputationEntity)) == 3  # each process's own entity is visible
    assert conflicts.get(timeout=5) + conflicts.get(timeout=5) > 0  # the writers did contend


def test_stale_cache_is_refreshed_on_conflict(tmp_path: Path) -> None:
    a, b = EntityRegistry.open(tmp_path), EntityRegistry.open(tmp_path)
    e = a.register(ReputationEntity(rank=0))
    b.update(e.lineage_id, _bump)
    a.update(e.lineage_id, _bump)  # a's cached head is stale: conflict, refresh, retry
    assert b.get(e.lineage_id, fresh=True).flag_count == 2
    assert a.resolver.metrics()["conflicts"] == 1
    a.close()
    b.close()


# -- client: writes from every rank reach rank 0 ----------------------------------------------------
def test_client_applies_patches_locally(registry: EntityRegistry) -> None:
    registry.register_many(ReputationEntity(rank=r) for r in range(2))
    client = RegistryClient(registry)
    client.patch(ReputationEntity, {"rank": 1}, set={"last_step": 3}, add={"flag_count": 1})
    client.patch(ReputationEntity, {"rank": 9}, add={"flag_count": 1})
    report = client.sync()
    assert [(e.rank, e.flag_count, e.last_step) for e in report.applied] == [(1, 1, 3)]
    assert len(report.rejected) == 1 and "0 ReputationEntity match" in report.rejected[0][1]


def _client_worker(rank: int, world: int, store: str, path: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    reg = EntityRegistry(path) if rank == 0 else None
    if reg is not None:
        reg.register_many(ReputationEntity(rank=r) for r in range(world))
    client = RegistryClient(reg)
    for step in range(3):
        client.patch(ReputationEntity, {"rank": rank}, set={"last_step": step}, add={"clean_count": 1})
        report = client.sync()
        assert not report.rejected
    if reg is not None:
        reg.close()
    dist.destroy_process_group()


@pytest.mark.slow
def test_client_gathers_writes_from_all_ranks(tmp_path: Path) -> None:
    import torch.multiprocessing as tmp

    path = tmp_path / REGISTRY_FILENAME
    tmp.spawn(_client_worker, args=(2, str(tmp_path / "pg_store"), str(path)), nprocs=2, join=True)
    with EntityRegistry(path) as reg:
        reps = reg.query(ReputationEntity)
        assert [(e.rank, e.clean_count, e.last_step, e.version) for e in reps] == [(0, 3, 2, 3), (1, 3, 2, 3)]


# -- write-behind -------------------------------------------------------------------------------------
def test_write_behind_versions_in_memory_and_persists_on_flush(tmp_path: Path) -> None:
    path = tmp_path / REGISTRY_FILENAME
    reg = EntityRegistry(path, write_behind=True, flush_interval_s=60)
    e = reg.register(ReputationEntity(rank=0))
    for _ in range(5):
        head = reg.update(e.lineage_id, _bump)
    assert head.version == 5 and reg.get(e.lineage_id) is head
    assert [v.version for v in reg.history(e.lineage_id)] == list(range(6))  # reads flush first
    with pytest.raises(EntityExists):
        reg.register(e)
    reg.update(e.lineage_id, _bump)
    with EntityRegistry(path) as other:
        assert other.get(e.lineage_id).version == 5  # the last update is still pending
        reg.flush()
        assert other.get(e.lineage_id, fresh=True).version == 6
    reg.close()


def test_write_behind_clash_with_another_writer_is_reported(tmp_path: Path) -> None:
    path = tmp_path / REGISTRY_FILENAME
    with EntityRegistry(path) as first:
        e = first.register(ReputationEntity(rank=0))
    behind = EntityRegistry(path, write_behind=True, flush_interval_s=60)
    behind.update(e.lineage_id, _bump)
    with EntityRegistry(path) as through:
        through.update(e.lineage_id, _bump)  # writes version 1 first
    with pytest.raises(RegistryWriteError, match="refused"):
        behind.flush()
    behind.close()
    with EntityRegistry(path) as reg:
        assert [v.version for v in reg.history(e.lineage_id)] == [0, 1]
