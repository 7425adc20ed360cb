"""Data movement of the robust all-reduce: who holds which rows and columns, and when.

Three exchanges share one contract. Given an :class:`AggregationPlan` (identical on every
rank) and this rank's flat update, each one aggregates, hands the per-rank statistics
(global sums of ``<x_i, a>``, ``||x_i||^2`` and ``||a||^2``) to a ``judge`` that decides
flags, exclusions and consensus, and returns ``(verdict, result)``: ``result`` is the
aggregated flat update, or None when the verdict is a consensus failure, plus the ranks
whose shard failed its audit (always empty unless audited; non-empty means no result).

* :func:`sharded`: ``all_to_all_single`` (rank ``j`` gets shard ``j`` of every rank), local
  aggregation, one ``all_gather_single`` of the aggregated shards with each rank's partial
  statistics appended as raw bytes (so detection needs no extra collective). With
  ``audited=True`` rank ``r`` also receives and aggregates shard ``r - 1``, compares it with
  what rank ``r - 1`` sent, and one tiny all-reduce agrees on mismatches.
* :func:`replicated`: ``all_gather_single`` of the full updates; every rank aggregates
  everything (no trust in other ranks' computation).

Both take an optional ``verify`` hook, called right after the data exchange and before any
aggregation with what this rank sent and received (sharded: the ``(n, s)`` or ``(n, 2, s)``
send and receive buffers; replicated: this rank's flat update and the ``(n, d)`` stack). It
is collective and returns the senders to reject, identical on every rank; the exchange goes on
with a plan without them (:meth:`AggregationPlan.without`), or stops with no verdict when the
rule cannot tolerate the ranks left. Both return the plan they finished with.
:mod:`fedgspo.robust.all_reduce` uses the hook for authenticated updates.

Buffers for the exchanges are cached per shape (a few entries), so a steady training loop
allocates nothing large per call. Failure behaviour: collectives raise whatever the backend
raises; every branch below is taken identically on every rank (decisions only depend on
all-reduced or all-gathered values), so no rank waits in a collective the others skip.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
import dataclasses
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import torch
import torch.distributed as dist

from fedgspo.distributed import all_gather_single
from fedgspo.robust.aggregators import Aggregator, ShardContext



@dataclass
class AggregationPlan:
    """The validated call, identical on every rank.

    Attributes:
        agg: the rule. n: world size. keep: ranks aggregated (sorted).
        weights: float64 ``(n,)`` weights. nonfinite: ranks with NaN/Inf updates.
        round: call counter of ``agg`` (same on every rank).
        auth_failed: senders whose update failed authentication (left out of ``keep``).
    """

    agg: Aggregator
    n: int
    keep: list[int]
    weights: torch.Tensor
    nonfinite: list[int]
    round: int
    auth_failed: list[int] = field(default_factory=list)

    def tolerated(self, rows: int | None = None) -> bool:
        """Whether the rule can aggregate ``rows`` ranks (default: the ranks kept)."""
        try:
            self.agg.check(len(self.keep) if rows is None else rows)
        except ValueError:
            return False
        return True

    def without(self, rejected: list[int]) -> "AggregationPlan":
        """A copy that leaves the ``rejected`` senders out of ``keep`` and lists them in ``auth_failed``."""
        return dataclasses.replace(self, keep=[r for r in self.keep if r not in rejected], auth_failed=list(rejected))


class Verdict(Protocol):
    consensus_failed: bool


V = TypeVar("V", bound=Verdict)
#: ``judge(plan, global_sums) -> (verdict, keep_after)``; a ``keep_after`` other than
#: ``plan.keep`` asks for re-aggregation without the dropped ranks.
Judge = Callable[["AggregationPlan", torch.Tensor], tuple[V, list[int]]]
#: ``verify(sent, received) -> rejected senders`` (collective; see the module docstring).
Verify = Callable[[torch.Tensor, torch.Tensor], list[int]]
#: What an exchange returns: the verdict (None: too few ranks left after ``verify``), the result
#: (None unless usable), the ranks whose shard failed its audit, and the plan it finished with.
Exchanged = tuple[V | None, torch.Tensor | None, list[int], AggregationPlan]


def aggregate_rows(plan: AggregationPlan, stack: torch.Tensor, keep: list[int], ctx: ShardContext) -> torch.Tensor:
    """The rule on the ``keep`` rows of ``stack`` (weights passed to rules that use them)."""
    rows = stack if len(keep) == plan.n else stack.index_select(0, torch.tensor(keep, device=stack.device))
    w = plan.weights[keep] if plan.agg.supports_weights else None
    return plan.agg.aggregate(rows, ctx, w)


def partial_stats(stack: torch.Tensor, agg: torch.Tensor) -> torch.Tensor:
    """float64 ``[<x_i, a>]_i ++ [||x_i||^2]_i ++ [||a||^2]`` over the columns held."""
    dots = (stack @ agg).double()
    sq = torch.linalg.vector_norm(stack, dim=1).double().square()
    return torch.cat([dots, sq, torch.dot(agg, agg).double().reshape(1)])


def all_reduce_sum(group: dist.ProcessGroup | None, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """A ``sum_over_shards`` for :class:`ShardContext`: all-reduce of a small float64 tensor."""

    def total(partial: torch.Tensor) -> torch.Tensor:
        t = partial.to(device=device, dtype=torch.float64).contiguous()
        dist.all_reduce(t, group=group)
        return t

    return total


_CACHE: OrderedDict[tuple, torch.Tensor] = OrderedDict()
_CACHE_ENTRIES = 16


def _buffer(tag: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (tag, numel, dtype, device)
    if key in _CACHE:
        _CACHE.move_to_end(key)
    else:
        _CACHE[key] = torch.empty(numel, dtype=dtype, device=device)
        while len(_CACHE) > _CACHE_ENTRIES:
            _CACHE.popitem(last=False)
    return _CACHE[key]


def _stats_width(n: int, dtype: torch.dtype) -> int:
    """Elements of ``dtype`` holding the ``2n + 1`` float64 statistics as raw bytes."""
    return (2 * n + 1) * 8 // torch.empty(0, dtype=dtype).element_size()


def _gather_with_stats(
    shard: torch.Tensor, stats: torch.Tensor, group: dist.ProcessGroup | None, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """All-gather ``[shard | stats bytes]``; returns the ``(n, s)`` shards and the summed stats."""
    s, k = shard.numel(), _stats_width(n, shard.dtype)
    send = _buffer("gather_send", s + k, shard.dtype, shard.device)
    send[:s].copy_(shard)
    send[s:].copy_(stats.to(shard.device).view(shard.dtype))
    out = _buffer("gather_out", n * (s + k), shard.dtype, shard.device).view(n, s + k)
    all_gather_single(out.view(-1), send, group=group)
    sums = out[:, s:].contiguous().view(torch.float64).sum(0)
    return out[:, :s], sums.cpu()


def _send_layout(flat: torch.Tensor, n: int, s: int, audited: bool) -> torch.Tensor:
    """``(n, s)`` (or ``(n, 2, s)`` audited: shards ``r`` and ``r - 1`` for destination ``r``)."""
    d = flat.numel()
    if d == n * s and not audited:
        return flat.view(n, s)
    send = _buffer("send", n * s * (2 if audited else 1), flat.dtype, flat.device)
    if not audited:
        send[:d].copy_(flat)
        send[d:].zero_()
        return send.view(n, s)
    pairs = send.view(n, 2, s)
    own = pairs[:, 0].reshape(-1)  # a copy: pairs[:, 0] is strided
    own[:d].copy_(flat)
    own[d:].zero_()
    pairs[:, 0].copy_(own.view(n, s))
    pairs[:, 1].copy_(own.view(n, s).roll(1, 0))
    return pairs


def sharded(
    plan: AggregationPlan,
    flat: torch.Tensor,
    group: dist.ProcessGroup | None,
    judge: Judge[V],
    audited: bool,
    verify: Verify | None = None,
) -> Exchanged[V]:
    """Sharded (optionally audited) exchange; writes the result into ``flat`` and returns it."""
    n, d = plan.n, flat.numel()
    s = -(-d // n)
    send = _send_layout(flat, n, s, audited)
    recv = _buffer("recv", send.numel(), flat.dtype, flat.device).view(send.shape)
    dist.all_to_all_single(recv.view(-1), send.reshape(-1), group=group)
    if verify is not None and (rejected := verify(send, recv)):
        plan = plan.without(rejected)
        if not plan.tolerated():
            return None, None, [], plan
    stacks = [recv[:, 0], recv[:, 1]] if audited else [recv]
    ctx = ShardContext(all_reduce_sum(group, flat.device), plan.round)
    shards = [aggregate_rows(plan, st, plan.keep, ctx) for st in stacks]
    gathered, sums = _gather_with_stats(shards[0], partial_stats(stacks[0], shards[0]), group, n)
    verdict, keep = judge(plan, sums)
    if verdict.consensus_failed:
        return verdict, None, [], plan
    if keep != plan.keep:
        shards = [aggregate_rows(plan, st, keep, ctx) for st in stacks]
        gathered, _ = _gather_with_stats(shards[0], partial_stats(stacks[0], shards[0]), group, n)
    mismatches = audit_mismatches(gathered, shards[1], ctx, group) if audited else []
    if mismatches:
        return verdict, None, mismatches, plan
    if d == n * s:
        flat.view(n, s).copy_(gathered)
    else:
        flat.copy_(gathered.reshape(-1)[:d])
    return verdict, flat, [], plan


def audit_mismatches(
    result: torch.Tensor, check: torch.Tensor, ctx: ShardContext, group: dist.ProcessGroup | None
) -> list[int]:
    """Ranks whose aggregated shard differs from its auditor's recomputation (same on every rank).

    Rank ``r`` compares ``check`` (its own aggregation of shard ``r - 1``) with row ``r - 1``
    of the gathered ``(n, s)`` result, at relative tolerance 1e-5.
    """
    n, rank = result.shape[0], dist.get_rank(group)
    owner = (rank - 1) % n
    mismatch = torch.zeros(n, dtype=torch.float64)
    mismatch[owner] = float(not torch.allclose(result[owner], check, rtol=1e-5, atol=1e-7, equal_nan=True))
    return [r for r, v in enumerate(ctx.sum_over_shards(mismatch).cpu().tolist()) if v > 0]


def replicated(
    plan: AggregationPlan,
    flat: torch.Tensor,
    group: dist.ProcessGroup | None,
    judge: Judge[V],
    verify: Verify | None = None,
) -> Exchanged[V]:
    """Replicated exchange: every rank gathers every update and aggregates all columns."""
    n = plan.n
    gathered = _buffer("replicated", n * flat.numel(), flat.dtype, flat.device)
    all_gather_single(gathered, flat.contiguous(), group=group)
    stack = gathered.view(n, -1)
    if verify is not None and (rejected := verify(flat, stack)):
        plan = plan.without(rejected)
        if not plan.tolerated():
            return None, None, [], plan
    ctx = ShardContext(round=plan.round)
    agg = aggregate_rows(plan, stack, plan.keep, ctx)
    verdict, keep = judge(plan, partial_stats(stack, agg).cpu())
    if verdict.consensus_failed:
        return verdict, None, [], plan
    if keep != plan.keep:
        agg = aggregate_rows(plan, stack, keep, ctx)
    return verdict, agg, [], plan
