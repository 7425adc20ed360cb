"""Alert rules: statistics, once-per-crossing firing, per-rank rules and the three outputs."""

from __future__ import annotations

import json

import pytest

from fedgspo.telemetry.alerts import AlertMonitor, AlertRule, AlertsConfig, statistic
from fedgspo.config import ConfigError, load_config
from fedgspo.entities.events import AlertRaised, EventBus, NullEventBus
from fedgspo.telemetry.metrics import read_metrics
from fedgspo.train import main


def rule(condition: str, threshold: float, window: int = 1, metric: str = "m") -> AlertRule:
    return AlertRule(name=f"{metric}_{condition}", metric=metric, condition=condition, threshold=threshold,
                     window=window)


@pytest.mark.parametrize("condition, window, values, expected", [
    ("above", 2, [1.0, 3.0, 5.0], 4.0),
    ("below", 1, [1.0, 3.0], 3.0),
    ("drop", 2, [2.0, 2.0, 1.0, 0.0], 1.5),
    ("ratio", 1, [2.0, 5.0], 2.5),
    ("ratio", 1, [0.0, 5.0], None),  # no positive baseline
    ("increase", 2, [1.0, 4.0, 5.0, 9.0], 5.0),
    ("drop", 2, [2.0, 1.0, 0.0], None),  # needs two full windows
    ("increase", 3, [1.0, 4.0, 5.0], None),
])
def test_statistic(condition, window, values, expected):
    assert statistic(rule(condition, 0.0, window), values) == expected


def monitor(tmp_path, *rules: AlertRule, bus=None) -> AlertMonitor:
    return AlertMonitor(AlertsConfig(rules=list(rules)), tmp_path, bus or NullEventBus())


def test_fires_once_per_crossing_and_rearms(tmp_path, capsys):
    mon = monitor(tmp_path, rule("above", 1.0))
    fired = [len(mon.observe({"step": s, "m": v})) for s, v in enumerate([0.0, 2.0, 3.0, 2.0, 0.5, 5.0])]
    mon.close()
    assert fired == [0, 1, 0, 0, 0, 1]
    lines = [json.loads(line) for line in (tmp_path / "alerts.jsonl").read_text().splitlines()]
    assert [(a["step"], a["rule"], a["value"], a["threshold"]) for a in lines] == [
        (1, "m_above", 2.0, 1.0), (5, "m_above", 5.0, 1.0)]
    assert set(lines[0]) == {"step", "rule", "message", "value", "threshold"}
    err = capsys.readouterr().err.splitlines()
    assert err == [f"alert: m_above: {lines[0]['message']}", f"alert: m_above: {lines[1]['message']}"]


def test_per_rank_rule_fires_for_each_rank(tmp_path):
    mon = monitor(tmp_path, rule("below", 0.5, metric="rank_trust"))
    assert mon.observe({"step": 0, "rank_trust": [1.0, 0.9, 1.0]}) == []
    (alert,) = mon.observe({"step": 1, "rank_trust": [1.0, 0.4, 1.0]})
    assert alert.rank == 1 and "rank 1 rank_trust" in alert.message
    assert [a.rank for a in mon.observe({"step": 2, "rank_trust": [0.1, 0.3, 1.0]})] == [0]
    mon.close()
    assert json.loads((tmp_path / "alerts.jsonl").read_text().splitlines()[0])["rank"] == 1


def test_missing_or_non_finite_values_are_not_evaluated(tmp_path):
    mon = monitor(tmp_path, rule("above", 1.0, window=2))
    assert mon.observe({"step": 0, "m": 5.0}) == []
    assert mon.observe({"step": 1}) == [] and mon.observe({"step": 2, "m": float("nan")}) == []
    assert len(mon.observe({"step": 3, "m": 5.0})) == 1
    mon.close()


def test_alert_is_an_event_on_the_bus(tmp_path):
    bus = EventBus()
    mon = monitor(tmp_path, rule("above", 0.5, metric="consensus_failed"), bus=bus)
    mon.observe({"step": 7, "consensus_failed": True})
    mon.close()
    bus.flush()
    (event,) = bus.history(AlertRaised)
    bus.close()
    assert (event.rule, event.step, event.value, event.threshold) == ("consensus_failed_above", 7, 1.0, 0.5)


def test_default_rules_include_consensus_failure():
    rules = {r.name: r for r in AlertsConfig().rules}
    assert {"reward_drop", "detection_rate", "low_trust", "step_time_regression", "retries_climbing",
            "consensus_failed"} <= set(rules)
    assert rules["consensus_failed"].severity == "error"


def test_bad_rules_are_config_errors():
    with pytest.raises(ConfigError, match="alerts: .*unique"):
        load_config(None, ["alerts.rules=[{name: a, metric: m, condition: above, threshold: 1},"
                           " {name: a, metric: n, condition: below, threshold: 1}]"])
    with pytest.raises(ConfigError, match="alerts.rules.0.condition"):
        load_config(None, ["alerts.rules=[{name: a, metric: m, condition: sideways, threshold: 1}]"])


def test_run_writes_alerts_and_events(tmp_path):
    run = tmp_path / "run"
    rules = "[{name: any_reward, metric: reward_mean, condition: above, threshold: -1}]"
    assert main([f"run.dir={run}", f"alerts.rules={rules}", "train.max_steps=4", "run.progress_bar=false",
                 "task.prompts_per_rank=2", "gspo.num_generations=4"]) == 0
    (alert,) = [json.loads(line) for line in (run / "alerts.jsonl").read_text().splitlines()]
    assert alert["step"] == 0 and alert["rule"] == "any_reward"
    assert alert["value"] == pytest.approx(read_metrics(run)[0]["reward_mean"])
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert [e["rule"] for e in events if e["type"] == "AlertRaised"] == ["any_reward"]
