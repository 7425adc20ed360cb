"""Robust all-reduce: a drop-in for ``dist.all_reduce`` that tolerates Byzantine ranks.

Every rank contributes a flat update; the updates are combined by a robust rule
(:mod:`fedgspo.robust.aggregators`) instead of a sum, the result is written back into the tensor
on every rank, and a :class:`RobustReport` says what each rank looked like
(:mod:`fedgspo.robust.detection`).

Modes (all give the single-process rule's result on the stacked updates, up to
floating-point summation order):

* ``sharded`` (default): the flat update is cut into ``n`` shards; ``all_to_all_single``
  gives rank ``j`` shard ``j`` of every rank; rank ``j`` aggregates it; an
  ``all_gather_single`` assembles the result, carrying each rank's partial detection
  statistics along. The bytes of a ring all-reduce. Rules needing whole-vector quantities
  (Krum, geometric median, centered clipping, NNM) all-reduce ``n`` (or ``n x n``) partial
  sums (:mod:`fedgspo.robust.shard_exchange`).
  Trust model: it filters Byzantine *updates* but trusts every rank to compute its shard
  and that shard's partial detection statistics (which enter every rank's distance, cosine
  and norm): a Byzantine owner can corrupt its shard of the result and get any rank flagged.
* ``replicated``: ``all_gather`` of everything; every rank aggregates the full stack and
  computes every statistic itself. ``n`` times the bytes; trusts no rank's computation.
* ``audited``: sharded, and rank ``r`` also aggregates shard ``r - 1`` and recomputes its
  partial statistics (and, for rules with whole-vector sums, the owner's contributions,
  which this mode all-gathers instead of all-reducing). Each auditor's vote is gathered on
  its own (one number per rank, never summed). Only when a vote accuses does a dispute round
  run: every rank recomputes the accused shard from rows re-sent by their senders, repairs
  the shard and its statistics if the owner lied (owner flagged, ``audit_mismatches``) and
  flags the auditor if it accused falsely (``false_accusations``); the step goes on with the
  correct result. Only a forged contribution to whole-vector sums fails the step. With any
  number of Byzantine ranks no honest rank is flagged by the audit and a wrong shard passes
  only when its auditor is Byzantine too (protocol, guarantees and what a Byzantine rank can
  still do: :mod:`fedgspo.robust.shard_exchange`). Twice the all-to-all bytes and local
  work, plus one tiny ``all_gather`` of the votes.

Call protocol and failure behaviour:

* Every rank of ``group`` must call with the same ``rule``, ``f``, ``mode``, options,
  ``exclude`` and ``weights`` and a tensor of the same numel and dtype. Every rank publishes
  that metadata (a float64 row: slots ``META_*``) and checks every rank's row before it uses
  any data: any mismatch, unknown name, bound the rule cannot tolerate (e.g. ``2f >= n`` for
  the median) or non-floating dtype raises the same ``ValueError`` on *every* rank (no
  hang); the tensor is unchanged. A Byzantine rank publishing a wrong row (numel, dtype, f,
  NaN, infinities) gets the same.
* How the rows travel (no extra collective round in a steady loop): each group remembers the
  sequence of agreed calls and predicts the next call's metadata and data layout (the
  layout that followed the previous call's last time: one layout per step, or the DDP
  buckets' cycle). With a prediction the rows go point to point *while* the data exchange of
  the predicted layout runs; a rank whose own call does not fit the prediction sends zeros
  of the predicted size, so every rank runs the same collective with the same sizes. The
  rows are then checked before anything else: a mismatch raises as above; rows that agree
  with each other but not with the prediction (the caller changed layout) repeat the data
  exchange with the agreed layout. Without a prediction (the first calls, a new layout) a
  tiny ``all_gather`` of the rows comes first. The point-to-point rows let a Byzantine
  sender show different metadata to different ranks; those ranks then disagree on whether
  the call proceeds and the call fails at its next collective or times out, as when a rank
  withholds a collective (the metadata round's ``all_gather`` relays rows through other
  ranks and does not stop a Byzantine process either).
* Nonfinite updates (NaN/Inf, or a squared norm overflowing) are always flagged and left
  out of the aggregate; so are ranks in ``exclude`` or with weight 0 (they are still
  measured and reported).
* Consensus failure: too few usable ranks for the rule's bound, more than ``f`` flagged
  ranks among those aggregated, a nonfinite aggregate, or (audited) a forged contribution
  to a rule's whole-vector sums. Then
  ``report.consensus_failed`` is True on every rank, ``report.reason`` says why, and the
  tensor is **zeroed** on every rank. The caller must skip the optimizer step (a zero
  gradient still moves momentum-based optimizers) or stop.
* Single process (``torch.distributed`` not initialised, or a group of one): the tensor is
  left as is and a trivial report returned.

Protocol-level attacks: ``tamper=`` (a :class:`~fedgspo.robust.shard_exchange.ProtocolTamper`,
implemented by :class:`fedgspo.robust.attacks.ProtocolAttack`) makes this rank publish
altered metadata, aggregated shards, partial statistics or votes, to test the modes against
a Byzantine rank's protocol messages. None (default) costs nothing.

Authenticated updates: with ``authenticator=`` (an
:class:`~fedgspo.robust.authentication.ExchangeAuthenticator` for this rank's group rank, such as
:class:`fedgspo.integrity.auth.UpdateAuthenticator`) and ``step=``, every message of the data exchange is checked
against an HMAC tag bound to (run, step, sender, receiver, shard). Right after the
``all_to_all`` (sharded, audited) each rank signs the ``n`` shards it sent and verifies the
shards it received; in replicated mode each rank signs its full update and verifies the
gathered ones. The tags travel in one tiny ``all_gather`` (``n * n * 32`` bytes) and the
senders rejected by *any* rank are agreed on by one ``all_reduce(MAX)`` of an ``n``-long
mask, before anything is aggregated. Those senders (tampered, forged, replayed from another
step, or carrying another rank's tag) are left out exactly like ``exclude`` ranks, always
flagged, and listed in ``report.auth_failed``; too few remaining ranks is a consensus
failure. The caller should audit them (:func:`fedgspo.integrity.auth.audit_auth_failures`). The cost
is sha256 over the bytes each rank sends and receives (hashed in place) plus those two tiny
collectives; without an authenticator nothing changes. Every rank passes an authenticator
with the same ``step``, or none does (checked up front: ``ValueError`` on every rank). A
rank can accuse any sender, so a Byzantine *receiver* can get honest senders excluded: that
costs the aggregate those ranks (or the step, when too few remain), while the rule's bound
on the ranks kept still holds.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import weakref
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from fedgspo.robust.aggregators import Aggregator, build_aggregator
from fedgspo.robust.authentication import ExchangeAuthenticator
from fedgspo.robust.compression import CODECS
from fedgspo.robust.precision import norm_dtype
from fedgspo.robust.detection import DEFAULT_THRESHOLD, SKEW_BOUND, detect, statistics_from_partial
from fedgspo.distributed import all_gather_single
from fedgspo.robust.shard_exchange import (
    AggregationPlan,
    AuditOutcome,
    Layout,
    Moved,
    ProtocolTamper,
    exchange,
    post_rows,
    replicated,
    sharded,
    split_stats,
)

MODES = ("sharded", "replicated", "audited")
_DTYPE_CODES = {torch.float32: 1, torch.float64: 2, torch.float16: 3, torch.bfloat16: 4}
#: Slots of the float64 metadata row every rank publishes and checks before it uses any data:
#: numel, dtype code, f, checksum of the call's configuration, error flag, ``||x||^2``, and
#: the authentication step (-1 without an authenticator).
META_NUMEL, META_DTYPE, META_F, META_CONFIG, META_ERROR, META_SQ_NORM, META_STEP = range(7)
#: The slots two calls must share to have the same layout (the others change every call).
_LAYOUT_SLOTS = (META_NUMEL, META_DTYPE, META_F, META_CONFIG)
#: Agreed layouts each group's predictor remembers (successors of as many layouts).
_PREDICTED_LAYOUTS = 64


@dataclass(frozen=True)
class RobustReport:
    """What one robust all-reduce saw; identical on every rank. Lists are indexed by rank.

    Attributes:
        distances: ``||x_i - a||`` to the (first) robust aggregate ``a``.
        z_scores: robust z-scores of the log distances (see :mod:`fedgspo.robust.detection`).
        flagged: ranks flagged as outliers or nonfinite (sorted).
        cosines: cosine of ``x_i`` to ``a``; ``z_cosine`` their robust z-scores.
        norms: ``||x_i||``; ``z_norm`` robust z-scores of the log norms.
        skews: mean over the columns where the aggregated updates differ of ``sign(x_ij - a_j)``;
            ``z_skew`` their robust z-scores (see :mod:`fedgspo.robust.detection`).
        nonfinite: ranks whose update had NaN/Inf (always flagged, never aggregated).
        excluded: ranks left out of the aggregate (requested, weight 0, nonfinite, or
            flagged with ``exclude_flagged``).
        weights: the weight each rank had in the aggregate's rule (0 = excluded).
        consensus_failed: the result is unusable; the tensor was zeroed; skip the step.
        reason: why consensus failed ("" otherwise).
        audit_mismatches: owners whose published shard, statistics or whole-vector
            contributions every rank's recomputation refuted (audited mode; flagged; their
            shard and statistics were repaired).
        false_accusations: auditors that accused a shard every rank's recomputation
            confirmed (audited mode; flagged).
        disputed: shards an auditor accused, recomputed by every rank (audited mode).
        auth_failed: senders whose update failed authentication on some rank (always
            flagged and excluded; empty without an authenticator).
        rule, mode, world_size: what was run.
    """

    distances: list[float]
    z_scores: list[float]
    flagged: list[int]
    cosines: list[float] = field(default_factory=list)
    norms: list[float] = field(default_factory=list)
    z_cosine: list[float] = field(default_factory=list)
    z_norm: list[float] = field(default_factory=list)
    skews: list[float] = field(default_factory=list)
    z_skew: list[float] = field(default_factory=list)
    nonfinite: list[int] = field(default_factory=list)
    excluded: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    consensus_failed: bool = False
    reason: str = ""
    audit_mismatches: list[int] = field(default_factory=list)
    false_accusations: list[int] = field(default_factory=list)
    disputed: list[int] = field(default_factory=list)
    auth_failed: list[int] = field(default_factory=list)
    rule: str = ""
    mode: str = ""
    world_size: int = 1


def _crc(text: str) -> int:
    return zlib.crc32(text.encode())


def _number(value: float) -> int | float:
    """A metadata value for an error message: an int when integral, else the float (NaN, inf)."""
    return int(value) if math.isfinite(value) and value == int(value) else value


def resolve_rule(rule: str | Aggregator, f: int | None, pre: Sequence[str] = (),
                 options: dict[str, float | int] | None = None) -> Aggregator:
    """``rule`` itself when it is an :class:`Aggregator` (then ``f``, ``pre`` and ``options``
    must be unset or agree with it), else the rule built by name with ``f`` (default 1).
    Raises ``ValueError`` on an unknown name, invalid options or a conflicting ``f``."""
    if not isinstance(rule, Aggregator):
        return build_aggregator(rule, 1 if f is None else f, pre=pre, **(options or {}))
    if pre or options:
        raise ValueError("pass pre-aggregation and rule options to build_aggregator, not with an Aggregator")
    if f is not None and f != rule.f:
        raise ValueError(f"f={f} conflicts with the aggregator's f={rule.f}")
    return rule


def _local_plan(
    tensor: torch.Tensor,
    rule: str | Aggregator,
    f: int | None,
    n: int,
    mode: str,
    exclude: Sequence[int],
    weights: Sequence[float] | None,
    pre: Sequence[str],
    options: dict[str, float | int],
    auth: ExchangeAuthenticator | None = None,
    step: int | None = None,
    rank: int = 0,
) -> tuple[Aggregator | None, torch.Tensor, str]:
    """Resolve the rule and check this rank's arguments; returns (rule, weights, local error)."""
    w = torch.ones(n, dtype=torch.float64)
    try:
        if auth is not None:
            if step is None or isinstance(step, bool) or not isinstance(step, int):
                raise ValueError(f"an authenticator needs an integer step, got {step!r}")
            auth.check(rank, n)
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; known: {', '.join(MODES)}")
        if tensor.dtype not in _DTYPE_CODES:
            raise ValueError(f"unsupported dtype {tensor.dtype}; supported: {sorted(map(str, _DTYPE_CODES))}")
        if any(not 0 <= r < n for r in exclude):
            raise ValueError(f"exclude {list(exclude)} names ranks outside 0..{n - 1}")
        if weights is not None:
            w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
            if w.shape != (n,) or not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
                raise ValueError(f"weights must be {n} finite non-negative numbers, got {list(weights)}")
        return resolve_rule(rule, f, pre, options), w, ""
    except ValueError as err:
        return None, w, str(err)


def _metadata_row(
    tensor: torch.Tensor, f: int, error: str, config_text: str, step: int | None, device: torch.device
) -> torch.Tensor:
    """This rank's float64 metadata row (slots ``META_*``)."""
    flat = tensor.reshape(-1)
    sq_norm = (torch.linalg.vector_norm(flat, dtype=norm_dtype(tensor.dtype)).double().square().item()
               if flat.is_floating_point() else 0.0)
    return torch.tensor(
        [flat.numel(), _DTYPE_CODES.get(tensor.dtype, 0), f, _crc(config_text), float(bool(error)), sq_norm,
         -1 if step is None else step],
        dtype=torch.float64,
        device=device,
    )


def _check(meta: torch.Tensor, agg: Aggregator | None, error: str, n: int) -> Aggregator:
    """Raise the same ``ValueError`` on every rank unless every row of the ``(n, 7)`` metadata
    reports no error and agrees with the others and the rule tolerates ``n`` ranks; returns
    the rule (this rank's, built by :func:`_local_plan`)."""
    bad = [r for r in range(n) if meta[r, META_ERROR] != 0]
    if bad:
        raise ValueError(f"robust_all_reduce: invalid arguments on rank(s) {bad}" + (f": {error}" if error else ""))
    for slot, what in ((META_NUMEL, "numel"), (META_DTYPE, "dtype"), (META_F, "f"),
                       (META_CONFIG, "rule/mode/options/exclude/weights"), (META_STEP, "authentication step")):
        if bool((meta[:, slot] != meta[0, slot]).any()):
            values = [_number(v) for v in meta[:, slot].tolist()]
            raise ValueError(f"robust_all_reduce: ranks disagree on {what} (per rank: {values})")
    assert agg is not None  # no rank reported an error, so this one built its rule
    try:
        agg.check(n)
    except ValueError as err:
        raise ValueError(f"robust_all_reduce: {err}") from None
    return agg


_LayoutKey = tuple[float, ...]


class _LayoutPredictor:
    """One group's agreed calls: predicts the next call's layout as the one that followed the
    previous call's layout last time. Updated only with agreed calls, in the same order on
    every rank, so every rank of the group predicts the same."""

    def __init__(self) -> None:
        self.last: _LayoutKey | None = None
        self.successor: OrderedDict[_LayoutKey | None, tuple[_LayoutKey, Layout]] = OrderedDict()

    def predict(self) -> tuple[_LayoutKey, Layout] | None:
        """The predicted (key, layout) of this call, or None (no agreed call has followed the last one)."""
        return self.successor.get(self.last)

    def record(self, key: _LayoutKey, layout: Layout) -> None:
        """Remember that the agreed call ``key`` (moving ``layout``) followed the last one."""
        self.successor[self.last] = (key, layout)
        self.successor.move_to_end(self.last)
        while len(self.successor) > _PREDICTED_LAYOUTS:
            self.successor.popitem(last=False)
        self.last = key


_PREDICTORS: weakref.WeakKeyDictionary[dist.ProcessGroup, _LayoutPredictor] = weakref.WeakKeyDictionary()


def _predictor(group: dist.ProcessGroup | None) -> _LayoutPredictor:
    """The predictor of ``group`` (the world when None); a new process group starts empty."""
    pg = group if group is not None else dist.group.WORLD
    if pg not in _PREDICTORS:
        _PREDICTORS[pg] = _LayoutPredictor()
    return _PREDICTORS[pg]


def _layout_key(row: torch.Tensor) -> _LayoutKey:
    return tuple(float(row[slot]) for slot in _LAYOUT_SLOTS)


def _agree_and_move(
    flat: torch.Tensor,
    row: torch.Tensor,
    layout: Layout | None,
    agg: Aggregator | None,
    error: str,
    group: dist.ProcessGroup | None,
    n: int,
) -> tuple[Aggregator, torch.Tensor, Layout, Moved | None]:
    """Check every rank's metadata ``row`` (module docstring, "How the rows travel") and move
    the data when the layout was predicted.

    ``row`` is what this rank publishes (after ``tamper``), ``layout`` this rank's own (None
    when its arguments are invalid). Returns the rule, the
    ``(n, 7)`` metadata, the agreed layout, and what moved (None: nothing has moved yet; the
    caller runs :func:`~fedgspo.robust.shard_exchange.exchange`). Raises the same
    ``ValueError`` on every rank on any mismatch; ``flat`` is only read.
    """
    predictor = _predictor(group)
    predicted = predictor.predict()
    moved: Moved | None = None
    if predicted is None:
        meta = torch.empty(n * row.numel(), dtype=torch.float64, device=row.device)
        all_gather_single(meta, row, group=group)
        meta = meta.view(n, -1).cpu()
    else:
        key, expected = predicted
        wait = post_rows(row, group, n)
        fits = layout == expected and not error
        moved = exchange(expected, flat if fits else expected.placeholder(flat.device), group, n)
        meta = wait()
    agg = _check(meta, agg, error, n)
    agreed = _layout_key(meta[0])
    assert layout is not None  # no rank reported an error
    if predicted is None or agreed != predicted[0]:
        moved = None  # the predicted layout was not this call's: what moved was a placeholder
    predictor.record(agreed, layout)
    return agg, meta, layout, moved


def _judge(
    plan: AggregationPlan, sums: torch.Tensor, *, z_threshold: float, skew_bound: float | None,
    exclude_flagged: bool, mode: str
) -> tuple[RobustReport, list[int]]:
    """Flags, exclusions and the consensus decision from the global per-rank sums."""
    n, keep = plan.n, plan.keep
    stats = statistics_from_partial(sums)
    det = detect(stats, z_threshold, skew_bound=skew_bound)
    flagged = sorted(set(det.flagged) | set(plan.nonfinite) | set(plan.auth_failed))
    reason = ""
    if exclude_flagged and set(flagged) & set(keep):
        keep = [r for r in keep if r not in flagged]
        if not plan.tolerated(len(keep)):
            reason = f"after excluding flagged ranks {flagged}, {len(keep)} ranks are too few for {plan.agg.spec()}"
    suspicious = [r for r in flagged if r in keep]
    if not reason and len(suspicious) > plan.agg.f:
        reason = (
            f"{len(suspicious)} aggregated ranks flagged ({suspicious}) "
            f"but {plan.agg.spec()} tolerates f={plan.agg.f}"
        )
    if not reason and not torch.isfinite(split_stats(sums).agg_sq_norm).all():
        reason = "the aggregate is not finite"
    report = RobustReport(
        distances=stats.distances,
        z_scores=det.z_distance,
        flagged=flagged,
        cosines=stats.cosines,
        norms=stats.norms,
        z_cosine=det.z_cosine,
        z_norm=det.z_norm,
        skews=stats.skews,
        z_skew=det.z_skew,
        nonfinite=plan.nonfinite,
        excluded=[r for r in range(n) if r not in keep],
        weights=[float(plan.weights[r]) if r in keep else 0.0 for r in range(n)],
        consensus_failed=bool(reason),
        reason=reason,
        auth_failed=list(plan.auth_failed),
        rule=plan.agg.spec(),
        mode=mode,
        world_size=n,
    )
    return report, keep


def _failed_report(plan: AggregationPlan, mode: str, reason: str) -> RobustReport:
    nan = [math.nan] * plan.n
    return RobustReport(
        distances=nan,
        z_scores=nan,
        flagged=sorted(set(plan.nonfinite) | set(plan.auth_failed)),
        cosines=nan,
        norms=nan,
        z_cosine=nan,
        z_norm=nan,
        skews=nan,
        z_skew=nan,
        nonfinite=plan.nonfinite,
        excluded=[r for r in range(plan.n) if r not in plan.keep],
        weights=[0.0] * plan.n,
        consensus_failed=True,
        reason=reason,
        auth_failed=list(plan.auth_failed),
        rule=plan.agg.spec(),
        mode=mode,
        world_size=plan.n,
    )


def _authenticate(auth: ExchangeAuthenticator, step: int, group: dist.ProcessGroup | None, n: int, mode: str):
    """The ``verify`` hook of :mod:`fedgspo.robust.shard_exchange`: ask the authenticator which
    senders this rank rejects, then agree on the union over ranks (``all_reduce(MAX)`` of an
    ``n`` mask), so every rank drops the same senders."""

    def verify(sent: torch.Tensor, received: torch.Tensor) -> list[int]:
        local = auth.rejected_senders(sent, received, step=step, replicated=mode == "replicated", group=group)
        mask = torch.zeros(n, dtype=torch.float64, device=received.device)
        if local:
            mask[torch.tensor(local, device=received.device)] = 1.0
        dist.all_reduce(mask, op=dist.ReduceOp.MAX, group=group)
        return [r for r, v in enumerate(mask.cpu().tolist()) if v > 0]

    return verify


def _with_audit(report: RobustReport, audit: AuditOutcome) -> RobustReport:
    """``report`` with the audit's blame flagged and, on an unrepairable dispute, failed."""
    if not (audit.disputed or audit.failure):
        return report
    failed = report.consensus_failed or bool(audit.failure)
    return dataclasses.replace(
        report,
        flagged=sorted(set(report.flagged) | set(audit.mismatches) | set(audit.false_accusations)),
        audit_mismatches=audit.mismatches,
        false_accusations=audit.false_accusations,
        disputed=audit.disputed,
        consensus_failed=failed,
        reason=report.reason or (f"audit: {audit.failure}" if audit.failure else ""),
    )


def robust_all_reduce(
    tensor: torch.Tensor,
    rule: str | Aggregator = "trimmed_mean",
    f: int | None = None,
    group: dist.ProcessGroup | None = None,
    *,
    mode: str = "sharded",
    z_threshold: float = DEFAULT_THRESHOLD,
    skew_bound: float | None = SKEW_BOUND,
    exclude: Sequence[int] = (),
    weights: Sequence[float] | None = None,
    exclude_flagged: bool = False,
    pre: Sequence[str] = (),
    authenticator: ExchangeAuthenticator | None = None,
    step: int | None = None,
    tamper: ProtocolTamper | None = None,
    compression: str = "none",
    **rule_options: float | int,
) -> RobustReport:
    """Replace ``tensor`` in place, on every rank, by the robust aggregate of all ranks' tensors.

    Args:
        tensor: this rank's update (any shape, floating dtype); overwritten with the result.
        rule: an :class:`~fedgspo.robust.aggregators.Aggregator` (keeps its state, e.g.
            bucketing's shuffle round, across calls: build it once and reuse it), or a name
            from :data:`fedgspo.robust.aggregators.RULES` (a fresh rule each call).
        f: Byzantine ranks to tolerate with a rule name (default 1); with an Aggregator,
            unset or equal to its ``f``. The rule's bound is checked against the world size.
        group: process group (default: the world).
        mode: ``"sharded"``, ``"replicated"`` or ``"audited"`` (module docstring).
        z_threshold: robust z-score threshold for flagging (:mod:`fedgspo.robust.detection`).
        skew_bound: flag ranks whose skew is beyond +-this and a z-score outlier; None: off.
        exclude: ranks left out of the aggregate (e.g. quarantined); still measured.
        weights: per-rank non-negative weights; 0 excludes a rank; rules with a weighted
            form (mean, geometric median, centered clipping) use the values.
        exclude_flagged: re-aggregate without the ranks flagged in this call.
        pre: pre-aggregation steps (``"nnm"``, ``"bucketing"``) with a rule name.
        authenticator: this rank's
            :class:`~fedgspo.robust.authentication.ExchangeAuthenticator` (for its rank in
            ``group``); authenticates every exchanged update (module docstring). None
            (default): no authentication, no extra cost.
        step: the training step the tags are bound to (required with ``authenticator``;
            the same on every rank); a tag made for another step does not verify.
        tamper: makes *this* rank lie inside the exchange (attack simulation; module
            docstring). None (default): the honest protocol, no extra cost.
        rule_options: the rule's (and bucketing's) further arguments.
        compression: how the updates travel (:mod:`fedgspo.robust.compression`): ``"none"``;
            ``"bf16"`` (any mode: the call runs on a bfloat16 copy, so the rule and its
            statistics see bfloat16 values); ``"int8"`` (sharded or replicated, not audited:
            every update, or every shard of it, travels as int8 codes with per-chunk scales
            and is aggregated decoded; sharded also sends the aggregated shards as int8).
            The result has the tensor's dtype.

    Returns:
        A :class:`RobustReport`, identical on every rank.

    Raises:
        ValueError: on every rank, for invalid or inconsistent arguments (tensor unchanged).
    """
    if compression not in CODECS:
        raise ValueError(f"compression {compression!r}: choose from {', '.join(CODECS)}")
    if compression == "int8" and mode == "audited":
        raise ValueError("compression 'int8' works with mode 'sharded' or 'replicated', not 'audited'")
    if compression == "bf16" and tensor.dtype != torch.bfloat16:
        wire = tensor.to(torch.bfloat16)
        report = robust_all_reduce(
            wire, rule, f, group, mode=mode, z_threshold=z_threshold, skew_bound=skew_bound, exclude=exclude,
            weights=weights,
            exclude_flagged=exclude_flagged, pre=pre, authenticator=authenticator, step=step, tamper=tamper,
            **rule_options)
        tensor.copy_(wire)
        return report
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size(group) == 1:
        spec = rule.spec() if isinstance(rule, Aggregator) else rule
        return RobustReport([0.0], [0.0], [], cosines=[1.0], norms=[float(tensor.norm())], weights=[1.0], rule=spec)
    n = dist.get_world_size(group)
    options = dict(rule_options)
    agg, w, error = _local_plan(
        tensor, rule, f, n, mode, exclude, weights, pre, options, authenticator, step, dist.get_rank(group)
    )
    config_text = repr(
        (agg.spec() if agg else rule, mode, sorted(agg.options().items()) if agg else options, sorted(exclude),
         weights, z_threshold, skew_bound, exclude_flagged, authenticator is not None, compression)
    )
    with torch.no_grad():
        flat = tensor.reshape(-1)
        row = _metadata_row(tensor, agg.f if agg else -1, error, config_text,
                            step if authenticator is not None else None, tensor.device)
        if tamper is not None:
            tamper.metadata(row)
        layout = None if error else Layout(mode, flat.numel(), tensor.dtype, compression)
        agg, meta, layout, moved = _agree_and_move(flat, row, layout, agg, error, group, n)
        nonfinite = [r for r in range(n) if not torch.isfinite(meta[r, META_SQ_NORM])]
        keep = [r for r in range(n) if r not in set(exclude) and w[r] > 0 and r not in nonfinite]
        plan = AggregationPlan(agg, n, keep, w, nonfinite, agg.next_round())
        judge = functools.partial(_judge, z_threshold=z_threshold, skew_bound=skew_bound,
                                  exclude_flagged=exclude_flagged, mode=mode)
        verify = None if authenticator is None else _authenticate(authenticator, step, group, n, mode)
        if not plan.tolerated():
            report, result = _failed_report(plan, mode, f"{len(keep)} usable ranks are too few for {agg.spec()}"), None
        else:
            if moved is None:
                moved = exchange(layout, flat, group, n)
            if mode == "replicated":
                report, result, audit, plan = replicated(plan, moved, judge, verify)
            else:
                report, result, audit, plan = sharded(plan, flat, moved, group, judge, audited=mode == "audited",
                                                      verify=verify, tamper=tamper, codec=compression)
            if report is None:
                report = _failed_report(
                    plan, mode, f"after excluding ranks {plan.auth_failed} whose updates failed authentication, "
                    f"{len(plan.keep)} usable ranks are too few for {agg.spec()}")
            else:
                report = _with_audit(report, audit)
        if result is None:
            tensor.zero_()
        elif result.data_ptr() != tensor.data_ptr():
            tensor.copy_(result.view_as(tensor))
    return report
