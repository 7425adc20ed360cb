"""RegistryClient: every rank's writes reach rank 0's registry at the step boundary.

Only rank 0 opens the :class:`~fedgspo.entities.registry.EntityRegistry`. Any rank queues a
small :class:`WriteRequest` with :meth:`RegistryClient.patch` (no communication); at the step
boundary every rank calls :meth:`RegistryClient.sync`, which gathers the queued requests to
rank 0 over the existing process group as JSON bytes (never pickle: a peer's bytes are parsed
and validated against the request's schema and the entity's field types) and applies them
there, in rank order, through the conflict resolver. Without an initialised process group the
requests are applied locally. No extra server or port is used.

Failure behaviour:

* :meth:`sync` is a collective: every rank of ``group`` must call it, at the same point, or the
  call hangs until the process group's timeout (like any collective).
* A request that matches no entity or more than one, or whose change is rejected, is not
  applied; rank 0 counts it in the returned :class:`SyncReport` with the reason. Other
  requests are still applied. A rank whose bytes are not a valid list of requests has all of
  them rejected (reported with the rank); ``origin_rank`` is always the sender's rank, whatever
  it claims.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import torch.distributed as dist
from pydantic import TypeAdapter

from fedgspo.distributed import all_gather_bytes
from fedgspo.entities.conflicts import OperationPriority, OperationRejectedError
from fedgspo.entities.base import Entity
from fedgspo.entities.registry import EntityRegistry


@dataclass(frozen=True)
class WriteRequest:
    """Set fields (``set``) and add to numeric fields (``add``) of the one head matching ``where``."""

    entity_type: str
    where: dict[str, Any]
    set: dict[str, Any]
    add: dict[str, float]
    priority: int
    origin_rank: int

    def mutate(self, entity: Entity) -> Entity:
        added = {k: getattr(entity, k) + v for k, v in self.add.items()}
        return entity.evolve(**self.set, **added)


@dataclass
class SyncReport:
    """What rank 0 applied in one :meth:`RegistryClient.sync` (empty on other ranks)."""

    applied: list[Entity] = field(default_factory=list)
    rejected: list[tuple[WriteRequest, str]] = field(default_factory=list)


class RegistryClient:
    """Queue writes on any rank; apply them on rank 0 at :meth:`sync`.

    Args:
        registry: the registry on rank 0; ``None`` on other ranks.
        group: process group of the collective; default the world.
    """

    def __init__(self, registry: EntityRegistry | None, group: dist.ProcessGroup | None = None) -> None:
        self.registry = registry
        self.group = group
        self._pending: list[WriteRequest] = []
        self._targets: dict[tuple[str, tuple[tuple[str, Any], ...]], UUID] = {}

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group) if dist.is_initialized() else 0

    def patch(
        self,
        entity_type: type[Entity],
        where: dict[str, Any],
        *,
        set: dict[str, Any] | None = None,
        add: dict[str, float] | None = None,
        priority: OperationPriority = OperationPriority.HIGH,
    ) -> None:
        """Queue a change of the head of ``entity_type`` whose fields equal ``where``."""
        self._pending.append(
            WriteRequest(
                entity_type.type_name(), dict(where), dict(set or {}), dict(add or {}), int(priority), self.rank
            )
        )

    def sync(self) -> SyncReport:
        """Collective: gather every rank's queued requests to rank 0 and apply them there."""
        pending, self._pending = self._pending, []
        if not dist.is_initialized():
            return self._apply(pending, SyncReport())
        blob = json.dumps([dataclasses.asdict(r) for r in pending], default=str).encode()
        blobs = all_gather_bytes(blob, self.group)
        if self.rank != 0:
            return SyncReport()
        report, requests = SyncReport(), []
        for sender, data in enumerate(blobs):
            try:
                requests.extend(_decode_requests(data, sender))
            except (ValueError, TypeError, KeyError) as err:
                report.rejected.append((WriteRequest("?", {}, {}, {}, 0, sender), f"rank {sender}: malformed ({err})"))
        return self._apply(requests, report)

    def _apply(self, requests: list[WriteRequest], report: SyncReport) -> SyncReport:
        if self.registry is None:
            report.rejected.extend((r, "no registry on rank 0") for r in requests)
            return report
        for req in requests:
            try:
                target = self._target(req)
                mutate: Callable[[Entity], Entity] = req.mutate
                report.applied.append(
                    self.registry.update(target, mutate, priority=OperationPriority(req.priority), name="client.patch")
                )
            except (LookupError, OperationRejectedError) as exc:
                report.rejected.append((req, str(exc)))
        return report

    def _target(self, req: WriteRequest) -> UUID:
        assert self.registry is not None
        key = (req.entity_type, tuple(sorted(req.where.items())))
        found = self._targets.get(key)
        if found is None:
            matches = self.registry.query(Entity.resolve_type(req.entity_type), **req.where)
            if len(matches) != 1:
                raise LookupError(f"{len(matches)} {req.entity_type} match {req.where}; need exactly one")
            found = self._targets[key] = matches[0].lineage_id
        return found


def _decode_requests(data: bytes, sender: int) -> list[WriteRequest]:
    """The requests in ``sender``'s JSON bytes, checked field by field; ``where`` values are
    validated as the entity's field types (so a UUID arrives as a UUID). Raises ``ValueError``,
    ``TypeError`` or ``KeyError`` for anything else."""
    items = json.loads(data.decode("utf-8"))
    if not isinstance(items, list):
        raise ValueError("not a list of requests")
    out = []
    for item in items:
        if not isinstance(item, dict) or set(item) != {f.name for f in dataclasses.fields(WriteRequest)}:
            raise ValueError(f"not a write request: {str(item)[:120]}")
        entity_cls = Entity.resolve_type(item["entity_type"])
        if not all(isinstance(item[k], dict) for k in ("where", "set", "add")):
            raise TypeError("where, set and add must be objects")
        fields = entity_cls.model_fields
        where = {k: TypeAdapter(fields[k].annotation).validate_python(v) for k, v in item["where"].items()}
        if not all(k in fields for k in item["set"]) or not all(
                k in fields and isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in item["add"].items()):
            raise ValueError(f"unknown fields or non-numeric additions for {item['entity_type']}")
        out.append(WriteRequest(item["entity_type"], where, item["set"], item["add"],
                                int(OperationPriority(item["priority"])), sender))
    return out
