"""Micro-benchmarks of the bookkeeping layer: entities, registry, events, tree.

Usage::

    python benchmarks/entities.py [--quick] [--out benchmarks/results/entities.json]

Prints a table (median of several repeats, per operation) and writes it, with machine info and
library versions, as JSON. Targets come from the design issue; timings are reported, not
asserted. The registry is measured on a SQLite file in a temporary run directory (the
default embedded setup; write-through and write-behind) and in memory;
``NullRegistry``/``NullEventBus`` show the cost with bookkeeping switched off.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info  # noqa: E402

from fedgspo.entities import EntityRegistry, EntityTree, NullRegistry, ReputationEntity
from fedgspo.entities.events import EventBus, NullEventBus, StepCompleted


def per_op_us(fn: Callable[[int], None], n: int, repeats: int) -> float:
    """Median over ``repeats`` of the time per operation of ``fn(n)`` (which does n operations)."""
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(n)
        samples.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(samples)


def bench_registry(path: Path | None, n: int, repeats: int, write_behind: bool = False) -> dict[str, float]:
    reg = EntityRegistry(path, write_behind=write_behind)
    head = reg.register(ReputationEntity(rank=0))
    lineage, ecs_id = head.lineage_id, head.ecs_id

    def register(k: int) -> None:
        for i in range(k):
            reg.register(ReputationEntity(rank=i))

    def update(k: int) -> None:
        for _ in range(k):
            reg.update(lineage, lambda e: e.evolve(flag_count=e.flag_count + 1))

    def commit(k: int) -> None:
        for _ in range(k):
            cur = reg.get(lineage)
            reg.commit(cur.evolve(clean_count=cur.clean_count + 1))

    def get_lineage(k: int) -> None:
        get = reg.get
        for _ in range(k):
            get(lineage)

    def get_version(k: int) -> None:
        get = reg.get
        for _ in range(k):
            get(ecs_id)

    out = {
        "create+register": per_op_us(register, n, repeats),
        "update (resolver, pre-ECS + OCC)": per_op_us(update, n, repeats),
        "evolve + commit": per_op_us(commit, n, repeats),
        "cached get(lineage_id)": per_op_us(get_lineage, 100 * n, repeats),
        "cached get(ecs_id)": per_op_us(get_version, 100 * n, repeats),
    }
    t0 = time.perf_counter()
    reg.close()  # includes the final flush of write-behind rows
    out["close (flush + WAL checkpoint)"] = (time.perf_counter() - t0) * 1e6
    return out


def bench_entities(n: int, repeats: int) -> dict[str, float]:
    rep = ReputationEntity(rank=0)

    def create(k: int) -> None:
        for i in range(k):
            ReputationEntity(rank=i)

    def evolve(k: int) -> None:
        for i in range(k):
            rep.evolve(flag_count=i)

    null = NullRegistry()

    def null_update(k: int) -> None:
        for _ in range(k):
            null.update(rep.lineage_id, lambda e: e)

    return {
        "entity create": per_op_us(create, n, repeats),
        "entity evolve": per_op_us(evolve, n, repeats),
        "NullRegistry.update": per_op_us(null_update, n, repeats),
    }


def bench_events(n: int, repeats: int) -> dict[str, float]:
    bus = EventBus(max_queue=1 << 22, history_size=10000)
    seen = [0]

    def handler(event: StepCompleted) -> None:
        seen[0] += 1

    bus.subscribe(StepCompleted, handler)
    prebuilt = [StepCompleted(step=i, loss=0.1) for i in range(n)]

    def emit(k: int) -> None:
        e = bus.emit
        for ev in prebuilt[:k]:
            e(ev)
        bus.flush()

    def emit_only(k: int) -> None:
        e = bus.emit
        for ev in prebuilt[:k]:
            e(ev)

    def build_and_emit(k: int) -> None:
        e = bus.emit
        for i in range(k):
            e(StepCompleted(step=i, loss=0.1))

    null = NullEventBus()

    def null_emit(k: int) -> None:
        for ev in prebuilt[:k]:
            null.emit(ev)

    out = {"emit (hot path, one handler)": per_op_us(emit_only, n, repeats)}
    bus.flush()
    out["build event + emit"] = per_op_us(build_and_emit, n, repeats)
    bus.flush()
    out["emit + dispatch, end to end"] = per_op_us(emit, n, repeats)
    out["NullEventBus.emit"] = per_op_us(null_emit, n, repeats)
    bus.close()
    return out


def bench_tree(nodes: int, repeats: int) -> dict[str, float]:
    rng = random.Random(0)
    tree = EntityTree()
    tree.add_node(0)
    for i in range(1, nodes):
        tree.add_child(rng.randrange(i), i)
    samples_bfs, samples_dfs = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        visited = tree.walk(0)
        samples_bfs.append((time.perf_counter() - t0) * 1e6)
        t0 = time.perf_counter()
        tree.walk(0, depth_first=True)
        samples_dfs.append((time.perf_counter() - t0) * 1e6)
    assert len(visited) == nodes
    return {
        f"{nodes // 1000}k-node tree walk (BFS)": statistics.median(samples_bfs),
        f"{nodes // 1000}k-node tree walk (DFS)": statistics.median(samples_dfs),
    }


# name -> (target in microseconds, True if the target is an upper bound)
TARGETS = {
    "entity create": 100.0,
    "create+register": 100.0,
    "update (resolver, pre-ECS + OCC)": 100.0,
    "evolve + commit": 100.0,
    "cached get(lineage_id)": 2.0,
    "cached get(ecs_id)": 2.0,
    "emit (hot path, one handler)": 20.0,
    "build event + emit": 20.0,
    "emit + dispatch, end to end": 10.0,  # = 100k events/s
    "10k-node tree walk (BFS)": 10_000.0,
    "10k-node tree walk (DFS)": 10_000.0,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "entities.json")
    args = parser.parse_args()
    n, repeats = (500, 3) if args.quick else (3000, 5)

    rows: list[dict[str, object]] = []

    def add(section: str, results: dict[str, float]) -> None:
        for name, us in results.items():
            target = TARGETS.get(name)
            rows.append({"section": section, "name": name, "us_per_op": round(us, 3), "target_us": target,
                         "meets_target": None if target is None else us <= target})

    add("entities", bench_entities(n, repeats))
    with tempfile.TemporaryDirectory() as run_dir:
        add("registry (file, write-through)", bench_registry(Path(run_dir) / "registry.sqlite", n, repeats))
        add("registry (file, write-behind)", bench_registry(Path(run_dir) / "wb.sqlite", n, repeats, True))
    add("registry (in memory)", bench_registry(None, n, repeats))
    add("events", bench_events(20 * n, repeats))
    add("tree", bench_tree(10_000, 5 * repeats))

    events_row = next(r for r in rows if r["name"] == "emit + dispatch, end to end")
    events_per_s = 1e6 / float(events_row["us_per_op"])  # type: ignore[arg-type]

    print(f"{'section':<30} {'operation':<36} {'us/op':>10} {'target':>10}  ok")
    for r in rows:
        target = "" if r["target_us"] is None else f"<= {r['target_us']:g}"
        ok = {True: "yes", False: "NO", None: ""}[r["meets_target"]]  # type: ignore[index]
        print(f"{r['section']:<30} {r['name']:<36} {r['us_per_op']:>10.2f} {target:>10}  {ok}")
    print(f"events per second (emit + dispatch, one handler): {events_per_s:,.0f} (target >= 100,000)")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine_info(), "n": n, "repeats": repeats,
                                    "events_per_second": events_per_s, "results": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
