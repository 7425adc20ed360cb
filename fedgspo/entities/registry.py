"""EntityRegistry: versioned entities in SQLite (WAL) with an in-memory read cache.

Rank 0 owns the registry of a run: ``EntityRegistry.open(run_dir)`` creates or reopens
``<run_dir>/registry.sqlite``. Several processes (e.g. concurrent runs) may open one file;
every write is one ``BEGIN IMMEDIATE`` transaction whose version check reads the lineage head
inside the transaction, so concurrent writers never clobber one another, and queries read the
file so they see every writer's entities. ``EntityRegistry()`` without a path keeps everything
in an in-memory SQLite database (same semantics, nothing on disk).

Writes are write-through: :meth:`register`, :meth:`commit` and :meth:`update` return only after
their transaction committed, with the new version number. Reads by id are served from a cache:
``get(ecs_id)`` is exact (versions are immutable); ``get(lineage_id)`` returns the head this
process last saw — pass ``fresh=True`` to re-read the head written by another process. A
stale head never causes a lost update: :meth:`commit` checks the head in the file and raises
:class:`VersionConflict` (refreshing the cache) if it moved.

Failure behaviour:

* :class:`EntityNotFound` (a ``KeyError``) for an unknown id; :class:`EntityExists` when
  registering an id twice; :class:`VersionConflict` from :meth:`commit` with ``occ=True``.
* A failing transaction is rolled back; the cache is changed only after a successful commit.
* ``sqlite3.OperationalError`` ("database is locked") only if another process held the write
  lock longer than ``busy_timeout_s``; the caller may retry.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

from fedgspo.conflicts import (
    ConflictResolver,
    Operation,
    OperationPriority,
    ResolverConfig,
    VersionConflict,
)
from fedgspo.entities.base import Entity
from fedgspo.events import AnyBus

E = TypeVar("E", bound=Entity)

REGISTRY_FILENAME = "registry.sqlite"

# Two b-trees per update (the primary key and the ecs_id index) keep a commit at a few page
# writes; ``lineages`` is written once per lineage and serves queries by type.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS entities (
    lineage_id BLOB NOT NULL,
    version INTEGER NOT NULL,
    ecs_id BLOB NOT NULL,
    type TEXT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (lineage_id, version)
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS entities_ecs_id ON entities (ecs_id);
CREATE TABLE IF NOT EXISTS lineages (
    lineage_id BLOB PRIMARY KEY,
    type TEXT NOT NULL
);
"""

_HEADS = (
    "SELECT e.ecs_id, e.type, e.data FROM lineages l JOIN entities e ON e.lineage_id = l.lineage_id "
    "WHERE e.version = (SELECT MAX(version) FROM entities WHERE lineage_id = l.lineage_id) AND "
)


class EntityNotFound(KeyError):
    """No entity version or lineage has this id."""


class EntityExists(ValueError):
    """An entity with this ecs_id or lineage_id is already registered."""


class EntityRegistry:
    """Register, read, update and query versioned entities (thread-safe).

    Args:
        path: SQLite file; ``None`` keeps everything in memory.
        bus: receives ``OperationRejected`` events from :attr:`resolver`.
        resolver_config: retry budget of :meth:`update`.
        cache_size: old versions kept in memory (heads are always kept).
        busy_timeout_s: how long a write waits for another process's transaction.
    """

    def __init__(
        self,
        path: Path | str | None = None,
        *,
        bus: AnyBus | None = None,
        resolver_config: ResolverConfig | None = None,
        cache_size: int = 100_000,
        busy_timeout_s: float = 30.0,
    ) -> None:
        self.path = Path(path) if path is not None else None
        self._conn = sqlite3.connect(
            ":memory:" if path is None else str(path),
            timeout=busy_timeout_s,
            isolation_level=None,
            check_same_thread=False,
        )
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        # Checkpoint the WAL every ~40 MB instead of ~4 MB: checkpoints are the only fsyncs.
        self._conn.execute("PRAGMA wal_autocheckpoint=10000")
        self._conn.executescript(_SCHEMA)
        self._lock = threading.RLock()
        self._versions: dict[UUID, Entity] = {}
        self._heads: dict[UUID, Entity] = {}
        self._cache_size = cache_size
        self._closed = False
        self.resolver = ConflictResolver(self, resolver_config, bus)

    @classmethod
    def open(cls, run_dir: Path | str, **kwargs: Any) -> "EntityRegistry":
        """Open (creating if needed) ``<run_dir>/registry.sqlite``; call on rank 0 only."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        return cls(run_dir / REGISTRY_FILENAME, **kwargs)

    # -- reads ------------------------------------------------------------------------------
    def get(self, ref: UUID | str, *, fresh: bool = False) -> Entity:
        """The version ``ref`` (an ecs_id) or the head of lineage ``ref`` (a lineage_id).

        Cached; ``fresh=True`` re-reads a lineage head from the file.
        """
        if type(ref) is str:
            ref = UUID(ref)
        if not fresh:
            found = self._versions.get(ref) or self._heads.get(ref)  # type: ignore[arg-type]
            if found is not None:
                return found
        return self._load(ref)  # type: ignore[arg-type]

    def history(self, ref: UUID | str) -> list[Entity]:
        """Every version of the lineage of ``ref``, oldest first (read from the file)."""
        lineage = self.get(ref).lineage_id
        with self._lock:
            rows = self._conn.execute(
                "SELECT ecs_id, type, data FROM entities WHERE lineage_id = ? ORDER BY version",
                (lineage.bytes,),
            ).fetchall()
        return [self._from_row(*row) for row in rows]

    def lineage(self, ref: UUID | str) -> list[Entity]:
        """The chain from version 0 to version ``ref`` (follows ``previous_ecs_id``)."""
        chain = [self.get(ref)]
        while chain[-1].previous_ecs_id is not None:
            chain.append(self.get(chain[-1].previous_ecs_id))
        return chain[::-1]

    def query(self, entity_type: type[E] = Entity, **equals: Any) -> list[E]:  # type: ignore[assignment]
        """Latest versions of ``entity_type`` (and subclasses) whose fields equal ``equals``.

        Reads the heads from the file, so entities written by other processes are included.
        """
        names = entity_type.with_subtypes()
        marks = ",".join("?" * len(names))
        with self._lock:
            rows = self._conn.execute(
                f"{_HEADS} l.type IN ({marks}) ORDER BY l.rowid", names
            ).fetchall()
        out = []
        for row in rows:
            entity = self._from_row(*row)
            self._heads[entity.lineage_id] = entity
            if all(getattr(entity, k) == v for k, v in equals.items()):
                out.append(entity)
        return out  # type: ignore[return-value]

    def __contains__(self, ref: object) -> bool:
        try:
            self.get(ref)  # type: ignore[arg-type]
        except (EntityNotFound, ValueError, TypeError):
            return False
        return True

    # -- writes -----------------------------------------------------------------------------
    def register(self, entity: E) -> E:
        """Store a new lineage at version 0 and return it; :class:`EntityExists` if known."""
        return self.register_many([entity])[0]

    def register_many(self, entities: Iterable[E]) -> list[E]:
        """Register several new lineages in one transaction (all or none)."""
        entities = list(entities)
        for entity in entities:
            if entity.version != 0:
                raise ValueError(
                    f"register takes version 0 (got version {entity.version}); use update() for new versions"
                )
        with self._lock:
            try:
                with self._transaction():
                    for entity in entities:
                        self._insert(entity)
                        self._conn.execute(
                            "INSERT INTO lineages VALUES (?, ?)", (entity.lineage_id.bytes, entity.type_name())
                        )
            except sqlite3.IntegrityError as exc:
                raise EntityExists(f"entity already registered: {exc}") from exc
            for entity in entities:
                self._cache(entity, head=True)
        return entities

    def commit(self, entity: E, *, occ: bool = True) -> E:
        """Store ``entity`` as the next version of its lineage and return that version.

        ``entity`` keeps the identity of the version it was derived from (see
        :meth:`Entity.evolve`). With ``occ=True`` that version must still be the head, else
        :class:`VersionConflict` is raised and nothing is written; ``occ=False`` commits on top
        of the current head whatever it is.
        """
        lineage = entity.lineage_id
        with self._lock:
            try:
                with self._transaction():
                    row = self._conn.execute(
                        "SELECT ecs_id, version, type FROM entities WHERE lineage_id = ? "
                        "ORDER BY version DESC LIMIT 1",
                        (lineage.bytes,),
                    ).fetchone()
                    if row is None:
                        raise EntityNotFound(lineage)
                    head_id, head_version, head_type = UUID(bytes=row[0]), row[1], row[2]
                    if head_type != entity.type_name():
                        raise TypeError(f"lineage {lineage} holds {head_type}, not {entity.type_name()}")
                    if occ and head_id != entity.ecs_id:
                        raise VersionConflict(f"lineage {lineage} moved to version {head_version}")
                    new = entity.next_version(head_id, head_version)
                    self._insert(new)
            except VersionConflict:
                self._load(lineage)
                raise
            self._cache(new, head=True)
        return new

    def update(
        self,
        ref: UUID | str,
        mutate: Callable[[Any], Any],
        *,
        priority: OperationPriority = OperationPriority.NORMAL,
        pre_ecs: bool = True,
        occ: bool = True,
        check: Callable[[Any], None] | None = None,
        name: str = "update",
    ) -> Entity:
        """Apply ``mutate(latest) -> changed`` to the lineage of ``ref`` through :attr:`resolver`.

        ``mutate`` may run several times (once per attempt) and must only return its result,
        typically ``latest.evolve(field=value)``. Returns the committed version; raises
        ``OperationRejectedError`` if the change could not be committed (it is also counted
        and emitted as an ``OperationRejected`` event).
        """
        if type(ref) is str:
            ref = UUID(ref)
        op = Operation(name=name, target=ref, mutate=mutate, priority=priority, check=check)  # type: ignore[arg-type]
        return self.resolver.execute(op, pre_ecs=pre_ecs, occ=occ)

    def close(self) -> None:
        """Close the file; later calls fail with ``sqlite3.ProgrammingError``. Idempotent."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._conn.close()

    def __enter__(self) -> "EntityRegistry":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------------
    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def _insert(self, entity: Entity) -> None:
        self._conn.execute(
            "INSERT INTO entities VALUES (?, ?, ?, ?, ?)",
            (
                entity.lineage_id.bytes,
                entity.version,
                entity.ecs_id.bytes,
                entity.type_name(),
                entity.model_dump_json(),
            ),
        )

    def _cache(self, entity: Entity, *, head: bool) -> None:
        versions = self._versions
        versions[entity.ecs_id] = entity
        if head:
            self._heads[entity.lineage_id] = entity
        while len(versions) > self._cache_size:
            versions.pop(next(iter(versions)))

    def _from_row(self, ecs_id: bytes, type_name: str, data: str) -> Entity:
        cached = self._versions.get(UUID(bytes=ecs_id))
        if cached is not None:
            return cached
        return Entity.resolve_type(type_name).model_validate_json(data)

    def _load(self, ref: UUID) -> Entity:
        with self._lock:
            key = ref.bytes
            row = self._conn.execute("SELECT ecs_id, type, data FROM entities WHERE ecs_id = ?", (key,)).fetchone()
            is_head = row is None
            if is_head:
                row = self._conn.execute(
                    "SELECT ecs_id, type, data FROM entities WHERE lineage_id = ? ORDER BY version DESC LIMIT 1",
                    (key,),
                ).fetchone()
            if row is None:
                raise EntityNotFound(f"no entity version or lineage with id {ref}")
            entity = self._from_row(*row)
            self._cache(entity, head=is_head)
            return entity


class NullRegistry:
    """The registry with bookkeeping switched off: writes are accepted and discarded.

    ``register``/``commit`` return their argument, ``update`` returns ``None`` without calling
    ``mutate``, reads find nothing (``get`` raises :class:`EntityNotFound`).
    """

    path = None

    def get(self, ref: UUID | str, *, fresh: bool = False) -> Entity:
        raise EntityNotFound(f"bookkeeping is off; no entity {ref}")

    def history(self, ref: UUID | str) -> list[Entity]:
        return []

    def lineage(self, ref: UUID | str) -> list[Entity]:
        return []

    def query(self, entity_type: type[E] = Entity, **equals: Any) -> list[E]:  # type: ignore[assignment]
        return []

    def register(self, entity: E) -> E:
        return entity

    def register_many(self, entities: Iterable[E]) -> list[E]:
        return list(entities)

    def commit(self, entity: E, *, occ: bool = True) -> E:
        return entity

    def update(self, ref: UUID | str, mutate: Callable[[Any], Any], **kwargs: Any) -> None:
        return None

    def close(self) -> None:
        """Nothing to close."""

    def __enter__(self) -> "NullRegistry":
        return self

    def __exit__(self, *exc: object) -> None:
        pass
