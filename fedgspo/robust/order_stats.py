"""Order statistics across a few rows of a very wide stack, at memory-bandwidth speed.

Coordinate-wise robust rules (median, trimmed mean) need, for every column of an ``(n, d)``
stack with small ``n`` and huge ``d``, the mean of the order statistics of rank
``lo .. hi-1``. ``torch.sort``/``torch.median`` along dim 0 are slow for that shape (they
sort each short column separately); a fixed comparator network of ``torch.minimum`` /
``torch.maximum`` over whole rows is faster eagerly, and under ``torch.compile`` (inductor
fuses the network into a single loop) it runs at the speed of ``stack.sum(0)``
(benchmarks/README.md, "Order statistics").

The network is Batcher's odd-even merge sort, truncated to ``n`` inputs (comparators that
touch a padding position are no-ops, padding being +inf) and pruned backwards to the
comparators (and the half of each comparator) that the requested outputs depend on.

Failure behaviour: a failing compilation is logged once and the eager network is used for
that shape from then on; results are the same either way. NaN propagates through
``minimum``/``maximum``, so a column with a NaN input yields NaN (callers exclude nonfinite
rows first).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import NamedTuple

import torch

logger = logging.getLogger(__name__)

#: Shards narrower than this run eagerly: below it, the seconds of the first compilation are not
#: earned back by a run of a few thousand steps (benchmarks/README.md, "Order statistics").
COMPILE_MIN_COLUMNS = 1 << 20


class Comparator(NamedTuple):
    """Compare-exchange of positions ``i < j``; ``keep_min``/``keep_max`` say which output is used."""

    i: int
    j: int
    keep_min: bool
    keep_max: bool


def _batcher_pairs(n: int) -> list[tuple[int, int]]:
    """Comparators of Batcher's odd-even merge sort for ``n`` inputs (padded to a power of two)."""
    size = 1
    while size < n:
        size *= 2
    pairs: list[tuple[int, int]] = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    a, b = i + j, i + j + k
                    if a // (2 * p) == b // (2 * p) and b < n:
                        pairs.append((a, b))
            k //= 2
        p *= 2
    return pairs


@functools.lru_cache(maxsize=None)
def selection_network(n: int, lo: int, hi: int) -> tuple[Comparator, ...]:
    """Comparators that place order statistics ``lo .. hi-1`` of ``n`` inputs at those positions.

    Raises ``ValueError`` unless ``0 <= lo < hi <= n``.
    """
    if not 0 <= lo < hi <= n:
        raise ValueError(f"need 0 <= lo < hi <= n, got lo={lo}, hi={hi}, n={n}")
    needed = set(range(lo, hi))
    kept: list[Comparator] = []
    for a, b in reversed(_batcher_pairs(n)):
        keep_min, keep_max = a in needed, b in needed
        if keep_min or keep_max:
            kept.append(Comparator(a, b, keep_min, keep_max))
            needed |= {a, b}
    return tuple(reversed(kept))


def _network_mean(stack: torch.Tensor, network: tuple[Comparator, ...], lo: int, hi: int) -> torch.Tensor:
    rows = list(stack.unbind(0))
    for c in network:
        a, b = rows[c.i], rows[c.j]
        if c.keep_min:
            rows[c.i] = torch.minimum(a, b)
        if c.keep_max:
            rows[c.j] = torch.maximum(a, b)
    total = rows[lo]
    for k in range(lo + 1, hi):
        total = total + rows[k]
    return total / (hi - lo) if hi - lo > 1 else total.clone()


def compile_enabled() -> bool:
    """Compiled kernels are used unless ``FEDGSPO_COMPILE=0`` is set in the environment."""
    return os.environ.get("FEDGSPO_COMPILE", "1") != "0"


_COMPILED: dict[tuple[int, int, int], Callable[[torch.Tensor], torch.Tensor] | None] = {}


def _compiled_kernel(n: int, lo: int, hi: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
    key = (n, lo, hi)
    if key not in _COMPILED:
        network = selection_network(n, lo, hi)
        _COMPILED[key] = torch.compile(
            functools.partial(_network_mean, network=network, lo=lo, hi=hi), dynamic=True, fullgraph=True
        )
    return _COMPILED[key]


def order_statistic_mean(stack: torch.Tensor, lo: int, hi: int, *, compiled: bool | None = None) -> torch.Tensor:
    """Per column, the mean of the order statistics of rank ``lo .. hi-1`` of an ``(n, d)`` stack.

    Args:
        stack: ``(n, d)`` floating tensor; not modified.
        lo, hi: the half-open range of sorted positions to average (``0 <= lo < hi <= n``).
        compiled: force (True) or forbid (False) the compiled kernel; default: compiled when
            enabled (:func:`compile_enabled`) and the stack has at least
            :data:`COMPILE_MIN_COLUMNS` columns.

    Returns:
        ``(d,)`` tensor of the stack's dtype. ``lo=f, hi=n-f`` is the trimmed mean; the middle
        one or two positions give the median.
    """
    n = stack.shape[0]
    if lo == 0 and hi == n:  # nothing trimmed: the plain mean, no network
        return stack.sum(0) / n if n > 1 else stack[0].clone()
    network = selection_network(n, lo, hi)
    use_compiled = compiled if compiled is not None else (
        compile_enabled() and stack.shape[1] >= COMPILE_MIN_COLUMNS
    )
    if use_compiled:
        kernel = _compiled_kernel(n, lo, hi)
        if kernel is not None:
            try:
                return kernel(stack)
            except Exception as err:  # noqa: BLE001 - any compiler failure falls back to eager
                logger.warning("compiling the order-statistic kernel failed (%s); using eager", err)
                _COMPILED[(n, lo, hi)] = None
    return _network_mean(stack, network, lo, hi)
