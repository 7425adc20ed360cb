"""Versioned entities of a run: records, registry, tree and the cross-rank client.

``Entity`` and the AI entities are imported eagerly; the registry, tree and client are
loaded on first access (the registry depends on :mod:`fedgspo.entities.conflicts`, which itself needs
:class:`Entity`, and the client imports torch).
"""

from __future__ import annotations

import importlib
from typing import Any

from fedgspo.entities.ai import (
    AIPipelineEntity,
    ByzantineDetectorEntity,
    ConfigEntity,
    DatasetEntity,
    GSPOConfigEntity,
    GSPOTrainingRunEntity,
    ModelCheckpointEntity,
    ModelEntity,
    ModelLineageEntity,
    ReputationEntity,
    TrainingRunEntity,
    TrainingStageEntity,
)
from fedgspo.entities.base import Entity

_LAZY = {
    "EntityRegistry": "registry",
    "NullRegistry": "registry",
    "EntityNotFound": "registry",
    "EntityExists": "registry",
    "RegistryWriteError": "registry",
    "REGISTRY_FILENAME": "registry",
    "EntityTree": "tree",
    "EdgeType": "tree",
    "DependencyCycleError": "tree",
    "MissingDependencyError": "tree",
    "topological_order": "tree",
    "resolve_stages": "tree",
    "build_model_lineage_tree": "tree",
    "build_ai_training_pipeline": "tree",
    "RegistryClient": "client",
    "WriteRequest": "client",
    "SyncReport": "client",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fedgspo.entities' has no attribute {name!r}")
    return getattr(importlib.import_module(f"fedgspo.entities.{module}"), name)


__all__ = [
    "Entity",
    "AIPipelineEntity",
    "ByzantineDetectorEntity",
    "ConfigEntity",
    "DatasetEntity",
    "GSPOConfigEntity",
    "GSPOTrainingRunEntity",
    "ModelCheckpointEntity",
    "ModelEntity",
    "ModelLineageEntity",
    "ReputationEntity",
    "TrainingRunEntity",
    "TrainingStageEntity",
    *_LAZY,
]
