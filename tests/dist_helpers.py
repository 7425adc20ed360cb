"""Run a function on ``world_size`` gloo ranks in fresh processes and collect the results.

Each worker initialises ``torch.distributed`` over ``tcp://127.0.0.1:<free port>``, calls
``fn(rank, world_size, *args)`` and sends back (pickled) its return value or the exception's type and
message. A worker that does not finish within ``timeout`` seconds fails the test (a hang
is a bug, never a reason to wait longer).

Workers are forked from a fork server that has imported :data:`PRELOAD` once for the whole
session, not spawned as fresh interpreters that import torch and transformers again; each
one starts with the environment of the test that runs it. :func:`train_ranks` runs
``fedgspo.train`` the same way, in place of ``torchrun --standalone`` for tests that need a
multi-rank run but not the launcher itself (the CLI, preemption and restart tests use torchrun).
"""

from __future__ import annotations

import os
import pickle
import runpy
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
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


def _context() -> Any:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def run_ranks(fn: Callable[..., Any], world_size: int = 4, *args: Any, timeout: float = 90.0) -> list[tuple[str, Any]]:
    """Results ``[(status, value)]`` by rank.

    ``status`` is ``"ok"`` or ``"error"`` (then ``value`` is type, message, traceback).
    """
    ctx = _context()
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


def _train_worker(rank: int, nproc: int, port: int, argv: list[str], env: dict[str, str], cwd: str,
                  log: str) -> None:
    """One rank of ``python -m fedgspo.train *argv`` with torchrun's variables; its stdout and
    stderr go to ``log``; exits with the module's exit code."""
    os.environ.clear()
    os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                      LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if nproc > 1 and "OMP_NUM_THREADS" not in env:  # what torchrun sets
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
    sys.path[:0] = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.chdir(cwd)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.argv = ["fedgspo.train", *argv]
    code = 0
    try:
        runpy.run_module("fedgspo.train", run_name="__main__", alter_sys=True)
    except SystemExit as err:
        code = err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
        if isinstance(err.code, str):
            print(err.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - the exit code and the log report it
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def train_ranks(argv: list[str], nproc: int, *, env: dict[str, str] | None = None, cwd: Path | None = None,
                timeout: float = 600.0) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=nproc -m fedgspo.train *argv``, with the ranks
    forked from the fork server. Like torchrun, the first rank to fail ends the others; the
    return code is that rank's (0 when all succeed); ``stdout`` and ``stderr`` both hold every
    rank's output (its stdout and stderr together), in rank order. Raises
    ``subprocess.TimeoutExpired`` after ``timeout`` seconds (every rank killed)."""
    ctx = _context()
    port = free_port()
    environ = {**os.environ, **(env or {})}
    logdir = Path(tempfile.mkdtemp(prefix="fedgspo-ranks-"))
    logs = [logdir / f"rank{r}.log" for r in range(nproc)]
    procs = [ctx.Process(target=_train_worker, args=(r, nproc, port, argv, environ, str(cwd or os.getcwd()),
                                                     str(logs[r])))
             for r in range(nproc)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    try:
        try:
            while any(p.exitcode is None for p in procs) and not any(p.exitcode for p in procs):
                if time.monotonic() > deadline:
                    raise subprocess.TimeoutExpired(["fedgspo.train", *argv], timeout)
                time.sleep(0.05)
            code = next((p.exitcode for p in procs if p.exitcode), 0)
        finally:
            for p in procs:
                if p.exitcode is None:
                    p.kill()
                p.join()
        output = "".join(log.read_text(errors="replace") for log in logs if log.exists())
    finally:
        shutil.rmtree(logdir, ignore_errors=True)
    return subprocess.CompletedProcess(["fedgspo.train", *argv], code, output, output)
