"""EntityRegistry: versioned entities in SQLite (WAL) with an in-memory read cache.

Rank 0 owns the registry of a run: ``EntityRegistry.open(run_dir)`` creates or reopens
``<run_dir>/registry.sqlite``. Several processes (e.g. concurrent runs) may open one file;
every write is one ``BEGIN IMMEDIATE`` transaction whose version check reads the lineage head
inside the transaction, so concurrent writers never clobber one another, and queries read the
file so they see every writer's entities. ``EntityRegistry()`` without a path keeps everything
in an in-memory SQLite database (same semantics, nothing on disk).

Writes are write-through by default: :meth:`register`, :meth:`commit` and :meth:`update`
return only after their transaction committed, with the new version number. With
``write_behind=True`` the in-memory index is authoritative: writes return once they are
versioned in memory and a writer thread appends them to the file in batched transactions
every ``flush_interval_s`` (call :meth:`flush` for a durable point). Use it only when this
process is the only writer of the lineages it updates (rank 0 of a run with its own file): a
crash loses at most the last interval, and a clash with another writer is only detected when
the batch is written (:class:`RegistryWriteError`). Reads by id are served from a cache:
``get(ecs_id)`` is exact (versions are immutable); ``get(lineage_id)`` returns the head this
process last saw — pass ``fresh=True`` to re-read the head written by another process. A
stale head never causes a lost update: :meth:`commit` checks the head in the file and raises
:class:`VersionConflict` (refreshing the cache) if it moved.

Failure behaviour:

* :class:`EntityNotFound` (a ``KeyError``) for an unknown id; :class:`EntityExists` when
  registering an id twice; :class:`VersionConflict` from :meth:`commit` with ``occ=True``.
* A failing transaction is rolled back; the cache is changed only after a successful commit.
* Write-behind: a batch row that the file refuses (another process wrote that version) is
  skipped and logged; the next :meth:`flush`, :meth:`close`, :meth:`register` or
  :meth:`commit` raises :class:`RegistryWriteError` naming it.
* ``sqlite3.OperationalError`` ("database is locked") only if another process held the write
  lock longer than ``busy_timeout_s``; the caller may retry.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

from fedgspo.entities.conflicts import (
    ConflictResolver,
    Operation,
    OperationPriority,
    ResolverConfig,
    VersionConflict,
)
from fedgspo.entities.base import Entity
from fedgspo.entities.events import AnyBus
from fedgspo import runfiles

E = TypeVar("E", bound=Entity)

log = logging.getLogger(__name__)

REGISTRY_FILENAME = runfiles.REGISTRY

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


class RegistryWriteError(RuntimeError):
    """A write-behind batch could not be written completely (see the message)."""


class EntityRegistry:
    """Register, read, update and query versioned entities (thread-safe).

    Args:
        path: SQLite file; ``None`` keeps everything in memory.
        bus: receives ``OperationRejected`` events from :attr:`resolver`.
        resolver_config: retry budget of :meth:`update`.
        cache_size: old versions kept in memory (heads are always kept).
        busy_timeout_s: how long a write waits for another process's transaction.
        write_behind: version writes in memory and persist them in batches (see module doc).
        flush_interval_s: longest delay of a write-behind write.
        on_write: called with every version this instance writes and its stored JSON, after
            the write succeeded (in memory for write-behind), under the registry's lock: keep
            it cheap (e.g. append to a list). An exception it raises reaches the writer.
    """

    def __init__(
        self,
        path: Path | str | None = None,
        *,
        bus: AnyBus | None = None,
        resolver_config: ResolverConfig | None = None,
        cache_size: int = 100_000,
        busy_timeout_s: float = 30.0,
        write_behind: bool = False,
        flush_interval_s: float = 0.05,
        on_write: Callable[[Entity, str], None] | None = None,
    ) -> None:
        self._on_write = on_write
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
        self._pending_lineages: list[tuple[bytes, str]] = []
        self._pending_rows: list[tuple[bytes, int, bytes, str, str]] = []
        self._write_errors: list[str] = []
        self._writer: threading.Thread | None = None
        if write_behind:
            self._stop = threading.Event()
            self._flush_interval_s = flush_interval_s
            self._writer = threading.Thread(target=self._write_loop, name="fedgspo-registry", daemon=True)
            self._writer.start()

    @property
    def write_behind(self) -> bool:
        return self._writer is not None

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
            self._drain()
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
            self._drain()
            rows = self._conn.execute(f"{_HEADS} l.type IN ({marks}) ORDER BY l.rowid", names).fetchall()
            heads = [self._from_row(*row) for row in rows]
            for entity in heads:
                self._cache(entity, head=True)
        return [e for e in heads if all(getattr(e, k) == v for k, v in equals.items())]  # type: ignore[misc]

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
            self._raise_write_errors()
            if self.write_behind:
                seen: set[UUID] = set()
                for entity in entities:
                    ids = (entity.ecs_id, entity.lineage_id)
                    if seen.intersection(ids) or any(i in self._versions or i in self._heads for i in ids) or (
                        self._in_file(entity)
                    ):
                        raise EntityExists(f"entity already registered: {entity.ecs_id}")
                    seen.update(ids)
                rows = [self._row(e) for e in entities]
                self._pending_lineages.extend((e.lineage_id.bytes, e.type_name()) for e in entities)
                self._pending_rows.extend(rows)
            else:
                rows = [self._row(e) for e in entities]
                try:
                    with self._transaction():
                        new_lineages = [(e.lineage_id.bytes, e.type_name()) for e in entities]
                        self._conn.executemany("INSERT INTO lineages VALUES (?, ?)", new_lineages)
                        self._conn.executemany("INSERT INTO entities VALUES (?, ?, ?, ?, ?)", rows)
                except sqlite3.IntegrityError as exc:
                    raise EntityExists(f"entity already registered: {exc}") from exc
            for entity, row in zip(entities, rows):
                self._cache(entity, head=True)
                self._written(entity, row)
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
            self._raise_write_errors()
            if self.write_behind:
                head = self.get(lineage)
                self._check_head(entity, head.ecs_id, head.version, head.type_name(), occ)
                new = entity.next_version(head.ecs_id, head.version)
                stored = self._row(new)
                self._pending_rows.append(stored)
            else:
                try:
                    with self._transaction():
                        row = self._conn.execute(
                            "SELECT ecs_id, version, type FROM entities WHERE lineage_id = ? "
                            "ORDER BY version DESC LIMIT 1",
                            (lineage.bytes,),
                        ).fetchone()
                        if row is None:
                            raise EntityNotFound(lineage)
                        head_id = UUID(bytes=row[0])
                        self._check_head(entity, head_id, row[1], row[2], occ)
                        new = entity.next_version(head_id, row[1])
                        stored = self._row(new)
                        self._conn.execute("INSERT INTO entities VALUES (?, ?, ?, ?, ?)", stored)
                except VersionConflict:
                    self._load(lineage)
                    raise
            self._cache(new, head=True)
            self._written(new, stored)
        return new

    def _written(self, entity: Entity, row: tuple[bytes, int, bytes, str, str]) -> None:
        if self._on_write is not None:
            self._on_write(entity, row[4])

    @staticmethod
    def _check_head(entity: Entity, head_id: UUID, head_version: int, head_type: str, occ: bool) -> None:
        if head_type != entity.type_name():
            raise TypeError(f"lineage {entity.lineage_id} holds {head_type}, not {entity.type_name()}")
        if occ and head_id != entity.ecs_id:
            raise VersionConflict(f"lineage {entity.lineage_id} moved to version {head_version}")

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

    def flush(self) -> None:
        """Write every pending write-behind row now (no-op when write-through).

        Raises :class:`RegistryWriteError` if any row since the last check was refused.
        """
        with self._lock:
            self._drain()
            self._raise_write_errors()

    def close(self) -> None:
        """Flush, stop the writer and close the file; later calls fail. Idempotent.

        Raises :class:`RegistryWriteError` (after closing) if write-behind rows were refused.
        """
        if self._writer is not None:
            self._stop.set()
            self._writer.join()
        with self._lock:
            if self._closed:
                return
            self._drain()
            self._closed = True
            self._conn.close()
            self._raise_write_errors()

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

    @staticmethod
    def _row(entity: Entity) -> tuple[bytes, int, bytes, str, str]:
        return (
            entity.lineage_id.bytes,
            entity.version,
            entity.ecs_id.bytes,
            entity.type_name(),
            entity.model_dump_json(),
        )

    def _in_file(self, entity: Entity) -> bool:
        return (
            self._conn.execute(
                "SELECT 1 FROM entities WHERE ecs_id = ? OR lineage_id = ? LIMIT 1",
                (entity.ecs_id.bytes, entity.lineage_id.bytes),
            ).fetchone()
            is not None
        )

    def _write_loop(self) -> None:
        while not self._stop.wait(self._flush_interval_s):
            with self._lock:
                if not self._closed:
                    self._drain()

    def _drain(self) -> None:
        """Write pending write-behind rows in one transaction (caller holds the lock).

        If the batch is refused as a whole, rows are retried one by one so that only the
        clashing rows are skipped (and recorded for :meth:`_raise_write_errors`).
        """
        lineages, rows = self._pending_lineages, self._pending_rows
        if not (lineages or rows):
            return
        self._pending_lineages, self._pending_rows = [], []
        try:
            with self._transaction():
                self._conn.executemany("INSERT INTO lineages VALUES (?, ?)", lineages)
                self._conn.executemany("INSERT INTO entities VALUES (?, ?, ?, ?, ?)", rows)
            return
        except sqlite3.IntegrityError:
            pass
        inserts = (
            ("INSERT INTO lineages VALUES (?, ?)", lineages),
            ("INSERT INTO entities VALUES (?, ?, ?, ?, ?)", rows),
        )
        for sql, batch in inserts:
            for row in batch:
                try:
                    with self._transaction():
                        self._conn.execute(sql, row)
                except sqlite3.IntegrityError as exc:
                    msg = f"row for lineage {UUID(bytes=row[0])} refused: {exc}"
                    log.error("registry write-behind: %s", msg)
                    self._write_errors.append(msg)

    def _raise_write_errors(self) -> None:
        if self._write_errors:
            errors, self._write_errors = self._write_errors, []
            raise RegistryWriteError("; ".join(errors))

    def _cache(self, entity: Entity, *, head: bool) -> None:
        """Remember ``entity``; as the lineage head only if no newer version is known.

        Caller holds the lock.
        """
        versions = self._versions
        versions[entity.ecs_id] = entity
        if head:
            known = self._heads.get(entity.lineage_id)
            if known is None or known.version <= entity.version:
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
            self._drain()
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

    def flush(self) -> None:
        """Nothing to write."""

    def close(self) -> None:
        """Nothing to close."""

    def __enter__(self) -> "NullRegistry":
        return self

    def __exit__(self, *exc: object) -> None:
        pass
