"""Nothing a peer sends is ever unpickled: the code has no object collectives, and a malicious
pickle sent over the wire formats fedgspo uses is refused without running."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from dist_helpers import run_ranks, values

PACKAGE = Path(__file__).resolve().parents[1] / "fedgspo"
#: Calls that unpickle what another process sent (or a file it wrote).
UNPICKLING = re.compile(r"\b(pickle|cloudpickle|dill)\b|_object_list\(|all_gather_object\(|gather_object\(|"
                        r"recv_object|torch\.load\((?![^)]*weights_only=True)")


def test_no_code_path_unpickles():
    found = [f"{path.relative_to(PACKAGE)}:{i}: {line.strip()}" for path in PACKAGE.rglob("*.py")
             for i, line in enumerate(path.read_text().splitlines(), 1)
             if UNPICKLING.search(line) and not line.lstrip().startswith("#") and "no pickle" not in line.lower()
             and "never pickle" not in line.lower() and "nothing is pickled" not in line.lower()]
    assert not found, found


class _Payload:
    """Unpickling this creates a marker file: proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _send_pickle_to_broadcast_json(rank: int, world_size: int, marker: str) -> str:
    """Rank 0 speaks broadcast_json's wire format (length, then bytes) with a pickle as the
    bytes; rank 1 receives through broadcast_json."""
    from fedgspo.distributed import broadcast_json

    if rank == 0:
        blob = pickle.dumps(_Payload(marker))
        dist.broadcast(torch.tensor([len(blob)], dtype=torch.int64), src=0)
        dist.broadcast(torch.frombuffer(bytearray(blob), dtype=torch.uint8), src=0)
        return "sent"
    try:
        broadcast_json(None)
    except ValueError as err:
        return f"refused: {err}"
    return "accepted"


def _send_pickle_as_weights_hash(rank: int, world_size: int, marker: str) -> list[str]:
    """The end-of-run weights-hash exchange with a pickle where a hash belongs."""
    from fedgspo.distributed import all_gather_bytes
    from fedgspo.train import _hex_digest

    mine = pickle.dumps(_Payload(marker)) if rank == 1 else ("ab" * 32).encode()
    return [_hex_digest(blob) for blob in all_gather_bytes(mine)]


@pytest.mark.slow
def test_a_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "code-ran"
    results = values(run_ranks(_send_pickle_to_broadcast_json, 2, str(marker)))
    assert results[0] == "sent" and results[1].startswith("refused: broadcast from rank 0: not valid JSON")
    hashes = values(run_ranks(_send_pickle_as_weights_hash, 2, str(marker)))
    assert hashes[0] == hashes[1] == ["ab" * 32, "invalid"]
    assert not marker.exists()


def _registry_client_over_json(rank: int, world_size: int, root: str, marker: str) -> list[str]:
    """Rank 1 patches a reputation through the client; rank 2 sends a pickle where its
    requests belong. Rank 0 applies rank 1's patch and rejects rank 2's bytes."""
    from fedgspo.distributed import all_gather_bytes
    from fedgspo.entities import ReputationEntity
    from fedgspo.entities.client import RegistryClient
    from fedgspo.entities.registry import EntityRegistry

    registry = EntityRegistry(Path(root) / "registry.sqlite") if rank == 0 else None
    if registry is not None:
        registry.register(ReputationEntity(rank=1))
    client = RegistryClient(registry)
    if rank == 2:
        all_gather_bytes(pickle.dumps(_Payload(marker)))
        return []
    if rank == 1:
        client.patch(ReputationEntity, {"rank": 1}, add={"flag_count": 2})
    report = client.sync()
    if registry is None:
        return []
    try:
        return [str(registry.query(ReputationEntity, rank=1)[0].flag_count),
                *[reason for _, reason in report.rejected]]
    finally:
        registry.close()


@pytest.mark.slow
def test_registry_client_parses_json_and_rejects_a_pickle(tmp_path):
    marker = tmp_path / "code-ran"
    results = values(run_ranks(_registry_client_over_json, 3, str(tmp_path), str(marker)))
    flags, *rejected = results[0]
    assert flags == "2"
    assert len(rejected) == 1 and rejected[0].startswith("rank 2: malformed")
    assert not marker.exists()
