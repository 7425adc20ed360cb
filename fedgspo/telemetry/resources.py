"""Resource figures of this process, for the step record: memory, CPU and GPU use.

:func:`resource_usage` returns the same keys, in the same order, on every call and every rank,
so the ranks can all-gather the values as one float tensor (:data:`RESOURCE_KEYS`). A figure
this process cannot measure is ``nan`` (JSON: ``"nan"``): CUDA figures without CUDA, GPU
utilisation without NVML (``pynvml``, which ``torch.cuda.utilization`` needs).

Failure behaviour: never raises for a figure it cannot read; it reports ``nan`` instead.
"""

from __future__ import annotations

import math
import os
import resource
import sys
import threading
import time

import torch

#: The keys of :func:`resource_usage`, in order.
RESOURCE_KEYS = ("rss_bytes", "cpu_percent", "cuda_allocated_bytes", "cuda_reserved_bytes", "gpu_util_percent")

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_last = {"wall": time.perf_counter(), "cpu": time.process_time()}
_lock = threading.Lock()


def rss_bytes() -> float:
    """Resident set size now (``/proc/self/statm``); where there is no ``/proc``, the peak RSS
    (``getrusage``)."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            return float(int(fh.read().split()[1]) * _PAGE)
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return float(peak if sys.platform == "darwin" else peak * 1024)


def cpu_percent() -> float:
    """CPU time of this process (all its threads) per wall-clock time since the previous call
    (the first call: since the module was imported), in percent: 100 is one core busy."""
    with _lock:
        wall, cpu = time.perf_counter(), time.process_time()
        elapsed = wall - _last["wall"]
        busy = cpu - _last["cpu"]
        _last["wall"], _last["cpu"] = wall, cpu
    return 100.0 * busy / elapsed if elapsed > 0 else math.nan


def gpu_util_percent(device: torch.device) -> float:
    """The GPU's utilisation over the driver's last sample period (``torch.cuda.utilization``),
    ``nan`` where it cannot be read."""
    try:
        return float(torch.cuda.utilization(device))
    except Exception:  # noqa: BLE001 - no NVML, or a driver that refuses: not measurable
        return math.nan


def resource_usage(device: torch.device | None = None) -> dict[str, float]:
    """This process's figures, keyed as :data:`RESOURCE_KEYS`: resident memory in bytes, CPU
    utilisation in percent since the previous call, and on a CUDA ``device`` the memory
    PyTorch's allocator holds for tensors (allocated) and from the driver (reserved), in
    bytes, and the GPU's utilisation in percent; ``nan`` for what does not apply."""
    figures = {"rss_bytes": rss_bytes(), "cpu_percent": cpu_percent(), "cuda_allocated_bytes": math.nan,
               "cuda_reserved_bytes": math.nan, "gpu_util_percent": math.nan}
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        figures["cuda_allocated_bytes"] = float(torch.cuda.memory_allocated(device))
        figures["cuda_reserved_bytes"] = float(torch.cuda.memory_reserved(device))
        figures["gpu_util_percent"] = gpu_util_percent(device)
    return figures
