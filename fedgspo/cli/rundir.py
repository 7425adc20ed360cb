"""Reading run directories: status, metrics, events, reputation history and checkpoint lineage.

Everything here only reads. A run directory is any directory holding ``config.yaml``,
``metrics.jsonl`` or ``summary.json`` (rank 0 writes them); a pipeline directory holds one run
directory per stage and the shared ``registry.sqlite``. The registry of a run is
``<run>/registry.sqlite`` or, for a pipeline stage or a run with
``bookkeeping.registry_path``, the shared file; without one (``bookkeeping.enabled=false``)
status, reputation and lineage fall back to ``summary.json``, ``events.jsonl`` and the
checkpoint manifests.

Failure behaviour: :class:`RunDirError` (one line) for a path that is missing or not a run
directory. Files being written while they are read are fine: a torn last JSON line is
skipped, and unreadable optional files (registry, audit log) count as absent.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from fedgspo.integrity.audit import AUDIT_FILE
from fedgspo.bookkeeping import EVENTS_FILENAME
from fedgspo.checkpoint import CHECKPOINTS, MANIFEST, sha256_file
from fedgspo.entities import (
    AIPipelineEntity,
    GSPOTrainingRunEntity,
    ModelCheckpointEntity,
    ModelLineageEntity,
    ReputationEntity,
    TrainingStageEntity,
)
from fedgspo.entities.registry import REGISTRY_FILENAME, EntityRegistry
from fedgspo.entities.tree import EdgeType, build_model_lineage_tree
from fedgspo.telemetry.metrics import read_metrics
from fedgspo import runfiles

RUN_MARKERS = runfiles.RUN_MARKERS
STALE_AFTER_S = 300.0


class RunDirError(ValueError):
    """The path is missing or not a run directory."""


# -- files -----------------------------------------------------------------------------------------

def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / m).exists() for m in RUN_MARKERS)


def require_run_dir(path: Path) -> Path:
    """``path`` if it is a run directory, else :class:`RunDirError`."""
    if not path.exists():
        raise RunDirError(f"{path}: no such directory")
    if not is_run_dir(path):
        raise RunDirError(f"{path}: not a run directory (no {', '.join(RUN_MARKERS)})")
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every complete JSON object of a JSON-lines file (torn or bad lines skipped; no file: [])."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """``summary.json`` (written when a run completes), or ``None``."""
    return _read_json(runfiles.RunFiles(run_dir).summary)


def read_config(run_dir: Path) -> dict[str, Any]:
    """The resolved ``config.yaml`` as a dict (``{}`` if absent or unreadable)."""
    try:
        return yaml.safe_load(runfiles.RunFiles(run_dir).config.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Step records of ``metrics.jsonl``, one per step (the last record of a step wins, so a
    resumed run's repeated steps count once), in step order."""
    if not runfiles.RunFiles(run_dir).metrics.exists():
        return []
    by_step = {r["step"]: r for r in read_metrics(run_dir) if isinstance(r.get("step"), int)}
    return [by_step[s] for s in sorted(by_step)]


def audit_records(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    """Records of ``audit.jsonl`` of one ``kind`` (e.g. ``run_start``)."""
    return [r for r in read_jsonl(run_dir / AUDIT_FILE) if r.get("kind") == kind]


# -- registry --------------------------------------------------------------------------------------

def registry_path(run_dir: Path) -> Path | None:
    """The registry holding this run's entities: its own, the configured shared file or the
    pipeline's (in the parent directory); ``None`` if there is none."""
    configured = read_config(run_dir).get("bookkeeping", {}).get("registry_path")
    candidates = [run_dir / REGISTRY_FILENAME, *([Path(configured)] if configured else []),
                  run_dir.parent / REGISTRY_FILENAME]
    return next((p for p in candidates if p.is_file()), None)


@contextmanager
def open_registry(run_dir: Path) -> Iterator[EntityRegistry | None]:
    """The run's registry, closed on exit; ``None`` if there is none or it cannot be opened."""
    path = registry_path(run_dir)
    try:
        registry = EntityRegistry(path) if path else None
    except sqlite3.Error:
        registry = None
    try:
        yield registry
    finally:
        if registry is not None:
            registry.close()


def find_run(registry: EntityRegistry | None, run_dir: Path) -> GSPOTrainingRunEntity | None:
    """The latest run entity named like the run directory."""
    if registry is None:
        return None
    runs = [r for r in registry.query(GSPOTrainingRunEntity) if r.name == run_dir.name]
    return runs[-1] if runs else None


# -- status ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunInfo:
    """One run at a glance. ``status``: running, completed, failed, crashed (marked running
    but nothing written for ``stale_after_s``) or unknown."""

    path: Path
    status: str
    steps: int
    total_steps: int | None
    last_reward: float | None
    started: datetime | None
    world_size: int | None

    @property
    def name(self) -> str:
        return self.path.name


def _last_write(run_dir: Path) -> float:
    return max((p.stat().st_mtime for p in (run_dir / n for n in (*RUN_MARKERS, EVENTS_FILENAME)) if p.exists()),
               default=0.0)


def _started(run_dir: Path) -> datetime | None:
    starts = audit_records(run_dir, "run_start")
    if starts:
        return datetime.fromtimestamp(starts[0]["time"], timezone.utc)
    config = runfiles.RunFiles(run_dir).config
    return datetime.fromtimestamp(config.stat().st_mtime, timezone.utc) if config.exists() else None


def run_info(run_dir: Path, *, stale_after_s: float = STALE_AFTER_S) -> RunInfo:
    """Status, progress and start time of the run in ``run_dir`` (:class:`RunDirError` if it is none)."""
    require_run_dir(run_dir)
    summary = read_summary(run_dir)
    records = metrics(run_dir)
    with open_registry(run_dir) as registry:
        run = find_run(registry, run_dir)
    status = run.status if run else ("completed" if summary else "running" if records else "unknown")
    if status == "completed" and records and summary and summary.get("steps", 0) < records[-1]["step"] + 1:
        status = "running"  # resumed after it completed once
    if status == "running" and time.time() - _last_write(run_dir) > stale_after_s:
        status = "crashed"
    steps = records[-1]["step"] + 1 if records else (run.step if run else 0)
    total = run.total_steps if run else read_config(run_dir).get("train", {}).get("max_steps")
    reward = records[-1].get("reward_mean") if records else None
    world = summary.get("world_size") if summary else (run.world_size if run else None)
    return RunInfo(run_dir, status, steps, total, reward, _started(run_dir), world)


def list_runs(root: Path, *, stale_after_s: float = STALE_AFTER_S) -> list[RunInfo]:
    """Every run directory under ``root`` (one level, and the stages of pipeline directories),
    oldest first; :class:`RunDirError` if ``root`` is not a directory."""
    if not root.is_dir():
        raise RunDirError(f"{root}: no such directory")
    found = []
    for child in sorted(p for p in root.iterdir() if p.is_dir()):
        if is_run_dir(child):
            found.append(child)
        else:
            found.extend(sorted(p for p in child.iterdir() if is_run_dir(p)))
    infos = [run_info(p, stale_after_s=stale_after_s) for p in found]
    epoch = datetime.fromtimestamp(0, timezone.utc)
    return sorted(infos, key=lambda i: i.started or epoch)


# -- events ----------------------------------------------------------------------------------------

def _wanted(record: dict[str, Any], kinds: list[str] | None) -> bool:
    return not kinds or str(record.get("type", "")).lower() in {k.lower() for k in kinds}


def read_events(run_dir: Path, kinds: list[str] | None = None) -> list[dict[str, Any]]:
    """Events of ``events.jsonl`` in order, only those whose ``type`` is in ``kinds`` if given."""
    return [r for r in read_jsonl(run_dir / EVENTS_FILENAME) if _wanted(r, kinds)]


def follow_events(run_dir: Path, kinds: list[str] | None = None, *, poll_s: float = 0.5,
                  max_seconds: float | None = None) -> Iterator[dict[str, Any]]:
    """Like ``tail -f``: every event already written, then each new one as it is appended,
    until ``max_seconds`` have passed (forever if ``None``; stop by closing the generator).
    A file that does not exist yet is waited for."""
    deadline = None if max_seconds is None else time.monotonic() + max_seconds
    path, offset, partial = run_dir / EVENTS_FILENAME, 0, ""
    while True:
        if path.exists():
            with path.open() as f:
                f.seek(offset)
                chunk = f.read()
                offset = f.tell()
            *lines, partial = (partial + chunk).split("\n")
            for line in lines:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if _wanted(record, kinds):
                    yield record
        if deadline is not None and time.monotonic() >= deadline:
            return
        time.sleep(poll_s if deadline is None else max(0.0, min(poll_s, deadline - time.monotonic())))


# -- reputation ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ReputationPoint:
    """Trust in one rank from ``step`` on."""

    rank: int
    step: int
    trust: float
    flags: int
    quarantined: bool


def reputation_history(run_dir: Path) -> dict[int, list[ReputationPoint]]:
    """Per rank, its trust, flag count and quarantine state each time they changed: the
    versions of the run's ``ReputationEntity`` lineages, or (no registry) the
    ``ReputationChanged`` and ``ByzantineRankFlagged`` events."""
    with open_registry(run_dir) as registry:
        run = find_run(registry, run_dir)
        if registry is not None and run is not None:
            return {rep.rank: [ReputationPoint(v.rank, v.last_step or 0, v.trust_score, v.flag_count, v.quarantined)
                               for v in registry.history(rep.lineage_id)]
                    for rep in sorted(registry.query(ReputationEntity, run_id=run.lineage_id), key=lambda r: r.rank)}
    history: dict[int, list[ReputationPoint]] = {}
    flags: dict[int, int] = {}
    for event in read_events(run_dir, ["ByzantineRankFlagged", "ReputationChanged"]):
        if event["type"] == "ByzantineRankFlagged":
            flags[event["flagged_rank"]] = flags.get(event["flagged_rank"], 0) + 1
            continue
        rank = event["subject_rank"]
        history.setdefault(rank, []).append(ReputationPoint(
            rank, event.get("step") or 0, event["new_trust"], flags.get(rank, 0), event["quarantined"]))
    return dict(sorted(history.items()))


def final_reputation(run_dir: Path) -> list[dict[str, Any]]:
    """Each rank's final state: ``summary.json``'s reputations of a completed run, else the
    last point of :func:`reputation_history` (keys: rank, trust, flags, quarantined, steps or step)."""
    summary = read_summary(run_dir)
    if summary and summary.get("reputation"):
        return summary["reputation"]
    return [{"rank": r, "trust": p[-1].trust, "flags": p[-1].flags, "quarantined": p[-1].quarantined,
             "step": p[-1].step} for r, p in reputation_history(run_dir).items()]


# -- checkpoint lineage ----------------------------------------------------------------------------

@dataclass(frozen=True)
class LineageNode:
    """A checkpoint, the checkpoint a run started from (``origin``) or a pipeline ``stage``."""

    id: str
    kind: str
    label: str
    detail: str = ""
    present: bool = True
    current: bool = False


@dataclass
class Lineage:
    """Nodes and labelled edges ``(src, dst, label)``, parents before children."""

    title: str
    nodes: dict[str, LineageNode] = field(default_factory=dict)
    edges: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, node: LineageNode) -> None:
        self.nodes.setdefault(node.id, node)

    def children(self, node_id: str) -> list[tuple[str, str]]:
        return [(dst, label) for src, dst, label in self.edges if src == node_id]

    def roots(self) -> list[str]:
        targets = {dst for _, dst, _ in self.edges}
        return [n for n in self.nodes if n not in targets]


def _on_disk(path: Path, expected_hash: str | None) -> bool:
    """The checkpoint at ``path`` is still the one registered with ``expected_hash`` (the
    manifest's sha256, or the weights hash for ``final``)."""
    manifest = _read_json(path / MANIFEST)
    if manifest is None:
        return False
    return expected_hash in (None, manifest.get("weights_sha256")) or sha256_file(path / MANIFEST) == expected_hash


def _checkpoint_node(ck_id: str, path: Path, step: int, reward: float | None, present: bool) -> LineageNode:
    detail = f"step {step}" + (f", reward {reward:.3f}" if reward is not None else "")
    return LineageNode(ck_id, "checkpoint", path.name, detail + ("" if present else ", gone"), present)


def _registry_checkpoints(lineage: Lineage, registry: EntityRegistry, run: GSPOTrainingRunEntity,
                          resumes: list[float]) -> None:
    """The checkpoints of the run's ``ModelLineageEntity`` with the parent edges of
    :func:`~fedgspo.entities.tree.build_model_lineage_tree`; a registry written before model
    lineages existed has none, and then every checkpoint of the model is listed."""
    checkpoints = registry.query(ModelCheckpointEntity, base_model_id=run.policy_model_id)
    found = registry.query(ModelLineageEntity, root_model_id=run.policy_model_id)
    model_lineage = found[-1] if found else ModelLineageEntity(
        root_model_id=run.policy_model_id, checkpoint_ids=[c.lineage_id for c in checkpoints])
    tree = build_model_lineage_tree(model_lineage, checkpoints)
    by_id = {c.lineage_id: c for c in checkpoints}
    for ck_id in model_lineage.checkpoint_ids:
        ck = by_id[ck_id]
        present = not ck.pruned and _on_disk(Path(ck.path), ck.checkpoint_hash)
        lineage.add(_checkpoint_node(str(ck_id), Path(ck.path), ck.step, ck.metrics.get("reward_mean"), present))
    created = {c.lineage_id: c.created_at.timestamp() for c in checkpoints}
    for parent, child in tree.edges(EdgeType.LINEAGE):
        resumed = any(created[parent] < t < created[child] for t in resumes)
        lineage.edges.append((str(parent), str(child), "resumed" if resumed else ""))


def checkpoints_on_disk(run_dir: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Every checkpoint directory of the run with its manifest, by name (``final`` last)."""
    root = run_dir / CHECKPOINTS
    found = [p for p in root.iterdir() if (p / MANIFEST).exists()] if root.is_dir() else []
    dirs = sorted(found, key=lambda p: (p.name == runfiles.FINAL_CHECKPOINT, p.name))
    return [(d, _read_json(d / MANIFEST) or {}) for d in dirs]


def _manifest_checkpoints(lineage: Lineage, run_dir: Path) -> None:
    by_step: dict[int, str] = {}
    for d, manifest in checkpoints_on_disk(run_dir):
        lineage.add(_checkpoint_node(str(d), d, manifest.get("step", 0), None, True))
        parent = manifest.get("parent")
        if parent:
            lineage.add(_checkpoint_node(parent["path"], Path(parent["path"]), parent.get("step", 0), None,
                                         Path(parent["path"]).exists()))
            lineage.edges.append((parent["path"], str(d), ""))
        if d.name != runfiles.FINAL_CHECKPOINT:
            by_step[manifest.get("step", 0)] = str(d)
        elif not parent and by_step.get(manifest.get("step", -1)):  # final's manifest names no parent
            lineage.edges.append((by_step[manifest["step"]], str(d), ""))


def _pipeline(lineage: Lineage, registry: EntityRegistry, run_dir: Path) -> None:
    for pipeline in registry.query(AIPipelineEntity):
        stages = [registry.get(s) for s in pipeline.stage_ids]
        if not any(isinstance(s, TrainingStageEntity) and s.name == run_dir.name for s in stages):
            continue
        lineage.title = f"pipeline {pipeline.name}, stage {run_dir.name}"
        for s in stages:
            lineage.add(LineageNode(f"stage:{s.lineage_id}", "stage", f"stage {s.name}", s.status,
                                    current=s.name == run_dir.name))
        for s in stages:
            lineage.edges.extend((f"stage:{d}", f"stage:{s.lineage_id}", "then") for d in s.depends_on)
        return


def checkpoint_lineage(run_dir: Path) -> Lineage:
    """The run's checkpoints as a tree (each the child of the one it descends from, across
    resumes: an edge is ``resumed`` when a restart happened between parent and child), rooted
    at the checkpoint the run started from (``model.path``) if any, and the pipeline's stages
    when the run is a pipeline stage. From the registry; from the manifests without one."""
    require_run_dir(run_dir)
    lineage = Lineage(title=f"run {run_dir.name}")
    resumes = [r["time"] for r in audit_records(run_dir, "run_start") if r.get("payload", {}).get("first_step")]
    with open_registry(run_dir) as registry:
        run = find_run(registry, run_dir)
        if registry is not None and run is not None:
            _pipeline(lineage, registry, run_dir)
            _registry_checkpoints(lineage, registry, run, resumes)
        else:
            _manifest_checkpoints(lineage, run_dir)
    origin = read_config(run_dir).get("model", {}).get("path")
    if origin:
        roots = [n for n in lineage.roots() if lineage.nodes[n].kind == "checkpoint"]
        path = Path(origin)
        lineage.add(LineageNode(f"origin:{origin}", "origin", f"{path.parent.parent.name}/{path.name}",
                                f"started from {origin}", path.exists()))
        lineage.edges.extend((f"origin:{origin}", r, "starts") for r in roots)
        stages = [n for n in lineage.nodes.values() if n.kind == "stage" and n.label == f"stage {path.parent.parent.name}"]
        lineage.edges.extend((s.id, f"origin:{origin}", "final") for s in stages)
    return lineage
