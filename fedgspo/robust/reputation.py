"""Per-rank reputation: trust scores, quarantine and rehabilitation from robust-all-reduce reports.

Each rank has a :class:`RankReputation` (a plain pydantic model, one per rank, meant to be
persisted as an entity). :meth:`ReputationTracker.update` folds one
:class:`~fedgspo.robust.all_reduce.RobustReport` into all of them:

* ``trust <- decay * trust + (1 - decay) * (0 if flagged else 1)`` (an EMA of clean steps);
* a rank flagged in at least ``quarantine_after`` of its last ``window`` steps is
  quarantined: weight 0 (left out of the aggregate) but still measured every step;
* a quarantined rank with ``rehabilitate_after`` consecutive clean steps is released and
  its recent-flag window cleared;
* a rank whose averages deviate across steps (:class:`~fedgspo.robust.detection.PersistentDeviation`,
  ``persistence``) counts as flagged too, even when no single step flagged it;
* a report that follows a consensus failure within the same rollout (``phase`` > 0) is not
  folded in: the failed update left the weights as they were, so the same batch gave the same
  gradients and its flags are the failed step's again (counted twice, two such steps and one
  more flag quarantined an honest rank of 8 in a measured run).

The update is pure arithmetic on the report, so trackers on different ranks that see the
same reports (reports are identical on every rank) stay identical. Call it once per
robust all-reduce, after it and before the next one.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedgspo.robust.detection import (
    DEFAULT_THRESHOLD, PERSISTENT_SKEW_BOUND, PERSISTENT_SKEW_FLOOR, PersistentDeviation)
from fedgspo.robust.all_reduce import RobustReport


#: Key of the across-step test that sees every step, whatever its phase.
ALL_PHASES = -1


class PersistenceConfig(BaseModel):
    """Detection across steps (:class:`fedgspo.robust.detection.PersistentDeviation`)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    enabled: bool = Field(True, description="Flag ranks whose averaged statistics deviate.")
    decay: float = Field(0.95, gt=0, lt=1, description="EMA decay of the per-rank averages.")
    threshold: float = Field(DEFAULT_THRESHOLD, gt=0, description="Robust z-score of an average that flags.")
    warmup: int = Field(10, gt=0, description="Steps a rank is measured before it can be flagged.")
    cosine_floor: float = Field(0.05, gt=0, description="MAD floor of the averaged cosines.")
    log_floor: float = Field(0.2, gt=0, description="MAD floor of the averaged relative log norms.")
    log_ratio_cap: float | None = Field(
        1.386, gt=0, description="Clip each step's relative log norm to +-this (default log 4) before averaging "
        "(None: no clip): bounds what one heavy-tailed step adds to an honest rank's average once most groups "
        "have equal rewards; a persistently scaled rank still averages up to the cap.")
    skew_bound: float = Field(PERSISTENT_SKEW_BOUND, gt=0, le=1,
                              description="Averaged skews beyond +-this (and z-score outliers) flag.")
    skew_floor: float = Field(PERSISTENT_SKEW_FLOOR, gt=0,
                              description="Floor of the averaged skews' scale (half-width of their shortest half).")


class ReputationConfig(BaseModel):
    """How trust is earned and lost."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    decay: float = Field(0.9, ge=0, lt=1, description="EMA decay of the trust score per step.")
    window: int = Field(10, gt=0, description="Recent steps considered for quarantine.")
    quarantine_after: int = Field(3, gt=0, description="Flags within the window that quarantine a rank.")
    rehabilitate_after: int = Field(20, gt=0, description="Consecutive clean steps that release a quarantined rank.")
    persistence: PersistenceConfig = Field(default_factory=PersistenceConfig)

    @model_validator(mode="after")
    def _fits_window(self) -> "ReputationConfig":
        if self.quarantine_after > self.window:
            raise ValueError(f"quarantine_after ({self.quarantine_after}) > window ({self.window})")
        return self


class RankReputation(BaseModel):
    """One rank's reputation; serialisable with ``model_dump`` / ``model_validate``."""

    model_config = ConfigDict(extra="forbid")

    rank: int = Field(ge=0)
    participant: str | None = Field(None, description="Stable identity of the process holding the rank.")
    trust: float = Field(1.0, ge=0, le=1, description="EMA of clean steps (1 = always clean).")
    steps: int = Field(0, ge=0, description="Reports seen.")
    flags: int = Field(0, ge=0, description="Times flagged in total.")
    consecutive_clean: int = Field(0, ge=0)
    recent: list[bool] = Field(default_factory=list, description="Flag history, newest last, at most `window`.")
    quarantined: bool = False
    quarantines: int = Field(0, ge=0, description="Times quarantined.")
    held: bool = Field(False, description="Quarantined by an operator: stays so until an operator releases it.")


class ReputationTracker:
    """Reputations of all ``world_size`` ranks, updated from robust all-reduce reports."""

    def __init__(self, world_size: int, config: ReputationConfig | None = None, phases: int = 1,
                 participants: list[str] | None = None) -> None:
        """``phases``: updates per rollout (``gspo.num_iterations``); with more than one, the
        across-step test also averages each phase on its own (:meth:`update`).
        ``participants``: the stable identity behind each rank (unique), which a restored state
        is matched by (:meth:`load_state_dict`)."""
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if phases < 1:
            raise ValueError(f"phases must be >= 1, got {phases}")
        if participants is not None and (len(participants) != world_size or len(set(participants)) != world_size):
            raise ValueError(f"need {world_size} distinct participants, got {participants}")
        self.config = config or ReputationConfig()
        self.phases = phases
        self.ranks = [RankReputation(rank=r, participant=participants[r] if participants else None)
                      for r in range(world_size)]
        # The across-step test over all steps (ALL_PHASES) and per phase of a rollout, and
        # each one's latest verdict.
        self.persistence: dict[int, PersistentDeviation] = {}
        self._persistent_flags: dict[int, list[int]] = {}
        self._last_failed = False

    def _detector(self) -> PersistentDeviation:
        p = self.config.persistence
        return PersistentDeviation(len(self.ranks), decay=p.decay, threshold=p.threshold, warmup=p.warmup,
                                   log_ratio_cap=p.log_ratio_cap, cosine_floor=p.cosine_floor,
                                   log_floor=p.log_floor, skew_bound=p.skew_bound, skew_floor=p.skew_floor)

    def update(self, report: RobustReport, phase: int = 0) -> list[int]:
        """Fold one report in; returns the ranks flagged in this step (sorted): the report's
        own flags plus those of the across-step test, which count alike. Raises
        ``ValueError`` if the report names a rank outside the world.

        ``phase`` says which update of a rollout this is (``step % num_iterations``): a
        rollout's first update (ratio 1) and its later ones (mostly clipped) have different
        statistics, so besides the average over all steps each phase is averaged on its own
        (warm-up counted per phase), and a rank in any of their latest verdicts is flagged.
        (A flipped-reward rank looks like a sign flip on the first update only: averaged with
        the second, it was never flagged.)

        A report with ``phase`` > 0 right after a report whose consensus failed repeats that
        step's measurement (module docstring): nothing is folded in and its own flags are
        returned."""
        flagged = set(report.flagged)
        if any(not 0 <= r < len(self.ranks) for r in flagged):
            raise ValueError(f"report flags {sorted(flagged)} outside 0..{len(self.ranks) - 1}")
        repeat = phase % self.phases != 0 and self._last_failed
        self._last_failed = report.consensus_failed
        if repeat:
            return sorted(flagged)
        if self.config.persistence.enabled and len(report.cosines) == len(self.ranks) == len(report.norms):
            # With one phase per rollout, the per-phase test would repeat the all-steps one.
            for key in (ALL_PHASES,) if self.phases == 1 else (ALL_PHASES, phase % self.phases):
                if key not in self.persistence:
                    self.persistence[key] = self._detector()
                self._persistent_flags[key] = self.persistence[key].update(
                    report.cosines, report.norms, report.skews if len(report.skews) == len(self.ranks) else None)
            flagged |= set().union(*self._persistent_flags.values())
        cfg = self.config
        for rep in self.ranks:
            bad = rep.rank in flagged
            rep.steps += 1
            rep.flags += bad
            rep.trust = cfg.decay * rep.trust + (1 - cfg.decay) * (0.0 if bad else 1.0)
            rep.recent = (rep.recent + [bad])[-cfg.window :]
            rep.consecutive_clean = 0 if bad else rep.consecutive_clean + 1
            if rep.quarantined and not rep.held and rep.consecutive_clean >= cfg.rehabilitate_after:
                rep.quarantined = False
                rep.recent = []
            elif not rep.quarantined and sum(rep.recent) >= cfg.quarantine_after:
                rep.quarantined = True
                rep.quarantines += 1
        return sorted(flagged)

    def hold(self, rank: int) -> None:
        """Quarantine ``rank`` on an operator's word until :meth:`release` (clean steps do not
        release it). ``ValueError`` for a rank outside the world."""
        rep = self._rank(rank)
        if not rep.quarantined:
            rep.quarantines += 1
        rep.quarantined = rep.held = True

    def release(self, rank: int) -> None:
        """Lift an operator's (or the tracker's) quarantine of ``rank``; its flag history starts
        afresh. ``ValueError`` for a rank outside the world."""
        rep = self._rank(rank)
        rep.quarantined = rep.held = False
        rep.recent, rep.consecutive_clean = [], 0

    def _rank(self, rank: int) -> RankReputation:
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < len(self.ranks):
            raise ValueError(f"rank {rank!r} is outside 0..{len(self.ranks) - 1}")
        return self.ranks[rank]

    def quarantined(self) -> list[int]:
        """Ranks currently quarantined (pass as ``exclude=`` to the robust all-reduce)."""
        return [rep.rank for rep in self.ranks if rep.quarantined]

    def weights(self, trust_weighted: bool = False) -> list[float]:
        """Per-rank weights: 0 when quarantined, else the trust score or 1.0."""
        return [0.0 if rep.quarantined else (rep.trust if trust_weighted else 1.0) for rep in self.ranks]

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state (JSON-serialisable) for checkpoints."""
        return {"config": self.config.model_dump(), "ranks": [rep.model_dump() for rep in self.ranks],
                "last_failed": self._last_failed,
                "persistence": {str(phase): {**det.state_dict(), "flags": self._persistent_flags.get(phase, [])}
                                for phase, det in self.persistence.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output.

        With participants on both sides, each reputation follows its participant to whatever
        rank it holds now (a restart that reorders ranks changes nothing); a participant the
        state does not know starts fresh, and one that left is dropped (an elastic resume with
        another world size). When the mapping is not the identity, the across-step test starts
        its warm-up again (its averages are per rank). Without participants the state must have
        this tracker's world size (``ValueError`` otherwise)."""
        saved = [RankReputation.model_validate(r) for r in state["ranks"]]
        self.config = ReputationConfig.model_validate(state["config"])
        current = [rep.participant for rep in self.ranks]
        by_participant = {rep.participant: rep for rep in saved if rep.participant is not None}
        self.persistence, self._persistent_flags = {}, {}
        self._last_failed = bool(state.get("last_failed", False))
        if None not in current and by_participant:
            self.ranks = [by_participant[p].model_copy(update={"rank": r}) if p in by_participant
                          else RankReputation(rank=r, participant=p) for r, p in enumerate(current)]
            if [rep.participant for rep in saved] != current:
                return  # ranks moved: the per-rank averages of the across-step test no longer apply
        elif len(saved) != len(self.ranks):
            raise ValueError(f"state has {len(saved)} ranks, tracker has {len(self.ranks)}")
        else:
            self.ranks = saved
        for phase, detector_state in state.get("persistence", {}).items():
            detector = self._detector()
            detector.load_state_dict(detector_state)
            self.persistence[int(phase)] = detector
            self._persistent_flags[int(phase)] = [int(r) for r in detector_state["flags"]]
