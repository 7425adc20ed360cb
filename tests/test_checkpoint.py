"""Checkpoints: round trip of every part, corruption fallback, crash safety, pruning, lineage,
and identical restore on two gloo ranks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedgspo import checkpoint as ckpt
from fedgspo.checkpoint import CheckpointConfig, CheckpointError, CheckpointManager, list_checkpoints, verify_checkpoint
from fedgspo.config import ModelConfig
from fedgspo.gspo.model import build_model, weights_sha256
from dist_helpers import run_ranks


def make_parts(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer, object]:
    model = build_model(ModelConfig(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2), 17,
                        pad_id=0, bos_id=1, eos_id=2, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
    return model, opt, sched


def train_one(model: torch.nn.Module, opt: torch.optim.Optimizer, sched: object) -> None:
    model(input_ids=torch.tensor([[1, 5, 6, 7]])).logits.square().mean().backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def save_steps(run_dir: Path, steps: list[int], keep_last: int = 5) -> CheckpointManager:
    model, opt, sched = make_parts()
    mgr = CheckpointManager(run_dir, CheckpointConfig(every=1, keep_last=keep_last))
    for step in steps:
        train_one(model, opt, sched)
        mgr.save(step, model, opt, sched, {"reputation": torch.full((3,), float(step)), "step": step})
    return mgr


def test_round_trip_restores_every_part(tmp_path: Path) -> None:
    model, opt, sched = make_parts()
    train_one(model, opt, sched)
    sampler = torch.Generator().manual_seed(7)
    extra = {"reputation": torch.arange(4.0), "flags": {3: [1, 2]}, "name": "x", "pair": (1, 2.5)}
    mgr = CheckpointManager(tmp_path, CheckpointConfig(every=1))
    info = mgr.save(1, model, opt, sched, extra, {"sampler": sampler})
    expected_draw = torch.rand(3, generator=sampler)
    expected_global = torch.rand(2)

    model2, opt2, sched2 = make_parts(seed=1)
    sampler2 = torch.Generator()
    torch.manual_seed(123)
    resumed = CheckpointManager(tmp_path, CheckpointConfig(resume="auto")).load_latest_verified(
        model2, opt2, sched2, {"sampler": sampler2})
    assert resumed is not None and resumed.info == info and resumed.skipped == []
    assert weights_sha256(model2) == weights_sha256(model) == info.weights_sha256
    assert torch.equal(torch.rand(3, generator=sampler2), expected_draw)
    assert torch.equal(torch.rand(2), expected_global)
    assert sched2.state_dict() == sched.state_dict()
    for a, b in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(resumed.extra_state["reputation"], extra["reputation"])
    assert resumed.extra_state["flags"] == {3: [1, 2]} and resumed.extra_state["pair"] == (1, 2.5)


def test_byte_flip_falls_back_to_previous(tmp_path: Path) -> None:
    save_steps(tmp_path, [1, 2])
    newest = list_checkpoints(tmp_path)[-1]
    target = newest / "optimizer.safetensors"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="optimizer.safetensors: sha256"):
        verify_checkpoint(newest)
    model, opt, sched = make_parts(seed=3)
    resumed = CheckpointManager(tmp_path, CheckpointConfig(resume="auto")).load_latest_verified(model, opt, sched)
    assert resumed is not None and resumed.info.step == 1
    assert [p for p, _ in resumed.skipped] == [str(newest)]
    assert "optimizer.safetensors" in resumed.skipped[0][1]


def test_crash_mid_write_leaves_no_partial_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mgr = save_steps(tmp_path, [1])
    real = ckpt.save_state

    def crash(directory: Path, name: str, state: object) -> None:
        real(directory, name, state)
        if name == "scheduler":
            raise OSError("disk full (injected)")

    monkeypatch.setattr(ckpt, "save_state", crash)
    model, opt, sched = make_parts()
    with pytest.raises(OSError, match="injected"):
        mgr.save(2, model, opt, sched, {})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000001"]


def test_prune_spares_older_verified_when_newest_is_corrupt(tmp_path: Path) -> None:
    mgr = save_steps(tmp_path, [1, 2, 3], keep_last=3)
    (list_checkpoints(tmp_path)[-1] / "extra.json").write_text("{}")
    mgr.cfg = CheckpointConfig(every=1, keep_last=1)
    deleted = mgr.prune()
    assert [p.name for p in deleted] == ["step_00000001"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]


def test_parent_chain_and_resume_from_other_run(tmp_path: Path) -> None:
    save_steps(tmp_path / "a", [1, 2])
    first, second = list_checkpoints(tmp_path / "a")
    manifest = verify_checkpoint(second)
    assert manifest["parent"]["path"] == str(first) and manifest["parent"]["step"] == 1
    assert verify_checkpoint(first)["parent"] is None

    model, opt, sched = make_parts()
    mgr = CheckpointManager(tmp_path / "b", CheckpointConfig(every=1, resume=second))
    resumed = mgr.load_latest_verified(model, opt, sched)
    assert resumed is not None and resumed.info.step == 2
    info = mgr.save(3, model, opt, sched, {})
    assert info.parent == str(second) and info.parent_sha256 == resumed.info.sha256


def test_explicit_resume_path_that_fails_raises(tmp_path: Path) -> None:
    save_steps(tmp_path, [1])
    path = list_checkpoints(tmp_path)[0]
    (path / "model.safetensors").write_bytes(b"broken")
    model, opt, sched = make_parts()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        CheckpointManager(tmp_path, CheckpointConfig(resume=path)).load_latest_verified(model, opt, sched)


def test_resume_never_and_empty_run(tmp_path: Path) -> None:
    model, opt, sched = make_parts()
    assert CheckpointManager(tmp_path, CheckpointConfig(resume="auto")).load_latest_verified(model, opt, sched) is None
    save_steps(tmp_path, [1])
    assert CheckpointManager(tmp_path, CheckpointConfig()).load_latest_verified(model, opt, sched) is None


def test_unstorable_extra_state_raises_before_writing(tmp_path: Path) -> None:
    model, opt, sched = make_parts()
    with pytest.raises(TypeError, match="cannot store a object"):
        CheckpointManager(tmp_path, CheckpointConfig()).save(1, model, opt, sched, {"bad": object()})
    assert list_checkpoints(tmp_path) == []


def _two_rank_resume(rank: int, world_size: int, run_dir: str) -> tuple[str, str, list[float], int]:
    import torch.distributed as dist

    torch.manual_seed(100 + rank)
    model, opt, sched = make_parts()
    sampler = torch.Generator().manual_seed(rank)
    mgr = CheckpointManager(Path(run_dir), CheckpointConfig(every=1, resume="auto"), rank=rank)
    train_one(model, opt, sched)
    mgr.save(1, model, opt, sched, {"n": 1}, {"sampler": sampler})
    after_save = torch.rand(2, generator=sampler).tolist()
    dist.barrier()
    model2, opt2, sched2 = make_parts(seed=9)
    sampler2 = torch.Generator()
    resumed = mgr.load_latest_verified(model2, opt2, sched2, {"sampler": sampler2})
    assert torch.rand(2, generator=sampler2).tolist() == after_save  # each rank gets its own stream back
    return weights_sha256(model2), resumed.info.sha256, after_save, resumed.info.step


@pytest.mark.slow
def test_two_ranks_restore_identically(tmp_path: Path) -> None:
    results = run_ranks(_two_rank_resume, 2, str(tmp_path))
    assert all(status == "ok" for status, _ in results), results
    (w0, s0, draw0, step0), (w1, s1, draw1, step1) = (value for _, value in results)
    assert (w0, s0, step0) == (w1, s1, step1) and draw0 != draw1


def _wired_loop(rank: int, world_size: int, run_dir: str, admin: bytes) -> tuple[int, int, str]:
    """The training-loop wiring in miniature: audit, periodic checkpoints, a signed stop request
    polled at the step boundary, then a restart that resumes on every rank."""
    from fedgspo.integrity.audit import CHECKPOINT, RESUME, AuditLog
    from fedgspo.integrity.auth import RequestInbox, poll_requests, write_request

    run = Path(run_dir)
    audit = AuditLog(run, key=admin) if rank == 0 else None
    inbox = RequestInbox(run, admin, audit) if rank == 0 else None
    model, opt, sched = make_parts()
    mgr = CheckpointManager(run, CheckpointConfig(every=2, resume="auto"), rank=rank)
    stopped_at = -1
    for step in range(10):
        train_one(model, opt, sched)
        info = mgr.maybe_save(step + 1, model, opt, sched, {"step": step + 1})
        if info is not None:
            audit.append(CHECKPOINT, {"path": str(info.path), "sha256": info.sha256}, step=info.step)
        if rank == 0 and step == 2:
            write_request(run, admin, "stop", {})
        if any(r.action == "stop" for r in poll_requests(inbox, step + 1)):
            stopped_at = step + 1
            break
    model2, opt2, sched2 = make_parts(seed=5)
    resumed = CheckpointManager(run, CheckpointConfig(resume="auto"), rank=rank).load_latest_verified(
        model2, opt2, sched2)
    if audit is not None:
        audit.append(RESUME, {"sha256": resumed.info.sha256}, step=resumed.info.step)
    return stopped_at, resumed.extra_state["step"], weights_sha256(model2)


@pytest.mark.slow
def test_wired_loop_stops_together_and_resumes_identically(tmp_path: Path) -> None:
    from fedgspo.integrity.audit import verify_audit_log

    admin = b"a" * 32
    results = run_ranks(_wired_loop, 2, str(tmp_path), admin)
    assert all(status == "ok" for status, _ in results), results
    (stop0, step0, w0), (stop1, step1, w1) = (value for _, value in results)
    assert stop0 == stop1 == 3 and step0 == step1 == 2 and w0 == w1
    assert verify_audit_log(tmp_path / "audit.jsonl", admin).records == 3
    kinds = [json.loads(line)["kind"] for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert kinds == ["checkpoint", "operator_request", "resume"]
