"""Entity validation, versioning invariants and the EntityTree."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from fedgspo.entities import (
    AIPipelineEntity,
    DependencyCycleError,
    EdgeType,
    Entity,
    EntityTree,
    GSPOConfigEntity,
    GSPOTrainingRunEntity,
    MissingDependencyError,
    ModelCheckpointEntity,
    ModelEntity,
    ReputationEntity,
    TrainingStageEntity,
    resolve_stages,
    topological_order,
)


def test_new_entity_is_version_zero_with_distinct_ids() -> None:
    e = ReputationEntity(rank=3)
    assert e.version == 0 and e.previous_ecs_id is None
    assert e.ecs_id != e.lineage_id


@pytest.mark.parametrize(
    "make",
    [
        lambda: ReputationEntity(rank=-1),
        lambda: ReputationEntity(rank=0, trust_score=1.5),
        lambda: ModelEntity(name="m", model_type="llama", vocab_size=0, hidden_size=8, num_layers=1),
        lambda: GSPOConfigEntity(name="g", num_generations=1, epsilon=0.1, learning_rate=1e-3, max_completion_length=8),
        lambda: GSPOTrainingRunEntity(
            name="r", config_id=uuid.uuid4(), policy_model_id=uuid.uuid4(), total_steps=10, step=11
        ),
        lambda: GSPOTrainingRunEntity(
            name="r", config_id=uuid.uuid4(), policy_model_id=uuid.uuid4(), total_steps=10,
            world_size=4, num_byzantine=2,
        ),
        lambda: ReputationEntity(rank=0, version=1),
        lambda: ReputationEntity(rank=0, unknown_field=1),
    ],
)
def test_invalid_entities_are_rejected(make) -> None:
    with pytest.raises(ValidationError):
        make()


def test_evolve_validates_and_keeps_identity() -> None:
    e = ReputationEntity(rank=1)
    f = e.evolve(trust_score=0.5)
    assert (f.ecs_id, f.lineage_id, f.version) == (e.ecs_id, e.lineage_id, e.version)
    assert f.trust_score == 0.5 and e.trust_score == 1.0
    with pytest.raises(ValidationError):
        e.evolve(trust_score=-1)
    with pytest.raises(ValueError, match="identity"):
        e.evolve(version=4)


def test_entities_are_frozen() -> None:
    with pytest.raises(ValidationError):
        ReputationEntity(rank=1).rank = 2  # type: ignore[misc]


def test_staged_copy_isolates_mutable_fields() -> None:
    stage = TrainingStageEntity(name="s", completion_criteria={"acc": 0.9})
    staged = stage.staged_copy()
    staged.completion_criteria["acc"] = 0.1
    assert stage.completion_criteria == {"acc": 0.9}
    assert staged.ecs_id == stage.ecs_id


def test_resolve_type_lists_known_names() -> None:
    assert Entity.resolve_type("ReputationEntity") is ReputationEntity
    with pytest.raises(KeyError, match="known: .*ReputationEntity"):
        Entity.resolve_type("Nope")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=20))
def test_next_version_chain_is_monotone_and_keeps_lineage(scores: list[float]) -> None:
    head = ReputationEntity(rank=0)
    chain = [head]
    for s in scores:
        head = head.evolve(trust_score=s).next_version(head.ecs_id, head.version)
        chain.append(head)
    assert [e.version for e in chain] == list(range(len(chain)))
    assert {e.lineage_id for e in chain} == {chain[0].lineage_id}
    assert len({e.ecs_id for e in chain}) == len(chain)
    assert all(b.previous_ecs_id == a.ecs_id for a, b in zip(chain, chain[1:]))
    assert chain[-1].trust_score == scores[-1]


# -- tree ---------------------------------------------------------------------------------------
def _tree(n: int) -> EntityTree:
    tree = EntityTree()
    tree.add_node(0)
    for i in range(1, n):
        tree.add_child((i - 1) // 2, i)
    return tree


def test_walk_visits_every_descendant_once() -> None:
    tree = _tree(100)
    assert sorted(tree.walk(0)) == list(range(100))
    assert sorted(tree.walk(0, depth_first=True)) == list(range(100))
    subtree = {n for n in range(100) if any((n + 1) >> k == 2 for k in range(8))}  # heap: 1's subtree
    assert sorted(tree.walk(1)) == sorted(subtree)
    assert tree.walk(0)[:3] == [0, 1, 2] and tree.walk(0, depth_first=True)[:4] == [0, 1, 3, 7]


def test_remove_cascades_without_orphans() -> None:
    tree = _tree(15)
    tree.add_node("other_parent")
    tree.add_edge("other_parent", 4, EdgeType.HIERARCHICAL)
    tree.add_edge(2, 3, EdgeType.REFERENCE)
    removed = tree.remove(1)
    assert removed[0] == 1
    assert 4 in tree and 9 in tree  # 4 keeps a parent, so its subtree stays
    assert 3 not in tree and 7 not in tree
    for kind in EdgeType:
        for src, dst in tree.edges(kind):
            assert src in tree and dst in tree
    roots = {0, "other_parent"}
    assert all(tree.parents(n) for n in tree.nodes if n not in roots)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 30), min_size=1, max_size=30), st.integers(1, 30))
def test_remove_never_leaves_orphans(parents: list[int], victim: int) -> None:
    tree = EntityTree()
    tree.add_node(0)
    for i, p in enumerate(parents, start=1):
        tree.add_child(min(p, i - 1), i)
    if victim not in tree:
        return
    tree.remove(victim)
    assert all(tree.parents(n) for n in tree.nodes if n != 0)


def test_edge_to_unknown_node_is_an_error() -> None:
    tree = EntityTree()
    tree.add_node("a")
    with pytest.raises(KeyError):
        tree.add_edge("a", "b")


def test_dependency_order_and_errors() -> None:
    order = topological_order({"train": ["sft", "data"], "sft": ["data"], "data": [], "eval": ["train"]})
    assert order.index("data") < order.index("sft") < order.index("train") < order.index("eval")
    with pytest.raises(DependencyCycleError) as err:
        topological_order({"a": ["b"], "b": ["c"], "c": ["a"], "d": []})
    assert set(err.value.cycle) == {"a", "b", "c"} and err.value.cycle[0] == err.value.cycle[-1]
    with pytest.raises(MissingDependencyError, match="ghost"):
        topological_order({"a": ["ghost"]})


def test_tree_dependency_edges() -> None:
    tree = EntityTree()
    for n in "abc":
        tree.add_node(n)
    tree.add_edge("c", "b", EdgeType.DEPENDENCY)
    tree.add_edge("b", "a", EdgeType.DEPENDENCY)
    assert tree.dependency_order() == ["a", "b", "c"]
    with pytest.raises(MissingDependencyError):
        tree.dependency_order(["b", "c"])


def test_resolve_stages_orders_pipeline() -> None:
    data = TrainingStageEntity(name="data")
    sft = TrainingStageEntity(name="sft", depends_on=[data.lineage_id])
    gspo = TrainingStageEntity(name="gspo", depends_on=[sft.lineage_id, data.lineage_id])
    assert [s.name for s in resolve_stages([gspo, sft, data])] == ["data", "sft", "gspo"]
    assert gspo.is_complete({}) and not TrainingStageEntity(name="x", completion_criteria={"acc": 1}).is_complete({})


def test_tree_from_entities_links_references() -> None:
    model = ModelEntity(name="m", model_type="llama", vocab_size=16, hidden_size=8, num_layers=1)
    cks = [ModelCheckpointEntity(base_model_id=model.lineage_id, path="c0", step=0)]
    for step in (1, 2):
        cks.append(
            ModelCheckpointEntity(
                base_model_id=model.lineage_id, path=f"c{step}", step=step, parent_checkpoint_id=cks[-1].lineage_id
            )
        )
    data = TrainingStageEntity(name="data")
    train = TrainingStageEntity(name="train", depends_on=[data.lineage_id])
    pipeline = AIPipelineEntity(name="p", stage_ids=[data.lineage_id, train.lineage_id])
    tree = EntityTree.from_entities([model, *cks, data, train, pipeline])
    assert tree.walk(cks[0].lineage_id, EdgeType.LINEAGE) == [c.lineage_id for c in cks]
    assert tree.parents(model.lineage_id, EdgeType.REFERENCE) == [c.lineage_id for c in cks]
    assert tree.dependency_order(tree.children(pipeline.lineage_id)) == [data.lineage_id, train.lineage_id]
    removed = tree.remove(pipeline.lineage_id)
    assert set(removed) == {pipeline.lineage_id, data.lineage_id, train.lineage_id}
    with pytest.raises(MissingDependencyError):
        EntityTree.from_entities([cks[1]])
