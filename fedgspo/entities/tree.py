"""EntityTree: typed edges between entity lineages, traversal and dependency resolution.

Nodes are ``lineage_id`` values (or any hashable id). Edges are directed and typed:

* ``HIERARCHICAL`` parent -> child (a pipeline owns its stages, a run owns its checkpoints);
* ``REFERENCE`` user -> used (a run references its config);
* ``LINEAGE`` ancestor -> descendant (checkpoint -> next checkpoint, model -> fine-tune);
* ``DEPENDENCY`` dependent -> dependency (a stage depends on an earlier stage).

Removing a node removes its edges and, recursively, every hierarchical child left without a
hierarchical parent, so no node is ever orphaned by a removal.

Failure behaviour: an edge to an unknown node raises :class:`KeyError`; dependency resolution
raises :class:`DependencyCycleError` (naming a cycle) or :class:`MissingDependencyError` (naming
the dependents and missing ids); the tree is unchanged when an error is raised.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterable, Iterator, Sequence
from enum import Enum
from typing import TypeVar

from fedgspo.entities.ai import (
    AIPipelineEntity,
    ModelCheckpointEntity,
    ModelLineageEntity,
    TrainingRunEntity,
    TrainingStageEntity,
)
from fedgspo.entities.base import Entity

Node = Hashable
S = TypeVar("S", bound=TrainingStageEntity)


class EdgeType(str, Enum):
    HIERARCHICAL = "hierarchical"
    REFERENCE = "reference"
    LINEAGE = "lineage"
    DEPENDENCY = "dependency"


# Reference fields of the AI entities and the edge each implies: (field, edge type, whether the
# edge points from the referenced entity to the referencing one).
_LINK_FIELDS: dict[type[Entity], tuple[tuple[str, EdgeType, bool], ...]] = {
    ModelCheckpointEntity: (
        ("base_model_id", EdgeType.REFERENCE, False),
        ("parent_checkpoint_id", EdgeType.LINEAGE, True),
    ),
    TrainingRunEntity: (
        ("config_id", EdgeType.REFERENCE, False),
        ("policy_model_id", EdgeType.REFERENCE, False),
        ("reference_model_id", EdgeType.REFERENCE, False),
        ("dataset_id", EdgeType.REFERENCE, False),
    ),
    AIPipelineEntity: (("stage_ids", EdgeType.HIERARCHICAL, False),),
    TrainingStageEntity: (("depends_on", EdgeType.DEPENDENCY, False),),
    ModelLineageEntity: (
        ("root_model_id", EdgeType.REFERENCE, False),
        ("checkpoint_ids", EdgeType.HIERARCHICAL, False),
    ),
}


class DependencyCycleError(ValueError):
    """The dependency edges contain a cycle; ``cycle`` lists it (first node repeated last)."""

    def __init__(self, cycle: list[Node]) -> None:
        super().__init__("dependency cycle: " + " -> ".join(map(str, cycle)))
        self.cycle = cycle


class MissingDependencyError(KeyError):
    """A node depends on ids that are not part of the resolution; ``missing`` maps them."""

    def __init__(self, missing: dict[Node, list[Node]]) -> None:
        detail = "; ".join(f"{k} needs {', '.join(map(str, v))}" for k, v in missing.items())
        super().__init__(f"missing dependencies: {detail}")
        self.missing = missing


class EntityTree:
    """Directed typed graph over entity ids (not thread-safe; guard it if shared)."""

    def __init__(self) -> None:
        self._out: dict[EdgeType, dict[Node, dict[Node, None]]] = {t: {} for t in EdgeType}
        self._in: dict[EdgeType, dict[Node, dict[Node, None]]] = {t: {} for t in EdgeType}
        self._nodes: dict[Node, None] = {}

    @classmethod
    def from_entities(cls, entities: Iterable[Entity]) -> "EntityTree":
        """A tree over the entities' ``lineage_id`` values with the edges their references imply.

        Checkpoint parent links become LINEAGE edges (parent -> child), pipeline stages
        HIERARCHICAL, stage ``depends_on`` DEPENDENCY, and config/model references REFERENCE.
        A reference to an entity not among ``entities`` is a :class:`MissingDependencyError`.
        """
        entities = list(entities)
        tree = cls()
        for e in entities:
            tree.add_node(e.lineage_id)
        missing: dict[Node, list[Node]] = {}
        for e in entities:
            links = next((v for k, v in _LINK_FIELDS.items() if isinstance(e, k)), ())
            for name, kind, reverse in links:
                value = getattr(e, name)
                refs = value if isinstance(value, list) else [] if value is None else [value]
                for ref in refs:
                    if ref not in tree:
                        missing.setdefault(e.lineage_id, []).append(ref)
                    elif reverse:
                        tree.add_edge(ref, e.lineage_id, kind)
                    else:
                        tree.add_edge(e.lineage_id, ref, kind)
        if missing:
            raise MissingDependencyError(missing)
        return tree

    def __contains__(self, node: object) -> bool:
        return node in self._nodes

    def __len__(self) -> int:
        return len(self._nodes)

    @property
    def nodes(self) -> list[Node]:
        return list(self._nodes)

    def add_node(self, node: Node) -> None:
        """Add ``node`` (idempotent)."""
        self._nodes[node] = None

    def add_edge(self, src: Node, dst: Node, kind: EdgeType = EdgeType.HIERARCHICAL) -> None:
        """Add ``src -> dst``; both must be nodes (``KeyError`` otherwise); idempotent."""
        for n in (src, dst):
            if n not in self._nodes:
                raise KeyError(f"unknown node {n}")
        self._out[kind].setdefault(src, {})[dst] = None
        self._in[kind].setdefault(dst, {})[src] = None

    def add_child(self, parent: Node, child: Node) -> None:
        """Add ``child`` as a node and a hierarchical child of ``parent``."""
        self.add_node(child)
        self.add_edge(parent, child, EdgeType.HIERARCHICAL)

    def remove_edge(self, src: Node, dst: Node, kind: EdgeType) -> None:
        """Remove ``src -> dst`` if present."""
        self._out[kind].get(src, {}).pop(dst, None)
        self._in[kind].get(dst, {}).pop(src, None)

    def children(self, node: Node, kind: EdgeType = EdgeType.HIERARCHICAL) -> list[Node]:
        return list(self._out[kind].get(node, ()))

    def parents(self, node: Node, kind: EdgeType = EdgeType.HIERARCHICAL) -> list[Node]:
        return list(self._in[kind].get(node, ()))

    def edges(self, kind: EdgeType) -> Iterator[tuple[Node, Node]]:
        for src, dsts in self._out[kind].items():
            for dst in dsts:
                yield src, dst

    def walk(
        self, root: Node, kind: EdgeType = EdgeType.HIERARCHICAL, *, depth_first: bool = False
    ) -> list[Node]:
        """Nodes reachable from ``root`` along ``kind`` edges, each once, in visit order.

        Breadth-first by default; ``depth_first=True`` gives pre-order, children in the order
        their edges were added.
        """
        if root not in self._nodes:
            raise KeyError(f"unknown node {root}")
        adj = self._out[kind]
        if depth_first:
            order: dict[Node, None] = {}
            stack = [root]
            while stack:
                node = stack.pop()
                if node not in order:
                    order[node] = None
                    stack.extend(reversed(adj.get(node, {}).keys()))
            return list(order)
        seen = {root: None}
        todo: deque[Node] = deque([root])
        while todo:
            for nxt in adj.get(todo.popleft(), ()):
                if nxt not in seen:
                    seen[nxt] = None
                    todo.append(nxt)
        return list(seen)

    def remove(self, node: Node) -> list[Node]:
        """Remove ``node``, its edges and every hierarchical descendant left without a parent.

        Returns the removed nodes (``node`` first). Unknown ``node`` is a ``KeyError``.
        """
        if node not in self._nodes:
            raise KeyError(f"unknown node {node}")
        removed, todo = [], [node]
        while todo:
            n = todo.pop()
            if n not in self._nodes:
                continue
            children = self.children(n)
            self._detach(n)
            removed.append(n)
            todo.extend(c for c in children if not self._in[EdgeType.HIERARCHICAL].get(c))
        return removed

    def _detach(self, node: Node) -> None:
        for kind in EdgeType:
            for dst in self._out[kind].pop(node, {}):
                self._in[kind][dst].pop(node, None)
            for src in self._in[kind].pop(node, {}):
                self._out[kind][src].pop(node, None)
        del self._nodes[node]

    def dependency_order(self, nodes: Iterable[Node] | None = None) -> list[Node]:
        """Topological order of ``nodes`` (default: all) along DEPENDENCY edges, dependencies first.

        A dependency outside ``nodes`` is a :class:`MissingDependencyError`; a cycle a
        :class:`DependencyCycleError`.
        """
        chosen = list(self._nodes if nodes is None else nodes)
        deps = {n: list(self._out[EdgeType.DEPENDENCY].get(n, ())) for n in chosen}
        return topological_order(deps)


def topological_order(deps: dict[Node, Sequence[Node]]) -> list[Node]:
    """Order the keys of ``deps`` (node -> its dependencies) so dependencies come first.

    Ties keep the input order. Raises :class:`MissingDependencyError` if a dependency is not a
    key, :class:`DependencyCycleError` if the dependencies form a cycle.
    """
    missing = {n: [d for d in ds if d not in deps] for n, ds in deps.items()}
    missing = {n: ds for n, ds in missing.items() if ds}
    if missing:
        raise MissingDependencyError(missing)
    pending = {n: len(set(ds)) for n, ds in deps.items()}
    dependents: dict[Node, list[Node]] = {n: [] for n in deps}
    for n, ds in deps.items():
        for d in set(ds):
            dependents[d].append(n)
    ready = deque(n for n, k in pending.items() if k == 0)
    order = []
    while ready:
        n = ready.popleft()
        order.append(n)
        for m in dependents[n]:
            pending[m] -= 1
            if pending[m] == 0:
                ready.append(m)
    if len(order) < len(deps):
        raise DependencyCycleError(_find_cycle({n: deps[n] for n in deps if pending[n] > 0}))
    return order


def _find_cycle(deps: dict[Node, Sequence[Node]]) -> list[Node]:
    """A cycle among ``deps``, all of whose nodes lie on or lead into a cycle."""
    node = next(iter(deps))
    seen: dict[Node, int] = {}
    path: list[Node] = []
    while node not in seen:
        seen[node] = len(path)
        path.append(node)
        node = next(d for d in deps[node] if d in deps)
    return path[seen[node]:] + [node]


def resolve_stages(stages: Iterable[S]) -> list[S]:
    """Pipeline stages in an order that runs every stage after the stages it ``depends_on``.

    Dependencies are stage ``lineage_id`` values and must all be among ``stages``.
    """
    by_id = {s.lineage_id: s for s in stages}
    order = topological_order({k: s.depends_on for k, s in by_id.items()})
    return [by_id[k] for k in order]


def build_model_lineage_tree(lineage: ModelLineageEntity, checkpoints: Iterable[ModelCheckpointEntity]) -> EntityTree:
    """The tree of one model's checkpoint chain: the lineage entity owns (HIERARCHICAL) every
    checkpoint it lists and references its model; each checkpoint is the LINEAGE child of its
    parent checkpoint. Nodes are ``lineage_id`` values.

    ``checkpoints`` must hold every checkpoint ``lineage.checkpoint_ids`` names (others are
    ignored); the model itself need not be given. Raises :class:`MissingDependencyError`
    naming the checkpoints that are missing.
    """
    by_id = {c.lineage_id: c for c in checkpoints if c.lineage_id in set(lineage.checkpoint_ids)}
    missing = [c for c in lineage.checkpoint_ids if c not in by_id]
    if missing:
        raise MissingDependencyError({lineage.lineage_id: missing})
    tree = EntityTree()
    tree.add_node(lineage.lineage_id)
    tree.add_node(lineage.root_model_id)
    tree.add_edge(lineage.lineage_id, lineage.root_model_id, EdgeType.REFERENCE)
    for ck_id in lineage.checkpoint_ids:
        tree.add_child(lineage.lineage_id, ck_id)
    for ck in by_id.values():
        if ck.parent_checkpoint_id in by_id:
            tree.add_edge(ck.parent_checkpoint_id, ck.lineage_id, EdgeType.LINEAGE)
    return tree


def build_ai_training_pipeline(pipeline: AIPipelineEntity, stages: Iterable[TrainingStageEntity]) -> EntityTree:
    """The tree of a pipeline: HIERARCHICAL edges to the stages it lists, DEPENDENCY edges
    between them; ``tree.dependency_order(pipeline.stage_ids)`` is their run order.

    Raises :class:`MissingDependencyError` when a listed stage, or a stage a stage depends on,
    is not among ``stages``, and :class:`DependencyCycleError` when the dependencies loop.
    """
    tree = EntityTree.from_entities([pipeline, *stages])
    tree.dependency_order(pipeline.stage_ids)
    return tree
