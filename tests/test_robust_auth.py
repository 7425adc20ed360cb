"""robust_all_reduce with an UpdateAuthenticator on 4 gloo ranks: honest runs are unchanged
bit for bit; tampered, forged and replayed updates are excluded and reported on every rank."""

from __future__ import annotations

import contextlib

import pytest
import torch
from dist_helpers import run_ranks, values

from fedgspo import robust_all_reduce
from fedgspo.integrity.auth import Keyring, SecretKey, UpdateAuthenticator, generate_keyring

WORLD = 4
MODES = ("sharded", "replicated", "audited")
SIZES = (1000, 1001)  # 1001: the padded shard layout


class ReplayingAuthenticator(UpdateAuthenticator):
    """Signs with the previous step's binding, like a rank replaying an old update."""

    def sign_full(self, update, step):
        return super().sign_full(update, step - 1)

    def sign_shards(self, shards, step):
        return super().sign_shards(shards, step - 1)


def _update(d: int, rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * d + rank)
    return torch.randn(d, generator=g) + 0.5


@contextlib.contextmanager
def _tamper_outgoing(mode: str, d: int):
    """Alter the bytes this rank puts on the wire after they were signed (the signature covers
    the buffer as laid out; the wire carries a modified copy)."""
    import torch.distributed as dist

    import fedgspo.robust.shard_exchange as ex

    if mode == "replicated":
        original = ex.all_gather_single

        def gather(out, inp, group=None):
            if inp.numel() == d:  # the update, not the metadata
                inp = inp.clone()
                inp[3] += 1e-3
            return original(out, inp, group=group)

        ex.all_gather_single = gather
        try:
            yield
        finally:
            ex.all_gather_single = original
    else:
        original = dist.all_to_all_single

        def all_to_all(out, inp, group=None, **kw):
            inp = inp.clone()
            inp.view(WORLD, -1)[:, 0] += 1e-3  # one element of every outgoing shard
            return original(out, inp, group=group, **kw)

        dist.all_to_all_single = all_to_all
        try:
            yield
        finally:
            dist.all_to_all_single = original


def _forging_keyring(keyring: Keyring, rank: int) -> Keyring:
    """``rank``'s own receive keys, but wrong keys for everything it sends."""
    pairs = dict(keyring.for_rank(rank).pairs)
    for j in range(keyring.world_size):
        pairs[(rank, j)] = SecretKey(bytes(32))
    return Keyring(keyring.world_size, pairs)


def _scenarios(rank: int, world: int, keyring: Keyring) -> dict:
    auth = UpdateAuthenticator(keyring.for_rank(rank), rank, run_id="test-run")
    out: dict = {}
    step = 7
    for d in SIZES:
        x = _update(d, rank)
        for mode in MODES:
            kw = dict(rule="trimmed_mean", f=1, mode=mode)
            plain = x.clone()
            out[("plain", d, mode)] = (plain, robust_all_reduce(plain, **kw))
            honest = x.clone()
            out[("honest", d, mode)] = (honest, robust_all_reduce(honest, **kw, authenticator=auth, step=step))
            excl = x.clone()
            out[("exclude2", d, mode)] = (excl, robust_all_reduce(excl, **kw, exclude=[2]))
            tampered = x.clone()
            with _tamper_outgoing(mode, d) if rank == 2 else contextlib.nullcontext():
                report = robust_all_reduce(tampered, **kw, authenticator=auth, step=step)
            out[("tampered", d, mode)] = (tampered, report)
            replay_auth = ReplayingAuthenticator(keyring.for_rank(rank), rank, run_id="test-run") if rank == 2 else auth
            replayed = x.clone()
            report = robust_all_reduce(replayed, **kw, authenticator=replay_auth, step=step)
            out[("replayed", d, mode)] = (replayed, report)
    # Two bad senders (2 replays, 3 forges): 2 ranks left are too few for trimmed_mean f=1.
    x = _update(1000, rank)
    bad_auth = {2: ReplayingAuthenticator(keyring.for_rank(2), 2, run_id="test-run"),
                3: UpdateAuthenticator(_forging_keyring(keyring, 3), 3, run_id="test-run")}.get(rank, auth)
    for mode in MODES:
        t = x.clone()
        out[("two_bad", mode)] = (t, robust_all_reduce(t, "trimmed_mean", 1, mode=mode, authenticator=bad_auth, step=3))
    # Misuse raises the same ValueError on every rank, never hangs.
    errors = {}
    for name, kwargs in {
        "mixed": {} if rank == 0 else {"authenticator": auth, "step": 1},
        "step_mismatch": {"authenticator": auth, "step": 1 + (rank == 1)},
        "no_step": {"authenticator": auth},
    }.items():
        try:
            robust_all_reduce(x.clone(), "trimmed_mean", 1, **kwargs)
            errors[name] = None
        except ValueError as err:
            errors[name] = str(err)
    out["errors"] = errors
    return out


@pytest.fixture(scope="module")
def scenarios() -> list[dict]:
    return values(run_ranks(_scenarios, WORLD, generate_keyring(WORLD), timeout=240))


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("d", SIZES)
def test_honest_run_equals_unauthenticated_bit_for_bit(scenarios, mode, d):
    for per_rank in scenarios:
        plain, plain_report = per_rank[("plain", d, mode)]
        honest, report = per_rank[("honest", d, mode)]
        assert torch.equal(plain, honest)
        assert report == plain_report and report.auth_failed == [] and not report.consensus_failed


@pytest.mark.slow
@pytest.mark.parametrize("case", ("tampered", "replayed"))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("d", SIZES)
def test_bad_sender_excluded_like_exclude_and_reported_everywhere(scenarios, case, mode, d):
    for per_rank in scenarios:
        result, report = per_rank[(case, d, mode)]
        expected, excluded_report = per_rank[("exclude2", d, mode)]
        assert report.auth_failed == [2], (case, mode, report)
        assert 2 in report.flagged and 2 in report.excluded and report.weights[2] == 0.0
        assert not report.consensus_failed, report.reason
        assert torch.equal(result, expected)  # exactly the aggregate of exclude=[2]
        assert report.excluded == excluded_report.excluded
    assert torch.equal(scenarios[0][(case, d, mode)][0], scenarios[3][(case, d, mode)][0])


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_too_many_bad_senders_fail_consensus(scenarios, mode):
    for per_rank in scenarios:
        tensor, report = per_rank[("two_bad", mode)]
        assert report.consensus_failed and "failed authentication" in report.reason
        assert report.auth_failed == [2, 3] and {2, 3} <= set(report.flagged)
        assert not bool(tensor.any())  # zeroed: skip the step


@pytest.mark.slow
def test_misuse_raises_on_every_rank(scenarios):
    for per_rank in scenarios:
        errors = per_rank["errors"]
        assert errors["mixed"] and "disagree" in errors["mixed"]
        assert errors["step_mismatch"] and "disagree" in errors["step_mismatch"]
        assert errors["no_step"] and "integer step" in errors["no_step"]


def test_single_process_ignores_the_authenticator():
    auth = UpdateAuthenticator(generate_keyring(1), 0)
    t = torch.ones(5)
    report = robust_all_reduce(t, authenticator=auth, step=0)
    assert torch.equal(t, torch.ones(5)) and report.auth_failed == []

