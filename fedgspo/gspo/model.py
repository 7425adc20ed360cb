"""The policy model: a tiny transformers causal LM built from config, or a local directory.

Nothing is ever downloaded: ``model.path`` must be a local transformers directory and is
loaded with ``local_files_only=True``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel, Qwen2Config


class ModelConfig(BaseModel):
    """The policy: a tiny transformers causal LM built from these sizes, or a local directory."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    path: Path | None = Field(
        None, description="Local transformers model directory; nothing is ever downloaded."
    )
    arch: Literal["llama", "qwen2"] = Field("llama", description="Architecture family.")
    hidden_size: int = Field(64, gt=0)
    intermediate_size: int = Field(256, gt=0)
    num_layers: int = Field(2, gt=0)
    num_heads: int = Field(4, gt=0)
    num_kv_heads: int | None = Field(None, gt=0, description="Default: num_heads (MHA).")
    max_position_embeddings: int = Field(64, gt=0)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

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


def build_model(cfg: ModelConfig, vocab_size: int, *, pad_id: int, bos_id: int, eos_id: int,
                seed: int) -> PreTrainedModel:
    """Build the policy on CPU with weights drawn from ``seed`` (equal on every rank).

    With ``cfg.path`` the local model is loaded instead; its vocabulary must cover the task's
    (``ValueError`` otherwise).
    """
    dtype = _DTYPES[cfg.dtype]
    if cfg.path is not None:
        model = AutoModelForCausalLM.from_pretrained(cfg.path, local_files_only=True, dtype=dtype)
        if model.config.vocab_size < vocab_size:
            raise ValueError(f"model.path vocabulary ({model.config.vocab_size}) is smaller than the "
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
        attn_implementation="sdpa",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    return model


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over parameter names and raw bytes, in state-dict order (device independent)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
