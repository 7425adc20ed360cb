"""Which ranks form a site, and the process groups of the two levels of trust.

A site is a set of ranks run by one organisation: they trust each other, so inside a site a
plain all-reduce (NCCL on GPUs) averages their updates. Between sites nothing is trusted: each
site's first rank (its *leader*) takes part in the robust all-reduce on the leaders' group
for the whole site, and hands the result to the other ranks of its site by a broadcast. In
the cross-site exchange a site is one participant: ``f``, flags, reputation, quarantine,
attacks and authentication keys count sites, numbered in the order of their leaders.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from fedgspo.federation.config import FederatedConfig


class SiteError(ValueError):
    """The site settings do not fit the job (one line naming the setting)."""


@dataclass(frozen=True)
class SiteLayout:
    """The sites of a job (lists of global ranks, each sorted; sites ordered by leader)."""

    sites: tuple[tuple[int, ...], ...]

    @classmethod
    def from_config(cls, cfg: FederatedConfig, world_size: int, local_world_size: int) -> "SiteLayout":
        """Sites from ``federated.sites``, else ``federated.site_size`` consecutive ranks.
        Raises :class:`SiteError` when they do not partition the ranks ``0..world_size-1``."""
        if cfg.sites is not None:
            sites = [sorted(site) for site in cfg.sites]
            flat = sorted(r for site in sites for r in site)
            if any(not site for site in sites) or flat != list(range(world_size)):
                raise SiteError(f"federated.sites: {cfg.sites} must list every rank 0..{world_size - 1} "
                                "exactly once, in non-empty sites")
            return cls(tuple(tuple(site) for site in sorted(sites)))
        size = cfg.site_size
        if size == "auto":
            size = local_world_size if 1 < local_world_size < world_size else 1
        if world_size % size:
            raise SiteError(f"federated.site_size: {size} does not divide the {world_size} ranks")
        return cls(tuple(tuple(range(s, s + size)) for s in range(0, world_size, size)))

    @property
    def num_sites(self) -> int:
        return len(self.sites)

    @property
    def leaders(self) -> list[int]:
        return [site[0] for site in self.sites]

    @property
    def trivial(self) -> bool:
        """Every rank is its own site: the cross-site exchange is today's world all-reduce."""
        return all(len(site) == 1 for site in self.sites)

    def site_of(self, rank: int) -> int:
        return next(i for i, site in enumerate(self.sites) if rank in site)

    def ranks_of(self, site: int) -> tuple[int, ...]:
        return self.sites[site]


class SiteGroups:
    """This rank's two process groups: its site's (``intra``; None for a site of one) and the
    leaders' (``cross``; None means the world, when every rank is its own site). Building it is
    collective: every rank of the world creates every group, in the same order."""

    def __init__(self, layout: SiteLayout, rank: int) -> None:
        self.layout = layout
        self.rank = rank
        self.site = layout.site_of(rank)
        self.leader = layout.sites[self.site][0]
        self.is_leader = rank == self.leader
        self.intra: dist.ProcessGroup | None = None
        self.cross: dist.ProcessGroup | None = None
        if layout.trivial or not dist.is_initialized():
            return
        for index, site in enumerate(layout.sites):
            group = dist.new_group(list(site)) if len(site) > 1 else None
            if index == self.site:
                self.intra = group
        self.cross = dist.new_group(layout.leaders)

    @property
    def site_size(self) -> int:
        return len(self.layout.sites[self.site])

    def mean_in_site(self, tensor: torch.Tensor) -> int:
        """Average ``tensor`` in place over this site's ranks (trusted, plain all-reduce);
        returns the bytes this rank sent (a ring all-reduce's, 0 for a site of one)."""
        k = self.site_size
        if self.intra is None or k == 1:
            return 0
        dist.all_reduce(tensor, group=self.intra)
        tensor.div_(k)
        return int(2 * (k - 1) / k * tensor.numel() * tensor.element_size())

    def share_in_site(self, tensor: torch.Tensor) -> int:
        """Copy the leader's ``tensor`` to every rank of the site; returns the bytes this rank
        sent (the leader's payload to each other rank, 0 elsewhere)."""
        if self.intra is None or self.site_size == 1:
            return 0
        dist.broadcast(tensor, src=self.leader, group=self.intra)
        return tensor.numel() * tensor.element_size() * (self.site_size - 1) if self.is_leader else 0
