"""Data movement of the robust all-reduce: who holds which rows and columns, and when.

Three exchanges share one contract. Given an :class:`AggregationPlan` (identical on every
rank) and this rank's flat update, each one aggregates, hands the per-rank statistics
(global sums of ``<x_i, a>``, ``||x_i||^2``, ``||a||^2`` and of the dot products with the
rows' coordinate-wise spread: :func:`partial_stats`) to a ``judge`` that decides
flags, exclusions and consensus, and returns ``(verdict, result, audit, plan)``: ``result``
is the aggregated flat update, or None when it is unusable; ``audit`` an
:class:`AuditOutcome` (empty unless audited).

* :func:`sharded` (``audited=False``): ``all_to_all_single`` (rank ``j`` gets shard ``j`` of
  every rank; :func:`exchange`), local aggregation, then one point-to-point round in which
  every owner sends its aggregated shard and its partial statistics to every other rank
  (:func:`publish`: one step, where gloo's ring ``all_gather`` takes ``n - 1`` dependent
  steps and was 2.5x slower at 10M elements; the shards land in the caller's tensor when
  ``d`` divides into ``n`` shards). Rules needing whole-vector sums all-reduce their partial
  sums. **Owners are
  trusted**: rank ``j`` alone computes shard ``j`` of the result *and* its partial
  statistics, which enter every rank's distance, cosine and norm; a Byzantine owner can
  corrupt that shard of the result and frame any rank (get it flagged).
* :func:`sharded` (``audited=True``): see *Audit protocol* below.
* :func:`replicated`: ``all_gather_single`` of the full updates (:func:`exchange`); every
  rank aggregates everything and computes every statistic itself (no trust in other ranks'
  computation).

Audit protocol (rank ``a`` audits shard ``o = a - 1``; its auditor is ``o + 1``, mod ``n``):

1. The ``all_to_all`` gives rank ``r`` shards ``r`` and ``r - 1`` of every update.
2. Rank ``r`` aggregates shard ``r``. Rules needing whole-vector sums *all-gather* their
   partial sums instead of all-reducing them (each rank sums the rows locally, in rank
   order), so every owner's contribution stays attributable.
3. :func:`publish` sends ``[shard | partial statistics]`` of every owner to every rank (as sharded).
4. The auditor recomputes shard ``o``, its partial statistics and its contributions to the
   whole-vector sums (replaying the recorded global sums, no collective), and votes:
   0 if all agree with what ``o`` published (each entry within :data:`AUDIT_RTOL` of its
   scale: :func:`agrees`, :func:`stats_agree`), anything else accuses ``o``.
5. Votes are all-gathered **per voter** (one number per rank, never summed): a rank can
   only vote on the one shard it audits, and no vote cancels another.
6. Only if some vote accuses, a dispute round settles every accused shard ``o`` on every
   rank: one ``all_gather`` in which each rank re-sends its own rows of the accused shards;
   the owner and the auditor of each accused shard then say (one tiny ``all_gather``)
   whether the rows they had received differ from the re-sent ones (*void*: a sender gave
   different rows to different ranks, which no third rank can attribute); every rank
   recomputes the shard, its statistics and its contributions from the re-sent rows. Then:

   * the owner's shard and statistics agree: the accusation was false, the auditor is
     flagged (``false_accusations``) unless it was void; the step goes on;
   * they disagree: the owner is flagged (``mismatches``) unless it was void, and its shard
     and statistics are **replaced** by the recomputation on every rank; the step goes on
     with the correct result;
   * its contributions to the whole-vector sums disagree: every shard used forged sums and
     nothing can be repaired; the step fails (``failure``), the owner flagged unless void.

Guarantees, with any number ``f`` of Byzantine ranks, assuming every rank receives the same
published row of an owner and the same gathered rows (an owner's shard and statistics reach
the others point to point, as a ring ``all_gather`` forwards them through other ranks: neither
transport stops a Byzantine process from sending different rows to different ranks): an
honest rank is never flagged by the audit (its published
shard and statistics are what every rank recomputes from the rows it received; its
accusation is what every rank confirms); a wrong shard or wrong statistics of owner ``o``
are caught and repaired whenever the auditor ``o + 1`` is honest, so a wrong shard passes
only inside a run of consecutive Byzantine ranks, never for the last one of a run (at most
``f - 1`` shards); a false accusation never fails a step. Left to a Byzantine rank: forcing a
dispute round each step (each rank then receives about ``d`` more elements per accused
shard), escaping blame by claiming void (its shard is still repaired), choosing its own rows
of an accused shard a second time when re-sending them (still one update under the rule's
bound), and, with a rule needing whole-vector sums (Krum, geometric median, centered
clipping, NNM), failing the step by forging its contribution (flagged) or by sending
different rows to an owner and its auditor (not attributable). Coordinate-wise rules
(median, trimmed mean, mean) have no whole-vector sums.

The data moves first (:func:`exchange`, given a :class:`Layout`: the same collective with the
same sizes on every rank, which a caller can run with a placeholder of the agreed size when its
own arguments are wrong), then :func:`sharded` or :func:`replicated` aggregates what moved.
:func:`post_rows` exchanges one small float64 row per rank point to point while the data moves
(the robust all-reduce's metadata). Both aggregations take an optional ``verify`` hook, called
before any aggregation with what this rank sent and received (sharded: the ``(n, s)`` or
``(n, 2, s)`` send and receive buffers; replicated: this rank's flat update and the
``(n, d)`` stack). It is collective and returns the senders to reject, identical on every
rank; the exchange goes on with a plan without them (:meth:`AggregationPlan.without`), or
stops with no verdict when the rule cannot tolerate the ranks left. Both return the plan they
finished with. :mod:`fedgspo.robust.all_reduce` uses the hook for authenticated updates.
:func:`sharded` also takes a :class:`ProtocolTamper` through which the attack simulator
(:mod:`fedgspo.robust.attacks`) makes this rank lie inside the exchange; None costs nothing.

Buffers for the exchanges are cached per shape (a few entries), so a steady training loop
allocates nothing large per call. Point-to-point messages carry distinct tags (:data:`ROW_TAG`,
:data:`SHARD_TAG`, :data:`STATS_TAG`) and each call waits for all of its own. Failure
behaviour: collectives and point-to-point messages raise whatever the backend raises; every
branch below is taken identically on every rank (decisions only depend on all-reduced or
all-gathered values, or on rows every owner sends alike to every rank), so no rank waits in
a collective the others skip.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable
import dataclasses
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, TypeVar

import torch
import torch.distributed as dist

from fedgspo.robust.compression import decode_int8_rows, encode_int8, payload_numel
from fedgspo.distributed import all_gather_single
from fedgspo.robust.aggregators import Aggregator, ShardContext
from fedgspo.robust.precision import products, row_sq_norms

#: Relative tolerance (of the largest finite entry) within which an audit accepts a claim.
AUDIT_RTOL = 1e-5
#: Scale of the sign sums' audit tolerance, in column counts (``AUDIT_RTOL`` x this = 1e-3 of them).
SIGN_AUDIT_SCALE = 100.0


class ProtocolTamper:
    """What this rank publishes inside the exchange, as a Byzantine rank would alter it.

    The robust all-reduce calls these hooks on the rank that holds the object (pass
    ``tamper=`` to :func:`fedgspo.robust.all_reduce.robust_all_reduce`); each default leaves
    the value as the honest protocol computed it, so a subclass overrides only what it lies
    about. :class:`fedgspo.robust.attacks.ProtocolAttack` implements the simulated attacks.
    Hooks must not call collectives.
    """

    def metadata(self, row: torch.Tensor) -> None:
        """Alter, in place, the float64 metadata row (slots ``META_*`` of
        :mod:`fedgspo.robust.all_reduce`) before it is all-gathered."""

    def aggregate(self, shard: torch.Tensor) -> None:
        """Alter, in place, the aggregated shard this rank publishes as its owner."""

    def statistics(self, stats: torch.Tensor) -> None:
        """Alter, in place, the float64 partial statistics this rank publishes as an owner:
        ``[<x_i, a>]_i ++ [||x_i||^2]_i ++ [||a||^2]`` over its shard (see :func:`partial_stats`)."""

    def vote(self, vote: float) -> float:
        """The vote this rank publishes as an auditor, given its honest one (0: the audited
        shard agrees; anything else accuses its owner)."""
        return vote


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


@dataclass
class AuditOutcome:
    """What the audit of an exchange decided; identical on every rank, empty unless audited.

    Attributes:
        mismatches: owners whose published shard, statistics or whole-vector contributions
            differed from every rank's recomputation (flagged).
        false_accusations: auditors that accused a shard the recomputation confirmed (flagged).
        disputed: shards that were accused (recomputed by every rank).
        failure: why the result cannot be used ("" when it can): forged whole-vector sums.
    """

    mismatches: list[int] = field(default_factory=list)
    false_accusations: list[int] = field(default_factory=list)
    disputed: list[int] = field(default_factory=list)
    failure: str = ""

    def merge(self, other: "AuditOutcome") -> "AuditOutcome":
        """The union of two rounds' outcomes (the first failure wins)."""
        return AuditOutcome(
            sorted(set(self.mismatches) | set(other.mismatches)),
            sorted(set(self.false_accusations) | set(other.false_accusations)),
            sorted(set(self.disputed) | set(other.disputed)),
            self.failure or other.failure,
        )


class Verdict(Protocol):
    consensus_failed: bool


V = TypeVar("V", bound=Verdict)
#: ``judge(plan, global_sums) -> (verdict, keep_after)``; a ``keep_after`` other than
#: ``plan.keep`` asks for re-aggregation without the dropped ranks.
Judge = Callable[["AggregationPlan", torch.Tensor], tuple[V, list[int]]]
#: ``verify(sent, received) -> rejected senders`` (collective; see the module docstring).
Verify = Callable[[torch.Tensor, torch.Tensor], list[int]]
#: What an exchange returns: the verdict (None: too few ranks left after ``verify``), the result
#: (None unless usable), the audit's outcome, and the plan it finished with.
Exchanged = tuple[V | None, torch.Tensor | None, AuditOutcome, AggregationPlan]


def kept_rows(stack: torch.Tensor, keep: list[int]) -> torch.Tensor:
    """The ``keep`` rows of ``stack`` (``stack`` itself when every row is kept)."""
    return stack if len(keep) == stack.shape[0] else stack.index_select(0, torch.tensor(keep, device=stack.device))


def aggregate_rows(plan: AggregationPlan, stack: torch.Tensor, keep: list[int], ctx: ShardContext) -> torch.Tensor:
    """The rule on the ``keep`` rows of ``stack`` (weights passed to rules that use them)."""
    w = plan.weights[keep] if plan.agg.supports_weights else None
    return plan.agg.aggregate(kept_rows(stack, keep), ctx, w)


class StatSums(NamedTuple):
    """The parts of a :func:`partial_stats` vector (views: writing one writes the vector)."""

    dots: torch.Tensor  # <x_i, a>
    sq_norms: torch.Tensor  # ||x_i||^2
    agg_sq_norm: torch.Tensor  # ||a||^2 (one element)
    sign_sums: torch.Tensor  # sum over spread columns of sign(x_ij - a_j)
    spread_count: torch.Tensor  # number of spread columns (the kept rows differ; one element)


def stats_width(n: int) -> int:
    """Entries of a :func:`partial_stats` vector for ``n`` ranks."""
    return 3 * n + 2


def split_stats(stats: torch.Tensor) -> StatSums:
    """``stats`` (one :func:`partial_stats` vector, or their sum) cut into its parts."""
    n = (stats.numel() - 2) // 3
    return StatSums(stats[:n], stats[n : 2 * n], stats[2 * n : 2 * n + 1], stats[2 * n + 1 : 3 * n + 1],
                    stats[3 * n + 1 :])


def partial_stats(stack: torch.Tensor, agg: torch.Tensor, keep: list[int]) -> torch.Tensor:
    """float64 ``[<x_i, a>]_i ++ [||x_i||^2]_i ++ [||a||^2] ++ [sum_j sign(x_ij - a_j)]_i ++ [count]``
    over the columns held (:class:`StatSums`). The sign sums run over the *spread columns*,
    those where the ``keep`` rows are not all equal (their coordinate-wise standard deviation
    is positive), and ``count`` is their number: the skew of :mod:`fedgspo.robust.detection`
    (NaN for a row that is not finite, by its squared norm). Products of half-precision rows
    in float32 (:mod:`fedgspo.robust.precision`)."""
    dots = products(stack, agg)
    sq = row_sq_norms(stack)
    rows = kept_rows(stack, keep)
    spread = (rows != rows[:1]).any(0) if keep else torch.zeros_like(agg, dtype=torch.bool)
    above, below = (stack > agg) & spread, (stack < agg) & spread
    signs = above.sum(1).double() - below.sum(1).double()
    count = spread.sum().double().reshape(1)
    return torch.cat([dots, sq, products(agg, agg).reshape(1), signs, count])


def all_reduce_sum(group: dist.ProcessGroup | None, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """A ``sum_over_shards`` for :class:`ShardContext`: all-reduce of a small float64 tensor."""

    def total(partial: torch.Tensor) -> torch.Tensor:
        t = partial.to(device=device, dtype=torch.float64).contiguous()
        dist.all_reduce(t, group=group)
        return t

    return total


class _GatheredSums:
    """A ``sum_over_shards`` that all-gathers every rank's partial sums (instead of reducing
    them) and adds the rows locally in rank order; records ``(rows, total)`` per call, so an
    auditor can check one owner's contributions and replay the totals without collectives."""

    def __init__(self, group: dist.ProcessGroup | None, device: torch.device, n: int) -> None:
        self.group, self.device, self.n = group, device, n
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, partial: torch.Tensor) -> torch.Tensor:
        t = partial.to(device=self.device, dtype=torch.float64).contiguous()
        rows = torch.empty(self.n * t.numel(), dtype=torch.float64, device=self.device)
        all_gather_single(rows, t.reshape(-1), group=self.group)
        rows = rows.view(self.n, *t.shape)
        total = rows.sum(0)
        self.calls.append((rows, total))
        return total


class _Replay:
    """A ``sum_over_shards`` that returns the totals recorded by :class:`_GatheredSums`, in
    order, and checks that the partial sums it is given equal ``owner``'s recorded ones."""

    def __init__(self, recorded: _GatheredSums, owner: int) -> None:
        self.calls, self.owner, self.next, self.consistent = recorded.calls, owner, 0, True

    def __call__(self, partial: torch.Tensor) -> torch.Tensor:
        if self.next >= len(self.calls):
            self.consistent = False
            return partial.to(torch.float64)
        rows, total = self.calls[self.next]
        self.next += 1
        if not agrees(rows[self.owner], partial.to(rows.device, torch.float64)):
            self.consistent = False
        return total

    def complete(self) -> bool:
        """Every recorded call was replayed, each with the owner's partial sums."""
        return self.consistent and self.next == len(self.calls)


def agrees(claim: torch.Tensor, check: torch.Tensor, scale: torch.Tensor | None = None) -> bool:
    """Whether ``claim`` equals the recomputed ``check`` entry by entry within :data:`AUDIT_RTOL`
    times ``scale`` (default: the largest finite ``|check|``); equal infinities and NaN at the
    same places agree."""
    if claim.shape != check.shape:
        return False
    if torch.equal(claim, check):
        return True
    a, b = claim.double(), check.double()
    if scale is None:
        finite = b[torch.isfinite(b)].abs()
        scale = finite.max() if finite.numel() else torch.zeros((), dtype=torch.float64, device=b.device)
    ok = ((a - b).abs() <= AUDIT_RTOL * scale + 1e-300) | (a == b) | (a.isnan() & b.isnan())
    return bool(ok.all())


def stats_agree(claim: torch.Tensor, check: torch.Tensor) -> bool:
    """:func:`agrees` for :func:`partial_stats`, each entry on its own scale: ``||x_i|| ||a||``
    for ``<x_i, a>``, the value itself for the squared norms (one rank's huge update does not
    widen the tolerance on the others'), and :data:`SIGN_AUDIT_SCALE` times the column count
    for the sign sums and the count (an aggregate recomputed one rounding away moves the sign
    of the columns where a row equals it, e.g. the median's own row)."""
    b = split_stats(check.double().abs())
    sq, agg_sq, count = b.sq_norms, b.agg_sq_norm, b.spread_count
    signs = (SIGN_AUDIT_SCALE * count).expand(b.sign_sums.numel() + 1)
    return agrees(claim, check, torch.cat([(sq * agg_sq).sqrt(), sq, agg_sq, signs]))


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


#: Tags of the point-to-point messages (gloo matches them; NCCL keeps per-pair order).
ROW_TAG, SHARD_TAG, STATS_TAG = 1, 2, 3


def _p2p_all(pieces: list[tuple[int, torch.Tensor, torch.Tensor]], group: dist.ProcessGroup | None,
             n: int) -> list[dist.Work]:
    """Post, for each ``(tag, mine, out)``, ``mine`` to every other rank and a receive of rank
    ``r``'s into ``out[r]`` (``out[rank]`` gets a copy of ``mine``); returns the works to wait on.
    ``mine`` must have the same numel and dtype on every rank (else a receive fails or hangs)."""
    rank = dist.get_rank(group)
    ops: list[dist.P2POp] = []
    for tag, mine, out in pieces:
        for peer in range(n):
            if peer != rank:
                ops.append(dist.P2POp(dist.isend, mine, group=group, group_peer=peer, tag=tag))
                ops.append(dist.P2POp(dist.irecv, out[peer], group=group, group_peer=peer, tag=tag))
        out[rank].copy_(mine)
    return dist.batch_isend_irecv(ops)


def post_rows(row: torch.Tensor, group: dist.ProcessGroup | None, n: int) -> Callable[[], torch.Tensor]:
    """Start exchanging one float64 ``row`` per rank point to point (every rank must call it with
    a row of the same length); the returned function waits and gives the ``(n, len)`` rows on
    the CPU. Collectives may run in between (the rows travel while they do)."""
    out = torch.empty(n, row.numel(), dtype=torch.float64, device=row.device)
    works = _p2p_all([(ROW_TAG, row.to(torch.float64).contiguous(), out)], group, n)

    def wait() -> torch.Tensor:
        for work in works:
            work.wait()
        return out.cpu()

    return wait


def publish(
    shard: torch.Tensor, stats: torch.Tensor, group: dist.ProcessGroup | None, n: int,
    into: torch.Tensor | None = None, tamper: ProtocolTamper | None = None, codec: str = "none",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every owner's aggregated shard and float64 partial statistics on every rank, in one
    point-to-point round; returns the ``(n, s)`` shards (written into ``into`` when given, e.g.
    the caller's tensor viewed as ``(n, s)``) and the ``(n, 3n + 2)`` statistics on the CPU.
    ``tamper`` alters what this rank publishes (its own row included). With the ``int8`` codec
    the shards travel as int8 payloads and every rank, the owner included, keeps the decoded
    ones (the statistics stay the owner's, of its exact shard)."""
    s = shard.numel()
    out = into if into is not None else _buffer("published", n * s, shard.dtype, shard.device).view(n, s)
    mine = shard.reshape(-1).contiguous()
    stats = stats.to(device=shard.device, dtype=torch.float64).contiguous()
    if tamper is not None:
        mine, stats = mine.clone(), stats.clone()
        tamper.aggregate(mine)
        tamper.statistics(stats)
    stats_out = torch.empty(n, stats.numel(), dtype=torch.float64, device=shard.device)
    if codec == "int8":
        payload = encode_int8(mine)
        payloads = _buffer("published-int8", n * payload.numel(), torch.uint8, shard.device).view(n, -1)
        works = _p2p_all([(SHARD_TAG, payload, payloads), (STATS_TAG, stats, stats_out)], group, n)
    else:
        works = _p2p_all([(SHARD_TAG, mine, out), (STATS_TAG, stats, stats_out)], group, n)
    for work in works:
        work.wait()
    if codec == "int8":
        out.copy_(decode_int8_rows(payloads, s).to(out.dtype))
    return out, stats_out.cpu()


@dataclass(frozen=True)
class Layout:
    """What the data exchange of one call moves: ``mode`` (``"sharded"``, ``"audited"`` or
    ``"replicated"``) and the flat update's ``numel`` and ``dtype``. Equal layouts on every rank
    mean the same collective with the same sizes."""

    mode: str
    numel: int
    dtype: torch.dtype
    codec: str = "none"  # "int8": replicated rows travel as encode_int8 payloads

    def placeholder(self, device: torch.device) -> torch.Tensor:
        """A zero update of this layout: what a rank whose own arguments do not fit sends."""
        return torch.zeros(self.numel, dtype=self.dtype, device=device)


#: What :func:`exchange` moved: (sent, received). Sharded: the ``(n, s)`` (audited
#: ``(n, 2, s)``) send and receive buffers; replicated: this rank's flat update and the
#: ``(n, d)`` stack of every rank's.
Moved = tuple[torch.Tensor, torch.Tensor]


def exchange(layout: Layout, flat: torch.Tensor, group: dist.ProcessGroup | None, n: int) -> Moved:
    """Run the data collective of ``layout`` with ``flat`` (``layout.numel`` elements of
    ``layout.dtype``): ``all_to_all_single`` of the shards (sharded, audited) or
    ``all_gather_single`` of the full updates (replicated). With the ``int8`` codec each
    update (replicated) or each destination's shard (sharded) travels as an int8 payload,
    decoded on arrival; what is returned as sent is the decoded value every receiver holds.
    Reads ``flat``, never writes it."""
    if layout.mode == "replicated" and layout.codec == "int8":
        payload = encode_int8(flat)
        gathered = _buffer("replicated-int8", n * payload.numel(), torch.uint8, flat.device).view(n, -1)
        all_gather_single(gathered.view(-1), payload, group=group)
        stack = decode_int8_rows(gathered, flat.numel()).to(flat.dtype)
        return stack[dist.get_rank(group)], stack
    if layout.mode == "replicated":
        gathered = _buffer("replicated", n * flat.numel(), flat.dtype, flat.device)
        all_gather_single(gathered, flat.contiguous(), group=group)
        return flat, gathered.view(n, -1)
    audited = layout.mode == "audited"
    s = -(-flat.numel() // n)
    send = _send_layout(flat, n, s, audited)
    if layout.codec == "int8":  # sharded: each destination's shard is its own payload
        payloads = torch.stack([encode_int8(row) for row in send])
        received = torch.empty_like(payloads)
        dist.all_to_all_single(received.view(-1), payloads.view(-1), group=group)
        return decode_int8_rows(payloads, s).to(flat.dtype), decode_int8_rows(received, s).to(flat.dtype)
    recv = _buffer("recv", send.numel(), flat.dtype, flat.device).view(send.shape)
    dist.all_to_all_single(recv.view(-1), send.reshape(-1), group=group)
    return send, recv


def sent_bytes(layout: Layout, n: int) -> int:
    """Bytes one rank sends in the data messages of an exchange of ``layout`` among ``n``
    ranks: its shards to their owners and its aggregated shard to every rank (sharded; audited
    sends every shard twice), or its update (its int8 payload) to every other rank
    (replicated, an all-gather counted as a ring: ``n - 1`` copies). The float64 metadata rows
    and partial statistics (``(n - 1) * (3n + 10) * 8`` bytes) are included; tags and
    transport framing are not."""
    if n <= 1:
        return 0
    small = (n - 1) * (7 + stats_width(n)) * 8
    size = torch.empty((), dtype=layout.dtype).element_size()
    if layout.mode == "replicated":
        payload = payload_numel("int8", layout.numel) if layout.codec == "int8" else layout.numel * size
        return (n - 1) * payload + small
    s = -(-layout.numel // n)
    shard = payload_numel("int8", s) if layout.codec == "int8" else s * size
    return (n - 1) * shard * (3 if layout.mode == "audited" else 2) + small


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


def _gather_floats(values: list[float], group: dist.ProcessGroup | None, n: int, device: torch.device) -> torch.Tensor:
    """``(n, len(values))`` float64 rows, one per rank (a tiny ``all_gather``)."""
    row = torch.tensor(values, dtype=torch.float64, device=device)
    out = torch.empty(n * row.numel(), dtype=torch.float64, device=device)
    all_gather_single(out, row, group=group)
    return out.view(n, -1).cpu()


def sharded(
    plan: AggregationPlan,
    flat: torch.Tensor,
    moved: Moved,
    group: dist.ProcessGroup | None,
    judge: Judge[V],
    audited: bool,
    verify: Verify | None = None,
    tamper: ProtocolTamper | None = None,
    codec: str = "none",
) -> Exchanged[V]:
    """Sharded (optionally audited) aggregation of what :func:`exchange` moved; writes the
    result into ``flat`` and returns it (``flat`` may be overwritten before a consensus
    failure is known: the caller zeroes it then). ``codec`` ``int8`` (not audited) publishes
    the aggregated shards as int8."""
    n, d = plan.n, flat.numel()
    send, recv = moved
    s = recv.shape[-1]
    if verify is not None and (rejected := verify(send, recv)):
        plan = plan.without(rejected)
        if not plan.tolerated():
            return None, None, AuditOutcome(), plan
    into = flat.view(n, s) if d == n * s else None
    if audited:
        rounds = functools.partial(_audited_round, plan, send, recv, group, tamper, into)
    else:
        ctx = ShardContext(all_reduce_sum(group, flat.device), plan.round)

        def rounds(keep: list[int]) -> tuple[torch.Tensor, torch.Tensor, AuditOutcome]:
            shard = aggregate_rows(plan, recv, keep, ctx)
            gathered, stats = publish(shard, partial_stats(recv, shard, keep), group, n, into, tamper, codec)
            return gathered, stats, AuditOutcome()

    gathered, stats, audit = rounds(plan.keep)
    verdict, keep = judge(plan, stats.sum(0))
    if verdict.consensus_failed or audit.failure:
        return verdict, None, audit, plan
    if keep != plan.keep:
        gathered, _, again = rounds(keep)
        audit = audit.merge(again)
        if audit.failure:
            return verdict, None, audit, plan
    if into is None:
        flat.copy_(gathered.reshape(-1)[:d])
    return verdict, flat, audit, plan


def _audited_round(
    plan: AggregationPlan,
    send: torch.Tensor,
    recv: torch.Tensor,
    group: dist.ProcessGroup | None,
    tamper: ProtocolTamper | None,
    into: torch.Tensor | None,
    keep: list[int],
) -> tuple[torch.Tensor, torch.Tensor, AuditOutcome]:
    """Steps 2-6 of the audit protocol (module docstring) for the ``keep`` rows: returns the
    ``(n, s)`` shards (in ``into`` when given) and ``(n, 3n + 2)`` statistics after repairs,
    and the outcome."""
    n, rank, device = plan.n, dist.get_rank(group), recv.device
    audited = (rank - 1) % n
    sums = _GatheredSums(group, device, n)
    shard = aggregate_rows(plan, recv[:, 0], keep, ShardContext(sums, plan.round))
    gathered, stats = publish(shard, partial_stats(recv[:, 0], shard, keep), group, n, into, tamper)
    honest = 0.0 if _claim_holds(plan, keep, recv[:, 1], sums, audited, gathered, stats) else 1.0
    votes = _gather_floats([tamper.vote(honest) if tamper is not None else honest], group, n, device)[:, 0]
    accused = sorted((a - 1) % n for a in range(n) if votes[a] != 0)
    if not accused:
        return gathered, stats, AuditOutcome()
    return gathered, stats, _settle(plan, keep, send, recv, group, sums, accused, gathered, stats)


def _recompute(
    plan: AggregationPlan, keep: list[int], stack: torch.Tensor, sums: _GatheredSums, owner: int
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Shard ``owner`` and its statistics from ``stack``, replaying the recorded whole-vector
    totals; the flag says whether ``owner``'s recorded contributions match."""
    replay = _Replay(sums, owner)
    shard = aggregate_rows(plan, stack, keep, ShardContext(replay, plan.round))
    return shard, partial_stats(stack, shard, keep), replay.complete()


def _claim_holds(
    plan: AggregationPlan, keep: list[int], stack: torch.Tensor, sums: _GatheredSums, owner: int,
    gathered: torch.Tensor, stats: torch.Tensor,
) -> bool:
    shard, shard_stats, contributions = _recompute(plan, keep, stack, sums, owner)
    return contributions and agrees(gathered[owner], shard) and stats_agree(stats[owner], shard_stats.cpu())


def _settle(
    plan: AggregationPlan,
    keep: list[int],
    send: torch.Tensor,
    recv: torch.Tensor,
    group: dist.ProcessGroup | None,
    sums: _GatheredSums,
    accused: list[int],
    gathered: torch.Tensor,
    stats: torch.Tensor,
) -> AuditOutcome:
    """Step 6 of the audit protocol: every rank recomputes the ``accused`` shards from rows
    their senders re-send, repairs ``gathered`` and ``stats`` in place and assigns blame."""
    n, rank, device = plan.n, dist.get_rank(group), recv.device
    s = recv.shape[-1]
    mine = send[:, 0].index_select(0, torch.tensor(accused, device=device)).contiguous()
    resent = torch.empty(n * mine.numel(), dtype=mine.dtype, device=device)
    all_gather_single(resent, mine.view(-1), group=group)
    stacks = resent.view(n, len(accused), s)
    rows = torch.tensor(keep, device=device)

    def fed_other_rows(held: torch.Tensor, k: int) -> float:
        return float(not torch.equal(held.index_select(0, rows), stacks[:, k].index_select(0, rows)))

    void = [0.0, 0.0]  # [as the owner, as the auditor] of an accused shard
    if rank in accused:
        void[0] = fed_other_rows(recv[:, 0], accused.index(rank))
    if (rank - 1) % n in accused:
        void[1] = fed_other_rows(recv[:, 1], accused.index((rank - 1) % n))
    voids = _gather_floats(void, group, n, device) != 0
    outcome = AuditOutcome(disputed=list(accused))
    for k, owner in enumerate(accused):
        auditor = (owner + 1) % n
        shard, shard_stats, contributions = _recompute(plan, keep, stacks[:, k], sums, owner)
        shard_stats = shard_stats.cpu()
        if contributions and agrees(gathered[owner], shard) and stats_agree(stats[owner], shard_stats):
            if not voids[auditor, 1]:
                outcome.false_accusations.append(auditor)
            continue
        if not voids[owner, 0]:
            outcome.mismatches.append(owner)
        if not contributions:
            outcome.failure = outcome.failure or (
                f"rank {owner}'s contributions to the whole-vector sums of {plan.agg.spec()} differ from "
                "the recomputation; every shard used them")
        gathered[owner].copy_(shard)
        stats[owner].copy_(shard_stats)
    outcome.mismatches.sort()
    outcome.false_accusations.sort()
    return outcome


def replicated(
    plan: AggregationPlan,
    moved: Moved,
    judge: Judge[V],
    verify: Verify | None = None,
) -> Exchanged[V]:
    """Replicated aggregation of what :func:`exchange` moved: every rank aggregates all columns
    of the gathered stack and computes every statistic itself."""
    flat, stack = moved
    if verify is not None and (rejected := verify(flat, stack)):
        plan = plan.without(rejected)
        if not plan.tolerated():
            return None, None, AuditOutcome(), plan
    ctx = ShardContext(round=plan.round)
    agg = aggregate_rows(plan, stack, plan.keep, ctx)
    verdict, keep = judge(plan, partial_stats(stack, agg, plan.keep).cpu())
    if verdict.consensus_failed:
        return verdict, None, AuditOutcome(), plan
    if keep != plan.keep:
        agg = aggregate_rows(plan, stack, keep, ctx)
    return verdict, agg, AuditOutcome(), plan
