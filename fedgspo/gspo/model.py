"""The policy model: a tiny transformers causal LM built from config, or a local directory.

Nothing is ever downloaded: ``model.path`` must be a local transformers directory (weights,
``config.json`` and tokenizer files) and is loaded with ``local_files_only=True``.

Precision. Full fine-tuning keeps every parameter in float32 (the optimizer's master
weights) and runs forward passes under :func:`autocast` in ``model.dtype``. With LoRA the
frozen base is stored in ``model.dtype`` and the adapter parameters, the only trainable
ones, in float32. Either way all trainable parameters share one dtype, as the flat gradient
buffer of the trainer requires.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class ModelError(ValueError):
    """A model directory or model option is unusable; the message is one line naming the key."""


class LoraSettings(BaseModel):
    """LoRA adapters (peft): only the adapter parameters are trained and exchanged."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    r: int = Field(8, gt=0, description="Adapter rank.")
    alpha: float = Field(16.0, gt=0, description="Scaling numerator: the update is scaled by alpha / r.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt, or 'all-linear' (every linear layer but the LM head)."
    )


class ModelConfig(BaseModel):
    """The policy: a tiny transformers causal LM built from these sizes, or a local directory."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    path: Path | None = Field(
        None, description="Local transformers directory (model and tokenizer); nothing is ever downloaded."
    )
    arch: Literal["llama", "qwen2"] = Field("llama", description="Architecture family.")
    hidden_size: int = Field(64, gt=0)
    intermediate_size: int = Field(256, gt=0)
    num_layers: int = Field(2, gt=0)
    num_heads: int = Field(4, gt=0)
    num_kv_heads: int | None = Field(None, gt=0, description="Default: num_heads (MHA).")
    max_position_embeddings: int = Field(64, gt=0)
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="Compute dtype: autocast for full fine-tuning (float32 master weights), "
                    "storage dtype of the frozen base with LoRA (float32 adapters).",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward (non-reentrant) to save memory."
    )
    attn_implementation: str | None = Field(
        None, description="transformers attention backend ('sdpa', 'eager', 'flash_attention_2', ...); "
                          "None: the transformers default for a model.path, 'sdpa' for a built model."
    )
    lora: LoraSettings | None = Field(None, description="Train LoRA adapters instead of all weights.")

    @model_validator(mode="after")
    def _heads_divide(self) -> "ModelConfig":
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        kv = self.num_kv_heads or self.num_heads
        if self.num_heads % kv:
            raise ValueError(f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({kv})")
        return self


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def compute_dtype(cfg: ModelConfig) -> torch.dtype:
    """The torch dtype named by ``cfg.dtype``."""
    return _DTYPES[cfg.dtype]


def autocast(cfg: ModelConfig, device: torch.device | str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``cfg.dtype`` on ``device``'s type; a no-op for float32.

    Wrap forward passes (rollout, log-probs, reference) in it; backward needs no wrapping.
    float16 without a loss scaler can underflow gradients: prefer bfloat16.
    """
    if cfg.dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=compute_dtype(cfg))


def check_model_dir(path: Path | str, *, lora: bool = False, tokenizer: bool = True) -> None:
    """Cheap pre-flight check of a ``model.path`` directory (reads no weights).

    Raises :class:`ModelError` with one line naming the key when the directory is missing,
    has no ``config.json`` or (with ``tokenizer``) no tokenizer files, or when ``lora`` is set
    and peft cannot be imported.
    """
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"model.path: {path} is not a directory")
    if not (path / "config.json").is_file():
        raise ModelError(f"model.path: {path} has no config.json")
    if tokenizer and not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ModelError(f"model.path: {path} has no tokenizer ({' / '.join(TOKENIZER_FILES)})")
    if lora and importlib.util.find_spec("peft") is None:
        raise ModelError("model.lora: needs the peft package, which is not importable")


def load_tokenizer(path: Path | str) -> PreTrainedTokenizerBase:
    """The tokenizer of a local directory, left-padding, with ``pad = eos`` when it has no
    pad token. Raises :class:`ModelError` when the directory fails :func:`check_model_dir`."""
    check_model_dir(path)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _storage_dtype(cfg: ModelConfig) -> torch.dtype:
    """float32 master weights for full fine-tuning; the low dtype for a frozen LoRA base."""
    return compute_dtype(cfg) if cfg.lora is not None else torch.float32


def load_policy(cfg: ModelConfig, *, seed: int, tokenizer: bool = True
                ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """The model of ``cfg.path`` with :func:`apply_training_options` applied (LoRA adapters
    are initialised from ``seed``, equal on every rank), and its tokenizer (``None`` without
    ``tokenizer``: the digit task brings its own).

    Raises :class:`ModelError` when ``cfg.path`` is unset, fails :func:`check_model_dir` or
    holds weights transformers cannot load (the message names the key and the cause).
    """
    if cfg.path is None:
        raise ModelError("model.path: not set")
    check_model_dir(cfg.path, lora=cfg.lora is not None, tokenizer=tokenizer)
    tok = load_tokenizer(cfg.path) if tokenizer else None
    kwargs = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.path, local_files_only=True, dtype=_storage_dtype(cfg),
                                                     **kwargs)
    except (OSError, ValueError) as err:
        raise ModelError(f"model.path: {cfg.path}: {str(err).strip().splitlines()[0]}") from None
    return apply_training_options(model, cfg, seed=seed), tok


def build_model(cfg: ModelConfig, vocab_size: int, *, pad_id: int, bos_id: int, eos_id: int,
                seed: int) -> PreTrainedModel:
    """Build the policy on CPU with weights drawn from ``seed`` (equal on every rank), with
    :func:`apply_training_options` applied.

    With ``cfg.path`` the local model is loaded instead (:func:`load_policy`); its vocabulary
    must cover the task's (:class:`ModelError` otherwise).
    """
    if cfg.path is not None:
        model, _ = load_policy(cfg, seed=seed, tokenizer=False)
        if model.config.vocab_size < vocab_size:
            raise ModelError(f"model.path: vocabulary ({model.config.vocab_size}) is smaller than the "
                             f"task's ({vocab_size})")
        return model
    config_cls = LlamaConfig if cfg.arch == "llama" else Qwen2Config
    hf_config = config_cls(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads or cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        pad_token_id=pad_id,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        tie_word_embeddings=True,
        attn_implementation=cfg.attn_implementation or "sdpa",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(hf_config, dtype=_storage_dtype(cfg))
    return apply_training_options(model, cfg, seed=seed)


def apply_training_options(model: PreTrainedModel, cfg: ModelConfig, *, seed: int = 0) -> PreTrainedModel:
    """Set precision, gradient checkpointing and LoRA on ``model`` as ``cfg`` says.

    Without LoRA every parameter is cast to float32 and trainable. With LoRA the base is
    cast to ``cfg.dtype`` and frozen, and peft adapters (drawn from ``seed``) are added in
    float32; the returned ``PeftModel`` is the policy. Raises :class:`ModelError` when LoRA
    is set and peft is missing.
    """
    if cfg.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)  # the name since transformers 5.2x
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora is None:
        return model.to(torch.float32).requires_grad_(True)
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise ModelError(f"model.lora: needs the peft package, which is not importable ({err})") from None
    model = model.to(compute_dtype(cfg)).requires_grad_(False)
    lora = cfg.lora
    peft_cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, task_type="CAUSAL_LM",
                          target_modules=lora.target_modules if lora.target_modules == "all-linear"
                          else list(lora.target_modules))
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft reads transformers' deprecated ``is_gradient_checkpointing``; nothing for users to fix.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        torch.manual_seed(seed)
        model = get_peft_model(model, peft_cfg)
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    return model


def compile_forward(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with its forward (and so its backward) compiled for the loss: ``torch.compile``
    with symbolic shapes, so batches of any row count and length share one compilation after a
    few warm-up calls (each takes seconds; e.g. with and without hidden states).

    The result shares ``model``'s parameters: gradients accumulate in them and optimizer
    steps are seen by the next call. Gradients equal the eager forward's up to float
    rounding: in float32, within 1e-5 relative to the largest gradient entry
    (``tests/test_compiled_rollout.py``). Use it for the loss only; generation keeps ``model``
    (its compiled path is :mod:`fedgspo.gspo.static_decode`). Compilation errors surface on
    the first call, as ``torch.compile`` raises them.
    """
    return torch.compile(model, dynamic=True)


def trainable_numel(model: torch.nn.Module) -> int:
    """Number of elements of the parameters that require grad (what the ranks exchange)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def export_pretrained(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, out_dir: Path | str,
                      *, merge_lora: bool) -> Path:
    """Write ``model`` (and ``tokenizer`` with its chat template, unless ``None``) to ``out_dir``.

    A plain model, or a LoRA model with ``merge_lora``, becomes a directory that
    ``AutoModelForCausalLM.from_pretrained`` loads; the merge happens on a copy, so the
    training model is unchanged. A LoRA model without ``merge_lora`` is saved as a peft
    adapter directory for ``PeftModel.from_pretrained(base, out_dir)``. Everything is written
    to a temporary sibling directory renamed into place, so ``out_dir`` is never partial; an
    existing ``out_dir`` is moved aside first and then deleted. Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        is_peft = hasattr(model, "peft_config")
        if is_peft and merge_lora:
            model = copy.deepcopy(model).merge_and_unload()
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        old = None
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
            os.replace(out_dir, old / out_dir.name)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over parameter names and raw bytes, in state-dict order (device independent)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
