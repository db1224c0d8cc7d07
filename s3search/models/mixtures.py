"""Gaussian-mixture test beds with the exact denoiser, exact samples and the exact probability-flow ODE.

Formulas: docs/math.md §8. Each component is stored by its eigendecomposition in a "spiked" form,

    Sigma_k = U_k diag(lam_k) U_k^T + floor_k (I - U_k U_k^T),     U_k: d x r orthonormal columns,

so a full-rank covariance is r = d and a low-rank-plus-isotropic one (the image test bed) is r << d; every
operation then costs O(K d r) per sample instead of O(K d^2). All arithmetic is float64; tensors handed back
to a sampler are in the caller's dtype.

Construction (the eigendecompositions, SVDs and numpy products) runs under `single_threaded()`, so a mixture
and its `fingerprint()` are the same bits under any OMP_NUM_THREADS on one torch build.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from ..denoisers import Denoiser
from ..processes import NoiseProcess, get as get_process
from .base import ModelSpec, single_threaded

__all__ = ["GaussianMixture", "builtin_models", "grid_mixture", "random_mixture", "image_mixture"]

_F64 = torch.float64


def _as_f64(a) -> torch.Tensor:
    return torch.from_numpy(np.array(a, dtype=np.float64, copy=True))


@dataclass(frozen=True, eq=False)
class GaussianMixture:
    """p0 = sum_k w_k N(mu_k, Sigma_k) on vectors of size d = prod(shape), stored in the spiked eigen-form."""

    weights: torch.Tensor      # [K]
    means: torch.Tensor        # [K, d]
    eigvecs: torch.Tensor      # [K, d, r]  orthonormal columns
    eigvals: torch.Tensor      # [K, r]     >= 0
    floors: torch.Tensor       # [K]        variance on the complement of span(U_k); > 0 unless r = d
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        k, d = self.means.shape
        if self.weights.shape != (k,) or not torch.all(self.weights > 0):
            raise ValueError(f"weights must be {k} positive numbers")
        if abs(float(self.weights.sum()) - 1.0) > 1e-9:
            raise ValueError(f"weights must sum to 1, not {float(self.weights.sum())}")
        if self.eigvecs.shape[:2] != (k, d) or self.eigvals.shape != (k, self.eigvecs.shape[2]):
            raise ValueError("eigvecs must be [K, d, r] and eigvals [K, r]")
        if torch.any(self.eigvals < 0) or torch.any(self.floors < 0) or self.floors.shape != (k,):
            raise ValueError("eigvals and floors must be non-negative (floors has one entry per component)")
        if self.eigvecs.shape[2] < d and not torch.all(self.floors > 0):
            raise ValueError("floors must be positive when the eigenvectors do not span the space (r < d)")
        if math.prod(self.shape) != d:
            raise ValueError(f"shape={self.shape} does not hold d={d} values")

    # ----- construction -------------------------------------------------------------------------------
    @classmethod
    def from_covariances(cls, weights, means, covariances, shape: Optional[tuple[int, ...]] = None
                         ) -> "GaussianMixture":
        """Full covariances [K, d, d]; each is eigendecomposed once (negative rounding is clipped to 0)."""
        w = _as_f64(weights)
        mu = _as_f64(means)
        cov = _as_f64(covariances)
        cov = 0.5 * (cov + cov.transpose(-1, -2))
        with single_threaded():
            lam, vecs = torch.linalg.eigh(cov)
        k, d = mu.shape
        return cls(w / w.sum(), mu, vecs, lam.clamp_min(0.0), torch.zeros(k, dtype=_F64),
                   tuple(shape) if shape else (d,))

    @classmethod
    def from_low_rank(cls, weights, means, factors, floors, shape: Optional[tuple[int, ...]] = None
                      ) -> "GaussianMixture":
        """Sigma_k = F_k F_k^T + floor_k I with F_k of shape [d, r] (need not be orthogonal)."""
        w = _as_f64(weights)
        mu = _as_f64(means)
        f = _as_f64(factors)
        fl = _as_f64(floors).reshape(-1).expand(mu.shape[0]).clone()
        # Thin SVD: F = U S V^T, so F F^T = U S^2 U^T; the floor adds to every direction, including span(U).
        with single_threaded():
            u, s, _ = torch.linalg.svd(f, full_matrices=False)
        return cls(w / w.sum(), mu, u, s**2 + fl[:, None], fl, tuple(shape) if shape else (mu.shape[1],))

    @property
    def _full_rank(self) -> bool:
        return self.eigvecs.shape[2] == self.dim

    @property
    def n_components(self) -> int:
        return int(self.means.shape[0])

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    def fingerprint(self) -> str:
        """sha256 of the parameters in a canonical byte form: the 'weights hash' of a mixture model."""
        h = hashlib.sha256()
        for t in (self.weights, self.means, self.eigvecs, self.eigvals, self.floors):
            h.update(np.ascontiguousarray(t.numpy(), dtype="<f8").tobytes())
        h.update(repr(self.shape).encode())
        return h.hexdigest()

    # ----- moments ----------------------------------------------------------------------------------------
    def covariances(self, sigma: float = 0.0) -> torch.Tensor:
        """Dense [K, d, d] covariances of the components at VE noise level sigma (for tests and exact stats)."""
        eye = torch.eye(self.dim, dtype=_F64)
        low = torch.einsum("kdr,kr,ker->kde", self.eigvecs, self.eigvals - self.floors[:, None], self.eigvecs)
        return low + (self.floors + sigma**2)[:, None, None] * eye

    def mean(self) -> torch.Tensor:
        return self.weights @ self.means

    def covariance(self, sigma: float = 0.0) -> torch.Tensor:
        """Covariance of the whole mixture at VE level sigma: sum_k w_k (Sigma_k + s^2 I + mu mu^T) - m m^T."""
        m = self.mean()
        second = torch.einsum("k,kde->de", self.weights, self.covariances(sigma))
        second = second + torch.einsum("k,kd,ke->de", self.weights, self.means, self.means)
        return second - torch.outer(m, m)

    # ----- the noised density at VE level s (x_tilde = x / alpha, s = sigma / alpha) ------------------------
    @functools.cached_property
    def _basis(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """U of all components side by side [d, K r], U_k^T mu_k [K, r], |mu_k|^2 [K] (for matmul-only terms)."""
        k, d, r = self.eigvecs.shape
        u_all = self.eigvecs.permute(1, 0, 2).reshape(d, k * r)
        return u_all, torch.einsum("kdr,kd->kr", self.eigvecs, self.means), (self.means**2).sum(1)

    def _comp_terms(self, y: torch.Tensor, s: float):
        """Per-component pieces at VE level s for flattened float64 y [B, d].

        Returns (|y - mu_k|^2 [B, K], U_k^T (y - mu_k) [B, K, r], 1 / (lam + s^2) [K, r], 1 / (floor + s^2) [K]).
        Everything is a matmul against the stacked bases, so no [B, K, d] tensor is formed.
        """
        u_all, u_mu, mu2 = self._basis
        k, _, r = self.eigvecs.shape
        proj = (y @ u_all).reshape(len(y), k, r) - u_mu
        # |y - mu|^2 expanded; float64 keeps the cancellation error far below the smallest variance used here.
        sqdist = ((y**2).sum(1, keepdim=True) - 2.0 * y @ self.means.T + mu2).clamp_min(0.0)
        s2 = s * s
        # With r = d the complement is empty; its (possibly infinite) inverse floor must not enter.
        inv_floor = torch.zeros_like(self.floors) if self._full_rank else 1.0 / (self.floors + s2)
        return sqdist, proj, 1.0 / (self.eigvals + s2), inv_floor

    def _log_comp(self, y: torch.Tensor, s: float, terms=None) -> torch.Tensor:
        """log w_k + log N(y; mu_k, Sigma_k + s^2 I), [B, K]."""
        sqdist, proj, inv_full, inv_floor = terms if terms is not None else self._comp_terms(y, s)
        r = self.eigvecs.shape[2]
        s2 = s * s
        quad = sqdist * inv_floor + (proj**2 * (inv_full - inv_floor[:, None])).sum(-1)
        logdet = torch.log(self.eigvals + s2).sum(-1)
        if not self._full_rank:
            logdet = logdet + (self.dim - r) * torch.log(self.floors + s2)
        return torch.log(self.weights) - 0.5 * (quad + logdet + self.dim * math.log(2.0 * math.pi))

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1).to(_F64)

    def log_prob(self, x: torch.Tensor, sigma: float = 0.0) -> torch.Tensor:
        """log p_sigma(x) for the VE-noised mixture (sigma = 0: the data density), float64 [B]."""
        return torch.logsumexp(self._log_comp(self._flat(x), sigma), dim=1)

    def responsibilities(self, x: torch.Tensor, sigma: float = 0.0) -> torch.Tensor:
        """r_k(x) = P(component k | x) at VE level sigma, float64 [B, K]."""
        return torch.softmax(self._log_comp(self._flat(x), sigma), dim=1)

    def denoise_ve(self, y: torch.Tensor, s: float) -> torch.Tensor:
        """E[x0 | x0 + s eps = y] in float64 for flattened y [B, d]."""
        if s <= 0:
            raise ValueError(f"sigma={s!r} must be positive for the denoiser")
        terms = self._comp_terms(y, s)
        _, proj, inv_full, inv_floor = terms
        resp = torch.softmax(self._log_comp(y, s, terms), dim=1)                      # [B, K]
        # Sigma C^-1 has eigenvalue lam / (lam + s^2) on span(U) and g0 = floor / (floor + s^2) off it, so
        # sum_k r_k [mu_k + g0_k (y - mu_k) + U_k((lam/(lam+s^2) - g0_k) U_k^T (y - mu_k))].
        g_floor = self.floors * inv_floor                                             # [K]
        g_full = self.eigvals * inv_full - g_floor[:, None]                           # [K, r]
        rg = resp * g_floor
        out = (resp - rg) @ self.means + rg.sum(1, keepdim=True) * y
        coef = (resp[:, :, None] * proj * g_full).reshape(len(y), -1)                 # [B, K r]
        return out + coef @ self._basis[0].T

    def denoise(self, x: torch.Tensor, process: NoiseProcess | str, t: float) -> torch.Tensor:
        """Exact D(x, t) = E[x0 | x_t = x] for the process's time t, in x's dtype (float64 inside)."""
        proc = get_process(process)
        alpha, sigma = proc.alpha(t), proc.sigma(t)
        y = self._flat(x) / alpha
        return self.denoise_ve(y, sigma / alpha).reshape(x.shape).to(x.dtype)

    def score(self, x: torch.Tensor, process: NoiseProcess | str, t: float) -> torch.Tensor:
        """grad_x log p_t(x) = (alpha D - x) / sigma^2, in x's dtype."""
        proc = get_process(process)
        alpha, sigma = proc.alpha(t), proc.sigma(t)
        xf = self._flat(x)
        d = self.denoise_ve(xf / alpha, sigma / alpha)
        return ((alpha * d - xf) / sigma**2).reshape(x.shape).to(x.dtype)

    def denoiser(self, process: NoiseProcess | str, name: str = "gmm-exact") -> Denoiser:
        proc = get_process(process)

        def fn(x: torch.Tensor, t: float) -> torch.Tensor:
            return self.denoise(x, proc, t)

        return Denoiser(fn=fn, process=proc, data_mean=self.mean().reshape(self.shape).float(), name=name)

    # ----- exact samples ----------------------------------------------------------------------------------
    def sample(self, n: int, generator: Optional[torch.Generator] = None, sigma_end: float = 0.0,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """n exact samples of p at VE noise level sigma_end: k ~ w, x = mu_k + (Sigma_k + s^2 I)^(1/2) z."""
        if n < 0:
            raise ValueError(f"n={n!r} must be >= 0")
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator) if n else \
            torch.zeros(0, dtype=torch.long)
        z = torch.randn(n, self.dim, generator=generator, dtype=_F64)
        return self._transform(comp, z, sigma_end).reshape(n, *self.shape).to(dtype)

    def sample_rows(self, generators: list[torch.Generator], sigma_end: float = 0.0,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One exact sample per generator (batch-invariant: row i depends only on generators[i])."""
        u = torch.stack([torch.rand((), generator=g, dtype=_F64) for g in generators]) if generators else \
            torch.zeros(0, dtype=_F64)
        z = torch.stack([torch.randn(self.dim, generator=g, dtype=_F64) for g in generators]) if generators \
            else torch.zeros(0, self.dim, dtype=_F64)
        cdf = torch.cumsum(self.weights, 0)
        comp = torch.searchsorted(cdf, u.contiguous()).clamp_max(self.n_components - 1)
        return self._transform(comp, z, sigma_end).reshape(len(generators), *self.shape).to(dtype)

    def _transform(self, comp: torch.Tensor, z: torch.Tensor, s: float) -> torch.Tensor:
        # (Sigma + s^2 I)^(1/2) z = c z + U[(sqrt(lam + s^2) - c) U^T z], c = sqrt(floor + s^2); grouped by
        # component so no [n, d, r] gather is ever built.
        out = torch.empty_like(z)
        for k in torch.unique(comp).tolist():
            rows = comp == k
            u = self.eigvecs[k]
            c = math.sqrt(float(self.floors[k]) + s * s)
            e = torch.sqrt(self.eigvals[k] + s * s) - c
            zk = z[rows]
            out[rows] = self.means[k] + c * zk + ((zk @ u) * e) @ u.T
        return out

    def sample_noised(self, n: int, generator: Optional[torch.Generator], process: NoiseProcess | str,
                      t: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Exact samples of x_t = alpha x0 + sigma eps: alpha times a sample at VE level sigma / alpha."""
        proc = get_process(process)
        a = proc.alpha(t)
        return (a * self.sample(n, generator, proc.sigma(t) / a, dtype=_F64)).to(dtype)

    # ----- the exact probability-flow ODE ------------------------------------------------------------------
    def exact_pf_ode(self, x_start: torch.Tensor, process: NoiseProcess | str, t_start: float, t_end: float,
                     rtol: float = 1e-10, atol: float = 1e-10, chunk: int = 256) -> torch.Tensor:
        """The probability-flow ODE solution from (x_start, t_start) to t_end, in the process's units.

        K = 1: closed form (docs/math.md §8). K > 1: scipy DOP853 in float64 on u = log(sigma/alpha),
        dx~/du = x~ - D(x~, e^u) with x~ = x / alpha, integrated in chunks of samples so each chunk adapts
        its own steps.
        """
        proc = get_process(process)
        a0, a1 = proc.alpha(t_start), proc.alpha(t_end)
        s0, s1 = proc.sigma(t_start) / a0, proc.sigma(t_end) / a1
        y0 = self._flat(x_start) / a0
        if self.n_components == 1:
            y1 = self._pf_single(y0, s0, s1)
        else:
            y1 = torch.cat([self._pf_numeric(y0[i:i + chunk], s0, s1, rtol, atol)
                            for i in range(0, y0.shape[0], chunk)]) if y0.shape[0] else y0
        return (a1 * y1).reshape(x_start.shape).to(x_start.dtype)

    def _pf_single(self, y0: torch.Tensor, s0: float, s1: float) -> torch.Tensor:
        # (Sigma + s1^2)^(1/2) (Sigma + s0^2)^(-1/2) acts as a per-eigendirection scale.
        diff = y0 - self.means[0]
        u = self.eigvecs[0]
        g_floor = math.sqrt((float(self.floors[0]) + s1 * s1) / (float(self.floors[0]) + s0 * s0))
        g_full = torch.sqrt((self.eigvals[0] + s1 * s1) / (self.eigvals[0] + s0 * s0)) - g_floor
        return self.means[0] + g_floor * diff + ((diff @ u) * g_full) @ u.T

    def _pf_numeric(self, y0: torch.Tensor, s0: float, s1: float, rtol: float, atol: float) -> torch.Tensor:
        from scipy.integrate import solve_ivp

        shape = y0.shape

        def rhs(u: float, flat: np.ndarray) -> np.ndarray:
            y = torch.from_numpy(flat).reshape(shape)
            return (y - self.denoise_ve(y, math.exp(u))).reshape(-1).numpy()

        sol = solve_ivp(rhs, (math.log(s0), math.log(s1)), y0.reshape(-1).numpy().copy(), method="DOP853",
                        rtol=rtol, atol=atol)
        if not sol.success:
            raise RuntimeError(f"DOP853 failed: {sol.message}")
        return torch.from_numpy(sol.y[:, -1].copy()).reshape(shape)


# ----- built-in test beds ---------------------------------------------------------------------------------
def grid_mixture(nx: int, ny: int, spacing: float = 0.5, std: tuple[float, float] = (0.05, 0.05),
                 weights: Optional[np.ndarray] = None) -> GaussianMixture:
    """nx * ny axis-aligned Gaussians on a centred grid with the given spacing (the AYS-style 2-D toys)."""
    gx = (np.arange(nx) - (nx - 1) / 2.0) * spacing
    gy = (np.arange(ny) - (ny - 1) / 2.0) * spacing
    means = np.stack(np.meshgrid(gx, gy, indexing="ij"), -1).reshape(-1, 2)
    k = means.shape[0]
    w = np.full(k, 1.0 / k) if weights is None else np.asarray(weights, dtype=np.float64)
    cov = np.broadcast_to(np.diag(np.square(std)), (k, 2, 2))
    return GaussianMixture.from_covariances(w, means, cov)


def random_mixture(dim: int = 64, k: int = 6, seed: int = 64) -> GaussianMixture:
    """k anisotropic full-rank components in `dim` dimensions: random rotations, log-uniform spectra."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((k, dim)) * 1.0
    covs = []
    with single_threaded():
        for _ in range(k):
            q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
            spectrum = np.exp(rng.uniform(np.log(1e-3), np.log(0.5), dim))
            covs.append((q * spectrum) @ q.T)
    weights = rng.dirichlet(np.full(k, 5.0))
    return GaussianMixture.from_covariances(weights, means, np.stack(covs))


def image_mixture(shape: tuple[int, int, int] = (3, 16, 16), k: int = 8, rank: int = 8, floor: float = 1e-4,
                  seed: int = 316) -> GaussianMixture:
    """k 'image' components: smooth colour-blob means in [-1, 1], rank-`rank` smooth covariances + a floor."""
    rng = np.random.default_rng(seed)
    c, h, w = shape
    yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")

    def smooth_field() -> np.ndarray:
        # A few low-frequency cosines per channel: an image-like field with strong spatial correlation.
        out = np.zeros(shape)
        for ch in range(c):
            for _ in range(3):
                fx, fy = rng.integers(0, 3, 2)
                phase = rng.uniform(0, 2 * np.pi)
                out[ch] += rng.standard_normal() * np.cos(np.pi * (fx * xx + fy * yy) / 2 + phase)
        return out.reshape(-1)

    means = np.stack([np.tanh(smooth_field()) for _ in range(k)])
    factors = np.stack([np.stack([smooth_field() * (0.25 * 0.7**j) / 3.0 for j in range(rank)], 1)
                        for _ in range(k)])
    weights = rng.dirichlet(np.full(k, 4.0))
    return GaussianMixture.from_low_rank(weights, means, factors, np.full(k, floor), shape=shape)


def _grid_8x4() -> GaussianMixture:
    # Elongated components (std 0.1 along x, 0.03 along y) on an 8 x 4 grid.
    return grid_mixture(8, 4, spacing=0.5, std=(0.1, 0.03))


def _grid_6x6() -> GaussianMixture:
    # Unequal weights (1, 2 or 3 by position), so mode-weight errors show.
    w = np.array([1.0 + (i + j) % 3 for i in range(6) for j in range(6)])
    return grid_mixture(6, 6, spacing=0.6, std=(0.06, 0.06), weights=w / w.sum())


_MIXTURES: dict[str, tuple[Callable[[], GaussianMixture], str, str]] = {
    "gmm-8x8": (lambda: grid_mixture(8, 8, spacing=0.5, std=(0.05, 0.05)), "nll",
                "2-D: 64 equal isotropic Gaussians (std 0.05) on an 8x8 grid, spacing 0.5"),
    "gmm-8x4": (_grid_8x4, "nll", "2-D: 32 equal anisotropic Gaussians (std 0.1 x 0.03) on an 8x4 grid, spacing 0.5"),
    "gmm-6x6": (_grid_6x6, "nll", "2-D: 36 isotropic Gaussians (std 0.06), weights 1:2:3 by diagonal, 6x6 grid"),
    "gmm-64d": (random_mixture, "fd", "64-D: 6 anisotropic full-rank Gaussians (spectra 1e-3..0.5), Dirichlet weights"),
    "gmm-image": (image_mixture, "fd", "3x16x16: 8 components, smooth means, rank-8 smooth covariances + 1e-4 floor"),
}
_MIXTURE_CACHE: dict[str, GaussianMixture] = {}


def mixture(name: str) -> GaussianMixture:
    """The built-in mixture named `name` (process suffix '-vp' or '-flow' allowed), built once."""
    base = name.removesuffix("-vp").removesuffix("-flow")
    if base not in _MIXTURES:
        raise ValueError(f"mixture={name!r} is unknown; known: {', '.join(sorted(_MIXTURES))}")
    if base not in _MIXTURE_CACHE:
        _MIXTURE_CACHE[base] = _MIXTURES[base][0]()
    return _MIXTURE_CACHE[base]


def model_spec(gm: GaussianMixture, name: str, process: str, description: str = "",
               default_metric: str = "fd") -> ModelSpec:
    """A ModelSpec around any mixture: exact denoiser, exact reference sampler, the mixture for exact metrics."""
    return ModelSpec(
        name=name,
        denoiser=gm.denoiser(process, name=name),
        shape=gm.shape,
        description=description,
        default_metric=default_metric,
        reference_sampler=lambda n, g: gm.sample(n, g),
        features=None,
        exact=gm,
        provenance={"weights_sha256": gm.fingerprint(), "source": "builtin:s3search.models.mixtures"},
    )


def _factory(base: str, process: str) -> Callable[[], ModelSpec]:
    def make() -> ModelSpec:
        _, metric, text = _MIXTURES[base]
        suffix = _SUFFIX[process]
        return model_spec(mixture(base), base + suffix, process, f"{text} ({process})", metric)

    return make


_SUFFIX = {"edm": "", "vp-linear": "-vp", "flow": "-flow"}


def builtin_models() -> dict[str, Callable[[], ModelSpec]]:
    """Every built-in mixture on EDM (plain name), on vp-linear (name + '-vp') and, for the test beds of
    flow-matching samplers, on the rectified-flow process (name + '-flow')."""
    out: dict[str, Callable[[], ModelSpec]] = {}
    for base in _MIXTURES:
        for process, suffix in _SUFFIX.items():
            out[base + suffix] = _factory(base, process)
    return out
