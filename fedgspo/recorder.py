"""Rank 0's record of a run behind one object: audit log, entities and events, metrics, alerts,
operator requests, console lines, the final checkpoint and summary.

:func:`open_recorder` returns a :class:`Recorder` on rank 0 and a :class:`NullRecorder`
elsewhere; both have the same methods, so the trainer calls them on every rank without asking
which rank it is. Every file goes where :class:`fedgspo.runfiles.RunFiles` says.

The writes (registry and events, audit log, metrics, alerts) run on one writer thread
(:class:`fedgspo.writer.BackgroundWriter`), in the order the trainer makes them, so the
training thread only queues them; the audit log's hash chain keeps that order. Every entity
version the bookkeeping writes is audited: after each bookkeeping call, one ``entity_write``
record lists its versions (type, ids, version, sha256 of the stored JSON), on the same thread,
so it follows the records queued before that call and precedes those queued after. The queue is
bounded (``bookkeeping.writer_queue``): when it is full, the training thread waits for room
rather than drop a record. :meth:`Recorder.flush` waits for everything queued and persists the
registry and ``events.jsonl``; :meth:`Recorder.checkpoint` and :meth:`Recorder.finish` flush,
:meth:`Recorder.close` runs everything still queued. A process that crashes loses what was
queued since the last flush: at most the records since the last checkpoint.

Failure behaviour: :func:`open_recorder` is collective; a Prometheus port rank 0 cannot bind is
a :class:`ConfigError` on every rank, raised before anything is written. Errors while recording
(disk full, registry write errors) happen on the writer thread and are raised on rank 0's
training thread by the next recorder call that queues or flushes (so at most one step later);
the trainer then closes with ``failed=True``, and nothing more is recorded but the files are
closed.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm import tqdm

from fedgspo.bookkeeping import RunBookkeeper, snapshot_reputations
from fedgspo.checkpoint import save_checkpoint
from fedgspo.config import Config, ConfigError
from fedgspo.distributed import DistContext, broadcast_json
from fedgspo.entities import ModelEntity
from fedgspo.entities.events import AnyBus, NullEventBus
from fedgspo.factory import RunInputs, trained_version
from fedgspo.integrity.audit import ENTITY_WRITE, RUN_END, RUN_START, AuditLog
from fedgspo.integrity.auth import Keyring, RequestInbox, audit_auth_failures
from fedgspo.runfiles import RunFiles, write_json_atomic, write_text_atomic
from fedgspo.telemetry.alerts import AlertMonitor
from fedgspo.telemetry.metrics import MetricsLogger, read_metrics
from fedgspo.telemetry.tracing import StepTracer
from fedgspo.writer import BackgroundWriter


class QueuedAudit:
    """The audit log seen through the writer: :meth:`append` queues the record, which the
    writer appends (hash-chained) in call order."""

    def __init__(self, log: AuditLog, writer: BackgroundWriter) -> None:
        self._log, self._writer = log, writer

    def append(self, kind: str, payload: dict[str, Any] | None = None, *, step: int | None = None,
               rank: int = 0) -> None:
        self._writer.submit(self._log.append, kind, payload, step=step, rank=rank)


class Recorder:
    """Everything rank 0 writes about a run. Build with :func:`open_recorder`."""

    def __init__(self, cfg: Config, files: RunFiles, logger: MetricsLogger, admin_key: bytes | None) -> None:
        self.cfg, self.files, self.logger = cfg, files, logger
        self.book = RunBookkeeper(cfg.bookkeeping, files.root, rank=0)
        self.alerts = AlertMonitor(cfg.alerts, files.root, self.book.bus) if cfg.alerts.enabled else None
        self.tracer = StepTracer(cfg.tracing, files.root, run_name=files.root.name, rank=0)
        self.audit_log = AuditLog(files.root, key=admin_key)
        self.writer = BackgroundWriter(cfg.bookkeeping.writer_queue, name="fedgspo-recorder")
        self.queued_audit = QueuedAudit(self.audit_log, self.writer)
        self.inbox: RequestInbox | None = (
            RequestInbox(files.root, admin_key, self.queued_audit, max_age_s=cfg.security.request_max_age_s)
            if admin_key else None)
        # Without an admin key, hot swaps come from <run dir>/hotswap.json; with one, only as
        # signed operator requests.
        self.hotswap_root: Path | None = files.root if admin_key is None else None
        self.inputs: RunInputs | None = None
        self._trained: ModelEntity | None = None
        self._step = 0  # the step of the last bookkeeping call queued (for its entity_write record)

    @property
    def bus(self) -> AnyBus:
        return self.book.bus

    @property
    def trained_model(self) -> ModelEntity | None:
        """After :meth:`finish`: the trained model's registry version (built locally when
        bookkeeping is off); ``None`` before."""
        return self.book.trained_model or self._trained

    def bind(self, inputs: RunInputs) -> None:
        """The entities :meth:`start` registers (config, data set, model, reference)."""
        self.inputs = inputs

    def _book(self, step: int, call: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Run a bookkeeping call (on the writer thread), then audit the entity versions it
        wrote as one ``entity_write`` record naming the call."""
        result = call(*args, **kwargs)
        writes = self.book.take_writes()
        if writes:
            self.audit_log.append(ENTITY_WRITE, {"operation": call.__name__.lstrip("_"), "writes": writes}, step=step)
        return result

    def say(self, message: str) -> None:
        """One console line on stderr (kept clear of the progress bar)."""
        tqdm.write(message, file=sys.stderr)

    def audit(self, kind: str, payload: dict[str, Any], *, step: int, rank: int = 0) -> None:
        """Queue an audit record (appended in call order on the writer thread)."""
        self.queued_audit.append(kind, payload, step=step, rank=rank)

    def audit_auth_failures(self, failed: list[int], *, step: int, mode: str) -> None:
        audit_auth_failures(self.queued_audit, failed, step=step, mode=mode)

    def counters(self) -> dict[str, int]:
        """System figures for the step record: the bookkeeper's (registry conflicts, event
        queue, user hooks), the writer's queue depth and waits for room, webhook deliveries."""
        writer = self.writer.stats()
        return {**self.book.counters(), "writer_queue_depth": writer["queue_depth"],
                "writer_full_waits": writer["full_waits"], **(self.alerts.counters() if self.alerts else {})}

    def start(self, *, first_step: int, world_size: int, participants: list[str], weights_sha256: str, rule: str,
              f: int, resumed_from: str | None) -> None:
        """Write the resolved config, audit the start (with the participant behind each rank)
        and register the run's entities, the ones :meth:`bind` gave (queued). Raises
        ``RuntimeError`` when nothing was bound."""
        if self.inputs is None:
            raise RuntimeError("Recorder.start: bind the run's input entities first")
        self._step = first_step
        self.writer.submit(write_text_atomic, self.files.config,
                           yaml.safe_dump(self.cfg.model_dump(mode="json"), sort_keys=False))
        self.audit(RUN_START, {"config_sha256": self.cfg.digest(), "world_size": world_size,
                               "participants": participants, "weights_sha256": weights_sha256,
                               "first_step": first_step}, step=first_step)
        self.writer.submit(self._book, first_step, self.book.start, name=self.files.root.name, cfg=self.cfg,
                           inputs=self.inputs, world_size=world_size, rule=rule, f=f, resumed_from=resumed_from)

    def publish(self, record: dict[str, Any], z_scores: list[float], reputations: list[Any]) -> None:
        """Queue a step record's outputs: events and registry versions, metrics, alerts. The
        record and the reputations are copied: the caller may reuse them."""
        self._step = record["step"]
        self.writer.submit(self._publish, dict(record), list(z_scores), snapshot_reputations(reputations))

    def _publish(self, record: dict[str, Any], z_scores: list[float], reputations: list[Any]) -> None:
        self._book(record["step"], self.book.step, record["step"], record, z_scores, reputations)
        self.logger.log(record)
        if self.alerts:
            self.alerts.observe(record)

    def checkpoint(self, path: Path, step: int, sha256: str, metrics: dict[str, float],
                   pruned: list[Path] | None = None) -> None:
        """Register a checkpoint as the child of the previous one and mark the checkpoints its
        save ``pruned``, then :meth:`flush`."""
        self._step = step
        self.writer.submit(self._book, step, self.book.checkpoint, path, step, sha256, dict(metrics), list(pruned or []))
        self.flush()

    def rule_changed(self, rule: str, f: int) -> None:
        self.writer.submit(self._book, self._step, self.book.rule_changed, rule, f)

    def flush(self) -> None:
        """Wait until everything queued is written, then persist the registry's write-behind
        versions, ``events.jsonl`` and the metrics files. Raises a write error of the writer."""
        self.writer.submit(self._flush_files)
        self.writer.flush()

    def _flush_files(self) -> None:
        self.book.flush()
        self.logger.flush()

    def finish(self, model: torch.nn.Module, *, tokenizer: Any, merge_lora: bool, steps: int, first_step: int,
               seconds: float, weights_per_rank: list[str], world_size: int, rule: str, f: int,
               reputation: list[dict[str, Any]], reputations: list[Any]) -> dict[str, Any]:
        """Write the final checkpoint (a directory transformers loads, with ``tokenizer``
        beside the weights when there is one) and ``summary.json``, close the run's entities;
        returns the summary."""
        weights = weights_per_rank[0]
        if len(set(weights_per_rank)) > 1:
            self.say(f"warning: ranks ended with different weights: {weights_per_rank}")
        self.flush()  # every step record is in metrics.jsonl
        final = save_checkpoint(self.files.final_checkpoint, model, step=steps, metadata={"weights_sha256": weights},
                                tokenizer=tokenizer, merge_lora=merge_lora)
        # The whole run's curve, across resumes: the last record of each step wins.
        curve = list({r["step"]: r["reward_mean"] for r in read_metrics(self.files.root)}.values())
        window = min(10, len(curve))
        first, last = sum(curve[:window]) / window, sum(curve[-window:]) / window
        self._step = steps
        self.writer.submit(self._book, steps, self._finish_run, final, steps, weights, snapshot_reputations(reputations),
                           {"reward_first10": first, "reward_last10": last, "seconds": seconds})
        if self.inputs is not None:
            self._trained = trained_version(self.inputs.model, weights)
        self.audit(RUN_END, {"weights_sha256": weights, "final_checkpoint": str(final)}, step=steps)
        summary = {
            "steps": steps, "world_size": world_size, "rule": rule, "f": f, "resumed_at": first_step,
            "reward_first10": first, "reward_last10": last, "weights_sha256": weights,
            "weights_sha256_per_rank": weights_per_rank, "final_checkpoint": str(final),
            "config_sha256": self.cfg.digest(), "seconds": seconds, "reputation": reputation,
        }
        self.writer.submit(write_json_atomic, self.files.summary, summary)
        self.flush()
        self.say(f"done: reward {first:.3f} (first {window} steps) -> {last:.3f} (last {window}); "
                 f"run directory {self.files.root}")
        return summary

    def _finish_run(self, final: Path, steps: int, weights: str, reputations: list[Any],
                    metrics: dict[str, float]) -> None:
        checkpoint_id = self.book.checkpoint(final, steps, weights, {"reward_mean": metrics["reward_last10"]})
        self.book.finish("completed", weights, step=steps, reputations=reputations, metrics=metrics,
                         final_checkpoint_id=checkpoint_id)

    def close(self, outcome: str | None = None) -> None:
        """Write what is queued and close everything; ``outcome`` ("failed", "cancelled") is
        the status of a run that did not finish (a finished one was marked by :meth:`finish`).
        A writer error not raised yet is raised here after closing when ``outcome`` is None,
        and only reported on the console otherwise (the run's own error comes first)."""
        if outcome and not self.writer.failed:
            self.writer.submit(self._book, self._step, self.book.finish, outcome)
        error = self.writer.close()
        self.book.close()
        self.logger.close()
        if self.alerts:
            self.alerts.close()
        self.tracer.close()
        if error is not None:
            if outcome is None:
                raise error
            self.say(f"warning: bookkeeping stopped early: {error!r}")


class NullRecorder:
    """What ranks other than 0 hold: the same calls, recording nothing but this rank's spans
    (when tracing is on and ``files`` is given)."""

    inbox: RequestInbox | None = None
    hotswap_root: Path | None = None

    def __init__(self, cfg: Config, files: RunFiles | None = None, *, rank: int = 0) -> None:
        self.rank = rank
        self.inputs: RunInputs | None = None
        self.trained_model: ModelEntity | None = None  # after finish: the bound model with the final weights
        self.bus: AnyBus = NullEventBus()
        self.tracer = StepTracer(cfg.tracing, files.root if files else None,
                                 run_name=files.root.name if files else "", rank=rank)

    def bind(self, inputs: RunInputs) -> None:
        self.inputs = inputs

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

    def checkpoint(self, path: Path, step: int, sha256: str, metrics: dict[str, float],
                   pruned: list[Path] | None = None) -> None:
        pass

    def rule_changed(self, rule: str, f: int) -> None:
        pass

    def flush(self) -> None:
        pass

    def finish(self, model: torch.nn.Module, *, weights_per_rank: list[str], **kwargs: Any) -> None:
        """No summary here; the trained model entity is built locally from this rank's hash."""
        if self.inputs is not None:
            self.trained_model = trained_version(self.inputs.model, weights_per_rank[self.rank])

    def close(self, outcome: str | None = None) -> None:
        self.tracer.close()


def open_recorder(cfg: Config, ctx: DistContext, files: RunFiles, keyring: Keyring | None) -> Recorder | NullRecorder:
    """Rank 0's :class:`Recorder` (it alone holds the admin key), a :class:`NullRecorder`
    elsewhere (with this rank's tracer). Collective: a Prometheus port rank 0 cannot bind is a :class:`ConfigError` on
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
        return NullRecorder(cfg, files, rank=ctx.rank)
    admin_key = keyring.admin_key() if keyring is not None and keyring.admin else None
    return Recorder(cfg, files, logger, admin_key)
