"""Process-group set-up from torchrun's or mpirun's environment, every small collective, and
flat-gradient plumbing. The one module of fedgspo that the robust library imports.

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous variables. Under
``mpirun`` (Open MPI, MPICH/PMI or SLURM's PMIx) the same variables are derived from the MPI
rank, and rank 0 shares a rendezvous address over MPI (needs ``mpi4py``). Without either the run
is a single process and no process group is created. CUDA gets nccl, CPU gets gloo.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: rank, world size, its device, and whether it is rank 0."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or dist.is_initialized()


def _pick_device(preference: str, local_rank: int) -> torch.device:
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is available")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_distributed(device: str = "auto", timeout_s: float = 600.0) -> DistContext:
    """Initialise the default process group when launched by torchrun, else a single process.

    Failure: rendezvous errors propagate from ``init_process_group`` (the run cannot start);
    the caller should exit non-zero so torchrun's restart policy applies.
    """
    if "RANK" not in os.environ and mpi_rank_and_size() is not None:
        export_mpi_rendezvous()
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    dev = _pick_device(device, local_rank)
    if "RANK" in os.environ and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s),
                                device_id=dev if dev.type == "cuda" else None,
                                store=_attempt_store(rank, world_size, timeout_s), rank=rank,
                                world_size=world_size)
    return DistContext(rank, world_size, local_rank, local_world_size, dev)


# (rank, size, local rank, local size) variables of the MPI launchers, in order of preference.
_MPI_ENV = (
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("PMIX_RANK", "PMIX_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
)


def mpi_rank_and_size() -> tuple[int, int, int, int] | None:
    """(rank, world size, local rank, local world size) from an MPI launcher's environment,
    or ``None`` when the process was not started by ``mpirun``/``mpiexec``."""
    for rank_var, size_var, local_rank_var, local_size_var in _MPI_ENV:
        if rank_var in os.environ and size_var in os.environ:
            size = int(os.environ[size_var])
            return (int(os.environ[rank_var]), size, int(os.environ.get(local_rank_var, 0)),
                    int(os.environ.get(local_size_var, size)))
    return None


def export_mpi_rendezvous() -> None:
    """Set torchrun's variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``) from the MPI launcher's, so that ``init_process_group``
    works as under torchrun. Rank 0 picks its host name and a free port unless ``MASTER_ADDR`` /
    ``MASTER_PORT`` are set, and broadcasts them over ``MPI.COMM_WORLD`` (collective).

    Failure: ``RuntimeError`` naming the missing package when ``mpi4py`` is not installed.
    """
    found = mpi_rank_and_size()
    if found is None:
        raise RuntimeError("not launched by mpirun: no MPI rank in the environment")
    rank, size, local_rank, local_size = found
    try:
        from mpi4py import MPI
    except ImportError as err:
        raise RuntimeError(f"launched by mpirun but mpi4py is unavailable ({err}); "
                           "pip install 'fedgspo[mpi]'") from err
    address = None
    if rank == 0:
        host = "127.0.0.1" if local_size == size else socket.gethostname()
        address = (os.environ.get("MASTER_ADDR") or host,
                   os.environ.get("MASTER_PORT") or str(_free_port()))
    master_addr, master_port = MPI.COMM_WORLD.bcast(address, root=0)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(local_rank),
                      LOCAL_WORLD_SIZE=str(local_size), MASTER_ADDR=master_addr, MASTER_PORT=master_port)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _attempt_store(rank: int, world_size: int, timeout_s: float) -> dist.Store:
    """The rendezvous store, with keys scoped to this torchrun attempt.

    torchrun keeps its store across restarts; without a per-attempt prefix, a restarted group
    reads the previous attempt's connection addresses and fails to connect.
    """
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "False") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=rank == 0 and not agent_store, timeout=timedelta(seconds=timeout_s))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"fedgspo/attempt{attempt}", store)


def destroy_distributed() -> None:
    """Tear down the default process group if one exists (call on success only)."""
    if dist.is_initialized():
        dist.destroy_process_group()


#: ``dist.all_gather_into_tensor`` under its torch >= 2.13 name ``all_gather_single`` when present.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def collective_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """Where tensors of a collective on ``group`` must live: the current CUDA device under
    nccl, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_bytes(blob: bytes, group: dist.ProcessGroup | None = None) -> list[bytes]:
    """Every rank's ``blob``, by rank, on every rank: two tensor all-gathers (sizes, then the
    padded bytes); no pickle, so a Byzantine rank can send only bytes. Collective; single
    process: ``[blob]``. Failure: collective errors propagate."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return [blob]
    world, device = dist.get_world_size(group), collective_device(group)
    sizes = torch.zeros(world, dtype=torch.int64, device=device)
    all_gather_single(sizes, torch.tensor([len(blob)], dtype=torch.int64, device=device), group=group)
    sizes = sizes.cpu()
    padded = torch.zeros(max(1, int(sizes.max())), dtype=torch.uint8)
    if blob:
        padded[:len(blob)] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    out = torch.zeros(world * padded.numel(), dtype=torch.uint8, device=device)
    all_gather_single(out, padded.to(device), group=group)
    rows = out.view(world, -1).cpu()
    return [bytes(rows[r, :int(sizes[r])].numpy()) for r in range(world)]


#: Environment variable naming this process's participant (see :func:`participant_ids`).
PARTICIPANT_ENV = "FEDGSPO_PARTICIPANT_ID"


def participant_ids(local_rank: int, group: dist.ProcessGroup | None = None) -> list[str]:
    """Every rank's stable identity, by rank, identical on every rank (collective).

    A process is ``$FEDGSPO_PARTICIPANT_ID`` when set, else ``<host name>:<local rank>``: it
    stays the same when a restart hands out rank numbers in another order. Ids travel as bytes.
    Raises the same ``ValueError`` on every rank when an id is empty, longer than 128
    characters, not printable ASCII without spaces, or taken by two ranks.
    """
    mine = os.environ.get(PARTICIPANT_ENV) or f"{socket.gethostname()}:{local_rank}"
    ids = [blob.decode("ascii", errors="replace") for blob in all_gather_bytes(mine.encode(), group)]
    bad = [i for i in ids if not 0 < len(i) <= 128 or not (i.isascii() and i.isprintable()) or " " in i]
    if bad:
        raise ValueError(f"{PARTICIPANT_ENV}: ids must be 1-128 printable ASCII characters without spaces, "
                         f"got {bad[:3]}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"{PARTICIPANT_ENV}: two ranks share a participant id ({ids}); give each process its own")
    return ids


def broadcast_json(value: Any, src: int = 0, group: dist.ProcessGroup | None = None, *,
                   max_bytes: int = 1 << 20) -> Any:
    """``value`` from rank ``src`` (global rank) on every rank of ``group``, as UTF-8 JSON in two
    tensor broadcasts (length, then bytes). Nothing is unpickled: receivers get only JSON types
    (dict, list, str, int, float, bool, None; tuples arrive as lists) and must validate the
    shape of what they got before using it. Identity in a single process.

    Collective. Failure: ``TypeError`` on ``src`` for a value JSON cannot encode (before any
    collective: the other ranks then wait until the group's timeout); ``ValueError`` on a
    receiver for a payload over ``max_bytes`` or not valid JSON.
    """
    if not dist.is_initialized():
        return value
    device = collective_device(group)
    payload = json.dumps(value).encode() if dist.get_rank() == src else b""
    size = torch.tensor([len(payload)], dtype=torch.int64, device=device)
    dist.broadcast(size, src=src, group=group)
    length = int(size.item())
    if not 0 <= length <= max_bytes:
        raise ValueError(f"broadcast from rank {src}: {length} bytes (limit {max_bytes})")
    data = torch.zeros(max(length, 1), dtype=torch.uint8, device=device)
    if payload:
        data[:length] = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device)
    dist.broadcast(data, src=src, group=group)
    try:
        return json.loads(bytes(data[:length].cpu().numpy()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"broadcast from rank {src}: not valid JSON ({err})") from None


def broadcast_parameters(module: torch.nn.Module, src: int = 0) -> None:
    """Make every rank's parameters and buffers equal to rank ``src``'s."""
    if not dist.is_initialized():
        return
    for tensor in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(tensor.data, src=src)


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over ranks (one small collective; identity in a single process)."""
    if not dist.is_initialized():
        return values
    out = values.clone()
    dist.all_reduce(out)
    return out / dist.get_world_size()


class FlatGradients:
    """One preallocated contiguous buffer that holds every parameter's gradient.

    After construction each ``param.grad`` is a view into :attr:`buffer`, so backward writes
    straight into it and an in-place collective on the buffer updates the gradients without a
    copy. Call :meth:`zero` instead of ``optimizer.zero_grad()`` (which would drop the views).
    """

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        self.params = [p for p in params if p.requires_grad]
        dtypes = {p.dtype for p in self.params}
        if len(dtypes) != 1:
            raise ValueError(f"all trainable parameters must share one dtype, got {sorted(map(str, dtypes))}")
        total = sum(p.numel() for p in self.params)
        self.buffer = torch.zeros(total, dtype=self.params[0].dtype, device=self.params[0].device)
        offset = 0
        for p in self.params:
            p.grad = self.buffer[offset:offset + p.numel()].view_as(p)
            offset += p.numel()

    def zero(self) -> None:
        self.buffer.zero_()
