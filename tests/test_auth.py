"""Update authentication (forged, replayed, swapped updates), key files, and signed operator
requests; the gathered and per-shard helpers on three gloo ranks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from fedgspo.integrity.audit import AUDIT_FILE, AuditLog
from fedgspo.integrity.auth import (
    AuthError,
    RequestInbox,
    UpdateAuthenticator,
    generate_keyring,
    load_keyring,
    write_keyring,
    write_request,
)
from dist_helpers import run_ranks


@pytest.fixture(scope="module")
def keyring():
    return generate_keyring(3)


def test_honest_forged_replayed_and_swapped_updates(keyring) -> None:
    a, b, c = (UpdateAuthenticator(keyring, r, run_id="run") for r in range(3))
    update = torch.randn(1000)
    tags = a.sign_full(update, step=5)
    assert b.verify_full(update, sender=0, step=5, tag=tags[1])
    forged = update.clone()
    forged[17] += 1e-3
    assert not b.verify_full(forged, sender=0, step=5, tag=tags[1])  # forged bytes
    assert not b.verify_full(update, sender=0, step=6, tag=tags[1])  # replayed at a later step
    assert not b.verify_full(update, sender=2, step=5, tag=tags[1])  # claimed as rank 2's
    assert not b.verify_full(update, sender=0, step=5, tag=tags[2])  # tag meant for rank 2
    other_run = UpdateAuthenticator(keyring, 1, run_id="another run")
    assert not other_run.verify_full(update, sender=0, step=5, tag=tags[1])


def test_shard_tags(keyring) -> None:
    a, b = UpdateAuthenticator(keyring, 0), UpdateAuthenticator(keyring, 1)
    shards = list(torch.randn(3, 50).unbind())
    tags = a.sign_shards(shards, step=2)
    assert b.verify_shard(shards[1], sender=0, step=2, tag=tags[1])
    assert not b.verify_shard(shards[2], sender=0, step=2, tag=tags[1])  # another receiver's shard
    assert not b.verify_shard(shards[1], sender=0, step=1, tag=tags[1])


def test_split_keys_cannot_forge_between_other_ranks(keyring) -> None:
    rank2 = keyring.for_rank(2)
    assert rank2.admin is None and (0, 1) not in rank2.pairs
    with pytest.raises(AuthError, match="from rank 0 to rank 1"):
        rank2.pair(0, 1)
    assert keyring.for_rank(0).admin is not None


def test_key_file_mode_and_redaction(tmp_path: Path, keyring) -> None:
    path = write_keyring(tmp_path / "keys.json", keyring)
    assert os.stat(path).st_mode & 0o777 == 0o600
    loaded = load_keyring(path)
    assert loaded.pair(1, 2) == keyring.pair(1, 2) and loaded.admin_key() == keyring.admin_key()
    secret = keyring.pair(1, 2).hex()
    text = repr(loaded) + repr(UpdateAuthenticator(loaded, 0)) + repr(loaded.pairs[(1, 2)])
    assert secret not in text and keyring.admin_key().hex() not in text
    with pytest.raises(FileExistsError):
        write_keyring(path, keyring)
    os.chmod(path, 0o644)
    with pytest.raises(AuthError, match="chmod 600"):
        load_keyring(path)


def test_operator_requests(tmp_path: Path, keyring) -> None:
    run = tmp_path / "run"
    run.mkdir()
    admin = keyring.admin_key()
    audit = AuditLog(run)
    inbox = RequestInbox(run, admin, audit)
    good = write_request(run, admin, "quarantine", {"rank": 2})
    bad = write_request(run, b"x" * 32, "stop", {})
    unsigned = run / "requests" / "0-unsigned.json"
    body = json.loads(good.read_text())
    unsigned.write_text(json.dumps({k: v for k, v in body.items() if k != "mac"} | {"nonce": "n2"}))
    accepted = inbox.poll(step=4)
    assert [(r.action, r.args) for r in accepted] == [("quarantine", {"rank": 2})]
    assert sorted(p.name for p in (run / "requests" / "rejected").iterdir()) == sorted([bad.name, unsigned.name])
    replay = run / "requests" / good.name
    replay.write_text((run / "requests" / "done" / good.name).read_text())
    assert inbox.poll(step=5) == []
    kinds = [json.loads(line)["kind"] for line in (run / AUDIT_FILE).read_text().splitlines()]
    assert kinds == ["request_rejected", "operator_request", "request_rejected", "request_rejected"]
    reasons = [json.loads(line)["payload"].get("reason") for line in (run / AUDIT_FILE).read_text().splitlines()]
    assert "replayed (nonce already used)" in reasons and "missing or bad signature" in reasons


def _exchange(rank: int, world_size: int, keyring) -> tuple[list[int], list[int]]:
    import torch.distributed as dist

    from fedgspo.integrity.auth import verify_gathered, verify_shards

    auth = UpdateAuthenticator(keyring, rank, run_id="t")
    update = torch.full((12,), float(rank))
    gathered = torch.empty(world_size, 12)
    dist.all_gather_into_tensor(gathered.view(-1), update)
    if rank == 0:
        gathered[2, 3] = 99.0  # tampered in transit to rank 0
    replicated = verify_gathered(auth, gathered, step=7)
    sent = update.view(world_size, 4)
    received = torch.empty_like(sent)
    dist.all_to_all_single(received.view(-1), sent.reshape(-1))
    if rank == 1:
        received[0] += 1.0  # rank 0's shard altered on its way to rank 1
    return replicated, verify_shards(auth, sent, received, step=7)


@pytest.mark.slow
def test_gathered_and_sharded_helpers_on_three_ranks(keyring) -> None:
    results = run_ranks(_exchange, 3, keyring)
    assert all(status == "ok" for status, _ in results), results
    assert [value for _, value in results] == [([2], []), ([], [0]), ([], [])]
