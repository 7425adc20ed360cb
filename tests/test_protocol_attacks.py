"""Byzantine ranks lying inside the robust all-reduce, on 4 gloo ranks.

Under each protocol-level attack, in the mode that claims to handle it, every rank must end
with the same tensor, equal to the rule applied locally to all updates (a protocol liar's
own update is honest), the liar flagged or the step skipped, and no honest rank flagged.
"""

from __future__ import annotations

import math

import pytest
import torch
from dist_helpers import run_ranks, values

from fedgspo import robust_all_reduce
from fedgspo.robust.aggregators import build_aggregator
from fedgspo.robust.all_reduce import META_NUMEL
from fedgspo.robust.attacks import AttackConfig, ProtocolAttack, protocol_tamper
from fedgspo.robust.shard_exchange import ProtocolTamper

WORLD = 4
D = 1001  # not a multiple of the world size: the last shard is padded
MODES = ("sharded", "replicated", "audited")


def updates(spread: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    x = 0.5 * torch.randn(D, generator=g) + torch.randn(WORLD, D, generator=g)
    x[0] *= spread
    return x


class _Numel(ProtocolTamper):
    """Claims a fixed value as its numel (NaN, infinity)."""

    def __init__(self, value: float) -> None:
        self.value = value

    def metadata(self, row: torch.Tensor) -> None:
        row[META_NUMEL] = self.value


def _attacked(rank: int, kind: str, ranks: list[int], **kw) -> ProtocolTamper | None:
    return protocol_tamper(AttackConfig(kind=kind, ranks=ranks, **kw), rank, step=0)


def _scenarios(rank: int, world: int) -> dict:
    x = updates()
    out: dict = {}

    def run(name: str, tamper: ProtocolTamper | None, rule: str = "trimmed_mean", data: torch.Tensor = x,
            **kw) -> None:
        t = data[rank].clone()
        out[name] = (t, robust_all_reduce(t, rule, 1, tamper=tamper, **kw))

    for mode in MODES:
        run(f"clean/{mode}", None, mode=mode)
    run("lie_aggregate", _attacked(rank, "lie_aggregate", [1]), mode="audited")
    run("lie_aggregate/geometric_median", _attacked(rank, "lie_aggregate", [2]), "geometric_median",
        mode="audited", tol=0.0, max_iter=6)
    run("lie_vote", _attacked(rank, "lie_vote", [2]), mode="audited")
    run("lie_stats", _attacked(rank, "lie_stats", [1], target=3), mode="audited")
    # Rank 1 lies about its shard; rank 3 votes -1, which cancelled rank 2's accusation of
    # rank 1 when votes were summed.
    run("lie_aggregate+lie_vote", {1: ProtocolAttack("lie_aggregate", 1.0), 3: ProtocolAttack("lie_vote", -1.0)}
        .get(rank), mode="audited")
    # Rank 0's update is 500 times too large (flagged and excluded); rank 1 lies in both
    # aggregation rounds.
    run("lie_aggregate/exclude_flagged", _attacked(rank, "lie_aggregate", [1]), data=updates(500.0),
        mode="audited", exclude_flagged=True)
    # Sharded mode trusts owners: the same lies go through.
    run("sharded/lie_aggregate", _attacked(rank, "lie_aggregate", [1]))
    run("sharded/lie_stats", _attacked(rank, "lie_stats", [1], target=3))

    errors = {}
    for mode in MODES:
        for name, tamper in (("bad_metadata", _attacked(rank, "bad_metadata", [2])),
                             ("nan_numel", _Numel(math.nan) if rank == 0 else None),
                             ("inf_numel", _Numel(math.inf) if rank == 3 else None)):
            try:
                robust_all_reduce(x[rank].clone(), "trimmed_mean", 1, mode=mode, tamper=tamper)
                errors[(mode, name)] = None
            except ValueError as err:
                errors[(mode, name)] = str(err)
    out["errors"] = errors
    run("after_errors", None, mode="audited")
    return out


@pytest.fixture(scope="module")
def scenarios() -> list[dict]:
    return values(run_ranks(_scenarios, WORLD, timeout=240))


def _same_everywhere(scenarios: list[dict], name: str) -> tuple[torch.Tensor, object]:
    tensor, report = scenarios[0][name]
    for other in scenarios[1:]:
        assert torch.equal(other[name][0], tensor), name
        assert repr(other[name][1]) == repr(report), name
    return tensor, report


def _reference(rule: str = "trimmed_mean", rows: list[int] | None = None, data: torch.Tensor | None = None,
               **options) -> torch.Tensor:
    x = updates() if data is None else data
    stack = x if rows is None else x[rows]
    return build_aggregator(rule, 1, **options)(stack.double()).float()


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_without_a_liar_every_mode_agrees(scenarios, mode):
    tensor, report = _same_everywhere(scenarios, f"clean/{mode}")
    assert report.flagged == [] and not report.consensus_failed and report.disputed == []
    torch.testing.assert_close(tensor, _reference(), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "liar", "rule", "options"),
    [("lie_aggregate", 1, "trimmed_mean", {}),
     ("lie_aggregate/geometric_median", 2, "geometric_median", {"tol": 0.0, "max_iter": 6}),
     ("lie_stats", 1, "trimmed_mean", {})],
)
def test_a_lying_owner_is_repaired_and_flagged(scenarios, name, liar, rule, options):
    tensor, report = _same_everywhere(scenarios, name)
    assert not report.consensus_failed, report.reason
    assert report.flagged == [liar] and report.audit_mismatches == [liar]
    assert report.disputed == [liar] and report.false_accusations == []
    torch.testing.assert_close(tensor, _reference(rule, **options), rtol=1e-5, atol=1e-6)
    clean = scenarios[0]["clean/audited"][1]
    assert report.norms == pytest.approx(clean.norms, rel=1e-6)  # statistics repaired too


@pytest.mark.slow
def test_a_false_accusation_flags_the_accuser_and_keeps_the_step(scenarios):
    tensor, report = _same_everywhere(scenarios, "lie_vote")
    assert not report.consensus_failed, report.reason
    assert report.disputed == [1] and report.false_accusations == [2] and report.audit_mismatches == []
    assert report.flagged == [2]
    torch.testing.assert_close(tensor, _reference(), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_a_vote_cannot_cancel_another(scenarios):
    tensor, report = _same_everywhere(scenarios, "lie_aggregate+lie_vote")
    assert not report.consensus_failed, report.reason
    assert report.audit_mismatches == [1] and report.false_accusations == [3] and report.flagged == [1, 3]
    assert report.disputed == [1, 2]
    torch.testing.assert_close(tensor, _reference(), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_a_liar_is_caught_in_the_second_round_of_exclude_flagged(scenarios):
    data = updates(500.0)
    tensor, report = _same_everywhere(scenarios, "lie_aggregate/exclude_flagged")
    assert not report.consensus_failed, report.reason
    assert report.excluded == [0] and report.flagged == [0, 1] and report.audit_mismatches == [1]
    torch.testing.assert_close(tensor, _reference(rows=[1, 2, 3], data=data), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_sharded_mode_trusts_owners(scenarios):
    tensor, _ = _same_everywhere(scenarios, "sharded/lie_aggregate")
    assert not torch.allclose(tensor, _reference(), rtol=1e-3, atol=1e-3)
    _, report = _same_everywhere(scenarios, "sharded/lie_stats")
    assert 3 in report.flagged  # framed


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_bad_metadata_raises_the_same_error_on_every_rank(scenarios, mode):
    for name, what in (("bad_metadata", "numel"), ("nan_numel", "numel"), ("inf_numel", "numel")):
        messages = [per_rank["errors"][(mode, name)] for per_rank in scenarios]
        assert messages[0] is not None and f"disagree on {what}" in messages[0], (name, messages)
        assert all(m == messages[0] for m in messages), (name, messages)
    tensor, report = _same_everywhere(scenarios, "after_errors")
    assert not report.consensus_failed
    torch.testing.assert_close(tensor, _reference(), rtol=1e-5, atol=1e-6)


def test_protocol_tamper_only_on_attacking_ranks():
    cfg = AttackConfig.model_validate({"kind": "lie_vote", "ranks": [2], "start_step": 3})
    assert protocol_tamper(cfg, 2, step=2) is None and protocol_tamper(cfg, 1, step=3) is None
    tamper = protocol_tamper(cfg, 2, step=3)
    assert isinstance(tamper, ProtocolAttack) and tamper.vote(0.0) == -1.0 and tamper.vote(1.0) == 0.0
    assert protocol_tamper(AttackConfig(kind="sign_flip", ranks=[2]), 2, step=0) is None
    with pytest.raises(ValueError, match="not a protocol-level attack"):
        ProtocolAttack("sign_flip", 1.0)


@pytest.mark.slow
def test_a_run_with_bad_metadata_stops_with_one_line_naming_the_disagreement(tmp_path):
    """A participant that publishes a wrong metadata row stops the run at its first exchange
    (as withholding a collective would): exit code 1, one line per rank, no traceback."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3", "-m",
           "fedgspo.train", f"run.dir={tmp_path / 'r'}", "train.max_steps=3", "run.progress_bar=false",
           "bookkeeping.enabled=false", "task.prompts_per_rank=2", "attack={kind: bad_metadata, ranks: [2]}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    # three ranks print at once: their lines may share a line of the captured stream
    assert proc.stderr.count("fedgspo.train: error: step 0: robust_all_reduce: ranks disagree on numel "
                             "(per rank: [132480, 132480, 132481])") == 3
    assert "fedgspo/train.py\", line" not in proc.stderr  # only torchrun's own summary has a traceback
