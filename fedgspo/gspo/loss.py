"""GSPO: Group Sequence Policy Optimization (Zheng et al., 2025, arXiv:2507.18071).

For completion ``i`` with unmasked tokens ``t``:

    s_i   = exp( mean_t [log pi_theta(y_i,t) - log pi_old(y_i,t)] )     # sequence ratio
    J     = mean_i min( s_i A_i, clip(s_i, 1 - eps, 1 + eps_high) A_i )

``level="token"`` is GSPO-token: ``s_i,t = sg[s_i] * pi_theta(y_i,t) / sg[pi_theta(y_i,t)]`` has
the value of ``s_i`` and per-token gradient weights. With ``beta > 0`` the k3 estimator of
KL(pi_theta || pi_ref), ``exp(r - l) - (r - l) - 1``, is added per token with weight ``beta``.
The loss is ``-J`` reduced as the mean over sequences of each sequence's masked token mean,
the reduction TRL calls ``loss_type="grpo"``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

Level = Literal["sequence", "token"]


@dataclass(frozen=True)
class GSPOStats:
    """Detached diagnostics of one loss evaluation (0-d tensors; no host sync on creation)."""

    clip_frac: torch.Tensor  # fraction of sequences whose clipped term was the active one
    ratio_mean: torch.Tensor  # mean sequence ratio s_i
    kl: torch.Tensor  # mean per-sequence k3 KL (0 when beta == 0)


def group_advantages(
    rewards: torch.Tensor, group_size: int, *, scale: bool = True, eps: float = 1e-4
) -> torch.Tensor:
    """Group-normalised advantages ``(r - mean_g(r)) / (std_g(r) + eps)``.

    ``rewards`` is ``(P * G,)`` with the ``G`` completions of each prompt contiguous. The std
    is the unbiased one, as in TRL. A group whose rewards are all equal gets zero advantage.
    Raises ``ValueError`` if the length is not a multiple of ``group_size``.
    """
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(
            f"rewards must be 1-D with a multiple of group_size={group_size} entries, "
            f"got shape {tuple(rewards.shape)}"
        )
    grouped = rewards.view(-1, group_size)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        centered = centered / (grouped.std(dim=1, keepdim=True) + eps)
    return centered.reshape(-1)


def _masked_seq_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


def gspo_loss_and_stats(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon: float = 3e-4,
    epsilon_high: float | None = 4e-4,
    level: Level = "sequence",
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
) -> tuple[torch.Tensor, GSPOStats]:
    """:func:`gspo_loss` plus its :class:`GSPOStats`; see there for the contract."""
    if logps.shape != old_logps.shape or logps.shape != mask.shape:
        raise ValueError(
            f"logps {tuple(logps.shape)}, old_logps {tuple(old_logps.shape)} and mask "
            f"{tuple(mask.shape)} must have the same (B, T) shape"
        )
    if advantages.shape != logps.shape[:1]:
        raise ValueError(f"advantages must have shape ({logps.shape[0]},), got {tuple(advantages.shape)}")
    if level not in ("sequence", "token"):
        raise ValueError(f"level must be 'sequence' or 'token', got {level!r}")
    if beta > 0 and ref_logps is None:
        raise ValueError("beta > 0 needs ref_logps")
    eps_high = epsilon if epsilon_high is None else epsilon_high
    mask = mask.to(logps.dtype)

    seq_log_ratio = _masked_seq_mean(logps - old_logps, mask)  # (B,)
    if level == "sequence":
        log_w = seq_log_ratio.unsqueeze(-1)  # (B, 1): one weight per sequence
    else:
        log_w = logps - logps.detach() + seq_log_ratio.detach().unsqueeze(-1)  # (B, T)
    ratio = torch.exp(log_w)
    clipped = torch.clamp(ratio, 1.0 - epsilon, 1.0 + eps_high)
    adv = advantages.unsqueeze(-1)
    per_token = -torch.minimum(ratio * adv, clipped * adv)

    if beta > 0:
        delta = ref_logps - logps
        per_token_kl = torch.exp(delta) - delta - 1.0
        per_token = per_token + beta * per_token_kl
        kl = _masked_seq_mean(per_token_kl.detach(), mask).mean()
    else:
        kl = logps.new_zeros(())

    per_token = per_token.expand_as(logps)
    loss = _masked_seq_mean(per_token, mask).mean()

    with torch.no_grad():
        seq_ratio = torch.exp(seq_log_ratio)
        low = (seq_ratio < 1.0 - epsilon) & (advantages < 0)
        high = (seq_ratio > 1.0 + eps_high) & (advantages > 0)
        stats = GSPOStats(
            clip_frac=(low | high).to(logps.dtype).mean(),
            ratio_mean=seq_ratio.mean(),
            kl=kl,
        )
    return loss, stats


def backward_in_micro_batches(
    logps_fn: Callable[[slice], torch.Tensor],
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    micro_batch_size: int,
    epsilon: float = 3e-4,
    epsilon_high: float | None = 4e-4,
    level: Level = "sequence",
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
) -> tuple[torch.Tensor, GSPOStats]:
    """Forward, GSPO loss and backward over chunks of at most ``micro_batch_size`` rows,
    accumulating into the parameters' ``.grad``.

    ``logps_fn(rows)`` returns the ``(b, T)`` current-policy log-probs (with gradient) of the
    rows ``rows`` (a ``slice``) of the batch; the other arguments are the full-batch ones of
    :func:`gspo_loss`. The loss and every statistic are means over rows of per-row values
    (GSPO's ratio and clipping are per sequence), so scaling each chunk's loss by its share of
    the rows makes the accumulated gradient, the returned detached loss and the
    :class:`GSPOStats` equal to one full-batch :func:`gspo_loss_and_stats` and backward, up to
    floating-point summation order. Gradients are added to whatever ``.grad`` holds (zero it
    first). Raises ``ValueError`` for ``micro_batch_size < 1`` and as :func:`gspo_loss`.
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    rows_total = old_logps.shape[0]
    loss_sum, clip_frac, ratio_mean, kl = (old_logps.new_zeros(()) for _ in range(4))
    for start in range(0, rows_total, micro_batch_size):
        rows = slice(start, min(start + micro_batch_size, rows_total))
        loss, stats = gspo_loss_and_stats(
            logps_fn(rows), old_logps[rows], advantages[rows], mask[rows],
            epsilon=epsilon, epsilon_high=epsilon_high, level=level,
            ref_logps=None if ref_logps is None else ref_logps[rows], beta=beta,
        )
        share = (rows.stop - rows.start) / rows_total
        (loss * share).backward()
        loss_sum += loss.detach() * share
        clip_frac += stats.clip_frac * share
        ratio_mean += stats.ratio_mean * share
        kl += stats.kl * share
    return loss_sum, GSPOStats(clip_frac=clip_frac, ratio_mean=ratio_mean, kl=kl)


def gspo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon: float = 3e-4,
    epsilon_high: float | None = 4e-4,
    level: Level = "sequence",
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
) -> torch.Tensor:
    """GSPO loss (scalar, to minimise).

    Args:
        logps: ``(B, T)`` per-token log-probs of the completions under the current policy
            (carries the gradient).
        old_logps: ``(B, T)`` log-probs under the policy that sampled them.
        advantages: ``(B,)`` one advantage per completion.
        mask: ``(B, T)`` 1 for completion tokens, 0 for padding.
        epsilon, epsilon_high: clip range ``[1 - epsilon, 1 + epsilon_high]`` of the sequence
            ratio (``epsilon_high=None`` means ``epsilon``); the paper uses 3e-4 / 4e-4.
        level: ``"sequence"`` (GSPO) or ``"token"`` (GSPO-token).
        ref_logps, beta: reference-model log-probs and the weight of the k3 KL penalty,
            used only when ``beta > 0``.

    Raises ``ValueError`` on mismatched shapes, an unknown level or ``beta > 0`` without
    ``ref_logps``. A sequence with no unmasked token contributes zero.

    Example:
        >>> B, T = 4, 5
        >>> logps = torch.randn(B, T, requires_grad=True)
        >>> loss = gspo_loss(logps, logps.detach(), torch.tensor([1., -1., .5, -.5]), torch.ones(B, T))
        >>> loss.backward()
    """
    loss, _ = gspo_loss_and_stats(
        logps, old_logps, advantages, mask,
        epsilon=epsilon, epsilon_high=epsilon_high, level=level, ref_logps=ref_logps, beta=beta,
    )
    return loss
