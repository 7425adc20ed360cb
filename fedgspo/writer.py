"""One background thread that runs rank 0's bookkeeping writes in submission order.

:class:`BackgroundWriter` takes calls (``submit(fn, *args)``) into a bounded queue and runs them
one at a time, first in, first out, on a daemon thread, so the training thread only pays for
the ``put``. One thread, one queue: writes that depend on their order (the audit log's hash
chain, a checkpoint entity after the audit record that names it) keep it.

Failure behaviour:

* A full queue makes :meth:`BackgroundWriter.submit` wait for room (back-pressure): nothing is
  dropped, and every wait is counted (``stats()["full_waits"]``).
* A call that raises stops the writer: later calls are discarded, and the error is raised on
  the caller's thread by the next :meth:`submit` or :meth:`flush` (once). The caller must then
  stop recording: the trainer closes the run as failed.
* :meth:`flush` returns once every call submitted before it has run. :meth:`close` runs what
  is queued, stops the thread and returns (does not raise) an error not yet raised. A crash
  of the process loses the calls still queued: at most what was submitted since the last
  :meth:`flush`.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

_STOP = object()


class BackgroundWriter:
    """FIFO calls on a daemon thread.

    Args:
        max_queue: calls waiting before :meth:`submit` blocks.
        name: the thread's name.
    """

    def __init__(self, max_queue: int = 4096, *, name: str = "fedgspo-writer") -> None:
        if max_queue < 1:
            raise ValueError("max_queue must be >= 1")
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_queue)
        self._error: BaseException | None = None
        self._raised = False
        self._closed = False
        self._counts = {"submitted": 0, "done": 0, "full_waits": 0}
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> None:
        """Queue ``fn(*args, **kwargs)``; waits while the queue is full. Raises the error of an
        earlier call that failed, and ``RuntimeError`` after :meth:`close`."""
        self._raise_error()
        if self._closed:
            raise RuntimeError("BackgroundWriter is closed")
        item = (fn, args, kwargs)
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self._counts["full_waits"] += 1
            self._queue.put(item)
        self._counts["submitted"] += 1

    def flush(self) -> None:
        """Wait until every call submitted before this one has run; raises the error of a call
        that failed (once)."""
        if not self._closed:
            done = threading.Event()
            self._queue.put(done)
            done.wait()
        self._raise_error()

    def close(self) -> BaseException | None:
        """Run what is queued, stop the thread; returns an error not yet raised. Idempotent."""
        if not self._closed:
            self._closed = True
            self._queue.put(_STOP)
            self._thread.join()
        if self._error is not None and not self._raised:
            self._raised = True
            return self._error
        return None

    @property
    def failed(self) -> bool:
        """Whether a call has raised (the writer then runs nothing more)."""
        return self._error is not None

    def stats(self) -> dict[str, int]:
        """submitted, done, full_waits (submits that waited for room) and queue_depth."""
        return {**self._counts, "queue_depth": self._queue.qsize()}

    def _raise_error(self) -> None:
        if self._error is not None and not self._raised:
            self._raised = True
            raise self._error

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if isinstance(item, threading.Event):  # a flush marker
                item.set()
                continue
            fn, args, kwargs = item
            if self._error is not None:
                continue  # a failed writer runs nothing more
            try:
                fn(*args, **kwargs)
            except BaseException as err:  # noqa: BLE001 - handed to the caller's thread
                self._error = err
            self._counts["done"] += 1
