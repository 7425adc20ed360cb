"""Fault injection for recovery tests: kill a rank's process at a given step.

Set ``FEDGSPO_FAULT`` to a comma-separated list of ``kind:rank:step`` (for example
``kill:1:25``). A fault fires only in the first attempt of a torchrun job
(``TORCHELASTIC_RESTART_COUNT`` 0 or unset), so the restarted group runs clean. Kinds:

* ``kill``: ``SIGKILL`` this process right before the step (no cleanup, like a lost node);
* ``raise``: raise :class:`InjectedFault` (an ordinary crash with a traceback).

With the variable unset, :meth:`FaultInjector.check` is a dictionary lookup.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

ENV = "FEDGSPO_FAULT"
KINDS = ("kill", "raise")


class InjectedFault(RuntimeError):
    """Raised by a ``raise`` fault."""


@dataclass(frozen=True)
class Fault:
    kind: str
    rank: int
    step: int


def parse_faults(text: str) -> list[Fault]:
    """Faults from ``kind:rank:step[,...]``; ``ValueError`` naming the bad entry."""
    faults = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            kind, rank, step = item.split(":")
            fault = Fault(kind, int(rank), int(step))
        except ValueError:
            raise ValueError(f"{ENV}: {item!r} is not kind:rank:step") from None
        if fault.kind not in KINDS:
            raise ValueError(f"{ENV}: unknown fault kind {fault.kind!r}; known: {', '.join(KINDS)}")
        faults.append(fault)
    return faults


class FaultInjector:
    """The faults meant for this rank in this attempt, checked once per step."""

    def __init__(self, rank: int, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        first_attempt = int(env.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0
        faults = parse_faults(env.get(ENV, "")) if first_attempt else []
        self._by_step = {f.step: f for f in faults if f.rank == rank}

    def check(self, step: int) -> None:
        """Fire the fault scheduled for ``step``, if any."""
        fault = self._by_step.get(step)
        if fault is None:
            return
        if fault.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise InjectedFault(f"injected fault at step {step}")
