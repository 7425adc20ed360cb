"""Conflict resolution for concurrent entity updates: priorities, Pre-ECS staging and OCC.

An :class:`Operation` changes one entity lineage: ``mutate(latest) -> changed``. The
:class:`ConflictResolver` runs it as follows:

1. **Admission.** The operation waits while an operation of strictly higher priority is queued
   on the same lineage (queued = waiting for admission or backing off after a conflict). When it
   is admitted, executing lower-priority operations on that lineage that have run longer than
   their grace period are pre-empted: their commit is refused and they retry. An operation
   inside its grace period is never pre-empted.
2. **Pre-ECS staging** (``pre_ecs=True``): ``mutate`` receives a deep copy of the latest
   version, so in-place edits can never leak into a committed version; the result is
   re-validated and passed to the operation's ``check`` before commit.
3. **OCC** (``occ=True``): the commit succeeds only if the lineage head is still the version
   that was staged (checked inside the store's transaction). Otherwise the operation backs off
   (exponential, with jitter, capped) and retries with the new head.

Failure behaviour: an operation that runs out of retries, waits too long for admission, or
whose ``mutate``/``check`` raises is *rejected*: the ``rejections`` counter is incremented,
an ``OperationRejected`` event is emitted and :class:`OperationRejectedError` is raised to the
caller (chained to the cause). Nothing is committed for a rejected operation; the caller
decides whether to resubmit. No operation is dropped silently.

Starvation: an operation that lost ``exclusive_after`` times runs its next attempts alone on
the lineage (new admissions wait until it finished, then resume in priority order), so within
one process it commits on that attempt; only writers in other processes can still beat it.

No deadlock: no lock is held across ``mutate``. An ordinary operation waits only for queued
operations of strictly higher priority and for an exclusive one; an exclusive operation waits
only for operations already executing, which wait for nothing. Every wait is also bounded by
``max_wait_s``.
"""

from __future__ import annotations

import functools
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Protocol, TypeVar
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

from fedgspo.entities.base import Entity
from fedgspo.entities.events import AnyBus, OperationRejected

E = TypeVar("E", bound=Entity)


class OperationPriority(IntEnum):
    """Higher value wins. Training is HIGH; verification and checkpoints NORMAL; cleanup LOW."""

    BACKGROUND = 0
    LOW = 1
    NORMAL = 2
    HIGH = 3
    CRITICAL = 4


class VersionConflict(Exception):
    """The lineage head moved since the staged version was read (OCC check failed)."""


class Preempted(Exception):
    """A higher-priority operation pre-empted this one after its grace period."""


class OperationRejectedError(RuntimeError):
    """The operation was not committed; see the message and ``__cause__`` for why."""

    def __init__(self, operation: "Operation", reason: str, attempts: int) -> None:
        super().__init__(f"operation {operation.name!r} rejected after {attempts} attempt(s): {reason}")
        self.operation = operation
        self.reason = reason
        self.attempts = attempts


class VersionedStore(Protocol):
    """What the resolver needs from a registry."""

    def get(self, ref: UUID | str) -> Entity: ...

    def commit(self, entity: E, *, occ: bool = True) -> E: ...


@dataclass
class Operation:
    """A change to one lineage. ``mutate`` gets the latest version and returns the changed one.

    ``check`` (optional) runs on the staged result before commit and raises to reject it.
    """

    name: str
    target: UUID
    mutate: Callable[[Any], Any]
    priority: OperationPriority = OperationPriority.NORMAL
    check: Callable[[Any], None] | None = None
    grace_period_s: float = 0.05


@dataclass
class StructuralOperation(Operation):
    """Training-state changes (step, run status, reputation): HIGH priority."""

    priority: OperationPriority = OperationPriority.HIGH


@dataclass
class NormalOperation(Operation):
    """Verification results and checkpoint records: NORMAL priority."""

    priority: OperationPriority = OperationPriority.NORMAL


@dataclass
class LowPriorityOperation(Operation):
    """Cleanup and housekeeping: LOW priority."""

    priority: OperationPriority = OperationPriority.LOW


class ResolverConfig(BaseModel):
    """Retry and wait budget of the conflict resolver."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_retries: int = Field(12, ge=0, description="Retries after the first attempt.")
    base_delay_s: float = Field(1e-4, gt=0, description="Backoff before the first retry.")
    max_delay_s: float = Field(0.05, gt=0, description="Backoff cap.")
    max_wait_s: float = Field(30.0, gt=0, description="Longest admission wait before rejection.")
    exclusive_after: int = Field(
        4, ge=1, description="Conflicts after which an operation's next attempts run alone on its lineage."
    )


@dataclass(eq=False)
class _Running:
    priority: int
    started: float
    grace_period_s: float
    exclusive: bool
    preempted: bool = False


@dataclass
class _Target:
    cond: threading.Condition
    queued: Counter[int] = field(default_factory=Counter)
    running: list[_Running] = field(default_factory=list)
    exclusive_wanted: int = 0


class ConflictResolver:
    """Runs :class:`Operation` objects against a :class:`VersionedStore` (thread-safe)."""

    def __init__(self, store: VersionedStore, config: ResolverConfig | None = None, bus: AnyBus | None = None) -> None:
        self.store = store
        self.config = config or ResolverConfig()
        self.bus = bus
        self._lock = threading.Lock()
        self._targets: dict[UUID, _Target] = {}
        self._rng = random.Random()
        self._metrics = Counter[str]()
        self._queue_depth = 0

    def metrics(self) -> dict[str, int]:
        """commits, conflicts, preemptions, retries, rejections, queue_depth, max_queue_depth."""
        with self._lock:
            keys = ("commits", "conflicts", "preemptions", "retries", "rejections", "max_queue_depth")
            return {**{k: self._metrics[k] for k in keys}, "queue_depth": self._queue_depth}

    def execute(self, op: Operation, *, pre_ecs: bool = True, occ: bool = True) -> Entity:
        """Commit ``op`` and return the new version; raise :class:`OperationRejectedError` if not.

        ``op.target`` may be any version's ecs_id or the lineage_id; ``mutate`` always gets the
        latest version (an unknown id raises ``EntityNotFound`` before anything runs).
        ``pre_ecs=False`` hands ``mutate`` the cached version itself (it must not edit it in
        place); ``occ=False`` commits on top of whatever the head is (last writer wins).
        """
        lineage = self.store.get(op.target).lineage_id
        state = self._target(lineage)
        deadline = time.monotonic() + self.config.max_wait_s
        attempts = 0
        self._enqueue(state, op.priority)
        queued = True
        try:
            while True:
                run = self._admit(state, op, deadline, attempts >= self.config.exclusive_after)
                queued = False
                attempts += 1
                try:
                    committed = self._attempt(op, lineage, run, pre_ecs, occ)
                except (VersionConflict, Preempted) as exc:
                    self._bump("preemptions" if isinstance(exc, Preempted) else "conflicts")
                    if attempts > self.config.max_retries:
                        raise self._reject(op, f"retry budget exhausted ({exc})", attempts) from exc
                except Exception as exc:
                    raise self._reject(op, f"{type(exc).__name__}: {exc}", attempts) from exc
                else:
                    self._bump("commits")
                    return committed
                finally:
                    self._leave(state, run)
                self._bump("retries")
                self._enqueue(state, op.priority)
                queued = True
                time.sleep(self._backoff(attempts))
        finally:
            if queued:
                self._dequeue(state, op.priority)

    # -- one attempt --------------------------------------------------------------------------
    def _attempt(self, op: Operation, lineage: UUID, run: _Running, pre_ecs: bool, occ: bool) -> Entity:
        latest = self.store.get(lineage)
        staged = latest.staged_copy() if pre_ecs else latest
        changed = op.mutate(staged)
        if not isinstance(changed, Entity):
            raise TypeError(f"mutate returned {type(changed).__name__}, expected an Entity")
        if pre_ecs:
            if type(changed) is not type(latest) or changed.ecs_id != latest.ecs_id:
                raise ValueError("mutate must return the staged entity or staged.evolve(...)")
            changed = changed.revalidate()
            if op.check is not None:
                op.check(changed)
        if run.preempted:
            raise Preempted(f"pre-empted after {time.monotonic() - run.started:.3f}s")
        return self.store.commit(changed, occ=occ)

    # -- admission, pre-emption and queue bookkeeping --------------------------------------------
    def _target(self, lineage: UUID) -> _Target:
        with self._lock:
            state = self._targets.get(lineage)
            if state is None:
                state = self._targets[lineage] = _Target(threading.Condition(self._lock))
            return state

    def _admit(self, state: _Target, op: Operation, deadline: float, exclusive: bool) -> _Running:
        p = int(op.priority)
        with state.cond:
            if exclusive:
                state.exclusive_wanted += 1
            try:
                while self._blocked(state, p, exclusive):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise self._reject_locked(op, "waited too long for admission", 0)
                    state.cond.wait(min(left, 0.05))
            finally:
                if exclusive:
                    state.exclusive_wanted -= 1
            state.queued[p] -= 1
            self._queue_depth -= 1
            now = time.monotonic()
            for other in state.running:
                if other.priority < p and now - other.started > other.grace_period_s:
                    other.preempted = True
            run = _Running(p, now, op.grace_period_s, exclusive)
            state.running.append(run)
            state.cond.notify_all()
            return run

    @staticmethod
    def _blocked(state: _Target, priority: int, exclusive: bool) -> bool:
        """Whether an operation must keep waiting for admission.

        An exclusive (starving) operation waits only for the operations running now; every
        other operation waits for an exclusive one and for queued higher priorities.
        """
        if exclusive:
            return bool(state.running)
        if state.exclusive_wanted or any(r.exclusive for r in state.running):
            return True
        return any(n and q > priority for q, n in state.queued.items())

    def _enqueue(self, state: _Target, priority: int) -> None:
        with self._lock:
            state.queued[int(priority)] += 1
            self._queue_depth += 1
            self._metrics["max_queue_depth"] = max(self._metrics["max_queue_depth"], self._queue_depth)

    def _dequeue(self, state: _Target, priority: int) -> None:
        with state.cond:
            state.queued[int(priority)] -= 1
            self._queue_depth -= 1
            state.cond.notify_all()

    def _leave(self, state: _Target, run: _Running) -> None:
        with state.cond:
            state.running.remove(run)
            state.cond.notify_all()

    def _backoff(self, attempt: int) -> float:
        delay = min(self.config.max_delay_s, self.config.base_delay_s * 2 ** (attempt - 1))
        return delay * (0.5 + 0.5 * self._rng.random())

    def _bump(self, key: str) -> None:
        with self._lock:
            self._metrics[key] += 1

    # -- rejection ----------------------------------------------------------------------------
    def _reject(self, op: Operation, reason: str, attempts: int) -> OperationRejectedError:
        with self._lock:
            return self._reject_locked(op, reason, attempts)

    def _reject_locked(self, op: Operation, reason: str, attempts: int) -> OperationRejectedError:
        self._metrics["rejections"] += 1
        if self.bus is not None:
            self.bus.emit(
                OperationRejected(
                    operation=op.name, priority=op.priority.name, reason=reason, attempts=attempts, target=op.target
                )
            )
        return OperationRejectedError(op, reason, attempts)


class HasResolver(Protocol):
    resolver: ConflictResolver


def with_conflict_resolution(
    *,
    pre_ecs: bool = True,
    occ: bool = True,
    priority: OperationPriority = OperationPriority.NORMAL,
    name: str | None = None,
    check: Callable[[Any], None] | None = None,
) -> Callable[[Callable[..., E]], Callable[..., E]]:
    """Turn ``fn(entity, *args) -> entity`` into ``fn(registry, target, *args) -> committed``.

    The wrapped function runs as an :class:`Operation` through ``registry.resolver``; it may be
    called several times (once per attempt) and must have no side effects besides its result.
    Raises :class:`OperationRejectedError` when the operation is rejected.
    """

    def deco(fn: Callable[..., E]) -> Callable[..., E]:
        op_name = name or fn.__qualname__

        @functools.wraps(fn)
        def wrapper(registry: HasResolver, target: UUID, *args: Any, **kwargs: Any) -> E:
            op = Operation(
                name=op_name,
                target=target,
                mutate=lambda e: fn(e, *args, **kwargs),
                priority=priority,
                check=check,
            )
            return registry.resolver.execute(op, pre_ecs=pre_ecs, occ=occ)  # type: ignore[return-value]

        return wrapper

    return deco
