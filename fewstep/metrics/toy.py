"""Exact sample-based distances for low-dimensional (toy) data (docs/math.md#toy-data).

All three take two sample sets `x` (N, D) and `y` (M, D) as torch tensors (or anything
`torch.as_tensor` accepts), compute in float64 on the CPU and return a Python float. `y` is
meant to be the held-out reference set.

- `sliced_wasserstein`: Monte-Carlo over random directions, exact 1-D Wasserstein per direction.
- `mmd`: unbiased estimate of the squared maximum mean discrepancy with an RBF-mixture kernel.
- `energy_distance`: unbiased estimate of Szekely's energy distance.

Pairwise terms are summed in row blocks so memory stays O(block * M) for large sets.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Tensor = torch.Tensor

_BLOCK = 2048  # rows per block for pairwise sums: 2048 x 10k float64 is 160 MB
_SMALL = 1 << 14  # pairs below which a broadcast difference beats cdist


def _as_samples(x, name: str) -> Tensor:
    """Samples as a float64 CPU tensor of shape (N, D); a 1-D input is N scalar samples."""
    x = torch.as_tensor(x).detach().to(device="cpu", dtype=torch.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape (N, D), got {tuple(x.shape)}")
    if x.shape[0] < 1:
        raise ValueError(f"{name} is empty")
    return x


def _check_pair(x, y) -> tuple[Tensor, Tensor]:
    x, y = _as_samples(x, "x"), _as_samples(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y differ in dimension: {x.shape[1]} vs {y.shape[1]}")
    return x, y


def _pairwise_sum(a: Tensor, b: Tensor, fn: Callable[[Tensor], Tensor],
                  exclude_diagonal: bool = False) -> Tensor:
    """Sum of `fn(||a_i - b_j||)` over all pairs (i, j), or over i != j when `a is b`.

    Distances from differences, never the `|a|^2 + |b|^2 - 2 a.b` shortcut: its cancellation
    leaves `||a_i - a_i||` around 1e-4 instead of 0, which would bias energy distance.
    """
    total = torch.zeros((), dtype=torch.float64)
    for start in range(0, a.shape[0], _BLOCK):
        block = a[start:start + _BLOCK]
        if block.shape[0] * b.shape[0] <= _SMALL:  # cdist has ~ms of fixed cost per call
            d = (block[:, None, :] - b[None, :, :]).square().sum(-1).sqrt()
        else:
            d = torch.cdist(block, b, compute_mode="donot_use_mm_for_euclid_dist")
        total = total + fn(d).sum()
    if exclude_diagonal:
        total = total - a.shape[0] * fn(torch.zeros((), dtype=torch.float64))
    return total


# ------------------------------------------------------------------------------------------
# Sliced Wasserstein


def _wasserstein_1d_pow(xs: Tensor, ys: Tensor, p: float) -> Tensor:
    """`W_p^p` between empirical 1-D distributions, row by row, from sorted samples.

    xs: (P, N) and ys: (P, M), each row sorted. `W_p^p = int_0^1 |F^-1(q) - G^-1(q)|^p dq`
    with the empirical (step) quantile functions; both are constant between consecutive
    points of the merged grid {i/N} U {j/M}, so the integral is an exact finite sum. With
    N == M this reduces to matching sorted samples one to one.
    """
    n, m = xs.shape[1], ys.shape[1]
    grid = torch.cat([torch.arange(1, n + 1, dtype=torch.float64) / n,
                      torch.arange(1, m + 1, dtype=torch.float64) / m])
    grid = torch.unique(grid)  # sorted, ends at exactly 1.0
    widths = torch.diff(grid, prepend=grid.new_zeros(1))
    mid = grid - widths / 2  # a quantile level strictly inside each piece
    ix = torch.clamp((mid * n).long(), max=n - 1)  # F^-1(q) = xs[ceil(qN) - 1] = xs[floor(qN)] off-grid
    iy = torch.clamp((mid * m).long(), max=m - 1)
    return ((xs[:, ix] - ys[:, iy]).abs() ** p * widths).sum(dim=1)


def sliced_wasserstein(x, y, num_projections: int = 512, p: float = 2, seed: int = 0) -> float:
    """Sliced Wasserstein distance `SW_p = (E_u W_p^p(u.x, u.y))^(1/p)`, u uniform on the sphere.

    The expectation over directions is a Monte-Carlo average over `num_projections` unit
    vectors drawn from a local generator seeded with `seed` (the global RNG is untouched, so
    calling this never perturbs training). Each 1-D Wasserstein term is exact, also for
    unequal sample counts (see `_wasserstein_1d_pow`).
    """
    x, y = _check_pair(x, y)
    if p < 1:
        raise ValueError(f"p must be >= 1, got {p}")
    if num_projections < 1:
        raise ValueError(f"num_projections must be >= 1, got {num_projections}")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    dirs = torch.randn(num_projections, x.shape[1], dtype=torch.float64, generator=gen)
    dirs = dirs / dirs.norm(dim=1, keepdim=True)  # normalized Gaussians are uniform on the sphere
    xs = torch.sort(dirs @ x.T, dim=1).values
    ys = torch.sort(dirs @ y.T, dim=1).values
    return float(_wasserstein_1d_pow(xs, ys, p).mean() ** (1.0 / p))


# ------------------------------------------------------------------------------------------
# Maximum mean discrepancy


def median_bandwidth(y, max_points: int = 2048) -> float:
    """Median pairwise distance of the reference set `y` (the median heuristic).

    Computed on `y` only, so every model evaluated against the same held-out set gets the
    same kernel and their MMDs are comparable. Subsampled (first `max_points`) for speed.
    """
    y = _as_samples(y, "y")[:max_points]
    if y.shape[0] < 2:
        raise ValueError("median_bandwidth needs at least two points")
    d = torch.pdist(y)
    med = float(d.median())
    return med if med > 0 else 1.0


def mmd(x, y, bandwidths: Sequence[float] | None = None) -> float:
    """Unbiased estimate of `MMD^2` with the kernel `k(a, b) = sum_h exp(-||a-b||^2 / (2 h^2))`.

    `MMD^2 = E k(X,X') + E k(Y,Y') - 2 E k(X,Y)`; the within-set means exclude i == j
    (U-statistics), so the estimate is unbiased and can be slightly negative when the two
    distributions are equal. `bandwidths=None` uses the median heuristic on the reference
    `y` times (0.5, 1, 2). Needs at least two samples in each set.
    """
    x, y = _check_pair(x, y)
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        raise ValueError("mmd needs at least two samples in each set")
    if bandwidths is None:
        med = median_bandwidth(y)
        bandwidths = (0.5 * med, med, 2.0 * med)
    hs = torch.as_tensor(list(bandwidths), dtype=torch.float64)
    if hs.numel() == 0 or bool((hs <= 0).any()):
        raise ValueError(f"bandwidths must be positive, got {list(bandwidths)}")
    gammas = (1.0 / (2.0 * hs**2)).tolist()

    def kernel(d: Tensor) -> Tensor:
        d2 = d * d
        return sum(torch.exp(-g * d2) for g in gammas)  # a loop, not a (B, M, H) tensor

    kxx = _pairwise_sum(x, x, kernel, exclude_diagonal=True) / (n * (n - 1))
    kyy = _pairwise_sum(y, y, kernel, exclude_diagonal=True) / (m * (m - 1))
    kxy = _pairwise_sum(x, y, kernel) / (n * m)
    return float(kxx + kyy - 2.0 * kxy)


# ------------------------------------------------------------------------------------------
# Energy distance


def energy_distance(x, y) -> float:
    """Energy distance `2 E||X-Y|| - E||X-X'|| - E||Y-Y'||` (Szekely & Rizzo), unbiased.

    This is the squared form (zero iff the distributions are equal, `2|a-b|` between point
    masses at a and b); the within-set means exclude i == j. A set of one sample contributes
    zero to its within-set term.
    """
    x, y = _check_pair(x, y)
    n, m = x.shape[0], y.shape[0]

    def ident(d: Tensor) -> Tensor:
        return d

    exy = _pairwise_sum(x, y, ident) / (n * m)
    exx = _pairwise_sum(x, x, ident) / (n * (n - 1)) if n > 1 else 0.0
    eyy = _pairwise_sum(y, y, ident) / (m * (m - 1)) if m > 1 else 0.0
    return float(2.0 * exy - exx - eyy)
