"""Tests under ``mpirun -n 4 python -m pytest --with-mpi tests/mpi``.

torch.distributed is initialised once per process from the MPI rank through
:func:`fedgspo.distributed.init_distributed` (the same path ``mpirun -m fedgspo.train`` takes).
Without ``--with-mpi`` (a plain ``pytest`` run) this directory is not collected;
``tests/test_mpi_suite.py`` launches it under mpirun instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool:
    return not config.getoption("--with-mpi", default=False)


@pytest.fixture(scope="session")
def dist_ctx() -> Iterator[object]:
    """The process group over all MPI ranks (gloo on CPU), torn down at the end of the session."""
    os.environ.setdefault("FEDGSPO_COMPILE", "0")
    import torch

    from fedgspo.distributed import destroy_distributed, init_distributed

    torch.set_num_threads(1)
    ctx = init_distributed("cpu", timeout_s=120)
    yield ctx
    destroy_distributed()
