"""Rollouts: sample a group of completions per prompt with a KV cache, keep their log-probs.

Each prompt is prefilled once and its cache shared by its ``G`` completions; then one batched
forward per token (:class:`KVDecoder`). The log-probs of the sampled tokens are recorded while
sampling, under the same temperature the loss uses, so they serve as ``old_logps`` without a
second forward pass.

Sampling options follow transformers' logits processors (repetition penalty, then
temperature, top-k, top-p). They change only which tokens are drawn: the recorded log-probs
are always those of the temperature-scaled full softmax, the distribution the loss
evaluates, as in TRL and vLLM-backed trainers.

Two decode paths share that loop: the eager one over a growing dynamic cache (the reference,
``compile="off"``) and a compiled prefill and one-token step over static caches padded to
length buckets (:mod:`fedgspo.gspo.static_decode`), chosen per call by ``generate(compile=...)``.
The sampling itself runs eagerly on both, with the same random draws.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F

from fedgspo.gspo.static_decode import (
    MIN_DECODE_STEPS,
    CompileMode,
    StaticDecoder,
    StaticShape,
    decoder_for,
    mask_positions,
    static_shape,
    use_compiled,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class TextDecoder(Protocol):
    """Anything that turns token ids into text (a transformers tokenizer, the task tokenizer)."""

    def decode(self, ids: list[int]) -> str: ...


@dataclass(frozen=True)
class Rollout:
    """``B = prompts * num_generations`` sequences, the G completions of a prompt contiguous."""

    input_ids: torch.Tensor  # (B, Lp + T): left-padded prompt, then completion padded with pad_id
    attention_mask: torch.Tensor  # (B, Lp + T)
    completion_ids: torch.Tensor  # (B, T)
    completion_mask: torch.Tensor  # (B, T) float, 1 up to and including the last token (EOS / stop)
    old_logps: torch.Tensor  # (B, T) float32, log-prob of each sampled token (0 on padding)
    prompt_length: int  # Lp

    def rows(self, index: slice) -> "Rollout":
        """The rollout restricted to the rows ``index`` (views, no copy)."""
        return Rollout(self.input_ids[index], self.attention_mask[index], self.completion_ids[index],
                       self.completion_mask[index], self.old_logps[index], self.prompt_length)


@functools.cache
def _cache_keyword(model_cls: type) -> str:
    """The KV-cache argument of ``model_cls.forward``: ``cache`` (transformers >= 5.2x) or
    ``past_key_values`` (older releases)."""
    return "cache" if "cache" in inspect.signature(model_cls.forward).parameters else "past_key_values"


class KVDecoder:
    """The KV-cached decoding path shared by generation and rollout proofs.

    Construction prefills the left-padded prompts once and shares each prompt's cache by
    ``repeats`` consecutive rows; :attr:`logits` then holds the ``(B, V)`` next-token logits
    and :meth:`step` feeds one token per row. With ``static`` the prefill and steps run
    compiled over static caches of those bucketed lengths
    (:mod:`fedgspo.gspo.static_decode`; the padded prompt plus every fed token must fit),
    else eagerly over a growing dynamic cache, the reference path. Call under
    ``torch.no_grad()`` with the model in eval mode.
    """

    def __init__(self, model: "PreTrainedModel", prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                 *, repeats: int = 1, static: StaticShape | None = None) -> None:
        self.model = model
        # A peft wrapper forwards **kwargs: ask the transformers model underneath.
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.cache_kw = _cache_keyword(type(base))
        self.static: StaticDecoder | None = None
        if static is not None:
            self.static = decoder_for(model, self.cache_kw, prompt_ids.shape[0], repeats, static, prompt_ids.device)
            self.logits, self.positions = self.static.prefill(prompt_ids, prompt_mask)
            return
        positions = mask_positions(prompt_mask)
        out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions, use_cache=True,
                    logits_to_keep=1)
        self.cache = getattr(out, self.cache_kw)
        if repeats > 1:
            self.cache.batch_repeat_interleave(repeats)
        self.logits = out.logits[:, -1].repeat_interleave(repeats, dim=0)
        self.positions = positions[:, -1:].repeat_interleave(repeats, dim=0)

    def step(self, token: torch.Tensor, attention_mask: torch.Tensor, *, hidden: bool = False) -> torch.Tensor | None:
        """Feed ``token`` ``(B,)``; ``attention_mask`` covers the sequence up to and including it.
        Updates :attr:`logits`; returns the ``(B, H)`` float32 last-layer state at ``token`` when
        ``hidden``, else ``None``. Raises ``ValueError`` for ``hidden`` on the static path."""
        self.positions = self.positions + 1
        if self.static is not None:
            if hidden:
                raise ValueError("the static decode path returns no hidden states")
            self.logits = self.static.step(token, attention_mask[:, -1], self.positions)
            return None
        out = self.model(input_ids=token.unsqueeze(-1), attention_mask=attention_mask, position_ids=self.positions,
                         use_cache=True, output_hidden_states=hidden, **{self.cache_kw: self.cache})
        self.cache, self.logits = getattr(out, self.cache_kw), out.logits[:, -1]
        return out.hidden_states[-1][:, -1].float() if hidden else None


def decode_hidden(model: "PreTrainedModel", input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  prompt_length: int) -> torch.Tensor:
    """``(B, T, H)`` float32 last-layer states at the completion tokens of left-padded prompt +
    completion rows, along the KV-cached decoding path of :func:`generate` (prompt prefill,
    then one given token at a time), as a prover recording during generation sees them. The
    model is put in eval mode for the call and restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            decoder = KVDecoder(model, input_ids[:, :prompt_length], attention_mask[:, :prompt_length])
            states = [decoder.step(input_ids[:, t], attention_mask[:, :t + 1], hidden=True)
                      for t in range(prompt_length, input_ids.shape[1])]
    finally:
        model.train(was_training)
    return torch.stack(states, dim=1)


class StopCondition:
    """Where a completion ends: at an EOS token, or at the token that completes a stop string.

    Stop-string contract: a completion ends at the first token ``t`` for which the decoded
    text of its last ``window`` tokens (``window = longest stop string in characters + 2``)
    contains a stop string. For tokenizers whose tokens each decode to at least one
    character this is exactly "the decoded completion up to ``t`` contains a stop string and
    up to ``t - 1`` does not", with one decode of ``window`` tokens per unfinished row and step.
    """

    def __init__(self, eos_ids: int | Sequence[int], stop_strings: Sequence[str] = (),
                 tokenizer: TextDecoder | None = None) -> None:
        """Raises ``ValueError`` when stop strings come without a tokenizer or one is empty."""
        self.eos_ids = torch.tensor([eos_ids] if isinstance(eos_ids, int) else list(eos_ids), dtype=torch.long)
        self.stop_strings = tuple(stop_strings)
        if self.stop_strings and tokenizer is None:
            raise ValueError("stop_strings need a tokenizer to decode completions")
        if any(not s for s in self.stop_strings):
            raise ValueError("stop strings must be non-empty")
        self.tokenizer = tokenizer
        self.window = max((len(s) for s in self.stop_strings), default=0) + 2

    def step(self, completion: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        """``(B,)`` bool: whether each row of the ``(B, t)`` completion so far ends at its last
        token. Rows outside ``active`` (bool ``(B,)``) are not decoded and may read either way."""
        last = completion[:, -1]
        if self.eos_ids.device != last.device:
            self.eos_ids = self.eos_ids.to(last.device)
        ended = torch.isin(last, self.eos_ids)
        if self.stop_strings:
            candidates = ~ended if active is None else active & ~ended
            rows = candidates.nonzero().flatten().tolist()
            windows = completion[rows, -self.window:].tolist()
            hits = [r for r, ids in zip(rows, windows)
                    if any(s in self.tokenizer.decode(ids) for s in self.stop_strings)]
            ended[hits] = True
        return ended

    def ended_at(self, completion: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` bool: :meth:`step` at every prefix of ``(B, T)`` completions (for
        verifying that a claimed completion ends where it should)."""
        if not self.stop_strings or completion.shape[1] == 0:
            return torch.isin(completion, self.eos_ids.to(completion.device))
        return torch.stack([self.step(completion[:, :t + 1]) for t in range(completion.shape[1])], dim=1)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' repetition penalty: the logits of ``seen`` tokens (bool ``(B, V)``) are
    divided by ``penalty`` when positive and multiplied by it when negative."""
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def filter_logits(logits: torch.Tensor, *, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to ``-inf`` the logits outside the top-k (ties kept; ``0`` disables) and then outside
    the nucleus: the most likely tokens whose softmax mass first reaches ``top_p`` (at least
    one kept; ``1.0`` disables). Same semantics as transformers' top-k and top-p warpers."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1)
        drop = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= 1.0 - top_p
        drop[..., -1] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def _chunks(prompts: int, num_generations: int, max_batch: int | None) -> list[tuple[slice, int]]:
    """``(prompt rows, completions per prompt)`` pieces of at most ``max_batch`` rows, in row order."""
    if max_batch is None or prompts * num_generations <= max_batch:
        return [(slice(0, prompts), num_generations)]
    if max_batch >= num_generations:
        per = max_batch // num_generations
        return [(slice(p, min(p + per, prompts)), num_generations) for p in range(0, prompts, per)]
    return [(slice(p, p + 1), min(max_batch, num_generations - g))
            for p in range(prompts) for g in range(0, num_generations, max_batch)]


@torch.no_grad()
def generate(
    model: "PreTrainedModel",
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    num_generations: int,
    max_new_tokens: int,
    temperature: float,
    eos_id: int | Sequence[int],
    pad_id: int,
    generator: torch.Generator | None = None,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    stop_strings: Sequence[str] = (),
    tokenizer: TextDecoder | None = None,
    max_batch: int | None = None,
    compile: CompileMode = "auto",
    expected_calls: int = 1,
    min_bucket: int = 32,
    min_decode_steps: int = MIN_DECODE_STEPS,
) -> Rollout:
    """Sample ``num_generations`` completions for each left-padded prompt.

    A completion ends at an ``eos_id`` (one id or several) or at the token that completes one
    of ``stop_strings`` (decoded with ``tokenizer``; see :class:`StopCondition`), which are
    kept and masked 1, the rest is ``pad_id`` and masked 0. Decoding stops once every row has
    ended. ``top_k`` (0: off), ``top_p`` (1: off) and ``repetition_penalty`` (1: off; applied
    over the prompt's real tokens and the completion so far) shape only the sampling
    distribution; ``old_logps`` stay the temperature-scaled full-softmax log-probs. With
    ``max_batch`` the ``prompts * num_generations`` rows are generated in pieces of at most that
    many rows (one prefill per piece) and concatenated in the same layout; the completion width
    is always ``max_new_tokens``. At the defaults the sampling is the plain multinomial draw.

    ``compile`` picks the decode path (:func:`fedgspo.gspo.static_decode.use_compiled`):
    ``"off"`` is the eager reference; ``"on"`` prefills and decodes compiled over static caches
    of ``static_shape(prompt length, max_new_tokens, min_bucket)``; ``"auto"`` does so
    when ``expected_calls`` such calls (the caller's estimate for the run) make at least
    ``min_decode_steps`` decode steps. Both paths draw the same random numbers from
    ``generator`` in the same order, so on the same seed they sample the same tokens unless
    floating-point rounding moves a draw across a token boundary, and record the same
    log-probs up to rounding.

    The model is put in eval mode for the call and restored afterwards. Raises ``ValueError``
    on a non-positive temperature, top-k, top-p out of range, a non-positive penalty or
    ``max_batch``, or stop strings without a tokenizer, and as ``use_compiled`` for ``compile``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k < 0 or not 0 < top_p <= 1 or repetition_penalty <= 0:
        raise ValueError(f"need top_k >= 0, 0 < top_p <= 1, repetition_penalty > 0; got {top_k}, {top_p}, "
                         f"{repetition_penalty}")
    if max_batch is not None and max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    stop = StopCondition(eos_id, stop_strings, tokenizer)
    options = _Sampling(temperature, top_k, top_p, repetition_penalty)
    chunks = _chunks(prompt_ids.shape[0], num_generations, max_batch)
    compiled = use_compiled(compile, model, decode_steps=expected_calls * len(chunks) * (max_new_tokens - 1),
                            min_decode_steps=min_decode_steps)
    static = static_shape(prompt_ids.shape[1], max_new_tokens, min_bucket) if compiled else None
    was_training = model.training
    model.eval()
    try:
        parts = [_generate_rows(model, prompt_ids[rows], prompt_mask[rows], repeats, max_new_tokens=max_new_tokens,
                                sampling=options, stop=stop, pad_id=pad_id, generator=generator,
                                static=static)
                 for rows, repeats in chunks]
    finally:
        model.train(was_training)
    completion, logps, mask = (torch.cat(t) for t in zip(*parts))
    prompt_len = prompt_ids.shape[1]
    return Rollout(
        input_ids=torch.cat([prompt_ids.repeat_interleave(num_generations, dim=0), completion], dim=-1),
        attention_mask=mask,
        completion_ids=completion,
        completion_mask=mask[:, prompt_len:].float(),
        old_logps=logps,
        prompt_length=prompt_len,
    )


@dataclass(frozen=True)
class _Sampling:
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float

    @property
    def plain(self) -> bool:
        return self.top_k == 0 and self.top_p == 1.0 and self.repetition_penalty == 1.0


def _generate_rows(model: "PreTrainedModel", prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, repeats: int, *,
                   max_new_tokens: int, sampling: _Sampling, stop: StopCondition, pad_id: int,
                   generator: torch.Generator | None, static: StaticShape | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Completion ids, log-probs and full attention mask of ``repeats`` completions per prompt
    (compiled over static caches of the ``static`` lengths when given)."""
    device = prompt_ids.device
    prompt_len = prompt_ids.shape[1]
    decoder = KVDecoder(model, prompt_ids, prompt_mask, repeats=repeats, static=static)
    batch = decoder.logits.shape[0]
    # The attention mask of the whole sequence, filled in as tokens are sampled.
    mask = torch.zeros((batch, prompt_len + max_new_tokens), dtype=prompt_mask.dtype, device=device)
    mask[:, :prompt_len] = prompt_mask.repeat_interleave(repeats, dim=0)
    completion = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logps = torch.zeros((batch, max_new_tokens), dtype=torch.float32, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    seen = None
    if sampling.repetition_penalty != 1.0:
        counts = torch.zeros(decoder.logits.shape, dtype=torch.long, device=device)
        counts.scatter_add_(1, prompt_ids.repeat_interleave(repeats, dim=0), mask[:, :prompt_len].long())
        seen = counts > 0

    for t in range(max_new_tokens):
        raw = decoder.logits.float()
        step_logps = F.log_softmax(raw / sampling.temperature, dim=-1)
        if sampling.plain:
            probs = step_logps.exp()
        else:
            scores = raw if seen is None else apply_repetition_penalty(raw, seen, sampling.repetition_penalty)
            scores = filter_logits(scores / sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
            probs = scores.softmax(dim=-1)
        token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        token = token.masked_fill(finished, pad_id)
        completion[:, t] = token
        logps[:, t] = step_logps.gather(-1, token.unsqueeze(-1)).squeeze(-1).masked_fill(finished, 0.0)
        mask[:, prompt_len + t] = (~finished).to(mask.dtype)
        if seen is not None:
            seen.scatter_(1, token.unsqueeze(-1), True)
        finished |= stop.step(completion[:, :t + 1], active=~finished)
        if t + 1 == max_new_tokens or bool(finished.all()):  # the one host sync per token
            break
        decoder.step(token, mask[:, :prompt_len + t + 1])
    return completion, logps, mask


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits).gather(-1, index)`` without materialising the log-softmax: the
    chosen logit minus the log-sum-exp over the vocabulary."""
    return logits.gather(-1, index.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def completion_logps(model: "PreTrainedModel", rollout: Rollout, temperature: float,
                     *, hidden: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(B, T)`` log-probs of the completion tokens under ``model`` (with gradient), at the
    sampling temperature so they compare with ``rollout.old_logps``; with ``hidden=True`` also
    the detached ``(B, T, H)`` last-layer states at the completion tokens (for rollout proofs,
    at no extra forward pass), else ``None``. Logits are computed for the completion positions
    only."""
    mask = rollout.attention_mask
    start, width = rollout.prompt_length - 1, rollout.completion_ids.shape[1]
    out = model(input_ids=rollout.input_ids, attention_mask=mask, position_ids=mask_positions(mask),
                use_cache=False, output_hidden_states=hidden, logits_to_keep=width + 1)
    logits = out.logits[:, :width].float() / temperature
    logps = selective_log_softmax(logits, rollout.completion_ids)
    states = out.hidden_states[-1][:, start + 1:start + 1 + width].detach().float() if hidden else None
    return logps, states
