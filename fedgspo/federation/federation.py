"""One rank's place in a federated run: its site and process groups, the round position, the
outer optimizer, error feedback, and the bytes it sent at each level.

The trainer calls, per inner step: :meth:`Federation.mean_in_site` on the gradients, then
either (``local_steps == 1``) the cross-site robust exchange of those gradients, or (``H > 1``)
its own optimizer step and, when :meth:`round_ends`, the cross-site exchange of
:meth:`pseudo_gradient` and :meth:`apply_round`. Only site leaders take part in the cross-site
exchange; :meth:`share` hands its result and report to the rest of the site.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from fedgspo.federation.config import FederatedConfig
from fedgspo.federation.outer import OuterOptimizer
from fedgspo.federation.sites import SiteGroups, SiteLayout
from fedgspo.distributed import broadcast_json
from fedgspo.robust.all_reduce import RobustReport
from fedgspo.robust.compression import ErrorFeedback
from fedgspo.robust.shard_exchange import Layout, sent_bytes


class Federation:
    """Built on every rank (collective: creates the process groups). Raises
    :class:`~fedgspo.federation.sites.SiteError` when the sites do not fit the job."""

    def __init__(self, cfg: FederatedConfig, *, rank: int, world_size: int, local_world_size: int,
                 params: list[torch.nn.Parameter]) -> None:
        self.cfg = cfg
        self.layout = SiteLayout.from_config(cfg, world_size, local_world_size)
        self.groups = SiteGroups(self.layout, rank)
        self.site = self.groups.site
        self.params = params
        self.numel = sum(p.numel() for p in params)
        self.outer = OuterOptimizer(cfg, params) if cfg.local_steps > 1 else None
        self.feedback = (ErrorFeedback(cfg.compression, self.numel, params[0].device)
                         if cfg.error_feedback else None)
        self.sent = {"cross": 0, "intra": 0}

    # -- shape of the run ----------------------------------------------------------------------

    @property
    def local_steps(self) -> int:
        return self.cfg.local_steps

    @property
    def num_sites(self) -> int:
        return self.layout.num_sites

    @property
    def is_leader(self) -> bool:
        return self.groups.is_leader

    def round_ends(self, step: int, max_steps: int) -> bool:
        """Whether inner step ``step`` (0-based) closes a round: every ``local_steps`` steps
        and at the run's last step, so a run always ends with every rank's weights equal."""
        return self.outer is not None and ((step + 1) % self.local_steps == 0 or step + 1 == max_steps)

    def mid_round(self, step: int, max_steps: int) -> bool:
        """Whether the sites train on their own after inner step ``step`` (the round is open)."""
        return self.outer is not None and not self.round_ends(step, max_steps)

    def round_starts(self, step: int) -> bool:
        """Whether every rank holds the round's start weights at ``step`` (before training)."""
        return self.outer is None or step % self.local_steps == 0

    def participants(self, rank_ids: list[str]) -> list[str]:
        """Identities of the cross-site participants: each site's leader's."""
        return [rank_ids[leader] for leader in self.layout.leaders]

    # -- communication -------------------------------------------------------------------------

    def mean_in_site(self, tensor: torch.Tensor) -> None:
        """Average ``tensor`` over this site's ranks (trusted)."""
        self.sent["intra"] += self.groups.mean_in_site(tensor)

    def count_cross(self, tensor: torch.Tensor, mode: str) -> None:
        """Count the bytes of one cross-site exchange of ``tensor`` (leaders only)."""
        if self.is_leader:
            wire = torch.bfloat16 if self.cfg.compression == "bf16" else tensor.dtype
            codec = "int8" if self.cfg.compression == "int8" else "none"
            self.sent["cross"] += sent_bytes(Layout(mode, tensor.numel(), wire, codec), self.num_sites)

    def compensate(self, update: torch.Tensor) -> None:
        """Add the error compression dropped from this site's earlier updates (in place)."""
        if self.feedback is not None:
            update.copy_(self.feedback.compensate(update))

    def share(self, tensor: torch.Tensor, report: RobustReport | None) -> RobustReport:
        """The leader's exchanged ``tensor`` and ``report`` on every rank of the site (the
        leader passes its report, the others None). Within a site everything is trusted."""
        self.sent["intra"] += self.groups.share_in_site(tensor)
        if self.groups.intra is None:
            assert report is not None
            return report
        shared = broadcast_json(dataclasses.asdict(report) if report is not None else None,
                                src=self.groups.leader, group=self.groups.intra)
        return RobustReport(**shared)

    def take_bytes(self) -> dict[str, int]:
        """Bytes sent across sites and inside the site since the last call."""
        out = {"comm_bytes": self.sent["cross"], "comm_bytes_intra": self.sent["intra"]}
        self.sent = {"cross": 0, "intra": 0}
        return out

    # -- the outer loop ------------------------------------------------------------------------

    def pseudo_gradient(self) -> torch.Tensor:
        assert self.outer is not None
        return self.outer.pseudo_gradient()

    def apply_round(self, delta: torch.Tensor, consensus_failed: bool) -> dict[str, float]:
        """Apply the agreed pseudo-gradient (or drop the round without consensus); returns the
        round's figures for the step record."""
        assert self.outer is not None
        figures = {"round": self.outer.rounds, "outer_delta_norm": float(delta.norm())}
        if consensus_failed:
            self.outer.discard()
            figures["outer_update_norm"] = 0.0
        else:
            figures["outer_update_norm"] = float(self.outer.step(delta).norm())
        return figures

    # -- checkpoints ---------------------------------------------------------------------------

    @property
    def has_site_state(self) -> bool:
        """Whether sites hold state of their own (weights mid-round, inner optimizer, residual)."""
        return self.outer is not None or self.feedback is not None

    def global_state(self) -> dict[str, Any]:
        """What every rank holds alike: the outer optimizer's state."""
        return {"outer": self.outer.state_dict() if self.outer is not None else None}

    def load_global_state(self, state: dict[str, Any]) -> None:
        if self.outer is not None:
            if not isinstance(state, dict) or state.get("outer") is None:
                raise ValueError("the checkpoint holds no outer optimizer state (saved without local steps)")
            self.outer.load_state_dict(state["outer"])

    def site_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """This site's own state: its trained weights, its (inner) optimizer, its residual."""
        return {"params": [p.detach().clone() for p in self.params], "optimizer": optimizer.state_dict(),
                "feedback": self.feedback.state_dict() if self.feedback is not None else None}

    def load_site_state(self, state: dict[str, Any], optimizer: torch.optim.Optimizer) -> None:
        params = state["params"]
        if len(params) != len(self.params) or any(a.shape != b.shape for a, b in zip(params, self.params)):
            raise ValueError("the site state does not fit the trained parameters")
        with torch.no_grad():
            for p, saved in zip(self.params, params):
                p.copy_(saved)
        optimizer.load_state_dict(state["optimizer"])
        if self.feedback is not None:
            self.feedback.load_state_dict(state["feedback"])
