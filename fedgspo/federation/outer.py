"""The outer loop of local-step training (DiLoCo): the round's starting weights, the
pseudo-gradient ``Δ = θ_start − θ_site`` and the outer optimizer that applies the agreed one.

The outer step is Nesterov SGD with PyTorch's formula (no dampening): ``m ← μ·m + Δ``,
``θ_start ← θ_start − lr·(Δ + μ·m)``; ``average`` is ``μ = 0, lr = 1``: ``θ_start − mean Δ``.
Every rank holds the same ``θ_start`` and momentum and applies the same agreed Δ, so every
rank ends a round with the same weights.
"""

from __future__ import annotations

import torch

from fedgspo.federation.config import FederatedConfig


class OuterOptimizer:
    """Round start weights and outer momentum over the flat vector of ``params``."""

    def __init__(self, cfg: FederatedConfig, params: list[torch.nn.Parameter]) -> None:
        self.params = params
        self.lr, self.momentum = cfg.lr, cfg.momentum
        self.start = self._flat().clone()
        self.velocity = torch.zeros_like(self.start)
        self.rounds = 0

    def _flat(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1).float() for p in self.params])

    def _assign(self, flat: torch.Tensor) -> None:
        offset = 0
        with torch.no_grad():
            for p in self.params:
                p.copy_(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()

    def pseudo_gradient(self) -> torch.Tensor:
        """``θ_start − θ`` of this rank's current weights (a new float32 tensor)."""
        return self.start - self._flat()

    def step(self, delta: torch.Tensor) -> torch.Tensor:
        """Apply the agreed pseudo-gradient ``delta`` to the round's start and load the result
        into the parameters; returns the applied update (the change of ``θ_start``)."""
        delta = delta.float()
        self.velocity.mul_(self.momentum).add_(delta)
        direction = delta + self.momentum * self.velocity if self.momentum else delta
        update = self.lr * direction
        self.start.sub_(update)
        self._assign(self.start)
        self.rounds += 1
        return update

    def discard(self) -> None:
        """Drop the round: the parameters return to the round's start (no consensus)."""
        self._assign(self.start)
        self.rounds += 1

    def state_dict(self) -> dict[str, object]:
        return {"start": self.start.clone(), "velocity": self.velocity.clone(), "rounds": self.rounds}

    def load_state_dict(self, state: dict[str, object]) -> None:
        start, velocity = state["start"], state["velocity"]
        if not isinstance(start, torch.Tensor) or not isinstance(velocity, torch.Tensor) \
                or start.shape != self.start.shape or velocity.shape != self.start.shape:
            raise ValueError(f"outer optimizer state does not fit {self.start.numel()} trained parameters")
        self.start = start.to(self.start.device, torch.float32).clone()
        self.velocity = velocity.to(self.start.device, torch.float32).clone()
        self.rounds = int(state["rounds"])  # type: ignore[arg-type]
