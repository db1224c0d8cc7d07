"""Unbiased MMD^2 with an RBF kernel whose length scale is the median pairwise distance of the reference.

k(a, b) = exp(-|a - b|^2 / (2 l^2)); with `scales` the kernel is the sum over l * scale (docs/math.md §9: {1/2, 1, 2}).
Kernel sums are formed in blocks, so memory stays O(block^2) whatever the sample counts.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

__all__ = ["median_distance", "mmd2_unbiased"]

_BLOCK = 2048


def _flat64(x: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(x).reshape(len(x), -1).to(torch.float64)


def median_distance(reference: torch.Tensor, max_points: int = 2000) -> float:
    """Median of the pairwise distances between (the first max_points) reference samples."""
    r = _flat64(reference)[:max_points]
    if len(r) < 2:
        raise ValueError("reference must hold at least 2 samples")
    d = torch.cdist(r, r)
    iu = torch.triu_indices(len(r), len(r), offset=1)
    # The usual median (mean of the middle two for an even count); torch.median would return the lower one.
    med = float(np.median(d[iu[0], iu[1]].numpy()))
    if not med > 0:
        raise ValueError("reference samples are all identical; the median distance is 0")
    return med


def _kernel_sum(a: torch.Tensor, b: torch.Tensor, gammas: Sequence[float], same: bool) -> float:
    total = 0.0
    for i in range(0, len(a), _BLOCK):
        for j in range(0, len(b), _BLOCK):
            d2 = torch.cdist(a[i:i + _BLOCK], b[j:j + _BLOCK]).pow_(2)
            k = sum(torch.exp(-g * d2) for g in gammas)
            if same and i == j:
                k = k - torch.diag_embed(torch.diagonal(k))  # drop the i = j terms of the unbiased estimate
            total += float(k.sum())
    return total


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor, length_scale: float,
                  scales: Sequence[float] = (1.0,)) -> float:
    """Unbiased MMD^2 between samples x [n, ...] and reference y [m, ...] (can be slightly negative)."""
    xf, yf = _flat64(x), _flat64(y)
    n, m = len(xf), len(yf)
    if n < 2 or m < 2 or xf.shape[1] != yf.shape[1]:
        raise ValueError(f"need >= 2 samples of equal dimension, got {tuple(xf.shape)} and {tuple(yf.shape)}")
    if not length_scale > 0:
        raise ValueError(f"length_scale={length_scale!r} must be positive")
    gammas = [1.0 / (2.0 * (length_scale * s) ** 2) for s in scales]
    kxx = _kernel_sum(xf, xf, gammas, True) / (n * (n - 1))
    kyy = _kernel_sum(yf, yf, gammas, True) / (m * (m - 1))
    kxy = _kernel_sum(xf, yf, gammas, False) / (n * m)
    return kxx + kyy - 2.0 * kxy
