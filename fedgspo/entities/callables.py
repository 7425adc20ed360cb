"""CallableRegistry and HotSwapper: named operations that a running job can swap by name.

Reward functions, aggregation rules and LR schedules register under a name and a *kind*::

    @CallableRegistry.register("exact_match", kind="reward")
    def exact_match(completions, targets): ...

A training job holds a :class:`HotSwapper` with one *slot* per kind (``{"reward":
"digit_accuracy", "aggregator": "median"}``) and reads the current function with
``swapper["reward"]``. A swap is requested on rank 0, either by an explicit
:meth:`HotSwapper.request` or by writing ``<run_dir>/hotswap.json`` (``{"reward":
"exact_match"}``), and takes effect when every rank calls :meth:`HotSwapper.sync` at the same
step boundary: rank 0 broadcasts the pending swap and all ranks apply it at that step.

Failure behaviour:

* Unknown names raise :class:`UnknownCallableError` (a ``KeyError``) listing the known names
  of that kind; a name of the wrong kind is the same error.
* An invalid ``hotswap.json`` (bad JSON, unknown slot or name) is ignored as a whole: nothing
  is swapped, an ``AlertRaised`` event is emitted and the error is logged. Fix the file; it is
  read again when it changes.
* :meth:`HotSwapper.sync` is a collective over the process group: every rank must call it at
  the same step or it hangs until the group's timeout.
* :meth:`CallableRegistry.execute` re-raises the function's exception after recording it.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar
from uuid import UUID

import torch
import torch.distributed as dist

from fedgspo.entities.base import Entity
from fedgspo.entities.events import AlertRaised, AnyBus, HotSwapApplied, get_event_bus
from fedgspo import runfiles
from fedgspo.distributed import broadcast_json

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

HOTSWAP_FILENAME = runfiles.HOTSWAP


class UnknownCallableError(KeyError):
    """No callable of the requested name (and kind) is registered."""


@dataclass(frozen=True)
class CallableSpec:
    """A registered callable: name, kind, function and whether it is a coroutine function."""

    name: str
    kind: str
    fn: Callable[..., Any]
    is_async: bool


@dataclass(frozen=True)
class ExecutionRecord:
    """One execution: which entity versions went in and came out, how long, and any error."""

    name: str
    input_ids: tuple[UUID, ...]
    output_ids: tuple[UUID, ...]
    duration_s: float
    error: str | None


def _entity_ids(values: Any) -> tuple[UUID, ...]:
    """ecs_ids of the entities in ``values`` (an entity, or a list/tuple/dict holding entities)."""
    if isinstance(values, Entity):
        return (values.ecs_id,)
    if isinstance(values, dict):
        values = values.values()
    if isinstance(values, (list, tuple, set, type({}.values()))):
        return tuple(v.ecs_id for v in values if isinstance(v, Entity))
    return ()


class CallableRegistry:
    """Process-wide table of named callables (class-level; thread-safe)."""

    _specs: ClassVar[dict[str, CallableSpec]] = {}
    _records: ClassVar[deque[ExecutionRecord]] = deque(maxlen=1000)
    _lock: ClassVar[threading.Lock] = threading.Lock()

    @classmethod
    def register(cls, name: str, *, kind: str = "generic", replace: bool = False) -> Callable[[F], F]:
        """Decorator: register the function under ``name``; a taken name is a ``ValueError``
        unless ``replace=True``. Returns the function unchanged."""

        def deco(fn: F) -> F:
            with cls._lock:
                if name in cls._specs and not replace:
                    raise ValueError(f"callable {name!r} is already registered (pass replace=True)")
                cls._specs[name] = CallableSpec(name, kind, fn, inspect.iscoroutinefunction(fn))
            return fn

        return deco

    @classmethod
    def unregister(cls, name: str) -> None:
        """Remove ``name``; :class:`UnknownCallableError` if it is not registered."""
        with cls._lock:
            if cls._specs.pop(name, None) is None:
                raise UnknownCallableError(cls._unknown(name, None))

    @classmethod
    def names(cls, kind: str | None = None) -> list[str]:
        """Registered names (of ``kind`` if given), sorted."""
        return sorted(n for n, s in cls._specs.items() if kind is None or s.kind == kind)

    @classmethod
    def get(cls, name: str, kind: str | None = None) -> CallableSpec:
        """The spec registered as ``name`` (and of ``kind`` if given)."""
        spec = cls._specs.get(name)
        if spec is None or (kind is not None and spec.kind != kind):
            raise UnknownCallableError(cls._unknown(name, kind))
        return spec

    @classmethod
    def _unknown(cls, name: str, kind: str | None) -> str:
        what = f"{kind} callable" if kind else "callable"
        return f"unknown {what} {name!r}; known: {', '.join(cls.names(kind)) or '(none)'}"

    @classmethod
    def execute(cls, name: str, *args: Any, **kwargs: Any) -> Any:
        """Call ``name`` synchronously (a coroutine function is run to completion)."""
        spec = cls.get(name)
        with cls._tracking(name, args, kwargs) as result:
            result.append(asyncio.run(spec.fn(*args, **kwargs)) if spec.is_async else spec.fn(*args, **kwargs))
        return result[0]

    @classmethod
    async def aexecute(cls, name: str, *args: Any, **kwargs: Any) -> Any:
        """Await ``name``; a sync function runs in a worker thread so the loop is not blocked."""
        spec = cls.get(name)
        with cls._tracking(name, args, kwargs) as result:
            if spec.is_async:
                result.append(await spec.fn(*args, **kwargs))
            else:
                result.append(await asyncio.to_thread(spec.fn, *args, **kwargs))
        return result[0]

    @classmethod
    @contextlib.contextmanager
    def _tracking(cls, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Iterator[list[Any]]:
        """Record one execution: the block appends the result to the yielded list."""
        result: list[Any] = []
        t0 = time.perf_counter()
        error: Exception | None = None
        try:
            yield result
        except Exception as exc:
            error = exc
            raise
        finally:
            record = ExecutionRecord(
                name=name,
                input_ids=_entity_ids(args) + _entity_ids(kwargs),
                output_ids=_entity_ids(result[0]) if result else (),
                duration_s=time.perf_counter() - t0,
                error=None if error is None else repr(error),
            )
            with cls._lock:
                cls._records.append(record)

    @classmethod
    def records(cls, name: str | None = None) -> list[ExecutionRecord]:
        """Recent executions (bounded history), oldest first."""
        with cls._lock:
            return [r for r in cls._records if name is None or r.name == name]


class HotSwapper:
    """The callables currently in use by a job, swapped in step on all ranks.

    Args:
        slots: slot (= callable kind) -> registered name in use at start.
        run_dir: where rank 0 watches ``hotswap.json``; ``None`` disables the file.
        bus: receives ``HotSwapApplied`` / ``AlertRaised`` (default: the default bus).
        group: process group of :meth:`sync`; default the world.
    """

    def __init__(
        self,
        slots: dict[str, str],
        run_dir: Path | str | None = None,
        *,
        bus: AnyBus | None = None,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        for slot, name in slots.items():
            CallableRegistry.get(name, kind=slot)
        self.slots = dict(slots)
        self.path = Path(run_dir) / HOTSWAP_FILENAME if run_dir is not None else None
        self.bus = bus
        self.group = group
        self._pending: dict[str, str] = {}
        self._seen: tuple[int, int] | None = None

    def __getitem__(self, slot: str) -> Callable[..., Any]:
        """The function currently in ``slot``."""
        return CallableRegistry.get(self.slots[slot]).fn

    @property
    def pending(self) -> dict[str, str]:
        return dict(self._pending)

    def request(self, slot: str, name: str) -> None:
        """Queue a swap of ``slot`` to ``name`` for the next :meth:`sync` (rank 0).

        ``KeyError`` for an unknown slot, :class:`UnknownCallableError` for an unknown name.
        """
        self._validate(slot, name)
        self._pending[slot] = name

    def _validate(self, slot: Any, name: Any) -> None:
        if slot not in self.slots:
            raise KeyError(f"unknown slot {slot!r}; slots: {', '.join(sorted(self.slots))}")
        if not isinstance(name, str):
            raise TypeError(f"slot {slot!r}: name must be a string, got {name!r}")
        CallableRegistry.get(name, kind=slot)

    def poll(self) -> dict[str, str]:
        """Read ``hotswap.json`` if it changed since the last poll; returns the pending swaps.

        The file is applied all or nothing.
        """
        if self.path is None or not self.path.exists():
            return self.pending
        st = self.path.stat()
        seen = (st.st_mtime_ns, st.st_size)
        if seen == self._seen:
            return self.pending
        self._seen = seen
        try:
            wanted = json.loads(self.path.read_text())
            if not isinstance(wanted, dict):
                raise ValueError(f"{HOTSWAP_FILENAME} must hold an object {{slot: name}}")
            for slot, name in wanted.items():
                self._validate(slot, name)
        except (ValueError, KeyError, TypeError) as exc:
            log.error("ignoring %s: %s", self.path, exc)
            self._bus().emit(AlertRaised(severity="error", message=f"hot swap ignored: {exc}"))
            return self.pending
        self._pending.update(wanted)
        return self.pending

    def sync(self, step: int) -> dict[str, str]:
        """Collective at a step boundary: apply rank 0's pending swaps on every rank.

        Returns the applied swaps (slot -> new name), identical on all ranks; each is emitted
        as a ``HotSwapApplied`` event on each rank.
        """
        rank = dist.get_rank(self.group) if dist.is_initialized() else 0
        if rank == 0:
            self.poll()
        swaps, self._pending = self._pending, {}
        if dist.is_initialized():
            src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
            swaps = broadcast_json(swaps, src=src, group=self.group)
            if not isinstance(swaps, dict):
                raise ValueError(f"hot swaps from rank 0 must be an object {{slot: name}}, got {swaps!r}")
        for slot, name in swaps.items():
            self._validate(slot, name)
            old, self.slots[slot] = self.slots.get(slot), name
            self._bus().emit(HotSwapApplied(slot=slot, old_name=old, new_name=name, step=step, rank=rank))
        return swaps

    def _bus(self) -> AnyBus:
        return self.bus if self.bus is not None else get_event_bus()
