"""Byzantine attack simulator: corrupt chosen ranks' flat updates (or rewards) from a step on.

:func:`apply_attack` is called by *every* rank on its flat update after backward and before
the robust all-reduce; it changes the update only on ``cfg.ranks`` from ``cfg.start_step``.
:func:`poison_rewards` is called on every rank on its rewards before advantages are
computed (only ``reward_flip`` changes anything).

Attacks (``strength`` default per kind in brackets):

* ``sign_flip`` [1]: ``-strength * g``.            * ``scaled`` [10]: ``strength * g``.
* ``gaussian`` [1]: ``N(0, strength^2)`` noise in place of ``g``.
* ``zero``: ``0``.                                 * ``nan``: all NaN.
* ``bit_flip`` [1e-3]: a fraction ``strength`` of the coordinates get their top exponent bit
  flipped (huge or tiny values).
* ``alie`` [z_max of Baruch et al.]: ``mean - strength * std`` of the honest updates
  ("A little is enough", NeurIPS 2019); colluding.
* ``ipm`` [0.1]: ``-strength * mean`` of the honest updates (inner product manipulation,
  Xie et al., UAI 2020); colluding.
* ``reward_flip`` [1]: rewards ``r -> -strength * r`` (upstream; updates untouched).

Adaptive attacks, which play against the defences rather than past them:

* ``stealth`` [0.9]: knows the detection rule and its default thresholds and stays under
  them. It sends ``mean - lam * std`` of the honest updates (ALIE's direction) with the
  largest ``lam`` (bisection, up to :data:`STEALTH_MAX_LAM`) whose statistics the per-step
  test (:func:`fedgspo.robust.detection.detect`) and replicas of the across-step tests
  (:class:`~fedgspo.robust.detection.PersistentDeviation` with its defaults, over all steps
  and per phase of ``phases`` updates per rollout) would not flag at ``strength`` times the
  default threshold (the cosine bound scaled alike). It measures against the honest mean as
  a stand-in for the aggregate; colluding. Against the skew test any ``lam > 0`` lies below
  that mean in every column (skew -1), so with the default skew bound it sends the honest
  mean itself.
* ``alternating`` [1]: ``-strength * g`` on every other step from ``start_step`` on (the
  second, fourth, ...), honest on the others, so that it halves its averages across steps.
* ``sleeper`` [1]: honest until ``start_step`` (default :data:`SLEEPER_START` for this kind),
  then ``-strength * g``: its trust and its averages across steps are those of an honest rank
  when it wakes.
* ``collusion`` [1]: every attacker sends the same vector, ``-strength`` times the honest
  mean rescaled to the median honest norm: a coordinated sign flip of ordinary norm, which
  distance-based rules (Krum, NNM) see as a tight pair of rows; colluding.

Protocol-level attacks leave the update alone and make the attacker lie *inside* the robust
all-reduce, through :func:`protocol_tamper` (a :class:`ProtocolAttack` to pass as
``robust_all_reduce(..., tamper=...)``). The ``audited`` mode repairs or rejects each of them
with the liar flagged; ``sharded`` trusts owners and is defeated by the first three:

* ``lie_aggregate`` [1]: the attacker publishes its aggregated shard plus ``strength``.
* ``lie_stats`` [1e3]: as an owner it publishes partial statistics in which the squared
  norm of ``target`` (default: the lowest honest rank) is ``strength^2`` times larger, so
  that ``target``'s norm looks blown up (framing an honest rank).
* ``lie_vote`` [-1]: as an auditor it votes ``strength`` (accusing) when the shard it audits
  is right, and 0 (covering up) when it is wrong; -1 is the vote that cancelled another
  auditor's accusation when votes were summed.
* ``bad_metadata`` [1]: its metadata row claims ``numel + strength`` elements, the other of
  float32/float64 and ``f + 1``.

Colluding attacks read the honest updates through an ``all_gather`` of every rank's update
(``n`` times the gradient bytes: simulation only). All ranks take part whenever the attack
is active, so nothing hangs; randomness is seeded by ``(seed, rank, step)``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from statistics import NormalDist
from typing import Any

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from fedgspo.distributed import all_gather_single
from fedgspo.robust.all_reduce import META_DTYPE, META_F, META_NUMEL
from fedgspo.robust.detection import (
    COSINE_BOUND, DEFAULT_THRESHOLD, SKEW_BOUND, PersistentDeviation, RankStatistics, detect,
    statistics_from_sums)
from fedgspo.robust.reputation import PersistenceConfig
from fedgspo.robust.shard_exchange import ProtocolTamper, split_stats

#: First attacking step of ``sleeper`` when ``start_step`` is not given.
SLEEPER_START = 100
#: Largest multiple of the honest coordinate-wise std that ``stealth`` subtracts.
STEALTH_MAX_LAM = 100.0
#: Bisection steps of ``stealth`` (the chosen ``lam`` is within ``STEALTH_MAX_LAM / 2**k``).
STEALTH_BISECTIONS = 20


class AttackConfig(BaseModel):
    """Which ranks attack, how, and from when."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    kind: str = Field(description="Attack name, a key of ATTACKS.")
    ranks: list[int] = Field(default_factory=list, description="Byzantine ranks.")
    strength: float | None = Field(None, description="Attack parameter; None: the kind's default.")
    start_step: int = Field(
        0, ge=0, description="First step at which the attack is active (sleeper: SLEEPER_START when not given).")
    seed: int = Field(0, description="Seed of the random attacks (gaussian, bit_flip).")
    target: int | None = Field(
        None, ge=0, description="Rank lie_stats frames; None: the lowest rank not in ranks.")
    phases: int = Field(
        2, gt=0, description="Updates per rollout that stealth assumes (gspo.num_iterations), for its replica "
        "of the per-phase across-step test.")
    # stealth's replicas of the across-step tests, all steps (key -1) and per phase
    # (attacker-side state, never serialised).
    _shadows: dict[int, PersistentDeviation] = PrivateAttr(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _sleeper_start(cls, data: Any) -> Any:
        """A ``sleeper`` without ``start_step`` (or with null) wakes at :data:`SLEEPER_START`."""
        if isinstance(data, dict) and data.get("kind") == "sleeper" and data.get("start_step") is None:
            return {**data, "start_step": SLEEPER_START}
        return data

    @field_validator("kind")
    @classmethod
    def _known(cls, kind: str) -> str:
        if kind not in ATTACKS:
            raise ValueError(f"unknown attack {kind!r}; known: {', '.join(sorted(ATTACKS))}")
        return kind

    @field_validator("ranks")
    @classmethod
    def _distinct(cls, ranks: list[int]) -> list[int]:
        if len(set(ranks)) != len(ranks) or any(r < 0 for r in ranks):
            raise ValueError(f"ranks must be distinct non-negative integers, got {ranks}")
        return sorted(ranks)

    def active(self, step: int) -> bool:
        """Whether the attack acts at ``step`` (same answer on every rank)."""
        return step >= self.start_step and bool(self.ranks)


def _generator(cfg: AttackConfig, rank: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((cfg.seed * 1_000_003 + rank) * 1_000_003 + step)


def alie_z(n: int, f: int) -> float:
    """Baruch et al.'s ``z_max = Phi^-1((n - s) / n)`` with ``s = floor(n/2 + 1) - f``."""
    s = math.floor(n / 2 + 1) - f
    return NormalDist().inv_cdf(min(max((n - s) / n, 1e-6), 1 - 1e-6))


def _honest_stack(flat: torch.Tensor, cfg: AttackConfig, group: dist.ProcessGroup | None) -> torch.Tensor:
    n = dist.get_world_size(group)
    out = torch.empty(n * flat.numel(), dtype=flat.dtype, device=flat.device)
    all_gather_single(out, flat.contiguous(), group=group)
    honest = [r for r in range(n) if r not in cfg.ranks]
    if not honest:
        raise ValueError("colluding attacks need at least one honest rank")
    return out.view(n, -1)[honest]


def _sign_flip(g: torch.Tensor, s: float, gen: torch.Generator) -> None:
    g.mul_(-s)


def _scaled(g: torch.Tensor, s: float, gen: torch.Generator) -> None:
    g.mul_(s)


def _gaussian(g: torch.Tensor, s: float, gen: torch.Generator) -> None:
    g.copy_(torch.randn(g.shape, generator=gen, dtype=g.dtype) * s)


def _zero(g: torch.Tensor, s: float, gen: torch.Generator) -> None:
    g.zero_()


def _nan(g: torch.Tensor, s: float, gen: torch.Generator) -> None:
    g.fill_(math.nan)


_INT_OF_SIZE = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bit_flip(g: torch.Tensor, s: float, gen: torch.Generator) -> None:
    bits = g.view(_INT_OF_SIZE[g.element_size()])
    count = max(1, math.ceil(s * g.numel()))
    idx = torch.randperm(g.numel(), generator=gen)[:count].to(g.device)
    top_exponent_bit = 1 << (8 * g.element_size() - 2)
    bits[idx] ^= top_exponent_bit


def _no_op(g: torch.Tensor, s: float, gen: torch.Generator) -> None:
    """``reward_flip`` acts on rewards (:func:`poison_rewards`), not on updates."""


LocalAttack = Callable[[torch.Tensor, float, torch.Generator], None]
_LOCAL: dict[str, LocalAttack] = {
    "sign_flip": _sign_flip,
    "scaled": _scaled,
    "gaussian": _gaussian,
    "zero": _zero,
    "nan": _nan,
    "bit_flip": _bit_flip,
    "reward_flip": _no_op,
    "alternating": _sign_flip,
    "sleeper": _sign_flip,
}
COLLUDING = ("alie", "ipm", "stealth", "collusion")
PROTOCOL = ("lie_aggregate", "lie_vote", "lie_stats", "bad_metadata")
ATTACKS: tuple[str, ...] = tuple(sorted((*_LOCAL, *COLLUDING, *PROTOCOL)))
_DEFAULT_STRENGTH = {
    "sign_flip": 1.0, "scaled": 10.0, "gaussian": 1.0, "bit_flip": 1e-3, "ipm": 0.1, "reward_flip": 1.0,
    "stealth": 0.9, "alternating": 1.0, "sleeper": 1.0, "collusion": 1.0,
    "lie_aggregate": 1.0, "lie_vote": -1.0, "lie_stats": 1e3, "bad_metadata": 1.0,
}


def strength_of(cfg: AttackConfig, n: int) -> float:
    """The attack parameter in effect: ``cfg.strength`` or the kind's default for ``n`` ranks."""
    if cfg.strength is not None:
        return cfg.strength
    if cfg.kind == "alie":
        return alie_z(n, len(cfg.ranks))
    return _DEFAULT_STRENGTH.get(cfg.kind, 0.0)


def _collusion(honest: torch.Tensor, s: float) -> torch.Tensor:
    """``-s`` times the honest mean at the median honest norm (the same on every attacker)."""
    mean = honest.mean(0)
    scale = honest.norm(dim=1).median() / mean.norm().clamp_min(torch.finfo(mean.dtype).tiny)
    return -s * scale * mean


def _stealth(cfg: AttackConfig, honest: torch.Tensor, n: int, fraction: float, step: int) -> torch.Tensor:
    """``mean - lam * std`` of ``honest`` with the largest ``lam`` that neither test would flag
    at ``fraction`` of the default thresholds (module docstring); updates ``cfg``'s replicas of
    the across-step tests (over all steps, and over this step's phase ``step % cfg.phases``)
    with the statistics of the vector sent. The replicas are judged as if warmed up from the
    first step, so that the averages are already inside the bounds when the real test starts."""
    honest_ranks = [r for r in range(n) if r not in cfg.ranks]
    rows = honest.double()
    mean = rows.mean(0)
    std = rows.std(0, correction=1 if honest.shape[0] > 1 else 0)
    keys = (-1,) if cfg.phases == 1 else (-1, step % cfg.phases)
    for key in keys:
        if key not in cfg._shadows or len(cfg._shadows[key].updates) != n:
            cfg._shadows[key] = PersistentDeviation(n, log_ratio_cap=PersistenceConfig().log_ratio_cap)

    # What does not depend on lam: the honest rows' sums against the honest mean (the
    # stand-in aggregate), their signs and the columns in which they differ.
    honest_dots, honest_sq, mm = rows @ mean, (rows ** 2).sum(1), float(mean @ mean)
    honest_differ = (rows != rows[:1]).any(0)
    above, below = rows > mean, rows < mean

    def statistics(lam: float) -> RankStatistics:
        """Every rank's statistics against the honest mean when the attackers send ``mean - lam * std``
        (the sums of :func:`~fedgspo.robust.shard_exchange.partial_stats`, by parts)."""
        sent = mean - lam * std
        spread = honest_differ | (sent != rows[0])
        signs = torch.full((n,), float(torch.sign(sent - mean)[spread].sum()), dtype=torch.float64)
        signs[honest_ranks] = ((above & spread).sum(1) - (below & spread).sum(1)).double()
        dots = torch.full((n,), float(sent @ mean), dtype=torch.float64)
        sq = torch.full((n,), float(sent @ sent), dtype=torch.float64)
        dots[honest_ranks], sq[honest_ranks] = honest_dots, honest_sq
        return statistics_from_sums(dots, sq, mm, signs, float(spread.sum()))

    def unseen(lam: float) -> bool:
        stats = statistics(lam)
        per_step = detect(stats, threshold=fraction * DEFAULT_THRESHOLD, cosine_bound=fraction * COSINE_BOUND,
                          skew_bound=None if SKEW_BOUND is None else fraction * SKEW_BOUND)
        flagged = set(per_step.flagged)
        for key in keys:
            shadow = copy.deepcopy(cfg._shadows[key])
            shadow.threshold, shadow.warmup = fraction * shadow.threshold, 1
            flagged |= set(shadow.update(stats.cosines, stats.norms, stats.skews))
        return not set(cfg.ranks) & flagged

    lo, hi = 0.0, STEALTH_MAX_LAM
    if unseen(hi):
        lo = hi
    else:
        for _ in range(STEALTH_BISECTIONS):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if unseen(mid) else (lo, mid)
    sent = statistics(lo)
    for key in keys:
        cfg._shadows[key].update(sent.cosines, sent.norms, sent.skews)
    return (mean - lo * std).to(honest.dtype)


def apply_attack(
    cfg: AttackConfig | None, flat_grad: torch.Tensor, rank: int, step: int, group: dist.ProcessGroup | None = None
) -> bool:
    """Corrupt ``flat_grad`` in place if this rank attacks at ``step``; returns whether it did.

    Must be called by every rank of ``group`` with the same ``cfg`` and ``step`` (colluding
    attacks run an ``all_gather`` in which every rank takes part). ``flat_grad`` must be a
    1-D floating tensor. Without ``torch.distributed`` colluding attacks raise ``ValueError``.
    Protocol-level kinds never touch the update (see :func:`protocol_tamper`); ``alternating``
    leaves it alone (and returns False) on its honest steps. ``stealth`` keeps its replicas of
    the across-step tests on ``cfg``: call it once per step, with the same ``cfg`` object.
    """
    if cfg is None or not cfg.active(step) or cfg.kind in PROTOCOL:
        return False
    if cfg.kind == "alternating" and (step - cfg.start_step) % 2 == 0:
        return False
    attacker = rank in cfg.ranks
    if cfg.kind in COLLUDING:
        if not dist.is_initialized():
            raise ValueError(f"attack {cfg.kind!r} needs torch.distributed (it reads honest updates)")
        honest = _honest_stack(flat_grad, cfg, group)
        if attacker:
            n = dist.get_world_size(group)
            s = strength_of(cfg, n)
            mean = honest.mean(0)
            if cfg.kind == "alie":
                std = honest.std(0, correction=1 if honest.shape[0] > 1 else 0)
                flat_grad.copy_(mean - s * std)
            elif cfg.kind == "ipm":
                flat_grad.copy_(-s * mean)
            elif cfg.kind == "collusion":
                flat_grad.copy_(_collusion(honest, s))
            else:
                flat_grad.copy_(_stealth(cfg, honest, n, s, step))
        return attacker
    if attacker:
        n = dist.get_world_size(group) if dist.is_initialized() else 1
        _LOCAL[cfg.kind](flat_grad, strength_of(cfg, n), _generator(cfg, rank, step))
    return attacker


def poison_rewards(cfg: AttackConfig | None, rewards: torch.Tensor, rank: int, step: int) -> torch.Tensor:
    """Rewards as this rank reports them: ``-strength * rewards`` under an active ``reward_flip``.

    Returns a new tensor (or ``rewards`` itself when untouched); no collectives.
    """
    if cfg is None or cfg.kind != "reward_flip" or not cfg.active(step) or rank not in cfg.ranks:
        return rewards
    return rewards * -strength_of(cfg, 1)


class ProtocolAttack(ProtocolTamper):
    """The :class:`~fedgspo.robust.shard_exchange.ProtocolTamper` of one protocol-level attack
    (module docstring): alters only what ``kind`` lies about.

    Args:
        kind: one of :data:`PROTOCOL`. strength: the attack parameter in effect.
        target: the rank ``lie_stats`` frames (ignored by the other kinds).
    """

    def __init__(self, kind: str, strength: float, target: int = 0) -> None:
        if kind not in PROTOCOL:
            raise ValueError(f"{kind!r} is not a protocol-level attack; those are: {', '.join(PROTOCOL)}")
        self.kind, self.strength, self.target = kind, strength, target

    def metadata(self, row: torch.Tensor) -> None:
        if self.kind == "bad_metadata":
            row[META_NUMEL] += self.strength
            row[META_DTYPE] = 2.0 if row[META_DTYPE] == 1.0 else 1.0  # float64 <-> float32 codes
            row[META_F] += 1.0

    def aggregate(self, shard: torch.Tensor) -> None:
        if self.kind == "lie_aggregate":
            shard.add_(self.strength)

    def statistics(self, stats: torch.Tensor) -> None:
        if self.kind == "lie_stats":
            sq_norms = split_stats(stats).sq_norms
            if self.target < sq_norms.numel():
                sq_norms[self.target] *= self.strength**2

    def vote(self, vote: float) -> float:
        if self.kind == "lie_vote":
            return 0.0 if vote else self.strength
        return vote


def protocol_tamper(
    cfg: AttackConfig | None, rank: int, step: int, group: dist.ProcessGroup | None = None
) -> ProtocolAttack | None:
    """The tamper to pass as ``robust_all_reduce(..., tamper=...)`` on ``rank`` at ``step``:
    a :class:`ProtocolAttack` when ``cfg`` is an active protocol-level attack and ``rank``
    attacks, else None (the honest protocol). No collectives. Every rank must call it with
    the same ``cfg``: a ``target`` outside the group raises the same ``ValueError`` on every
    rank (before any rank enters the all-reduce).
    """
    if cfg is None or cfg.kind not in PROTOCOL or not cfg.active(step):
        return None
    n = dist.get_world_size(group) if dist.is_initialized() else 1
    if cfg.target is not None and cfg.target >= n:
        raise ValueError(f"lie_stats target {cfg.target} is not a rank of a group of {n}")
    if rank not in cfg.ranks:
        return None
    target = cfg.target if cfg.target is not None else next(r for r in range(n + 1) if r not in cfg.ranks)
    return ProtocolAttack(cfg.kind, strength_of(cfg, n), target)
