"""Signed operator requests reach a running job; unsigned hot-swap files are ignored with keys."""

from __future__ import annotations

import json

from fedgspo.integrity.auth import generate_keyring, write_keyring, write_request
from fedgspo.telemetry.metrics import read_metrics
from fedgspo.train import main

FAST = ["run.progress_bar=false", "task.prompts_per_rank=2", "gspo.num_generations=4",
        "bookkeeping.hotswap_every=2"]


def _keys(tmp_path):
    keyring = generate_keyring(1)
    path = tmp_path / "keys.json"
    write_keyring(path, keyring)
    return path, keyring.admin_key()


def test_signed_requests_swap_and_stop(tmp_path):
    key_file, admin = _keys(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    write_request(run, admin, "hotswap", {"swaps": {"lr_schedule": "cosine"}})
    (run / "hotswap.json").write_text(json.dumps({"aggregator": "median"}))  # unsigned: ignored
    assert main([f"run.dir={run}", f"security.key_file={key_file}", "train.max_steps=50", *FAST]) == 0
    first = read_metrics(run)
    assert len(first) == 50  # the swap alone does not stop the run
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    swaps = [e for e in events if e["type"] == "HotSwapApplied"]
    assert [(e["slot"], e["new_name"]) for e in swaps] == [("lr_schedule", "cosine")]
    kinds = [json.loads(line)["kind"] for line in (run / "audit.jsonl").read_text().splitlines()]
    assert "operator_request" in kinds and "hot_swap" in kinds


def test_stop_request_checkpoints_and_ends(tmp_path):
    key_file, admin = _keys(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    write_request(run, admin, "stop", {})
    assert main([f"run.dir={run}", f"security.key_file={key_file}", "train.max_steps=50", *FAST]) == 0
    assert len(read_metrics(run)) == 2
    assert (run / "checkpoints" / "step_00000002" / "manifest.json").is_file()


def test_forged_request_is_rejected(tmp_path):
    key_file, _ = _keys(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    write_request(run, b"not the admin key" * 2, "stop", {})
    assert main([f"run.dir={run}", f"security.key_file={key_file}", "train.max_steps=6", *FAST]) == 0
    assert len(read_metrics(run)) == 6
    assert list((run / "requests" / "rejected").glob("*.json"))


def test_rule_hot_swap_versions_the_run_and_its_detector(tmp_path):
    """The entities that describe the rule follow a hot swap (and are built from the config)."""
    from fedgspo.entities import ByzantineDetectorEntity, GSPOTrainingRunEntity
    from fedgspo.entities.registry import EntityRegistry

    run = tmp_path / "run"
    run.mkdir()
    (run / "hotswap.json").write_text(json.dumps({"aggregator": "median"}))
    assert main([f"run.dir={run}", "train.max_steps=4", "aggregation.z_threshold=2.5",
                 "aggregation.reputation.quarantine_after=2", *FAST]) == 0
    registry = EntityRegistry(run / "registry.sqlite")
    try:
        (run_entity,) = registry.query(GSPOTrainingRunEntity)
        (detector,) = registry.query(ByzantineDetectorEntity)
        assert run_entity.aggregation_rule == detector.rule == "median(f=0)"
        assert [e.aggregation_rule for e in registry.history(run_entity.lineage_id)][0] == "trimmed_mean(f=0)"
        assert detector.z_threshold == 2.5 and detector.quarantine_after == 2
        assert detector.run_id == run_entity.lineage_id
    finally:
        registry.close()


def test_operator_quarantine_holds_until_released_and_bad_ranks_are_rejected(tmp_path):
    key_file, admin = _keys(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    write_request(run, admin, "quarantine", {"rank": 0})
    write_request(run, admin, "quarantine", {"rank": 7})  # outside the world: rejected, not a crash
    assert main([f"run.dir={run}", f"security.key_file={key_file}", "train.max_steps=30",
                 "aggregation.reputation.rehabilitate_after=3", *FAST]) == 0
    summary = json.loads((run / "summary.json").read_text())
    (rep,) = summary["reputation"]
    assert rep["quarantined"] and rep["held"]  # 28 clean steps did not release it
    audit = [json.loads(line) for line in (run / "audit.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "quarantine" and r["payload"].get("by") == "operator" for r in audit)
    assert any(r["kind"] == "request_rejected" and "outside" in r["payload"].get("reason", "") for r in audit)


def test_release_lifts_a_held_quarantine():
    from fedgspo.robust.reputation import ReputationConfig, ReputationTracker
    from fedgspo.robust.all_reduce import RobustReport

    tracker = ReputationTracker(3, ReputationConfig(rehabilitate_after=2))
    tracker.hold(1)
    clean = RobustReport([0.0] * 3, [0.0] * 3, [])
    for _ in range(5):
        tracker.update(clean)
    assert tracker.quarantined() == [1]
    tracker.release(1)
    tracker.update(clean)
    assert tracker.quarantined() == []
    for bad in (3, -1, True, "1"):
        try:
            tracker.hold(bad)
        except ValueError:
            continue
        raise AssertionError(f"hold({bad!r}) accepted")
