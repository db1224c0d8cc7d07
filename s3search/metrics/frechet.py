"""Fréchet distance between Gaussians fitted to two sample sets (FID when the samples are features).

FD = |m1 - m2|^2 + tr C1 + tr C2 - 2 tr (C2^(1/2) C1 C2^(1/2))^(1/2). The last trace is the sum of square roots
of the eigenvalues of a symmetric PSD matrix, so only `eigh` is needed: no inverse, no complex sqrtm, and a
rank-deficient covariance (fewer samples than dimensions) is handled exactly. Float64 throughout.

`frechet_distance_to_stats` compares samples with given statistics (FID against a reference file). With n samples
in d > n - 1 dimensions it never forms a d x d eigendecomposition: with H the (n - 1) x n Helmert matrix (rows
orthonormal and orthogonal to the ones vector), A = H x [n - 1, d] gives C1 = Aᵀ A / (n - 1), and the non-zero
eigenvalues of C2^(1/2) C1 C2^(1/2) = (A C2^(1/2))ᵀ (A C2^(1/2)) / (n - 1) are those of A C2 Aᵀ / (n - 1), an
(n - 1) x (n - 1) matrix. Centring by H rather than by subtracting the mean leaves no structural zero eigenvalue,
whose rounding-level square root would otherwise enter the trace.
"""

from __future__ import annotations

from typing import Union

import numpy as np
import torch

__all__ = ["gaussian_stats", "frechet_distance", "frechet_distance_samples", "frechet_distance_to_stats",
           "psd_sqrt"]

Array = Union[np.ndarray, torch.Tensor]


def _np64(a: Array) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().to(torch.float64).numpy()
    return np.asarray(a, dtype=np.float64)


def gaussian_stats(x: Array) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of samples [n, ...] (trailing dimensions are flattened)."""
    a = _np64(x)
    if a.ndim < 1 or a.shape[0] < 2:
        raise ValueError(f"samples must hold at least 2 rows, got shape {a.shape}")
    a = a.reshape(a.shape[0], -1)
    if not np.all(np.isfinite(a)):
        raise ValueError("samples contain NaN or inf")
    return a.mean(0), np.atleast_2d(np.cov(a, rowvar=False))


def psd_sqrt(c: np.ndarray) -> np.ndarray:
    """Symmetric square root of a PSD matrix; rounding-level negative eigenvalues are clipped to 0."""
    w, v = np.linalg.eigh(0.5 * (c + c.T))
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: Array, cov1: Array, mu2: Array, cov2: Array) -> float:
    m1, m2, c1, c2 = _np64(mu1), _np64(mu2), _np64(cov1), _np64(cov2)
    if m1.shape != m2.shape or c1.shape != c2.shape or c1.shape != (m1.size, m1.size):
        raise ValueError(f"stats do not match: means {m1.shape} / {m2.shape}, covariances {c1.shape} / {c2.shape}")
    s2 = psd_sqrt(c2)
    inner = s2 @ c1 @ s2
    eig = np.linalg.eigvalsh(0.5 * (inner + inner.T))
    cross = np.sqrt(np.clip(eig, 0.0, None)).sum()
    fd = float(((m1 - m2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2.0 * cross)
    # FD >= 0; a tiny negative value is rounding in the trace terms.
    return max(fd, 0.0)


def frechet_distance_samples(x: Array, y: Array) -> float:
    return frechet_distance(*gaussian_stats(x), *gaussian_stats(y))


def _helmert(n: int) -> np.ndarray:
    k = np.arange(1, n)[:, None]
    j = np.arange(n)[None, :]
    return np.where(j < k, 1.0, np.where(j == k, -k, 0.0)) / np.sqrt(k * (k + 1.0))


def frechet_distance_to_stats(x: Array, mu2: Array, cov2: Array) -> float:
    """FD between the Gaussian fitted to samples x [n, ...] (unbiased covariance) and N(mu2, cov2)."""
    a = _np64(x)
    if a.ndim < 1 or a.shape[0] < 2:
        raise ValueError(f"samples must hold at least 2 rows, got shape {a.shape}")
    a = a.reshape(a.shape[0], -1)
    n, d = a.shape
    if n - 1 >= d:
        return frechet_distance(*gaussian_stats(a), mu2, cov2)
    m2, c2 = _np64(mu2), _np64(cov2)
    if m2.shape != (d,) or c2.shape != (d, d):
        raise ValueError(f"stats do not match: samples of dimension {d}, mean {m2.shape}, covariance {c2.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError("samples contain NaN or inf")
    m1 = a.mean(0)
    centred = _helmert(n) @ (a - m1)
    gram = centred @ c2 @ centred.T / (n - 1)
    eig = np.linalg.eigvalsh(0.5 * (gram + gram.T))
    cross = np.sqrt(np.clip(eig, 0.0, None)).sum()
    fd = float(((m1 - m2) ** 2).sum() + (centred ** 2).sum() / (n - 1) + np.trace(c2) - 2.0 * cross)
    return max(fd, 0.0)
