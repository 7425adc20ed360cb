"""Micro-benchmarks of the bookkeeping layer: entities, registry, events, tree, memory.

Usage::

    python benchmarks/entities.py [--quick] [--out benchmarks/results/entities.json]

Prints a table (median of several repeats, per operation) and writes it, with machine info and
library versions, as JSON. Targets come from the design issue; timings are reported, not
asserted. The registry is measured on a SQLite file in a temporary run directory (the
default embedded setup; write-through and write-behind) and in memory;
``NullRegistry``/``NullEventBus`` show the cost with bookkeeping switched off.

Also, each with its ratio to a baseline measured in the same run:

* events with a user hook attached: the run's bus forwarding to a second bus where a
  ``@on``-style handler runs (what ``@fedgspo.on`` gets), against the bus with no hook;
* registry updates of one entity from 4 threads at once, against one thread;
* building the tree of a 10k-checkpoint lineage (``EntityTree.from_entities``);
* memory: RSS of a process that makes 1000 ``Recorder.publish`` calls of a step-sized record
  (4 ranks) and flushes, with bookkeeping on against off (each in a fresh process).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info  # noqa: E402

from fedgspo.entities import (
    Entity,
    EntityRegistry,
    EntityTree,
    ModelCheckpointEntity,
    ModelEntity,
    NullRegistry,
    ReputationEntity,
)
from fedgspo.entities.events import Event, EventBus, NullEventBus, StepCompleted


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


def bench_hooks(n: int, repeats: int) -> dict[str, float]:
    """Emit on a run's bus with and without a user hook behind it (forwarded to a second bus,
    as the trainer does for ``@fedgspo.on`` handlers), interleaved over repeats."""
    plain, run_bus, hooks = EventBus(max_queue=1 << 22), EventBus(max_queue=1 << 22), EventBus(max_queue=1 << 22)
    seen = [0]

    def user_hook(event: StepCompleted) -> None:
        seen[0] += 1

    run_bus.subscribe(Event, hooks.emit)
    hooks.subscribe(StepCompleted, user_hook)
    events = [StepCompleted(step=i, loss=0.1, metrics={f"m{k}": 0.5 for k in range(40)}) for i in range(n)]
    emit_plain, emit_hooked, end_to_end = [], [], []
    for _ in range(repeats):
        for bus, out in ((plain, emit_plain), (run_bus, emit_hooked)):
            t0 = time.perf_counter()
            for ev in events:
                bus.emit(ev)
            out.append((time.perf_counter() - t0) / n * 1e6)
            bus.flush()
        hooks.flush()
        t0 = time.perf_counter()
        for ev in events:
            run_bus.emit(ev)
        run_bus.flush()
        hooks.flush()
        end_to_end.append((time.perf_counter() - t0) / n * 1e6)
    assert seen[0] == 2 * n * repeats
    for bus in (plain, run_bus, hooks):
        bus.close()
    return {"emit, no hook": statistics.median(emit_plain),
            "emit, user hook attached": statistics.median(emit_hooked),
            "emit -> user hook ran, end to end": statistics.median(end_to_end)}


def bench_contention(n: int, repeats: int, threads: int = 4) -> tuple[dict[str, float], dict[str, int]]:
    """Updates of one entity through the conflict resolver from ``threads`` threads at once
    (wall time per update) against one thread; the resolver's conflict counters."""
    reg = EntityRegistry(None)
    lineage = reg.register(ReputationEntity(rank=0)).lineage_id

    def update(k: int) -> None:
        for _ in range(k):
            reg.update(lineage, lambda e: e.evolve(flag_count=e.flag_count + 1))

    def contended(k: int) -> None:
        workers = [threading.Thread(target=update, args=(k // threads,)) for _ in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    single, many = [], []
    for _ in range(repeats):
        single.append(per_op_us(update, n, 1))
        many.append(per_op_us(contended, n - n % threads, 1))
    expected = repeats * (n + n - n % threads)
    metrics = reg.resolver.metrics()
    assert reg.get(lineage).flag_count == expected, "lost update under contention"
    reg.close()
    return ({"update, 1 thread": statistics.median(single),
             f"update, {threads} threads on one entity": statistics.median(many)},
            {k: metrics[k] for k in ("commits", "conflicts", "retries", "rejections")})


def bench_lineage_tree(nodes: int, repeats: int) -> dict[str, float]:
    """``EntityTree.from_entities`` over a chain of ``nodes`` checkpoints (each the parent of
    the next), in microseconds per build."""
    model = ModelEntity(name="policy", model_type="tiny", vocab_size=16, hidden_size=8, num_layers=1)
    chain: list[Entity] = [model]
    parent = None
    for step in range(nodes):
        ck = ModelCheckpointEntity(base_model_id=model.lineage_id, path=f"checkpoints/step_{step:08d}", step=step,
                                   parent_checkpoint_id=parent)
        chain.append(ck)
        parent = ck.lineage_id
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        tree = EntityTree.from_entities(chain)
        samples.append((time.perf_counter() - t0) * 1e6)
    assert len(tree) == nodes + 1
    return {f"{nodes // 1000}k-checkpoint lineage tree build": statistics.median(samples)}


def memory_child(mode: str, steps: int) -> None:
    """In a fresh process: a Recorder (bookkeeping ``mode`` on/off), ``steps`` publishes of a
    step-sized record, flush; prints RSS before and after and the publish time as JSON."""
    from types import SimpleNamespace

    from fedgspo.config import load_config
    from fedgspo.factory import EntityFactory
    from fedgspo.recorder import Recorder
    from fedgspo.robust.reputation import RankReputation
    from fedgspo.runfiles import RunFiles
    from fedgspo.telemetry.metrics import MetricsLogger
    from fedgspo.telemetry.resources import rss_bytes

    world = 4
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, ["run.tensorboard=false", f"bookkeeping.enabled={mode == 'on'}"])
        files = RunFiles(Path(tmp) / "run")
        files.root.mkdir()
        recorder = Recorder(cfg, files, MetricsLogger(files.root, tensorboard=False), None)
        hf = SimpleNamespace(model_type="tiny", vocab_size=16, hidden_size=8, num_hidden_layers=1)
        recorder.bind(EntityFactory(cfg, "run").inputs(hf, "0" * 64, {"name": "digits/x", "source": "synthetic"}))
        recorder.start(first_step=0, world_size=world, participants=[f"p{r}" for r in range(world)],
                       weights_sha256="0" * 64, rule="median", f=1, resumed_from=None)
        recorder.flush()
        reps = [RankReputation(rank=r) for r in range(world)]
        before = rss_bytes()
        t0 = time.perf_counter()
        for step in range(steps):
            reps[3].trust, reps[3].flags, reps[3].steps = 0.9 ** (step % 7), step // 2, step
            record = {"step": step, **{f"figure_{k}": 0.5 + step for k in range(36)}, "flagged": [3] * (step % 2),
                      "rank_trust": [r.trust for r in reps], "rank_z_score": [0.1, 0.2, 0.1, 3.5]}
            recorder.publish(record, record["rank_z_score"], reps)
        publish_s = time.perf_counter() - t0
        recorder.flush()
        total_s = time.perf_counter() - t0
        after = rss_bytes()
        recorder.close()
    print(json.dumps({"rss_before": before, "rss_after": after, "publish_us": publish_s / steps * 1e6,
                      "until_written_us": total_s / steps * 1e6}))


def bench_memory(steps: int) -> dict[str, dict[str, float]]:
    """:func:`memory_child` with bookkeeping on and off, each in its own process."""
    out = {}
    for mode in ("off", "on"):
        proc = subprocess.run([sys.executable, __file__, "--memory-child", mode, "--steps", str(steps)],
                              capture_output=True, text=True, check=True)
        out[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


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
    parser.add_argument("--memory-child", choices=("on", "off"), help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=1000, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args.steps)
        return
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
    hooks = bench_hooks(4 * n, repeats)
    add("events with a user hook", hooks)
    contention, resolver = bench_contention(n, repeats)
    add("registry under contention", contention)
    add("tree", bench_lineage_tree(10_000, repeats))
    memory = bench_memory(1000)
    rss = {mode: (m["rss_after"] - m["rss_before"]) / 2**20 for mode, m in memory.items()}
    add("recorder.publish (bookkeeping off)", {"publish, caller's thread": memory["off"]["publish_us"],
                                               "publish until written": memory["off"]["until_written_us"]})
    add("recorder.publish (bookkeeping on)", {"publish, caller's thread": memory["on"]["publish_us"],
                                              "publish until written": memory["on"]["until_written_us"]})
    ratios = {
        "emit with a user hook / without": hooks["emit, user hook attached"] / hooks["emit, no hook"],
        "update with 4 threads / 1 thread": (contention["update, 4 threads on one entity"]
                                             / contention["update, 1 thread"]),
        "publish on / off (caller's thread)": memory["on"]["publish_us"] / memory["off"]["publish_us"],
        "publish on / off (until written)": memory["on"]["until_written_us"] / memory["off"]["until_written_us"],
        "RSS after 1000 publishes, on / off": memory["on"]["rss_after"] / memory["off"]["rss_after"],
    }

    events_row = next(r for r in rows if r["name"] == "emit + dispatch, end to end")
    events_per_s = 1e6 / float(events_row["us_per_op"])  # type: ignore[arg-type]

    print(f"{'section':<30} {'operation':<36} {'us/op':>10} {'target':>10}  ok")
    for r in rows:
        target = "" if r["target_us"] is None else f"<= {r['target_us']:g}"
        ok = {True: "yes", False: "NO", None: ""}[r["meets_target"]]  # type: ignore[index]
        print(f"{r['section']:<30} {r['name']:<36} {r['us_per_op']:>10.2f} {target:>10}  {ok}")
    print(f"events per second (emit + dispatch, one handler): {events_per_s:,.0f} (target >= 100,000)")
    print(f"registry under contention (resolver counters): {resolver}")
    print(f"RSS growth over 1000 publishes: bookkeeping off {rss['off']:.1f} MiB, on {rss['on']:.1f} MiB "
          f"(RSS after: off {memory['off']['rss_after'] / 2**20:.0f} MiB, on {memory['on']['rss_after'] / 2**20:.0f} MiB)")
    print(f"{'ratio (same run)':<48} {'value':>8}")
    for name, value in ratios.items():
        print(f"{name:<48} {value:>8.2f}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine_info(), "n": n, "repeats": repeats,
                                    "events_per_second": events_per_s, "results": rows, "ratios": ratios,
                                    "registry_contention": resolver, "memory": memory,
                                    "rss_growth_mib": rss}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
