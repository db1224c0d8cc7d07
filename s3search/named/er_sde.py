"""ER-SDE-Solver 1/2/3 (Cui et al., arXiv 2309.06169), docs/math.md §6.6, VE form; VP via x / alpha and sigma / alpha.

x_{i+1} = r x_i + (1 - r) D_i + [s_{i+1} - s_i + phi(s_{i+1}) S_0] D'_i
          + [(s_{i+1} - s_i)^2 / 2 + phi(s_{i+1}) S_1] D''_i + sqrt(s_{i+1}^2 - s_i^2 r^2) z,   r = phi(s_{i+1})/phi(s_i)
with s = sigma / alpha, S_0 = int ds / phi, S_1 = int (s - s_i) / phi ds over [s_{i+1}, s_i], and D', D'' the
official code's backward differences. The integrals are computed by Gauss-Legendre quadrature (exact to
rounding for these smooth phi), or with quadrature="riemann" by the official code's 100-point left Riemann sum.
Note: D' is a first backward difference (the slope at the midpoint, not at s_i), so the order-3 rule is
second-order accurate as published; tests measure that. Final-step rule: x = D(x_N, t_N), as the official code.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from ..noise import GeneratorArg, randn_rows
from ..processes import NoiseProcess
from ._common import Denoise, check_grid, denoise_ve, ve_point
from .registry import NamedSampler, Param, choice, integer, number, register

__all__ = ["er_sde", "phi_function", "step_integrals", "PHI_NAMES"]

PHI_NAMES = {1: "sigma (ODE)", 2: "sigma^2 (reverse SDE)", 3: "sigma (exp(sigma^(eta-1)/(eta-1)) + 10)",
             4: "sigma^1.5", 5: "sigma^2.5", 6: "sigma^0.9 log10(1 + 100 sigma^1.5)", 7: "sigma (exp(sigma^0.3) + 10)"}
_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(32)


def phi_function(kind: int, phi_eta: float = 0.0) -> Callable[[np.ndarray], np.ndarray]:
    """The noise-scale function phi(sigma) of the official code's `func_type` = kind."""
    if kind == 1:
        return lambda s: s
    if kind == 2:
        return lambda s: s**2
    if kind == 3:
        if phi_eta == 1.0:
            raise ValueError("params.phi_eta=1 makes phi 3 undefined (division by eta - 1)")
        return lambda s: s * (np.exp(s ** (phi_eta - 1.0) / (phi_eta - 1.0)) + 10.0)
    if kind == 4:
        return lambda s: s**1.5
    if kind == 5:
        return lambda s: s**2.5
    if kind == 6:
        return lambda s: s**0.9 * np.log10(1.0 + 100.0 * s**1.5)
    if kind == 7:
        return lambda s: s * (np.exp(s**0.3) + 10.0)
    raise ValueError(f"params.phi={kind!r} must be an integer from 1 to 7")


def step_integrals(phi: Callable[[np.ndarray], np.ndarray], s_from: float, s_to: float,
                   quadrature: str = "gauss") -> tuple[float, float]:
    """S_0 = int_{s_to}^{s_from} ds / phi and S_1 = int (s - s_from) / phi ds (float64)."""
    width = s_from - s_to
    if quadrature == "riemann":
        # The official code: 100 left points from s_to upward.
        nodes = s_to + np.arange(100.0) / 100.0 * width
        weights = np.full(100, width / 100.0)
    else:
        nodes = s_to + (_GL_NODES + 1.0) / 2.0 * width
        weights = _GL_WEIGHTS * width / 2.0
    inv = 1.0 / phi(nodes)
    return float(np.sum(weights * inv)), float(np.sum(weights * (nodes - s_from) * inv))


def er_sde(denoiser: Denoise, x: torch.Tensor, timesteps: tuple[float, ...], process: NoiseProcess,
           generator: GeneratorArg = None, *, order: int = 3, phi: int = 7, phi_eta: float = 0.0,
           quadrature: str = "gauss", s_noise: float = 1.0) -> torch.Tensor:
    check_grid(timesteps)
    fn = phi_function(phi, phi_eta)
    pts = [ve_point(process, t) for t in timesteps]
    sig = [p[1] for p in pts]
    xb = x / pts[0][0]
    d_hist: list[torch.Tensor] = []        # D_i, D_{i-1}
    dd_prev: torch.Tensor | None = None    # D'_{i-1}
    for i in range(len(timesteps) - 1):
        s_i, s_n = sig[i], sig[i + 1]
        d_i = denoise_ve(denoiser, xb, timesteps[i], pts[i][0])
        f_i, f_n = float(fn(np.float64(s_i))), float(fn(np.float64(s_n)))
        r = f_n / f_i
        # Stage 1: the exact solution with D frozen.
        out = r * xb + (1.0 - r) * d_i
        used = min(order, i + 1)
        d1 = None
        if used >= 2:
            s0, s1 = step_integrals(fn, s_i, s_n, quadrature)
            d1 = (d_i - d_hist[-1]) / (s_i - sig[i - 1])
            out = out + (s_n - s_i + f_n * s0) * d1
            if used >= 3:
                d2 = 2.0 * (d1 - dd_prev) / (s_i - sig[i - 2])
                out = out + ((s_n - s_i) ** 2 / 2.0 + f_n * s1) * d2
        # Noise: what the step's exact solution adds (none for the ODE choice phi = sigma).
        var = s_n * s_n - (s_i * r) ** 2
        if phi != 1 and s_noise > 0 and var > 0:
            out = out + (math.sqrt(var) * s_noise) * randn_rows(xb, generator)
        dd_prev = d1 if d1 is not None else dd_prev
        d_hist = [d_i]
        xb = out
    return denoise_ve(denoiser, xb, timesteps[-1], pts[-1][0])


def _register(k: int) -> None:
    def fn(denoiser, x, timesteps, process, generator=None, **params):
        return er_sde(denoiser, x, timesteps, process, generator, order=k, **params)

    register(NamedSampler(
        name=f"er_sde_{k}", fn=fn, nfe=lambda n, p: n,
        params={"phi": Param(7, integer(1, 7), "noise-scale function: " + "; ".join(
                    f"{i} = {v}" for i, v in PHI_NAMES.items())),
                "phi_eta": Param(0.0, number(-10.0, 10.0), "eta of phi choice 3"),
                "quadrature": Param("gauss", choice("gauss", "riemann"),
                                    "S_0, S_1 by Gauss-Legendre or the official 100-point Riemann sum"),
                "s_noise": Param(1.0, number(0.0, 10.0), "noise multiplier")},
        stochastic=lambda p: p["phi"] != 1 and p["s_noise"] > 0,
        check=lambda p: phi_function(p["phi"], p["phi_eta"]) and None,
        description=f"ER-SDE-Solver-{k}: extended reverse-time SDE, order-{k} Taylor multistep",
        paper="Cui et al., Elucidating the solution space of extended reverse-time SDEs (arXiv 2309.06169)"))


for _k in (1, 2, 3):
    _register(_k)
