"""Byzantine-robust aggregation rules: each a small class mapping an ``(n, d)`` stack to ``(d,)``.

Every rule is usable on its own (``TrimmedMean(f=1)(stack)``) and, unchanged, on one
*shard* of the columns inside :func:`fedgspo.robust_all_reduce`: rules that need whole-vector
quantities (distances, norms) compute per-row partial sums over the columns they hold and
ask :attr:`ShardContext.sum_over_shards` for the total. On one process that is the identity;
in the sharded all-reduce it is a tiny ``all_reduce`` of ``n`` or ``n x n`` numbers. So the
distributed result is the single-process rule up to floating-point summation order.

Definitions follow the papers and agree numerically with ByzFL (``byzfl`` 0.0.11) where
ByzFL implements the rule: Krum scores use the ``n - f - 1`` nearest other rows, the
geometric median is ByzFL's smoothed Weiszfeld started from 0, centered clipping starts
from 0 (ByzFL's first call).

Failure behaviour: constructors raise ``ValueError`` for invalid parameters; calling a rule
on ``n`` rows it cannot tolerate (e.g. ``2f >= n`` for the median) raises ``ValueError``
naming the bound. Rules do not screen NaN/Inf: exclude nonfinite rows first (the robust
all-reduce does).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from fedgspo.robust.order_stats import order_statistic_mean
from fedgspo.robust.precision import products, row_sq_norms


def _local_sum(partial: torch.Tensor) -> torch.Tensor:
    return partial


@dataclass
class ShardContext:
    """What a rule may use besides its rows.

    Attributes:
        sum_over_shards: returns the sum over all shards of a small float64 tensor of
            per-row partial sums (identity when the rule sees all columns). Every holder
            of a shard must call it the same number of times with the same shape.
        round: a counter identical on every rank, for rules that draw random numbers.
    """

    sum_over_shards: Callable[[torch.Tensor], torch.Tensor] = _local_sum
    round: int = 0


def as_stack(vectors: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """An ``(n, d)`` floating tensor from a stack or a sequence of equally shaped tensors."""
    stack = vectors if isinstance(vectors, torch.Tensor) else torch.stack([v.reshape(-1) for v in vectors])
    if stack.dim() != 2 or stack.shape[0] == 0:
        raise ValueError(f"expected a non-empty (n, d) stack, got shape {tuple(stack.shape)}")
    if not stack.is_floating_point():
        raise ValueError(f"expected a floating dtype, got {stack.dtype}")
    return stack


def _check_count(name: str, value: int, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_positive(name: str, value: float) -> float:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return float(value)


def gram_matrix(stack: torch.Tensor, ctx: ShardContext) -> torch.Tensor:
    """``(n, n)`` float64 Gram matrix ``<x_i, x_j>`` of the full rows: one matrix product over
    the shard and one reduction of ``n^2`` numbers (the products accumulate in the stack's
    dtype, half precision in float32: :func:`~fedgspo.robust.precision.products`)."""
    return ctx.sum_over_shards(products(stack, stack.T))


class _Span:
    """Points ``z = sum_j c_j x_j`` in the span of the rows, handled by their coefficients.

    The iterative rules start at 0 and only ever move to combinations of the rows, so every
    distance they need follows from the Gram matrix, ``||x_i - z||^2 = G_ii - 2 (G c)_i +
    c^T G c``: one reduction per call instead of one per iteration, and the result vector is
    formed once at the end.
    """

    def __init__(self, stack: torch.Tensor, ctx: ShardContext) -> None:
        self.gram = gram_matrix(stack, ctx).cpu()

    def sq_distances(self, c: torch.Tensor) -> torch.Tensor:
        """Squared distances of the rows to the point with coefficients ``c`` (clamped at 0)."""
        g = self.gram
        return (g.diagonal() - 2 * (g @ c) + c @ g @ c).clamp_min(0)

    def sq_norm(self, c: torch.Tensor) -> float:
        return float(c @ self.gram @ c)


def pairwise_sq_distances(stack: torch.Tensor, ctx: ShardContext) -> torch.Tensor:
    """``(n, n)`` float64 squared Euclidean distances between the full rows.

    From the Gram matrix, ``||x_i||^2 + ||x_j||^2 - 2<x_i, x_j>``: one matrix product over
    the shard (a pairwise ``cdist`` was 14x slower on a (4, 2.5M) shard). Precision: the
    shard's products accumulate in the stack's dtype, so distances much smaller than the
    norms (relative ~1e-3 in float32) are rounding noise; rows far from each other, such
    as Byzantine outliers, are unaffected.
    """
    gram = gram_matrix(stack, ctx)
    sq = gram.diagonal()
    dist = (sq[:, None] + sq[None, :] - 2 * gram).clamp_min(0)
    return dist.fill_diagonal_(0)


def _combine(weights: torch.Tensor, stack: torch.Tensor) -> torch.Tensor:
    """``sum_i weights_i * stack_i`` with float64 weights cast to the stack's dtype."""
    return weights.to(stack.dtype) @ stack


class Aggregator(ABC):
    """Base class: ``__call__`` validates and aggregates a full stack; :meth:`aggregate` a shard."""

    name: ClassVar[str]
    #: True when the rule can use per-row weights (a weighted form of the rule exists).
    supports_weights: ClassVar[bool] = False

    def __init__(self, f: int = 0) -> None:
        self.f = _check_count("f", f)
        self._calls = 0

    def check(self, n: int) -> None:
        """Raise ``ValueError`` unless the rule tolerates ``f`` arbitrary rows out of ``n``."""
        if n < 1:
            raise ValueError(f"{self.name} needs at least one row, got n={n}")

    def next_round(self) -> int:
        """This call's round number (0, 1, 2, ...); callers on every rank advance it in step."""
        self._calls += 1
        return self._calls - 1

    def options(self) -> dict[str, float | int]:
        """Constructor arguments besides ``f`` (used to identify the rule across ranks)."""
        return {}

    def spec(self) -> str:
        """A canonical string naming the rule and all its parameters."""
        opts = ",".join(f"{k}={v}" for k, v in sorted(self.options().items()))
        return f"{self.name}(f={self.f}{',' + opts if opts else ''})"

    @abstractmethod
    def aggregate(self, stack: torch.Tensor, ctx: ShardContext, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Aggregate the ``(n, s)`` rows of one shard; ``weights`` (float64, ``(n,)``) if supported."""

    def __call__(
        self, vectors: torch.Tensor | Sequence[torch.Tensor], weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        stack = as_stack(vectors)
        self.check(stack.shape[0])
        ctx = ShardContext(round=self.next_round())
        w = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        return self.aggregate(stack, ctx, w if self.supports_weights else None)

    def __repr__(self) -> str:
        return self.spec()


class Mean(Aggregator):
    r"""Arithmetic (optionally weighted) mean; not robust, the baseline.

    Formula: :math:`\mathrm{Mean}(x_1..x_n) = \sum_i w_i x_i / \sum_i w_i` (:math:`w_i = 1` by default).

    Args:
        f: accepted for a uniform interface; the mean tolerates no Byzantine row.

    Returns:
        ``(d,)`` tensor.

    Example:
        >>> Mean()(torch.tensor([[1., 2.], [3., 4.]]))
        tensor([2., 3.])

    Reference: the arithmetic mean of distributed SGD (no robustness).
    """

    name = "mean"
    supports_weights = True

    def aggregate(self, stack: torch.Tensor, ctx: ShardContext, weights: torch.Tensor | None = None) -> torch.Tensor:
        if weights is None:
            return stack.mean(0)
        return _combine(weights / weights.sum(), stack)


class _OrderStatistic(Aggregator):
    """Rules that average sorted positions ``lo .. hi-1`` of every coordinate; need ``2f < n``."""

    def check(self, n: int) -> None:
        super().check(n)
        if 2 * self.f >= n:
            raise ValueError(f"{self.name} cannot tolerate f={self.f} of n={n} rows: needs 2f < n")

    @abstractmethod
    def positions(self, n: int) -> tuple[int, int]:
        """The half-open range of sorted positions averaged for ``n`` rows."""

    def aggregate(self, stack: torch.Tensor, ctx: ShardContext, weights: torch.Tensor | None = None) -> torch.Tensor:
        lo, hi = self.positions(stack.shape[0])
        return order_statistic_mean(stack, lo, hi)


class CoordinateMedian(_OrderStatistic):
    r"""Coordinate-wise median (mean of the two middle values for even ``n``, as ``numpy.median``).

    Formula: :math:`[\mathrm{CM}(x_1..x_n)]_k = \mathrm{median}([x_1]_k, \dots, [x_n]_k)`.

    Args:
        f: number of Byzantine rows to tolerate; calls need ``2f < n``.

    Returns:
        ``(d,)`` tensor.

    Example:
        >>> CoordinateMedian(f=1)(torch.tensor([[1., 9.], [2., 8.], [100., -50.]]))
        tensor([2., 8.])

    Reference: D. Yin, Y. Chen, K. Ramchandran, P. Bartlett. Byzantine-robust distributed
    learning: towards optimal statistical rates. ICML 2018.
    """

    name = "median"

    def positions(self, n: int) -> tuple[int, int]:
        return ((n - 1) // 2, n // 2 + 1)


class TrimmedMean(_OrderStatistic):
    r"""Coordinate-wise trimmed mean: drop the ``f`` largest and ``f`` smallest values per coordinate.

    Formula: :math:`[\mathrm{TM}_f(x_1..x_n)]_k = \frac{1}{n-2f}\sum_{j=f+1}^{n-f} [x_{\pi_k(j)}]_k`
    with :math:`\pi_k` sorting the k-th coordinates.

    Args:
        f: values trimmed at each end; calls need ``2f < n``.

    Returns:
        ``(d,)`` tensor.

    Example:
        >>> TrimmedMean(f=1)(torch.tensor([[1., 0.], [2., 1.], [3., 2.], [100., -9.]]))
        tensor([2.5000, 0.5000])

    Reference: D. Yin, Y. Chen, K. Ramchandran, P. Bartlett. Byzantine-robust distributed
    learning: towards optimal statistical rates. ICML 2018.
    """

    name = "trimmed_mean"

    def positions(self, n: int) -> tuple[int, int]:
        return (self.f, n - self.f)


def krum_scores(sq_dist: torch.Tensor, f: int) -> torch.Tensor:
    """Krum score of each row: mean squared distance to its ``n - f - 1`` nearest other rows."""
    n = sq_dist.shape[0]
    return sq_dist.sort(dim=1).values[:, 1 : n - f].mean(1)


class MultiKrum(Aggregator):
    r"""Average of the ``m`` rows with the lowest Krum scores (default ``m = n - f``).

    Formula: :math:`\mathrm{score}(i) = \sum_{j \in N_i} \|x_i - x_j\|^2` over the ``n - f - 1``
    nearest other rows :math:`N_i` (ByzFL's neighbourhood); output
    :math:`\frac{1}{m}\sum_{i \in S} x_i`, ``S`` the ``m`` lowest scores (ties: lower index).

    Args:
        f: Byzantine rows to tolerate; calls need ``n > 2f + 2``.
        m: rows averaged; ``None`` means ``n - f``. Must be ``<= n - f`` when called.

    Returns:
        ``(d,)`` tensor.

    Example:
        >>> x = torch.tensor([[0., 0.], [1., 0.], [0., 1.], [1., 1.], [1., 0.5], [50., 50.]])
        >>> MultiKrum(f=1, m=2)(x)
        tensor([1.0000, 0.2500])

    Reference: P. Blanchard, E. M. El Mhamdi, R. Guerraoui, J. Stainer. Machine learning with
    adversaries: Byzantine tolerant gradient descent. NeurIPS 2017.
    """

    name = "multi_krum"

    def __init__(self, f: int = 0, m: int | None = None) -> None:
        super().__init__(f)
        self.m = None if m is None else _check_count("m", m, 1)

    def options(self) -> dict[str, float | int]:
        return {} if self.m is None else {"m": self.m}

    def check(self, n: int) -> None:
        super().check(n)
        if n <= 2 * self.f + 2:
            raise ValueError(f"{self.name} cannot tolerate f={self.f} of n={n} rows: needs n > 2f + 2")
        if self.m is not None and self.m > n - self.f:
            raise ValueError(f"{self.name}: m={self.m} exceeds n - f = {n - self.f}")

    def selected(self, sq_dist: torch.Tensor) -> torch.Tensor:
        """Indices (ascending score, stable) of the rows averaged, from the global distances."""
        n = sq_dist.shape[0]
        m = n - self.f if self.m is None else self.m
        return krum_scores(sq_dist, self.f).argsort(stable=True)[:m]

    def aggregate(self, stack: torch.Tensor, ctx: ShardContext, weights: torch.Tensor | None = None) -> torch.Tensor:
        chosen = self.selected(pairwise_sq_distances(stack, ctx)).to(stack.device)
        return stack.index_select(0, chosen).mean(0)


class Krum(MultiKrum):
    r"""The single row with the lowest Krum score (Multi-Krum with ``m = 1``).

    Formula: :math:`\mathrm{Krum}_f(x_1..x_n) = x_{k^*}`,
    :math:`k^* = \arg\min_i \sum_{j \in N_i} \|x_i - x_j\|^2`, :math:`N_i` the ``n - f - 1``
    nearest other rows.

    Args:
        f: Byzantine rows to tolerate; calls need ``n > 2f + 2``.

    Returns:
        ``(d,)`` tensor: one of the input rows.

    Example:
        >>> x = torch.tensor([[0., 0.], [1., 0.], [0., 1.], [1., 1.], [1., 0.5], [50., 50.]])
        >>> Krum(f=1)(x)
        tensor([1.0000, 0.5000])

    Reference: P. Blanchard, E. M. El Mhamdi, R. Guerraoui, J. Stainer. Machine learning with
    adversaries: Byzantine tolerant gradient descent. NeurIPS 2017.
    """

    name = "krum"

    def __init__(self, f: int = 0) -> None:
        super().__init__(f, m=1)

    def options(self) -> dict[str, float | int]:
        return {}


class GeometricMedian(Aggregator):
    r"""Approximate geometric median by the smoothed Weiszfeld algorithm, started from 0.

    Formula: :math:`z_0 = 0`, :math:`z_{t+1} = \sum_i \beta_i x_i / \sum_i \beta_i` with
    :math:`\beta_i = w_i / \max(\nu, \|x_i - z_t\|)`, approximating
    :math:`\arg\min_z \sum_i w_i \|z - x_i\|`. Stops after ``max_iter`` steps or when
    :math:`\|z_{t+1} - z_t\| \le \mathrm{tol} \cdot \|z_{t+1}\|` (``tol=0``: always ``max_iter``,
    ByzFL's behaviour with ``nu=eps, T=max_iter``).

    Args:
        f: recorded for the interface; the breakdown point is 1/2 (calls need ``2f < n``).
        eps: smoothing ``nu`` (> 0), the floor on distances.
        max_iter: Weiszfeld iterations (>= 1); they run on the rows' Gram matrix (one
            reduction of n^2 numbers when sharded, whatever the count).
        tol: relative stopping tolerance (>= 0).

    Returns:
        ``(d,)`` tensor.

    Example:
        >>> GeometricMedian(eps=0.1, max_iter=3)(torch.tensor([[1., 2., 3.], [4., 5., 6.], [7., 8., 9.]]))
        tensor([3.7879, 4.7879, 5.7879])

    Reference: E. Weiszfeld. Sur le point pour lequel la somme des distances de n points
    donnés est minimum. Tohoku Math. J. 1937; K. Pillutla, S. Kakade, Z. Harchaoui. Robust
    aggregation for federated learning. IEEE TSP 2022.
    """

    name = "geometric_median"
    supports_weights = True

    def __init__(self, f: int = 0, eps: float = 1e-6, max_iter: int = 4, tol: float = 1e-6) -> None:
        super().__init__(f)
        self.eps = _check_positive("eps", eps)
        self.max_iter = _check_count("max_iter", max_iter, 1)
        if tol < 0:
            raise ValueError(f"tol must be >= 0, got {tol!r}")
        self.tol = float(tol)

    def options(self) -> dict[str, float | int]:
        return {"eps": self.eps, "max_iter": self.max_iter, "tol": self.tol}

    def check(self, n: int) -> None:
        super().check(n)
        if 2 * self.f >= n:
            raise ValueError(f"{self.name} cannot tolerate f={self.f} of n={n} rows: needs 2f < n")

    def aggregate(self, stack: torch.Tensor, ctx: ShardContext, weights: torch.Tensor | None = None) -> torch.Tensor:
        n = stack.shape[0]
        w = torch.ones(n, dtype=torch.float64) if weights is None else weights.cpu()
        span = _Span(stack, ctx)
        c = torch.zeros(n, dtype=torch.float64)  # z_0 = 0
        for t in range(self.max_iter):
            beta = w / span.sq_distances(c).sqrt().clamp_min(self.eps)
            c_next = beta / beta.sum()
            if t == self.max_iter - 1:
                break
            if self.tol > 0 and span.sq_norm(c_next - c) <= self.tol**2 * span.sq_norm(c_next):
                break
            c = c_next
        return _combine(c_next.to(stack.device), stack)


class CenteredClipping(Aggregator):
    r"""Centered clipping from 0: repeatedly move the centre by the mean of clipped differences.

    Formula: :math:`v_0 = 0`, :math:`v_{l+1} = v_l + \sum_i w_i (x_i - v_l)
    \min(1, \tau / \|x_i - v_l\|) / \sum_i w_i`, output :math:`v_L`. ByzFL keeps ``v_L`` as
    the next call's start; this class is stateless (every call equals ByzFL's first call).

    Args:
        f: recorded for the interface (robustness comes from ``tau``).
        tau: clipping radius (> 0).
        iterations: ``L`` (>= 1); they run on the rows' Gram matrix (one reduction of
            n^2 numbers when sharded, whatever the count).

    Returns:
        ``(d,)`` tensor.

    Example:
        >>> CenteredClipping(tau=100.0)(torch.tensor([[1., 2., 3.], [4., 5., 6.], [7., 8., 9.]]))
        tensor([4., 5., 6.])

    Reference: S. P. Karimireddy, L. He, M. Jaggi. Learning from history for Byzantine
    robust optimization. ICML 2021.
    """

    name = "centered_clipping"
    supports_weights = True

    def __init__(self, f: int = 0, tau: float = 100.0, iterations: int = 1) -> None:
        super().__init__(f)
        self.tau = _check_positive("tau", tau)
        self.iterations = _check_count("iterations", iterations, 1)

    def options(self) -> dict[str, float | int]:
        return {"tau": self.tau, "iterations": self.iterations}

    def aggregate(self, stack: torch.Tensor, ctx: ShardContext, weights: torch.Tensor | None = None) -> torch.Tensor:
        n = stack.shape[0]
        w = torch.ones(n, dtype=torch.float64) if weights is None else weights.cpu()
        w = w / w.sum()
        span = _Span(stack, ctx)
        c = torch.zeros(n, dtype=torch.float64)  # v_0 = 0
        for _ in range(self.iterations):
            scale = w * torch.clamp(self.tau / span.sq_distances(c).sqrt(), max=1.0)
            c = c * (1 - scale.sum()) + scale
        return _combine(c.to(stack.device), stack)


class PreAggregator(ABC):
    """A step that maps ``n`` rows to ``rows_out(n)`` rows before the rule (a linear mixing)."""

    name: ClassVar[str]

    @abstractmethod
    def rows_out(self, n: int) -> int:
        """Number of rows the step produces from ``n``."""

    @abstractmethod
    def mixing(self, stack: torch.Tensor, ctx: ShardContext) -> torch.Tensor:
        """``(rows_out(n), n)`` float64 matrix ``M``; the step's output is ``M @ stack``."""

    @abstractmethod
    def spec(self) -> str:
        """A canonical string naming the step and its parameters."""

    def __call__(self, vectors: torch.Tensor | Sequence[torch.Tensor], round: int = 0) -> torch.Tensor:
        stack = as_stack(vectors)
        return _combine_rows(self.mixing(stack, ShardContext(round=round)), stack)


def _combine_rows(mixing: torch.Tensor, stack: torch.Tensor) -> torch.Tensor:
    return mixing.to(device=stack.device, dtype=stack.dtype) @ stack


class _PerRowStep(PreAggregator):
    """A step that maps each of ``n`` rows to one row, tolerating ``f < n`` Byzantine rows."""

    def __init__(self, f: int = 0) -> None:
        self.f = _check_count("f", f)

    def rows_out(self, n: int) -> int:
        if self.f >= n:
            raise ValueError(f"{self.name} cannot tolerate f={self.f} of n={n} rows: needs f < n")
        return n

    def spec(self) -> str:
        return f"{self.name}(f={self.f})"


class NearestNeighborMixing(_PerRowStep):
    r"""NNM: replace each row by the mean of its ``n - f`` nearest rows (itself included).

    Formula: :math:`y_i = \frac{1}{n-f}\sum_{j \in N_i} x_j`, :math:`N_i` the ``n - f`` rows
    closest to :math:`x_i` in Euclidean distance (ties: lower index).

    Args:
        f: Byzantine rows to tolerate (``f < n`` when called).

    Returns:
        ``(n, d)`` tensor, fed to the aggregation rule.

    Example:
        >>> NearestNeighborMixing(f=1)(torch.tensor([[0., 0.], [2., 0.], [10., 0.]]))
        tensor([[1., 0.],
                [1., 0.],
                [6., 0.]])

    Reference: Y. Allouah, S. Farhadkhani, R. Guerraoui, N. Gupta, R. Pinot, J. Stephan.
    Fixing by mixing: a recipe for optimal Byzantine ML under heterogeneity. AISTATS 2023.
    """

    name = "nnm"

    def mixing(self, stack: torch.Tensor, ctx: ShardContext) -> torch.Tensor:
        n = stack.shape[0]
        k = n - self.f
        nearest = pairwise_sq_distances(stack, ctx).cpu().argsort(dim=1, stable=True)[:, :k]
        m = torch.zeros(n, n, dtype=torch.float64)
        m.scatter_(1, nearest, 1.0 / k)
        return m


def sq_norms(stack: torch.Tensor, ctx: ShardContext) -> torch.Tensor:
    """``(n,)`` float64 squared norms of the full rows: the shard's row norms (in
    :func:`~fedgspo.robust.precision.norm_dtype`) and one reduction of ``n`` numbers."""
    return ctx.sum_over_shards(row_sq_norms(stack))


class AdaptiveRobustClipping(_PerRowStep):
    r"""ARC: clip the ``k`` largest rows to the norm of the largest row left unclipped.

    Formula: with :math:`k = \lfloor 2 f (n - f) / n \rfloor` and :math:`r` the
    :math:`(k+1)`-th largest norm, :math:`y_i = \min(1, r / \|x_i\|)\, x_i`. The radius
    follows the rows of the call itself (no constant to tune): rows up to ``r`` pass
    unchanged, so ``f`` blown-up rows cannot scale the aggregate beyond the honest norms.
    Ties at ``r`` are not clipped; ``k = 0`` (``f = 0``) leaves every row as it is.

    Args:
        f: Byzantine rows to tolerate (``f < n`` when called).

    Returns:
        ``(n, d)`` tensor, fed to the aggregation rule.

    Example:
        >>> AdaptiveRobustClipping(f=1)(torch.tensor([[0., 1.], [0., 2.], [30., 40.]]))
        tensor([[0.0000, 1.0000],
                [0.0000, 2.0000],
                [1.2000, 1.6000]])

    Reference: Y. Allouah, R. Guerraoui, N. Gupta, A. Jellouli, G. Rizk, J. Stephan. The vital
    role of gradient clipping in Byzantine-resilient distributed learning. arXiv:2405.14432.
    """

    name = "arc"

    def clipped(self, n: int) -> int:
        """``k``: how many of ``n`` rows are clipped."""
        return 2 * self.f * (n - self.f) // n

    def mixing(self, stack: torch.Tensor, ctx: ShardContext) -> torch.Tensor:
        n = stack.shape[0]
        norms = sq_norms(stack, ctx).cpu().clamp_min(0).sqrt()
        k = self.clipped(n)
        scale = torch.ones(n, dtype=torch.float64)
        if k > 0:
            radius = norms.sort(descending=True).values[k]
            over = norms > radius
            scale[over] = radius / norms[over]
        return torch.diag(scale)


class Bucketing(PreAggregator):
    r"""Bucketing: shuffle the rows and average consecutive buckets of ``s`` rows.

    Formula: with a permutation :math:`\pi` drawn from ``(seed, round)``,
    :math:`y_b = \mathrm{mean}\{x_{\pi(j)} : j \in [bs, (b+1)s)\}` for
    :math:`b < \lceil n/s \rceil` (the last bucket may be smaller). The permutation is the
    same on every rank because ``round`` is.

    Args:
        s: bucket size (>= 1).
        seed: base seed of the shuffles.

    Returns:
        ``(ceil(n / s), d)`` tensor, fed to the aggregation rule (whose ``f`` bound then
        applies to ``ceil(n / s)`` rows).

    Example:
        >>> Bucketing(s=2)(torch.tensor([[0.], [2.], [4.], [6.]])).shape
        torch.Size([2, 1])

    Reference: S. P. Karimireddy, L. He, M. Jaggi. Byzantine-robust learning on
    heterogeneous datasets via bucketing. ICLR 2022.
    """

    name = "bucketing"

    def __init__(self, s: int = 2, seed: int = 0) -> None:
        self.s = _check_count("s", s, 1)
        self.seed = int(seed)

    def rows_out(self, n: int) -> int:
        return -(-n // self.s)

    def permutation(self, n: int, round: int) -> torch.Tensor:
        """The shuffle used at ``round`` (a pure function of ``seed``, ``round`` and ``n``)."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + round)
        return torch.randperm(n, generator=gen)

    def mixing(self, stack: torch.Tensor, ctx: ShardContext) -> torch.Tensor:
        n = stack.shape[0]
        perm = self.permutation(n, ctx.round)
        m = torch.zeros(self.rows_out(n), n, dtype=torch.float64)
        for b in range(m.shape[0]):
            members = perm[b * self.s : (b + 1) * self.s]
            m[b, members] = 1.0 / len(members)
        return m

    def spec(self) -> str:
        return f"bucketing(s={self.s},seed={self.seed})"


class Pipeline(Aggregator):
    """Pre-aggregation steps followed by a rule: ``rule(M_k @ ... @ M_1 @ stack)``.

    Weights are not supported (mixing makes per-row weights meaningless). Raises
    ``ValueError`` when called on ``n`` rows that a step or the rule cannot tolerate (the
    rule's bound applies to the rows the last step produces).
    """

    def __init__(self, rule: Aggregator, steps: Sequence[PreAggregator]) -> None:
        super().__init__(rule.f)
        self.rule = rule
        self.steps = list(steps)
        self.name = rule.name

    def check(self, n: int) -> None:
        for step in self.steps:
            n = step.rows_out(n)
        self.rule.check(n)

    def spec(self) -> str:
        return "+".join([s.spec() for s in self.steps] + [self.rule.spec()])

    def aggregate(self, stack: torch.Tensor, ctx: ShardContext, weights: torch.Tensor | None = None) -> torch.Tensor:
        for step in self.steps:
            stack = _combine_rows(step.mixing(stack, ctx), stack)
        return self.rule.aggregate(stack, ctx)


RULES: dict[str, type[Aggregator]] = {
    cls.name: cls
    for cls in (Mean, CoordinateMedian, TrimmedMean, Krum, MultiKrum, GeometricMedian, CenteredClipping)
}
PRE_AGGREGATORS: dict[str, type[PreAggregator]] = {
    "nnm": NearestNeighborMixing, "arc": AdaptiveRobustClipping, "bucketing": Bucketing}


def _lookup(registry: dict[str, type], kind: str, name: str) -> type:
    try:
        return registry[name]
    except KeyError:
        raise ValueError(f"unknown {kind} {name!r}; known: {', '.join(sorted(registry))}") from None


def build_aggregator(
    rule: str,
    f: int = 0,
    *,
    pre: Sequence[str] = (),
    bucket_size: int = 2,
    seed: int = 0,
    **options: float | int,
) -> Aggregator:
    """Build a rule by registry name, optionally behind pre-aggregation steps.

    Args:
        rule: a key of :data:`RULES`.
        f: Byzantine rows to tolerate (passed to the rule, ``nnm`` and ``arc``).
        pre: names from :data:`PRE_AGGREGATORS`, applied in order.
        bucket_size, seed: parameters of ``bucketing``.
        options: further keyword arguments of the rule (``tau``, ``iterations``, ``eps``,
            ``max_iter``, ``tol``, ``m``).

    Raises:
        ValueError: unknown name (the message lists the known ones) or invalid parameters.
    """
    cls = _lookup(RULES, "aggregation rule", rule)
    try:
        agg = cls(f, **options)
    except TypeError as err:
        raise ValueError(f"invalid options for {rule!r}: {err}") from None
    if not pre:
        return agg
    steps: list[PreAggregator] = []
    for name in pre:
        step_cls = _lookup(PRE_AGGREGATORS, "pre-aggregation step", name)
        steps.append(Bucketing(bucket_size, seed) if step_cls is Bucketing else step_cls(f))
    return Pipeline(agg, steps)


__all__ = [
    "ShardContext",
    "as_stack",
    "gram_matrix",
    "pairwise_sq_distances",
    "sq_norms",
    "Aggregator",
    "Mean",
    "CoordinateMedian",
    "TrimmedMean",
    "krum_scores",
    "MultiKrum",
    "Krum",
    "GeometricMedian",
    "CenteredClipping",
    "PreAggregator",
    "NearestNeighborMixing",
    "AdaptiveRobustClipping",
    "Bucketing",
    "Pipeline",
    "RULES",
    "PRE_AGGREGATORS",
    "build_aggregator",
]
