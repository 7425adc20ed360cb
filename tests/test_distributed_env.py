"""Launcher environments: which rank a process is, read from torchrun's or an MPI launcher's variables."""

from __future__ import annotations

import pytest

from fedgspo.distributed import export_mpi_rendezvous, mpi_rank_and_size

MPI_VARS = ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
            "OMPI_COMM_WORLD_LOCAL_SIZE", "PMIX_RANK", "PMIX_SIZE", "PMI_RANK", "PMI_SIZE",
            "MPI_LOCALRANKID", "MPI_LOCALNRANKS")


@pytest.fixture
def clean_env(monkeypatch):
    for var in MPI_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_no_mpi_launcher(clean_env):
    assert mpi_rank_and_size() is None
    with pytest.raises(RuntimeError, match="not launched by mpirun"):
        export_mpi_rendezvous()


def test_open_mpi_variables(clean_env):
    for var, value in zip(MPI_VARS[:4], ("5", "8", "1", "4")):
        clean_env.setenv(var, value)
    assert mpi_rank_and_size() == (5, 8, 1, 4)


def test_pmi_variables_default_local_size_to_world(clean_env):
    clean_env.setenv("PMI_RANK", "2")
    clean_env.setenv("PMI_SIZE", "3")
    assert mpi_rank_and_size() == (2, 3, 0, 3)
