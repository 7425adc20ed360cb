"""Run a function on ``world_size`` gloo ranks in fresh processes and collect the results.

Each worker initialises ``torch.distributed`` over ``tcp://127.0.0.1:<free port>``, calls
``fn(rank, world_size, *args)`` and sends back (pickled) its return value or the exception's type and
message. A worker that does not finish within ``timeout`` seconds fails the test (a hang
is a bug, never a reason to wait longer).

Workers are forked from a fork server that has imported :data:`PRELOAD` once for the whole
session, not spawned as fresh interpreters that import torch and transformers again; each
one starts with the environment of the test that runs it.
"""

from __future__ import annotations

import os
import pickle
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


#: Modules the fork server imports before it forks any worker.
PRELOAD = ["torch", "torch.distributed", "transformers"]


def _worker(rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple, queue: Any,
            env: dict[str, str]) -> None:
    os.environ.clear()
    os.environ.update(env)
    os.environ.setdefault("FEDGSPO_COMPILE", "0")
    import torch

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        queue.put((rank, "ok", pickle.dumps(fn(rank, world_size, *args))))
    except Exception as err:  # noqa: BLE001 - reported to the parent test
        queue.put((rank, "error", pickle.dumps((type(err).__name__, str(err), traceback.format_exc()))))
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], world_size: int = 4, *args: Any, timeout: float = 90.0) -> list[tuple[str, Any]]:
    """Results ``[(status, value)]`` by rank.

    ``status`` is ``"ok"`` or ``"error"`` (then ``value`` is type, message, traceback).
    """
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    queue = ctx.Queue()
    port = free_port()
    env = dict(os.environ)
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue, env)) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, tuple[str, Any]] = {}
    try:
        for _ in range(world_size):
            rank, status, value = queue.get(timeout=timeout)
            results[rank] = (status, pickle.loads(value))
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world_size)]


def values(results: list[tuple[str, Any]]) -> list[Any]:
    """The per-rank return values; fails with the first worker's traceback if any raised."""
    for status, value in results:
        assert status == "ok", value[2]
    return [value for _, value in results]
