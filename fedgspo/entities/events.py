"""Events: typed pydantic records and a bus that never slows or breaks training.

``EventBus.emit`` is O(1) on the caller's thread: it appends the event to a bounded queue and
to a bounded history, then returns. A worker thread drains the queue in batches and calls the
handlers registered with :meth:`EventBus.on` (or the module-level :func:`on` decorator for the
default bus). Coroutine handlers run on an event loop owned by a second background thread.

Failure behaviour:

* A handler that raises is logged and counted (``stats()["handler_errors"]``); later handlers
  and later events are still dispatched.
* A slow handler delays only the worker; when the queue is full, :meth:`EventBus.emit` drops
  the event, counts it (``stats()["dropped"]``) and returns ``False`` instead of blocking.
* :meth:`EventBus.flush` waits until everything emitted before it was dispatched;
  :meth:`EventBus.close` flushes and stops the threads. Call ``close()`` at shutdown on
  success and failure alike; emitting after ``close()`` is a ``RuntimeError``.

:func:`emit_events` wraps a function with ``OperationStarted`` / ``OperationCompleted`` /
``OperationFailed`` events; operations nested inside it get the outer started event as parent.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any, Literal, TypeVar
from uuid import UUID, uuid4

from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])
Handler = Callable[["Event"], Any]


class Event(BaseModel):
    """Base event: identity, time, optional parent and the (rank, step) it belongs to."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    event_id: UUID = Field(default_factory=uuid4)
    timestamp: float = Field(default_factory=time.time, description="Unix time of creation.")
    parent_id: UUID | None = Field(None, description="event_id of the event that caused this one.")
    rank: int | None = Field(None, ge=0)
    step: int | None = Field(None, ge=0)


class TrainingStarted(Event):
    """A run started or resumed; the parent of its step events."""

    run_id: UUID | None = None
    model_id: UUID | None = Field(None, description="lineage_id of the policy's ModelEntity.")
    config_id: UUID | None = Field(None, description="lineage_id of the run's GSPOConfigEntity.")
    total_steps: int = Field(ge=0)


class StepCompleted(Event):
    """One optimizer step; the parent of the step's detection, reputation and checkpoint events."""

    run_id: UUID | None = None
    loss: float | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    duration_s: float | None = Field(None, ge=0)
    checkpoint_triggered: bool = Field(False, description="A checkpoint was written after this step.")


class TrainingCompleted(Event):
    """The run ended; ``final_metrics`` are the last step's figures and the run's summary ones."""

    run_id: UUID | None = None
    model_id: UUID | None = None
    status: Literal["completed", "failed", "cancelled"] = "completed"
    final_metrics: dict[str, float] = Field(default_factory=dict)
    final_checkpoint_id: UUID | None = Field(None, description="lineage_id of the final checkpoint, if written.")


class CheckpointCreated(Event):
    run_id: UUID | None = None
    checkpoint_id: UUID
    path: str


class ByzantineRankFlagged(Event):
    flagged_rank: int = Field(ge=0)
    score: float
    reason: str = ""


class ReputationChanged(Event):
    subject_rank: int = Field(ge=0)
    old_trust: float
    new_trust: float
    quarantined: bool = False


class OperationStarted(Event):
    operation: str


class OperationCompleted(Event):
    operation: str
    duration_s: float = Field(ge=0)


class OperationFailed(Event):
    operation: str
    error: str
    duration_s: float = Field(ge=0)


class OperationRejected(Event):
    operation: str
    priority: str
    reason: str
    attempts: int = Field(ge=0)
    target: UUID | None = None


class HotSwapApplied(Event):
    slot: str
    old_name: str | None
    new_name: str


class AlertRaised(Event):
    severity: Literal["info", "warning", "error", "critical"] = "warning"
    message: str
    rule: str | None = Field(None, description="The alert rule that fired (fedgspo/telemetry/alerts.py), if any.")
    value: float | None = Field(None, description="The rule's statistic when it fired.")
    threshold: float | None = None
    subject_rank: int | None = Field(None, ge=0, description="The rank a per-rank rule fired for.")


class _FlushMarker:
    """Queued behind pending events; set once the worker reaches it."""

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = threading.Event()


class EventBus:
    """Bounded, batched, isolated event dispatch on a background thread.

    Args:
        max_queue: events waiting for dispatch before ``emit`` starts dropping.
        history_size: most recent events kept for :meth:`history`.
        batch_size: events dispatched per worker wake-up.
        slow_handler_s: a handler call slower than this is counted and logged once.
    """

    def __init__(
        self,
        max_queue: int = 65536,
        history_size: int = 10000,
        batch_size: int = 512,
        slow_handler_s: float = 0.1,
    ) -> None:
        if max_queue < 1 or history_size < 0 or batch_size < 1:
            raise ValueError("max_queue and batch_size must be >= 1, history_size >= 0")
        self._max_queue = max_queue
        self._batch_size = batch_size
        self._slow_handler_s = slow_handler_s
        self._queue: deque[Event | _FlushMarker] = deque()
        self._history: deque[Event] = deque(maxlen=history_size)
        self._handlers: dict[type[Event], list[Handler]] = {}
        self._resolved: dict[type[Event], tuple[Handler, ...]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._pending_async: set[Future[Any]] = set()
        self._slow_logged: set[Handler] = set()
        self._counts = {"emitted": 0, "dropped": 0, "dispatched": 0, "handler_errors": 0, "slow_handlers": 0}
        self._worker = threading.Thread(target=self._run, name="fedgspo-events", daemon=True)
        self._worker.start()

    # -- subscription ---------------------------------------------------------------------
    def subscribe(self, event_type: type[Event], handler: Handler) -> None:
        """Call ``handler(event)`` for every emitted instance of ``event_type`` (or a subclass)."""
        if inspect.iscoroutinefunction(handler):
            self._ensure_loop()
        with self._lock:
            self._handlers.setdefault(event_type, []).append(handler)
            self._resolved.clear()

    def unsubscribe(self, event_type: type[Event], handler: Handler) -> None:
        """Remove a handler; ``ValueError`` if it was not subscribed to ``event_type``."""
        with self._lock:
            self._handlers.get(event_type, []).remove(handler)
            self._resolved.clear()

    def on(self, event_type: type[Event]) -> Callable[[F], F]:
        """Decorator form of :meth:`subscribe`; returns the handler unchanged."""

        def deco(fn: F) -> F:
            self.subscribe(event_type, fn)
            return fn

        return deco

    # -- hot path ---------------------------------------------------------------------------
    def emit(self, event: Event) -> bool:
        """Queue ``event`` for dispatch; ``False`` (and counted) if the queue was full."""
        with self._lock:
            if self._closed:
                raise RuntimeError("EventBus is closed")
            if len(self._queue) >= self._max_queue:
                self._counts["dropped"] += 1
                return False
            self._queue.append(event)
            self._history.append(event)
            self._counts["emitted"] += 1
        self._wake.set()
        return True

    # -- inspection -------------------------------------------------------------------------
    def history(self, event_type: type[Event] | None = None, limit: int | None = None) -> list[Event]:
        """Most recent events (oldest first), optionally only instances of ``event_type``."""
        with self._lock:
            events = list(self._history)
        if event_type is not None:
            events = [e for e in events if isinstance(e, event_type)]
        return events[-limit:] if limit else events

    def stats(self) -> dict[str, int]:
        """Counters: emitted, dropped, dispatched, handler_errors, slow_handlers, queue_depth."""
        with self._lock:
            return {**self._counts, "queue_depth": len(self._queue)}

    # -- shutdown ---------------------------------------------------------------------------
    def flush(self, timeout: float | None = 10.0) -> bool:
        """Wait until every event emitted before this call was dispatched (async ones awaited).

        Returns ``False`` if ``timeout`` seconds passed first; events are then still queued.
        Calling it from a handler is a ``RuntimeError`` (it would wait for itself).
        """
        if threading.current_thread() is self._worker:
            raise RuntimeError("EventBus.flush() called from an event handler")
        deadline = None if timeout is None else time.monotonic() + timeout
        marker = _FlushMarker()
        with self._lock:
            if self._closed:
                return not self._queue
            self._queue.append(marker)
        self._wake.set()
        if not marker.done.wait(timeout):
            return False
        for fut in list(self._pending_async):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                fut.result(left)
            except TimeoutError:
                return False
            except Exception:  # counted by the done-callback
                pass
        return True

    def close(self, timeout: float | None = 10.0) -> bool:
        """Flush, then stop the worker and the async loop. Idempotent; returns flush's result."""
        flushed = self.flush(timeout)
        with self._lock:
            self._closed = True
        self._wake.set()
        self._worker.join(timeout)
        if self._loop is not None and self._loop_thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop_thread.join(timeout)
        return flushed

    # -- worker -----------------------------------------------------------------------------
    def _handlers_for(self, event_type: type[Event]) -> tuple[Handler, ...]:
        found = self._resolved.get(event_type)
        if found is None:
            with self._lock:
                found = tuple(
                    h for cls in event_type.__mro__ for h in self._handlers.get(cls, ())  # type: ignore[arg-type]
                )
                self._resolved[event_type] = found
        return found

    def _run(self) -> None:
        while True:
            self._wake.wait(0.5)
            self._wake.clear()
            while self._queue:
                n = min(self._batch_size, len(self._queue))
                batch = [self._queue.popleft() for _ in range(n)]
                for item in batch:
                    if isinstance(item, _FlushMarker):
                        item.done.set()
                    else:
                        self._dispatch(item)
            if self._closed and not self._queue:
                return

    def _dispatch(self, event: Event) -> None:
        for handler in self._handlers_for(type(event)):
            t0 = time.perf_counter()
            try:
                result = handler(event)
                if inspect.iscoroutine(result):
                    self._schedule(result)
            except Exception:
                self._count("handler_errors")
                log.exception("event handler %r failed on %s", handler, type(event).__name__)
            elapsed = time.perf_counter() - t0
            if elapsed > self._slow_handler_s:
                self._count("slow_handlers")
                if handler not in self._slow_logged:
                    self._slow_logged.add(handler)
                    log.warning("event handler %r took %.3fs", handler, elapsed)
        self._count("dispatched")

    def _count(self, key: str) -> None:
        with self._lock:
            self._counts[key] += 1

    def _ensure_loop(self) -> None:
        with self._lock:
            if self._loop is not None:
                return
            self._loop = asyncio.new_event_loop()
            self._loop_thread = threading.Thread(
                target=self._loop.run_forever, name="fedgspo-events-async", daemon=True
            )
            self._loop_thread.start()

    def _schedule(self, coro: Any) -> None:
        self._ensure_loop()
        assert self._loop is not None
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        self._pending_async.add(fut)
        fut.add_done_callback(self._async_done)

    def _async_done(self, fut: Future[Any]) -> None:
        self._pending_async.discard(fut)
        if not fut.cancelled() and fut.exception() is not None:
            self._count("handler_errors")
            log.error("async event handler failed: %r", fut.exception())


class NullEventBus:
    """The bus with bookkeeping switched off: same methods, nothing queued or dispatched."""

    def subscribe(self, event_type: type[Event], handler: Handler) -> None:
        """Accepted and ignored."""

    def unsubscribe(self, event_type: type[Event], handler: Handler) -> None:
        """Accepted and ignored."""

    def on(self, event_type: type[Event]) -> Callable[[F], F]:
        return lambda fn: fn

    def emit(self, event: Event) -> bool:
        """Discards the event; always ``True``."""
        return True

    def history(self, event_type: type[Event] | None = None, limit: int | None = None) -> list[Event]:
        return []

    def stats(self) -> dict[str, int]:
        return {}

    def flush(self, timeout: float | None = 10.0) -> bool:
        return True

    def close(self, timeout: float | None = 10.0) -> bool:
        return True


AnyBus = EventBus | NullEventBus

_default_bus: AnyBus | None = None
_default_lock = threading.Lock()
_parent: contextvars.ContextVar[UUID | None] = contextvars.ContextVar("fedgspo_event_parent", default=None)


def get_event_bus() -> AnyBus:
    """The process-wide default bus, created on first use."""
    global _default_bus
    with _default_lock:
        if _default_bus is None:
            _default_bus = EventBus()
        return _default_bus


def set_event_bus(bus: AnyBus | None) -> AnyBus | None:
    """Replace the default bus (``None`` resets it); returns the previous one, not closed."""
    global _default_bus
    with _default_lock:
        previous, _default_bus = _default_bus, bus
    return previous


def on(event_type: type[Event], bus: AnyBus | None = None) -> Callable[[F], F]:
    """Decorator: subscribe the function to ``event_type`` on ``bus`` (default bus if None)."""
    return (bus or get_event_bus()).on(event_type)


def current_parent() -> UUID | None:
    """event_id of the innermost running :func:`emit_events` operation, if any."""
    return _parent.get()


@contextlib.contextmanager
def _operation_events(name: str, bus: AnyBus | None) -> Iterator[None]:
    b = bus or get_event_bus()
    started = OperationStarted(operation=name, parent_id=_parent.get())
    b.emit(started)
    token = _parent.set(started.event_id)
    t0 = time.perf_counter()
    try:
        yield
    except BaseException as exc:
        dt = time.perf_counter() - t0
        b.emit(OperationFailed(operation=name, parent_id=started.event_id, error=repr(exc), duration_s=dt))
        raise
    finally:
        _parent.reset(token)
    b.emit(OperationCompleted(operation=name, parent_id=started.event_id, duration_s=time.perf_counter() - t0))


def emit_events(operation: str | None = None, *, bus: AnyBus | None = None) -> Callable[[F], F]:
    """Wrap a sync or async function with started / completed / failed events.

    The started event's parent is the enclosing operation's started event; completed and
    failed events have the started event as parent. Exceptions are re-raised unchanged after
    the ``OperationFailed`` event is emitted.
    """

    def deco(fn: F) -> F:
        name = operation or fn.__qualname__

        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                with _operation_events(name, bus):
                    return await fn(*args, **kwargs)

            return async_wrapper  # type: ignore[return-value]

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with _operation_events(name, bus):
                return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return deco
