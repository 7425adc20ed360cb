"""The interface through which the robust all-reduce authenticates what ranks exchange.

The robust library defines it and never imports an implementation; fedgspo's integrity package
provides one (:class:`fedgspo.integrity.auth.UpdateAuthenticator`, HMAC tags per rank pair).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.distributed as dist


@runtime_checkable
class ExchangeAuthenticator(Protocol):
    """Signs what this rank sends and checks what it receives in one robust all-reduce."""

    def check(self, rank: int, world_size: int) -> None:
        """Raise ``ValueError`` (one line) unless this authenticator can sign and verify every
        message between ``rank`` and the other ranks of a group of ``world_size``."""
        ...

    def rejected_senders(self, sent: torch.Tensor, received: torch.Tensor, *, step: int, replicated: bool,
                         group: dist.ProcessGroup | None) -> list[int]:
        """Senders whose message to this rank did not verify (this rank's view only).

        Collective over ``group``: every rank calls it once per exchange, right after the data
        moved. ``sent``/``received``: sharded mode, the ``(n, ...)`` send and receive buffers
        (row ``j`` to / from rank ``j``); replicated mode, this rank's flat update and the
        ``(n, d)`` gathered stack.
        """
        ...
