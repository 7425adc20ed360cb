"""Rollouts: sample a group of completions per prompt with a KV cache, keep their log-probs.

Each prompt is prefilled once and its cache shared by its ``G`` completions; then one batched
forward per token. The log-probs of the sampled tokens are recorded while sampling, under the
same temperature the loss uses, so they serve as ``old_logps`` without a second forward pass.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel


@dataclass(frozen=True)
class Rollout:
    """``B = prompts * num_generations`` sequences, the G completions of a prompt contiguous."""

    input_ids: torch.Tensor  # (B, Lp + T): left-padded prompt, then completion padded with pad_id
    attention_mask: torch.Tensor  # (B, Lp + T)
    completion_ids: torch.Tensor  # (B, T)
    completion_mask: torch.Tensor  # (B, T) float, 1 up to and including EOS
    old_logps: torch.Tensor  # (B, T) float32, log-prob of each sampled token (0 on padding)
    prompt_length: int  # Lp


@functools.cache
def _cache_keyword(model_cls: type) -> str:
    """The KV-cache argument of ``model_cls.forward``: ``cache`` (transformers >= 5.2x) or
    ``past_key_values`` (older releases)."""
    return "cache" if "cache" in inspect.signature(model_cls.forward).parameters else "past_key_values"


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    num_generations: int,
    max_new_tokens: int,
    temperature: float,
    eos_id: int,
    pad_id: int,
    generator: torch.Generator | None = None,
) -> Rollout:
    """Sample ``num_generations`` completions for each left-padded prompt.

    Stops early once every sequence has produced EOS. The model is put in eval mode for the
    call and restored afterwards.
    """
    was_training = model.training
    model.eval()
    device = prompt_ids.device
    prompts, prompt_len = prompt_ids.shape
    batch = prompts * num_generations
    # One prefill per prompt; its cache and last logits are then shared by the G completions.
    positions = _positions(prompt_mask)
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions, use_cache=True,
                logits_to_keep=1)
    cache_kw = _cache_keyword(type(model))
    cache = getattr(out, cache_kw)
    cache.batch_repeat_interleave(num_generations)
    logits = out.logits[:, -1].repeat_interleave(num_generations, dim=0)
    positions = positions[:, -1:].repeat_interleave(num_generations, dim=0)
    # The attention mask of the whole sequence, filled in as tokens are sampled.
    mask = torch.zeros((batch, prompt_len + max_new_tokens), dtype=prompt_mask.dtype, device=device)
    mask[:, :prompt_len] = prompt_mask.repeat_interleave(num_generations, dim=0)
    completion = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logps = torch.zeros((batch, max_new_tokens), dtype=torch.float32, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)

    for t in range(max_new_tokens):
        step_logps = F.log_softmax(logits.float() / temperature, dim=-1)
        token = torch.multinomial(step_logps.exp(), 1, generator=generator).squeeze(-1)
        token = token.masked_fill(finished, pad_id)
        completion[:, t] = token
        logps[:, t] = step_logps.gather(-1, token.unsqueeze(-1)).squeeze(-1).masked_fill(finished, 0.0)
        mask[:, prompt_len + t] = (~finished).to(mask.dtype)
        finished |= token == eos_id
        if t + 1 == max_new_tokens or bool(finished.all()):  # the one host sync per token
            break
        positions = positions + 1
        out = model(input_ids=token.unsqueeze(-1), attention_mask=mask[:, :prompt_len + t + 1],
                    position_ids=positions, use_cache=True, **{cache_kw: cache})
        cache, logits = getattr(out, cache_kw), out.logits[:, -1]
    model.train(was_training)

    completion_mask = mask[:, prompt_len:].float()
    return Rollout(
        input_ids=torch.cat([prompt_ids.repeat_interleave(num_generations, dim=0), completion], dim=-1),
        attention_mask=mask,
        completion_ids=completion,
        completion_mask=completion_mask,
        old_logps=logps,
        prompt_length=prompt_len,
    )


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits).gather(-1, index)`` without materialising the log-softmax: the
    chosen logit minus the log-sum-exp over the vocabulary."""
    return logits.gather(-1, index.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def completion_logps(model: PreTrainedModel, rollout: Rollout, temperature: float,
                     *, hidden: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(B, T)`` log-probs of the completion tokens under ``model`` (with gradient), at the
    sampling temperature so they compare with ``rollout.old_logps``; with ``hidden=True`` also
    the detached ``(B, T, H)`` last-layer states at the completion tokens (for rollout proofs,
    at no extra forward pass), else ``None``. Logits are computed for the completion positions
    only."""
    mask = rollout.attention_mask
    start, width = rollout.prompt_length - 1, rollout.completion_ids.shape[1]
    out = model(input_ids=rollout.input_ids, attention_mask=mask, position_ids=_positions(mask),
                use_cache=False, output_hidden_states=hidden, logits_to_keep=width + 1)
    logits = out.logits[:, :width].float() / temperature
    logps = selective_log_softmax(logits, rollout.completion_ids)
    states = out.hidden_states[-1][:, start + 1:start + 1 + width].detach().float() if hidden else None
    return logps, states
