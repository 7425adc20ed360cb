"""Resource figures of a process: fixed keys in a fixed order (ready for a float all-gather),
memory and CPU always, CUDA figures on a CUDA device, nan for what cannot be measured."""

from __future__ import annotations

import math

import pytest
import torch

from fedgspo.telemetry.resources import RESOURCE_KEYS, resource_usage


def test_keys_are_fixed_and_every_value_is_a_float():
    figures = resource_usage(torch.device("cpu"))
    assert tuple(figures) == RESOURCE_KEYS and all(isinstance(v, float) for v in figures.values())
    assert torch.tensor(list(figures.values()), dtype=torch.float64).shape == (len(RESOURCE_KEYS),)


def test_memory_and_cpu_of_this_process():
    resource_usage()
    block = bytearray(64 << 20)  # touched: resident
    for i in range(0, len(block), 4096):
        block[i] = 1
    total = sum(i * i for i in range(200_000))  # some CPU time since the previous call
    figures = resource_usage()
    assert total > 0 and figures["rss_bytes"] >= len(block)
    assert math.isfinite(figures["cpu_percent"]) and figures["cpu_percent"] > 0


def test_cuda_figures_are_nan_off_cuda():
    figures = resource_usage(torch.device("cpu"))
    assert all(math.isnan(figures[k]) for k in ("cuda_allocated_bytes", "cuda_reserved_bytes", "gpu_util_percent"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_memory_on_a_cuda_device():
    device = torch.device("cuda", torch.cuda.current_device())
    held = torch.empty(32 << 20, dtype=torch.uint8, device=device)
    figures = resource_usage(device)
    assert figures["cuda_allocated_bytes"] >= held.numel()
    assert figures["cuda_reserved_bytes"] >= figures["cuda_allocated_bytes"]
    util = figures["gpu_util_percent"]
    assert math.isnan(util) or 0 <= util <= 100
