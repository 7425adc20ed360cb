"""The ``federated`` config section."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedgspo.robust.compression import CODECS


class FederatedConfig(BaseModel):
    """Sites, local steps, the outer optimizer and compression of the cross-site exchange."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    site_size: int | Literal["auto"] = Field(
        "auto", description="Ranks per site (consecutive ranks). 'auto': the ranks of a node (torchrun's "
        "LOCAL_WORLD_SIZE) when the job spans several nodes, else 1 (every rank its own site).")
    sites: list[list[int]] | None = Field(
        None, description="Explicit sites, each a list of global ranks; together every rank exactly once. "
        "Overrides site_size.")
    local_steps: int = Field(
        1, ge=1, description="Inner steps per round (H). 1: gradients are aggregated across sites every step; "
        "H > 1: each site trains H steps with its own optimizer, then pseudo-gradients are aggregated.")
    outer_optimizer: Literal["nesterov", "average"] = Field(
        "average", description="How the aggregated pseudo-gradient is applied (local_steps > 1): plain averaging "
        "(lr 1, no momentum) or Nesterov SGD (DiLoCo: lr 0.7, momentum 0.9, made for hundreds of local steps; "
        "at H = 4-16 it trained worse here, benchmarks/federated.py).")
    outer_lr: float | None = Field(None, gt=0, description="Outer learning rate; default 0.7 (nesterov) or 1.0.")
    outer_momentum: float = Field(0.9, ge=0, lt=1, description="Outer Nesterov momentum.")
    compression: Literal[CODECS] = Field(  # type: ignore[valid-type]
        "none", description="How updates cross sites: none, bf16, or int8 (per-chunk scale; sharded or "
        "replicated exchange, not audited).")
    error_feedback: bool = Field(False, description="Carry what compression dropped into the next round.")

    @model_validator(mode="after")
    def _consistent(self) -> "FederatedConfig":
        if self.error_feedback and self.compression == "none":
            raise ValueError("error_feedback needs a lossy compression (bf16 or int8)")
        if self.outer_optimizer == "average" and self.outer_lr not in (None, 1.0):
            raise ValueError("outer_optimizer 'average' applies the mean pseudo-gradient with lr 1.0; "
                             "use 'nesterov' for another outer_lr")
        return self

    @property
    def lr(self) -> float:
        """The outer learning rate in effect."""
        if self.outer_lr is not None:
            return self.outer_lr
        return 0.7 if self.outer_optimizer == "nesterov" else 1.0

    @property
    def momentum(self) -> float:
        return self.outer_momentum if self.outer_optimizer == "nesterov" else 0.0
