"""Alert rules evaluated on rank 0 against every step record.

A rule watches one field of the step record (``metric``) and compares a statistic of its
recent values with ``threshold``:

* ``above`` / ``below``: the mean of the last ``window`` values is above / below it;
* ``drop``: the mean of the last ``window`` values is lower than the mean of the ``window``
  before them by more than it (a falling reward);
* ``ratio``: the mean of the last ``window`` values is more than ``threshold`` times the mean
  of the ``window`` before them (a step time regressing);
* ``increase``: the value grew by more than it over the last ``window`` steps (a cumulative
  counter climbing, such as registry retries).

A per-rank field (``rank_trust``, a list indexed by rank) is watched rank by rank. A rule
fires once when its condition becomes true, and re-arms when the condition is evaluated false
again, so a condition that holds for 100 steps is one alert, not 100. A fired alert is one
line in ``<run_dir>/alerts.jsonl`` (``step``, ``rule``, ``message``, ``value``,
``threshold``, and ``rank`` for per-rank rules), one console line ``alert: <rule>:
<message>`` on stderr, an :class:`~fedgspo.entities.events.AlertRaised` event on the run's bus
(so it lands in ``events.jsonl``) and, with ``alerts.webhook_url`` set, a JSON POST to that URL
(:mod:`fedgspo.telemetry.webhook`: a background thread, retried with exponential backoff; the
step never waits for it). The payload has ``run``, ``step``, ``rule``, ``severity``,
``message``, ``value``, ``threshold``, ``rank`` (``null`` unless per-rank) and ``text`` (one
line, which Slack- and Mattermost-style incoming webhooks display).

Failure behaviour: a rule is not evaluated until its metric has enough history; a record
without the metric (or with a non-finite value) adds nothing to that history. Names of rules
must be unique (a config error otherwise).
"""

from __future__ import annotations

import json
import math
import sys
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm import tqdm

from fedgspo.entities.events import AlertRaised, AnyBus
from fedgspo.telemetry.metrics import PER_RANK_PREFIX
from fedgspo.telemetry.webhook import WebhookSender
from fedgspo import runfiles

Condition = Literal["above", "below", "drop", "ratio", "increase"]
Severity = Literal["info", "warning", "error", "critical"]
ALERTS_FILENAME = runfiles.ALERTS


class AlertRule(BaseModel):
    """One condition on one step-record field."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: str = Field(min_length=1, description="Names the alert in alerts.jsonl and on the console.")
    metric: str = Field(min_length=1, description="A step-record field, e.g. reward_mean or rank_trust.")
    condition: Condition = Field(description="above | below | drop | ratio | increase (see fedgspo/telemetry/alerts.py).")
    threshold: float
    window: int = Field(1, gt=0, description="Steps the statistic is taken over.")
    severity: Severity = "warning"


def default_rules() -> list[AlertRule]:
    """Reward dropping, high detection rate, a distrusted rank, step time regressing,
    registry retries climbing, consensus failure."""
    return [
        AlertRule(name="reward_drop", metric="reward_mean", condition="drop", threshold=0.3, window=20),
        AlertRule(name="detection_rate", metric="flagged_frac", condition="above", threshold=0.2, window=10),
        AlertRule(name="low_trust", metric="rank_trust", condition="below", threshold=0.5),
        AlertRule(name="step_time_regression", metric="step_time_s", condition="ratio", threshold=2.0, window=20),
        AlertRule(name="retries_climbing", metric="registry_retries", condition="increase", threshold=20,
                  window=50),
        AlertRule(name="consensus_failed", metric="consensus_failed", condition="above", threshold=0.5,
                  severity="error"),
    ]


class AlertsConfig(BaseModel):
    """Alert rules, evaluated on rank 0 after every step."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    enabled: bool = Field(True, description="Evaluate the rules; off writes no alerts.jsonl.")
    rules: list[AlertRule] = Field(default_factory=default_rules)
    webhook_url: str | None = Field(
        None, pattern=r"^https?://", description="POST every alert as JSON to this URL (null: no delivery).")
    webhook_retries: int = Field(5, ge=0, description="Further tries of a delivery that failed.")
    webhook_backoff_s: float = Field(1.0, ge=0, description="Wait before the first retry; doubled for each next one.")
    webhook_timeout_s: float = Field(
        5.0, gt=0, description="Per request; also how long the end of a run waits for pending deliveries.")

    @model_validator(mode="after")
    def _unique_names(self) -> "AlertsConfig":
        repeated = sorted(name for name, n in Counter(r.name for r in self.rules).items() if n > 1)
        if repeated:
            raise ValueError(f"rule names must be unique: {repeated}")
        return self


@dataclass(frozen=True)
class Alert:
    """A rule's condition became true at ``step``; ``value`` is the statistic compared."""

    step: int
    rule: str
    message: str
    value: float
    threshold: float
    severity: Severity = "warning"
    rank: int | None = None

    def record(self) -> dict[str, Any]:
        out = {"step": self.step, "rule": self.rule, "message": self.message,
               "value": self.value, "threshold": self.threshold}
        return out if self.rank is None else {**out, "rank": self.rank}


def history_needed(rule: AlertRule) -> int:
    """Values of the metric that ``rule``'s statistic looks at."""
    if rule.condition in ("drop", "ratio"):
        return 2 * rule.window
    return rule.window + 1 if rule.condition == "increase" else rule.window


def statistic(rule: AlertRule, values: list[float]) -> float | None:
    """The figure ``rule`` compares with its threshold (newest value last), or ``None`` while
    there are too few values (or, for ``ratio``, the earlier window's mean is not positive)."""
    w = rule.window
    if len(values) < history_needed(rule):
        return None
    last = sum(values[-w:]) / w
    if rule.condition in ("above", "below"):
        return last
    if rule.condition == "increase":
        return values[-1] - values[-1 - w]
    previous = sum(values[-2 * w:-w]) / w
    if rule.condition == "drop":
        return previous - last
    return last / previous if previous > 0 else None


def crossed(rule: AlertRule, value: float) -> bool:
    return value < rule.threshold if rule.condition == "below" else value > rule.threshold


def describe(rule: AlertRule, value: float, rank: int | None) -> str:
    subject = rule.metric if rank is None else f"rank {rank} {rule.metric}"
    w, t = rule.window, rule.threshold
    over = f" (mean of the last {w} steps)" if w > 1 else ""
    return {
        "above": f"{subject} = {value:.4g}, above {t:g}{over}",
        "below": f"{subject} = {value:.4g}, below {t:g}{over}",
        "drop": f"{subject} fell by {value:.4g} (more than {t:g}) from one {w}-step window to the next",
        "ratio": f"{subject} is {value:.3g}x its previous {w}-step mean (more than {t:g}x)",
        "increase": f"{subject} rose by {value:.4g} (more than {t:g}) in the last {w} steps",
    }[rule.condition]


class AlertMonitor:
    """Evaluates :class:`AlertsConfig` rules on rank 0's step records (construct on rank 0
    only) and reports every alert that fires."""

    def __init__(self, cfg: AlertsConfig, run_dir: Path, bus: AnyBus) -> None:
        self.rules = list(cfg.rules)
        self.bus = bus
        self._keep: dict[str, int] = {}
        for rule in self.rules:
            self._keep[rule.metric] = max(self._keep.get(rule.metric, 0), history_needed(rule))
        self._history: dict[tuple[str, int | None], deque[float]] = {}
        self._active: set[tuple[str, int | None]] = set()
        self._file = (Path(run_dir) / ALERTS_FILENAME).open("a", buffering=1)
        self.run_name = Path(run_dir).name
        self._close_s = cfg.webhook_timeout_s
        self.webhook = (WebhookSender(cfg.webhook_url, retries=cfg.webhook_retries, backoff_s=cfg.webhook_backoff_s,
                                      timeout_s=cfg.webhook_timeout_s) if cfg.webhook_url else None)

    def observe(self, record: dict[str, Any]) -> list[Alert]:
        """Add the record's watched fields to the history, evaluate every rule and report the
        alerts that fire at this step."""
        for metric, keep in self._keep.items():
            self._remember(metric, record.get(metric), keep)
        fired = []
        for rule in self.rules:
            for (metric, rank), values in self._history.items():
                if metric != rule.metric:
                    continue
                value = statistic(rule, list(values))
                if value is None:
                    continue
                key = (rule.name, rank)
                if not crossed(rule, value):
                    self._active.discard(key)
                elif key not in self._active:
                    self._active.add(key)
                    fired.append(Alert(int(record["step"]), rule.name, describe(rule, value, rank), value,
                                       rule.threshold, rule.severity, rank))
        for alert in fired:
            self.report(alert)
        return fired

    def _remember(self, metric: str, value: Any, keep: int) -> None:
        if metric.startswith(PER_RANK_PREFIX) and isinstance(value, list):
            series = list(enumerate(value))
        elif isinstance(value, (int, float)):
            series = [(None, value)]
        else:
            return
        for rank, v in series:
            if math.isfinite(v):
                self._history.setdefault((metric, rank), deque(maxlen=keep)).append(float(v))

    def report(self, alert: Alert) -> None:
        """alerts.jsonl line, console line, ``AlertRaised`` event, webhook delivery (queued)."""
        self._file.write(json.dumps(alert.record()) + "\n")
        tqdm.write(f"alert: {alert.rule}: {alert.message}", file=sys.stderr)
        self.bus.emit(AlertRaised(severity=alert.severity, message=alert.message, rule=alert.rule,
                                  value=alert.value, threshold=alert.threshold, subject_rank=alert.rank,
                                  step=alert.step, rank=0))
        if self.webhook is not None:
            self.webhook.send({
                "run": self.run_name, "step": alert.step, "rule": alert.rule, "severity": alert.severity,
                "message": alert.message, "value": alert.value, "threshold": alert.threshold, "rank": alert.rank,
                "text": f"[fedgspo {self.run_name}] {alert.severity}: {alert.rule}: {alert.message} "
                        f"(step {alert.step})"})

    def counters(self) -> dict[str, int]:
        """Webhook deliveries for the step record (``{}`` without a webhook): sent, failed
        finally, dropped because the queue was full."""
        if self.webhook is None:
            return {}
        stats = self.webhook.stats()
        return {"webhook_sent": stats["sent"], "webhook_failed": stats["failed"], "webhook_dropped": stats["dropped"]}

    def close(self) -> None:
        """Close alerts.jsonl; wait up to ``webhook_timeout_s`` for pending deliveries."""
        self._file.close()
        if self.webhook is not None:
            self.webhook.close(self._close_s)
