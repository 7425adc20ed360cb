"""gspo_loss against an independent, loop-based re-derivation of the GSPO objective and its
analytic gradient (float64), for both levels, with and without KL, with padding."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedgspo.gspo.loss import group_advantages, gspo_loss, gspo_loss_and_stats


def reference(logp, old, adv, mask, eps, eps_high, ref=None, beta=0.0):
    """Loss and d loss / d logp, written out per sequence and token with Python floats."""
    B, T = logp.shape
    loss, grad = 0.0, np.zeros((B, T))
    for i in range(B):
        toks = [t for t in range(T) if mask[i, t] > 0]
        L = len(toks)
        if L == 0:
            continue
        s = math.exp(sum(logp[i, t] - old[i, t] for t in toks) / L)
        clipped = min(max(s, 1 - eps), 1 + eps_high)
        term = min(s * adv[i], clipped * adv[i])
        seq_loss = -term
        # The unclipped branch carries the gradient unless the clipped one is strictly lower.
        active = not ((adv[i] > 0 and s > 1 + eps_high) or (adv[i] < 0 and s < 1 - eps))
        for t in toks:
            if active:
                grad[i, t] += -adv[i] * s / L / B
        if beta > 0:
            kls = [math.exp(ref[i, t] - logp[i, t]) - (ref[i, t] - logp[i, t]) - 1 for t in toks]
            seq_loss += beta * sum(kls) / L
            for t in toks:
                grad[i, t] += beta * (1 - math.exp(ref[i, t] - logp[i, t])) / L / B
        loss += seq_loss / B
    return loss, grad


def make_case(seed: int, B: int = 6, T: int = 7, spread: float = 1e-3):
    g = np.random.default_rng(seed)
    logp = -g.uniform(0.1, 3.0, size=(B, T))
    # Small per-sequence shifts so some ratios fall inside and some outside the clip range.
    old = logp - g.normal(0, spread, size=(B, 1)) - g.normal(0, spread / 4, size=(B, T))
    adv = g.normal(size=B)
    lengths = g.integers(0, T + 1, size=B)
    lengths[0] = T
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(float)
    ref = logp + g.normal(0, 0.1, size=(B, T))
    return logp, old, adv, mask, ref


@pytest.mark.parametrize("level", ["sequence", "token"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("seed", range(5))
def test_value_and_gradient_match_reference(level, beta, seed):
    logp, old, adv, mask, ref = make_case(seed)
    eps, eps_high = 3e-4, 4e-4
    want_loss, want_grad = reference(logp, old, adv, mask, eps, eps_high, ref, beta)
    lp = torch.tensor(logp, requires_grad=True)
    loss = gspo_loss(lp, torch.tensor(old), torch.tensor(adv), torch.tensor(mask),
                     epsilon=eps, epsilon_high=eps_high, level=level,
                     ref_logps=torch.tensor(ref), beta=beta)
    loss.backward()
    assert loss.item() == pytest.approx(want_loss, rel=1e-10, abs=1e-12)
    np.testing.assert_allclose(lp.grad.numpy(), want_grad, rtol=1e-9, atol=1e-12)


def test_padding_is_ignored():
    logp, old, adv, mask, _ = make_case(1)
    garbage = np.where(mask > 0, logp, 123.0)
    a = gspo_loss(torch.tensor(logp), torch.tensor(old), torch.tensor(adv), torch.tensor(mask))
    b = gspo_loss(torch.tensor(garbage), torch.tensor(np.where(mask > 0, old, -7.0)),
                  torch.tensor(adv), torch.tensor(mask))
    assert a.item() == pytest.approx(b.item(), rel=1e-12)


def test_on_policy_ratio_is_one_and_loss_is_minus_mean_advantage():
    logp, _, adv, mask, _ = make_case(2)
    mask[:] = 1
    loss, stats = gspo_loss_and_stats(torch.tensor(logp), torch.tensor(logp), torch.tensor(adv),
                                      torch.tensor(mask))
    assert stats.ratio_mean.item() == pytest.approx(1.0)
    assert stats.clip_frac.item() == 0.0
    assert loss.item() == pytest.approx(-adv.mean())


def test_clip_fraction_counts_active_clips():
    T = 3
    logp = torch.zeros(4, T)
    old = torch.tensor([[-0.01], [0.01], [-0.01], [0.01]]).expand(4, T)  # s > 1+eh, <1-e, >, <
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0])  # clipped, clipped, not, not
    _, stats = gspo_loss_and_stats(logp, old, adv, torch.ones(4, T))
    assert stats.clip_frac.item() == pytest.approx(0.5)


def test_bad_inputs_raise():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="same"):
        gspo_loss(x, torch.zeros(2, 4), torch.zeros(2), x)
    with pytest.raises(ValueError, match="advantages"):
        gspo_loss(x, x, torch.zeros(3), x)
    with pytest.raises(ValueError, match="ref_logps"):
        gspo_loss(x, x, torch.zeros(2), x, beta=0.1)
    with pytest.raises(ValueError, match="level"):
        gspo_loss(x, x, torch.zeros(2), x, level="tok")


def test_group_advantages_reference():
    g = np.random.default_rng(0)
    r = g.normal(size=12)
    got = group_advantages(torch.tensor(r), 4).numpy()
    groups = r.reshape(3, 4)
    want = ((groups - groups.mean(1, keepdims=True)) / (groups.std(1, ddof=1, keepdims=True) + 1e-4)).ravel()
    np.testing.assert_allclose(got, want, rtol=1e-12)
    flat = group_advantages(torch.ones(8), 4)
    assert torch.equal(flat, torch.zeros(8))
    np.testing.assert_allclose(group_advantages(torch.tensor(r), 4, scale=False).numpy(),
                               (groups - groups.mean(1, keepdims=True)).ravel())
    with pytest.raises(ValueError, match="multiple"):
        group_advantages(torch.ones(7), 4)
