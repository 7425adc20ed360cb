"""Where half-precision rows are widened: their norms and products.

float16 overflows at 65504, so the squared norm of a row of norm above 256, or the dot product
of two such rows, is ``inf`` in float16: every rank would look nonfinite and Krum, the
geometric median and centered clipping would return NaN or pick an outlier. bfloat16 keeps
float32's range but rounds a product's result to 8 bits (relative error ~4e-3). Norms and
products of half-precision rows are therefore computed in float32 (a product of two half
values is exact there) and summed over column chunks in float64; other dtypes keep their own
precision and one matrix product, so float32 and float64 results are unchanged.
"""

from __future__ import annotations

import torch

#: Elements of a widened float32 chunk (64 MiB): bounds the copy a product of half rows makes.
CHUNK_ELEMENTS = 1 << 24


def norm_dtype(dtype: torch.dtype) -> torch.dtype | None:
    """The dtype to compute norms of ``dtype`` values in: float32 for half precision, whose
    squares overflow early; None (the values' own) otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else None


def products(rows: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """float64 ``rows @ other`` for ``rows`` of shape ``(n, d)`` or ``(d,)`` and ``other`` of
    shape ``(d,)`` or ``(d, m)``, in float32 column chunks when ``rows`` is half precision
    (module docstring).

    Raises what ``torch.matmul`` raises for mismatched shapes or dtypes."""
    wide = norm_dtype(rows.dtype)
    if wide is None:
        return (rows @ other).double()
    width = (rows.shape[0] if rows.dim() == 2 else 1) + (other.shape[1] if other.dim() == 2 else 1)
    chunk = max(1, CHUNK_ELEMENTS // width)
    total = torch.zeros((*rows.shape[:-1], *other.shape[1:]), dtype=torch.float64, device=rows.device)
    for start in range(0, rows.shape[-1], chunk):
        stop = start + chunk
        total += (rows[..., start:stop].to(wide) @ other[start:stop].to(wide)).double()
    return total


def row_sq_norms(rows: torch.Tensor) -> torch.Tensor:
    """float64 ``||x_i||^2`` of the rows of an ``(n, d)`` tensor, in :func:`norm_dtype`."""
    return torch.linalg.vector_norm(rows, dim=1, dtype=norm_dtype(rows.dtype)).double().square()
