"""Sliced Wasserstein-2 with fixed projections: SW2^2 = mean_l W2^2(x . theta_l, y . theta_l).

The directions come from a seeded generator, so every method is compared on the same slices. In 1-D, W2 is the
L2 distance between quantile functions; with equal sample counts that is the sorted-pairs formula of docs/math.md §9,
with unequal counts both quantile functions are read at the midpoints of the finer grid.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["projections", "sliced_wasserstein2_squared", "sliced_wasserstein2"]


def projections(dim: int, n_projections: int = 512, seed: int = 0) -> torch.Tensor:
    """n_projections directions uniform on the unit sphere in R^dim, float64 [dim, L]."""
    if dim < 1 or n_projections < 1:
        raise ValueError(f"dim={dim} and n_projections={n_projections} must be positive")
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(dim, n_projections, generator=g, dtype=torch.float64)
    return theta / theta.norm(dim=0, keepdim=True)


def _quantiles(sorted_proj: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    # Piecewise-linear quantile function through the points ((i + 1/2) / n, sorted_i), as np.quantile's
    # "hazen" rule; with levels equal to those points it returns the sorted values themselves.
    n = sorted_proj.shape[0]
    pos = (levels * n - 0.5).clamp(0, n - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp_max(n - 1)
    frac = (pos - lo).unsqueeze(1)
    return sorted_proj[lo] * (1 - frac) + sorted_proj[hi] * frac


def sliced_wasserstein2_squared(x: torch.Tensor, y: torch.Tensor, n_projections: int = 512,
                                seed: int = 0) -> float:
    xf = torch.as_tensor(x).reshape(len(x), -1).to(torch.float64)
    yf = torch.as_tensor(y).reshape(len(y), -1).to(torch.float64)
    if xf.shape[1] != yf.shape[1] or len(xf) < 1 or len(yf) < 1:
        raise ValueError(f"samples have shapes {tuple(xf.shape)} and {tuple(yf.shape)}; they must share a dimension")
    theta = projections(xf.shape[1], n_projections, seed)
    # Sort each projection as a contiguous row: sorting along dim 0 of [n, L] is many times slower.
    px = torch.sort((theta.T @ xf.T).contiguous(), dim=1).values.T
    py = torch.sort((theta.T @ yf.T).contiguous(), dim=1).values.T
    if len(px) != len(py):
        m = max(len(px), len(py))
        levels = (torch.arange(m, dtype=torch.float64) + 0.5) / m
        px, py = _quantiles(px, levels), _quantiles(py, levels)
    return float(((px - py) ** 2).mean())


def sliced_wasserstein2(x: torch.Tensor, y: torch.Tensor, n_projections: int = 512, seed: int = 0) -> float:
    return float(np.sqrt(sliced_wasserstein2_squared(x, y, n_projections, seed)))
