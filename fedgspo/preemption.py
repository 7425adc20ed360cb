"""Stopping on a scheduler's signal: SIGTERM (preemption, ``scancel``, torchrun shutting down)
or SIGUSR1 (SLURM's warning before the time limit, ``#SBATCH --signal=USR1@120``).

A handler only records the signal; the trainer finishes the current step, the ranks agree on
the stop inside the step's existing all-reduce (no extra collective), every rank writes its
part of a verified checkpoint, rank 0 audits why, and the process exits with
:data:`EXIT_PREEMPTED` so a job script can requeue itself. A second signal while the
checkpoint is written changes nothing (checkpoints are written to a temporary directory and
renamed, never in place).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

#: Exit code of a run that checkpointed and stopped on a signal (``EX_TEMPFAIL``: try again).
EXIT_PREEMPTED = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """The run stopped on a signal after writing a checkpoint; continue it with
    ``checkpoint.resume=auto`` (the job script's requeue does)."""

    def __init__(self, signal_name: str, step: int) -> None:
        super().__init__(f"stopped by {signal_name} at step {step}; checkpoint written, "
                         "continue with checkpoint.resume=auto")
        self.signal_name, self.step = signal_name, step


class StopSignals:
    """Records the first of :data:`SIGNALS` while installed (a context manager). Outside the
    main thread (where Python cannot install handlers) it records nothing."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = self.received or signal.Signals(signum).name

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
