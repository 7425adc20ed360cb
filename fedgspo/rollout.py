"""Rollouts: sample a group of completions per prompt with a KV cache, keep their log-probs.

The log-probs of the sampled tokens are recorded while sampling, under the same temperature
the loss uses, so they serve as ``old_logps`` without a second forward pass.
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
    ids = prompt_ids.repeat_interleave(num_generations, dim=0)
    mask = prompt_mask.repeat_interleave(num_generations, dim=0)
    prompt_attention = mask
    batch, prompt_len = ids.shape
    completion = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logps = torch.zeros((batch, max_new_tokens), dtype=torch.float32, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    lengths = torch.zeros(batch, dtype=torch.long, device=device)

    positions = _positions(mask)
    cache_kw = _cache_keyword(type(model))
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                logits_to_keep=1)
    for t in range(max_new_tokens):
        step_logps = F.log_softmax(out.logits[:, -1].float() / temperature, dim=-1)
        token = torch.multinomial(step_logps.exp(), 1, generator=generator).squeeze(-1)
        token = token.masked_fill(finished, pad_id)
        completion[:, t] = token
        logps[:, t] = step_logps.gather(-1, token.unsqueeze(-1)).squeeze(-1).masked_fill(finished, 0.0)
        lengths += (~finished).long()
        finished |= token == eos_id
        if t + 1 == max_new_tokens or bool(finished.all()):
            break
        mask = torch.cat([mask, (~finished).long().unsqueeze(-1)], dim=-1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=token.unsqueeze(-1), attention_mask=mask, position_ids=positions,
                    use_cache=True, **{cache_kw: getattr(out, cache_kw)})
    model.train(was_training)

    steps = torch.arange(max_new_tokens, device=device)
    completion_mask = (steps.unsqueeze(0) < lengths.unsqueeze(1)).float()
    return Rollout(
        input_ids=torch.cat([ids, completion], dim=-1),
        attention_mask=torch.cat([prompt_attention, completion_mask.long()], dim=-1),
        completion_ids=completion,
        completion_mask=completion_mask,
        old_logps=logps,
        prompt_length=prompt_len,
    )


def completion_logps(model: PreTrainedModel, rollout: Rollout, temperature: float,
                     *, hidden: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(B, T)`` log-probs of the completion tokens under ``model`` (with gradient), at the
    sampling temperature so they compare with ``rollout.old_logps``; with ``hidden=True`` also
    the detached ``(B, T, H)`` last-layer states at the completion tokens (for rollout proofs,
    at no extra forward pass), else ``None``."""
    mask = rollout.attention_mask
    out = model(input_ids=rollout.input_ids, attention_mask=mask, position_ids=_positions(mask),
                use_cache=False, output_hidden_states=hidden)
    start, width = rollout.prompt_length - 1, rollout.completion_ids.shape[1]
    logits = out.logits[:, start:start + width].float() / temperature
    logps = F.log_softmax(logits, dim=-1).gather(-1, rollout.completion_ids.unsqueeze(-1)).squeeze(-1)
    states = out.hidden_states[-1][:, start + 1:start + 1 + width].detach().float() if hidden else None
    return logps, states
