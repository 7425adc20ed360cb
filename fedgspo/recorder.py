"""Rank 0's record of a run behind one object: audit log, entities and events, metrics, alerts,
operator requests, console lines, the final checkpoint and summary.

:func:`open_recorder` returns a :class:`Recorder` on rank 0 and a :class:`NullRecorder`
elsewhere; both have the same methods, so the trainer calls them on every rank without asking
which rank it is. Every file goes where :class:`fedgspo.runfiles.RunFiles` says.

Failure behaviour: :func:`open_recorder` is collective; a Prometheus port rank 0 cannot bind is
a :class:`ConfigError` on every rank, raised before anything is written. Errors while recording
(disk full, registry write errors) propagate on rank 0; the trainer then closes with
``failed=True``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm import tqdm

from fedgspo.bookkeeping import RunBookkeeper
from fedgspo.checkpoint import save_checkpoint
from fedgspo.config import Config, ConfigError
from fedgspo.distributed import DistContext, broadcast_json
from fedgspo.entities.events import AnyBus, NullEventBus
from fedgspo.integrity.audit import RUN_END, RUN_START, AuditLog
from fedgspo.integrity.auth import Keyring, RequestInbox, audit_auth_failures
from fedgspo.runfiles import RunFiles, write_json_atomic, write_text_atomic
from fedgspo.telemetry.alerts import AlertMonitor
from fedgspo.telemetry.metrics import MetricsLogger, read_metrics
from fedgspo.telemetry.tracing import StepTracer


class Recorder:
    """Everything rank 0 writes about a run. Build with :func:`open_recorder`."""

    def __init__(self, cfg: Config, files: RunFiles, logger: MetricsLogger, admin_key: bytes | None) -> None:
        self.cfg, self.files, self.logger = cfg, files, logger
        self.book = RunBookkeeper(cfg.bookkeeping, files.root, rank=0)
        self.alerts = AlertMonitor(cfg.alerts, files.root, self.book.bus) if cfg.alerts.enabled else None
        self.tracer = StepTracer(cfg.tracing, files.root, run_name=files.root.name)
        self.audit_log = AuditLog(files.root, key=admin_key)
        self.inbox: RequestInbox | None = (
            RequestInbox(files.root, admin_key, self.audit_log, max_age_s=cfg.security.request_max_age_s)
            if admin_key else None)
        # Without an admin key, hot swaps come from <run dir>/hotswap.json; with one, only as
        # signed operator requests.
        self.hotswap_root: Path | None = files.root if admin_key is None else None

    @property
    def bus(self) -> AnyBus:
        return self.book.bus

    def say(self, message: str) -> None:
        """One console line on stderr (kept clear of the progress bar)."""
        tqdm.write(message, file=sys.stderr)

    def audit(self, kind: str, payload: dict[str, Any], *, step: int, rank: int = 0) -> None:
        self.audit_log.append(kind, payload, step=step, rank=rank)

    def audit_auth_failures(self, failed: list[int], *, step: int, mode: str) -> None:
        audit_auth_failures(self.audit_log, failed, step=step, mode=mode)

    def counters(self) -> dict[str, int]:
        """System figures for the step record (registry conflicts, event queue depth, ...)."""
        return self.book.counters()

    def start(self, *, first_step: int, world_size: int, participants: list[str], weights_sha256: str, rule: str,
              f: int, model_info: dict[str, Any], dataset_info: dict[str, Any], resumed_from: str | None) -> None:
        """Write the resolved config, audit the start (with the participant behind each rank)
        and register the run's entities."""
        write_text_atomic(self.files.config, yaml.safe_dump(self.cfg.model_dump(mode="json"), sort_keys=False))
        self.audit(RUN_START, {"config_sha256": self.cfg.digest(), "world_size": world_size,
                               "participants": participants, "weights_sha256": weights_sha256,
                               "first_step": first_step}, step=first_step)
        self.book.start(name=self.files.root.name, cfg=self.cfg, model_info=model_info,
                        dataset_info=dataset_info, weights_hash=weights_sha256, world_size=world_size,
                        rule=rule, f=f, resumed_from=resumed_from)

    def publish(self, record: dict[str, Any], z_scores: list[float], reputations: list[Any]) -> None:
        """A step record's outputs: events and registry versions, metrics, alerts."""
        self.book.step(record["step"], record, z_scores, reputations)
        self.logger.log(record)
        if self.alerts:
            self.alerts.observe(record)

    def checkpoint(self, path: Path, step: int, sha256: str, metrics: dict[str, float]) -> None:
        """Register a checkpoint as the child of the previous one."""
        self.book.checkpoint(path, step, sha256, metrics)

    def rule_changed(self, rule: str, f: int) -> None:
        self.book.rule_changed(rule, f)

    def finish(self, model: torch.nn.Module, *, tokenizer: Any, merge_lora: bool, steps: int, first_step: int,
               seconds: float, weights_per_rank: list[str], world_size: int, rule: str, f: int,
               reputation: list[dict[str, Any]], reputations: list[Any]) -> dict[str, Any]:
        """Write the final checkpoint (a directory transformers loads, with ``tokenizer``
        beside the weights when there is one) and ``summary.json``, close the run's entities;
        returns the summary."""
        weights = weights_per_rank[0]
        if len(set(weights_per_rank)) > 1:
            self.say(f"warning: ranks ended with different weights: {weights_per_rank}")
        final = save_checkpoint(self.files.final_checkpoint, model, step=steps, metadata={"weights_sha256": weights},
                                tokenizer=tokenizer, merge_lora=merge_lora)
        # The whole run's curve, across resumes: the last record of each step wins.
        curve = list({r["step"]: r["reward_mean"] for r in read_metrics(self.files.root)}.values())
        window = min(10, len(curve))
        first, last = sum(curve[:window]) / window, sum(curve[-window:]) / window
        self.book.checkpoint(final, steps, weights, {"reward_mean": last})
        self.book.finish("completed", weights, step=steps, reputations=reputations)
        self.audit(RUN_END, {"weights_sha256": weights, "final_checkpoint": str(final)}, step=steps)
        summary = {
            "steps": steps, "world_size": world_size, "rule": rule, "f": f, "resumed_at": first_step,
            "reward_first10": first, "reward_last10": last, "weights_sha256": weights,
            "weights_sha256_per_rank": weights_per_rank, "final_checkpoint": str(final),
            "config_sha256": self.cfg.digest(), "seconds": seconds, "reputation": reputation,
        }
        write_json_atomic(self.files.summary, summary)
        self.say(f"done: reward {first:.3f} (first {window} steps) -> {last:.3f} (last {window}); "
                 f"run directory {self.files.root}")
        return summary

    def close(self, outcome: str | None = None) -> None:
        """Flush and close everything; ``outcome`` ("failed", "cancelled") is the status of a
        run that did not finish (a finished one was marked by :meth:`finish`)."""
        if outcome:
            self.book.finish(outcome)
        self.book.close()
        self.logger.close()
        if self.alerts:
            self.alerts.close()
        self.tracer.close()


class NullRecorder:
    """What ranks other than 0 hold: the same calls, recording nothing."""

    inbox: RequestInbox | None = None
    hotswap_root: Path | None = None

    def __init__(self, cfg: Config) -> None:
        self.bus: AnyBus = NullEventBus()
        self.tracer = StepTracer(cfg.tracing, None)

    def say(self, message: str) -> None:
        pass

    def audit(self, kind: str, payload: dict[str, Any], *, step: int, rank: int = 0) -> None:
        pass

    def audit_auth_failures(self, failed: list[int], *, step: int, mode: str) -> None:
        pass

    def counters(self) -> dict[str, int]:
        return {}

    def start(self, **kwargs: Any) -> None:
        pass

    def publish(self, record: dict[str, Any], z_scores: list[float], reputations: list[Any]) -> None:
        pass

    def checkpoint(self, path: Path, step: int, sha256: str, metrics: dict[str, float]) -> None:
        pass

    def rule_changed(self, rule: str, f: int) -> None:
        pass

    def finish(self, model: torch.nn.Module, **kwargs: Any) -> None:
        return None

    def close(self, outcome: str | None = None) -> None:
        self.tracer.close()


def open_recorder(cfg: Config, ctx: DistContext, files: RunFiles, keyring: Keyring | None) -> Recorder | NullRecorder:
    """Rank 0's :class:`Recorder` (it alone holds the admin key), a :class:`NullRecorder`
    elsewhere. Collective: a Prometheus port rank 0 cannot bind is a :class:`ConfigError` on
    every rank, before anything is written."""
    logger, error = None, None
    if ctx.is_main:
        files.root.mkdir(parents=True, exist_ok=True)
        try:
            logger = MetricsLogger(files.root, cfg.run.tensorboard, cfg.metrics)
        except OSError as err:
            error = f"metrics.prometheus_port: cannot serve on {cfg.metrics.prometheus_port} ({err.strerror or err})"
    error = broadcast_json(error)
    if error:
        raise ConfigError(str(error))
    if logger is None:
        return NullRecorder(cfg)
    admin_key = keyring.admin_key() if keyring is not None and keyring.admin else None
    return Recorder(cfg, files, logger, admin_key)
