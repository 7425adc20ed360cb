"""Compiled prefill and one-token decoding over static KV caches: the fast path of rollouts.

The eager path (:class:`fedgspo.gspo.rollout.KVDecoder` without ``static``) grows a dynamic
cache by one token per step and runs each forward as a fresh sequence of kernels driven from
Python, which is most of a small model's decode time. Here the prompts are left-padded to a
power of two (at least 8; padding is masked), prefilled into a preallocated cache of one row
per prompt, and each prompt's keys and values are broadcast to its ``repeats`` rows of the
group's preallocated cache, whose length is bucketed too (:func:`static_shape`). Prefill and
one-token step are compiled with ``torch.compile`` (``mode="reduce-overhead"``, i.e. CUDA
graphs, on CUDA; inductor's default mode elsewhere). Every call with the same prompt count,
group size and buckets has the same shapes, so nothing recompiles once each shape has run.
The first prefill of a shape runs uncompiled: it allocates the caches.

Caching. Decoders are kept per model (weakly referenced: they go with the model) and per
shape, dtype and device; each holds its caches and compiled functions, so compilation is paid
once per shape and process, and inductor's on-disk cache makes later processes' compilations
cheaper. Bucketing to powers of two keeps a run to a handful of shapes; each is one entry of
torch's per-function recompile limit (``torch._dynamo.config.recompile_limit``, 8 by
default), beyond which torch runs new shapes uncompiled.

When compilation pays (``compile="auto"``, :func:`use_compiled`): compiling costs seconds
once per shape (5-35 s on a 2-core CPU for the models of ``benchmarks/generation.py``, less
with a warm inductor cache) and saves, per decode step of a 32-row group, about 1.5 ms at
0.1-1M parameters and 10 ms at 30M on that CPU: a break-even after 3 000 to 15 000 decode
steps (more is saved on CUDA, where CUDA graphs remove the per-kernel launch cost). ``auto``
therefore compiles when the caller's expected number of decode steps (generate calls x
chunks x (new tokens - 1)) reaches ``min_decode_steps`` (10 000 by default), and never for a
model the static path cannot serve (:func:`unsupported_reason`).
"""

from __future__ import annotations

import inspect
import weakref
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

if TYPE_CHECKING:
    from transformers import PreTrainedModel

CompileMode = Literal["auto", "on", "off"]

#: Expected decode steps from which ``compile="auto"`` compiles (see the module docstring).
MIN_DECODE_STEPS = 10_000

#: Shortest padded prompt of the compiled prefill.
MIN_PROMPT_BUCKET = 8


def bucket_length(length: int, min_bucket: int = 32) -> int:
    """The bucketed length for sequences of up to ``length`` tokens: the smallest power of two
    that is at least ``length`` and ``min_bucket``."""
    return max(min_bucket, 1 << max(length - 1, 0).bit_length())


class StaticShape(NamedTuple):
    """Bucketed lengths of one generation: the padded prompt and the group's cache."""

    prompt: int
    cache: int


def static_shape(prompt_length: int, max_new_tokens: int, min_bucket: int = 32) -> StaticShape:
    """Prompts padded to a power of two (at least :data:`MIN_PROMPT_BUCKET`), and a cache of
    ``bucket_length(padded prompt + max_new_tokens, min_bucket)`` slots."""
    prompt = bucket_length(prompt_length, MIN_PROMPT_BUCKET)
    return StaticShape(prompt, bucket_length(prompt + max_new_tokens, min_bucket))


def mask_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows: the count of real tokens before each (0 on padding)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def _base_model(model: "PreTrainedModel") -> "PreTrainedModel":
    # A peft wrapper forwards **kwargs: ask the transformers model underneath.
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def unsupported_reason(model: "PreTrainedModel") -> str | None:
    """Why the static path cannot decode with ``model`` (``None`` when it can): torch.compile
    unavailable, a transformers release without the position-free static cache, or a model
    whose layers are not all plain full-attention ones (sliding windows, linear attention).
    Worked out once per model."""
    if model not in _REASONS:
        _REASONS[model] = _find_unsupported(_base_model(model))
    return _REASONS[model]


def _find_unsupported(base: "PreTrainedModel") -> str | None:
    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile is not supported on this Python"
    try:
        from transformers.cache_utils import StaticCache, StaticLayer
    except ImportError:
        return "transformers has no StaticCache"
    if "cache_position" in inspect.signature(type(base).forward).parameters:
        return "this transformers release decodes a static cache by cache positions (needs transformers >= 5.2x)"
    layers = StaticCache(config=base.config, max_cache_len=1).layers
    if any(type(layer) is not StaticLayer for layer in layers):
        return f"{type(base).__name__} has layers other than full attention"
    return None


def use_compiled(mode: CompileMode, model: "PreTrainedModel", *, decode_steps: int,
                 min_decode_steps: int = MIN_DECODE_STEPS) -> bool:
    """Whether to decode with the compiled static-cache path.

    ``"off"``: never. ``"on"``: always; raises ``ValueError`` with the reason when the model
    cannot be served. ``"auto"``: when the model can be served and ``decode_steps`` (the
    caller's expected number of decode steps with this model) is at least
    ``min_decode_steps``. Raises ``ValueError`` on an unknown mode.
    """
    if mode == "off":
        return False
    if mode not in ("auto", "on"):
        raise ValueError(f"compile must be 'auto', 'on' or 'off', got {mode!r}")
    if mode == "auto" and decode_steps < min_decode_steps:
        return False
    reason = unsupported_reason(model)
    if reason is not None and mode == "on":
        raise ValueError(f"compile='on' but the static decode path cannot serve this model: {reason}")
    return reason is None


class StaticDecoder:
    """Preallocated KV caches for ``prompts`` prompts of ``shape.prompt`` tokens and their
    ``prompts * repeats`` completions in ``shape.cache`` slots, with the compiled prefill and
    one-token step that fill them.

    Use: :meth:`prefill` the prompts, then :meth:`step` once per new token. Call under
    ``torch.no_grad()`` with the model in eval mode. One decoder serves one generation at a
    time (the next :meth:`prefill` overwrites its buffers).
    """

    def __init__(self, model: "PreTrainedModel", cache_kw: str, prompts: int, repeats: int, shape: StaticShape,
                 device: torch.device) -> None:
        from transformers.cache_utils import StaticCache

        # Weakly held: the per-model registry must not keep its own key alive.
        self._model = weakref.ref(model)
        self.cache_kw, self.prompts, self.repeats, self.shape = cache_kw, prompts, repeats, shape
        config = _base_model(model).config
        self.prompt_cache = StaticCache(config=config, max_cache_len=shape.prompt)
        self.cache = StaticCache(config=config, max_cache_len=shape.cache)
        self.allocated = False
        self.mask = torch.zeros((prompts * repeats, shape.cache), dtype=torch.long, device=device)
        self.slot = 0
        self.cuda = device.type == "cuda"
        mode = "reduce-overhead" if self.cuda else None
        self._prefill = torch.compile(_prefill_step, dynamic=False, mode=mode)
        self._step = torch.compile(_decode_step, dynamic=False, mode=mode)

    def prefill(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefill left-padded ``(prompts, L)`` prompts (``L <= shape.prompt``) into every row's
        cache; returns the ``(rows, V)`` next-token logits and ``(rows, 1)`` positions of each
        row's last prompt token. Raises ``ValueError`` when the prompts do not fit."""
        prompts, length = prompt_ids.shape
        if prompts != self.prompts or length > self.shape.prompt:
            raise ValueError(f"{prompts} prompts of {length} tokens do not fit a static prefill of {self.prompts} "
                             f"x {self.shape.prompt}")
        extra = self.shape.prompt - length
        ids = torch.nn.functional.pad(prompt_ids, (extra, 0))  # token 0 as masked filler
        mask = torch.nn.functional.pad(prompt_mask, (extra, 0))
        positions = mask_positions(mask)
        for layer in self.prompt_cache.layers:
            layer.cumulative_length.zero_()
        self._mark_step()
        # The first prefill runs uncompiled: it allocates the prompt cache (dtype, heads, device).
        prefill = self._prefill if self.allocated else _prefill_step
        logits = prefill(self._model(), self.cache_kw, self.prompt_cache, ids, mask, positions)
        logits = logits.repeat_interleave(self.repeats, dim=0)
        if not self.allocated:
            self._allocate()
        self._broadcast_prompts(mask)
        return logits, positions[:, -1:].repeat_interleave(self.repeats, dim=0)

    def step(self, token: torch.Tensor, mask_column: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Feed ``token`` ``(rows,)`` at position ``positions`` ``(rows, 1)``, with
        ``mask_column`` ``(rows,)`` its attention-mask entry; returns the ``(rows, V)`` logits
        (a tensor the caller owns). Raises ``ValueError`` when the cache is full."""
        if self.slot >= self.shape.cache:
            raise ValueError(f"static cache of {self.shape.cache} slots is full")
        self.mask[:, self.slot] = mask_column
        self.slot += 1
        self._mark_step()
        return self._step(self._model(), self.cache_kw, self.cache, token.unsqueeze(-1), self.mask, positions).clone()

    def _allocate(self) -> None:
        """Allocate the group's cache like the prompt cache, with ``rows`` rows."""
        rows = self.prompts * self.repeats
        for layer, source in zip(self.cache.layers, self.prompt_cache.layers):
            layer.lazy_initialization(source.keys.new_empty((rows, *source.keys.shape[1:])),
                                      source.values.new_empty((rows, *source.values.shape[1:])))
        self.allocated = True

    def _broadcast_prompts(self, prompt_mask: torch.Tensor) -> None:
        """Copy each prompt's keys and values into its ``repeats`` rows; reset the mask."""
        length = self.shape.prompt
        for layer, source in zip(self.cache.layers, self.prompt_cache.layers):
            for buffer, values in ((layer.keys, source.keys), (layer.values, source.values)):
                buffer.unflatten(0, (self.prompts, self.repeats))[:, :, :, :length].copy_(values.unsqueeze(1))
            layer.cumulative_length.fill_(length)
        self.slot = length
        self.mask.zero_()
        self.mask[:, :length] = prompt_mask.repeat_interleave(self.repeats, dim=0)

    def _mark_step(self) -> None:
        # CUDA graphs reuse their output buffers: every output is consumed before the next call.
        if self.cuda:
            torch.compiler.cudagraph_mark_step_begin()


def _prefill_step(model: "PreTrainedModel", cache_kw: str, cache: Any, ids: torch.Tensor, mask: torch.Tensor,
                  positions: torch.Tensor) -> torch.Tensor:
    """The prompts' forward into the static ``cache``; the ``(prompts, V)`` last-token logits."""
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                **{cache_kw: cache})
    return out.logits[:, -1]


def _decode_step(model: "PreTrainedModel", cache_kw: str, cache: Any, token: torch.Tensor, mask: torch.Tensor,
                 positions: torch.Tensor) -> torch.Tensor:
    """One forward of ``(rows, 1)`` tokens against the static ``cache``; the ``(rows, V)`` logits."""
    # One query per row: attention in its math form fuses into a few small kernels, cheaper
    # than the flash kernel's set-up at this size.
    with sdpa_kernel(SDPBackend.MATH):
        out = model(input_ids=token, attention_mask=mask, position_ids=positions, use_cache=True, **{cache_kw: cache})
    return out.logits[:, -1]


_DECODERS: "weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, StaticDecoder]]" = weakref.WeakKeyDictionary()
_REASONS: "weakref.WeakKeyDictionary[torch.nn.Module, str | None]" = weakref.WeakKeyDictionary()


def decoder_for(model: "PreTrainedModel", cache_kw: str, prompts: int, repeats: int, shape: StaticShape,
                device: torch.device) -> StaticDecoder:
    """The model's decoder for this shape on ``device`` under the current autocast state,
    made (and compiled on its first calls) when first asked for."""
    autocast = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    key = (prompts, repeats, shape, device, autocast)
    decoders = _DECODERS.setdefault(model, {})
    if key not in decoders:
        decoders[key] = StaticDecoder(model, cache_kw, prompts, repeats, shape, device)
    return decoders[key]
