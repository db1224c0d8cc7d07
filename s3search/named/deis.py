"""DEIS rho-AB (Zhang & Chen, ICLR 2023; qsh-zh/deis, diff-sampler solver_utils.py), docs/math.md §6.1.

In VE coordinates xb = x / alpha, u = sigma / alpha, the ODE is dxb/du = eps(x, t). A step integrates the
Lagrange polynomial in u through the newest `order` noise predictions exactly:
    xb_{i+1} = xb_i + sum_j C_ij eps_{i-j},   C_ij = int_{u_i}^{u_{i+1}} l_j(u) du.
"""

from __future__ import annotations

import numpy as np
import torch

from ..noise import GeneratorArg
from ..processes import NoiseProcess
from ._common import Denoise, check_grid, denoise_ve, ve_point
from .registry import NamedSampler, Param, integer, register

__all__ = ["deis", "rho_ab_coefficients"]

_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(8)


def rho_ab_coefficients(nodes: tuple[float, ...], u_from: float, u_to: float) -> list[float]:
    """int_{u_from}^{u_to} l_j(u) du for the Lagrange basis on `nodes` (newest first), float64.

    Gauss-Legendre with 8 points integrates these polynomials (degree <= 3) exactly.
    """
    width = u_to - u_from
    q = u_from + (_GL_NODES + 1.0) / 2.0 * width
    w = _GL_WEIGHTS * width / 2.0
    out = []
    for j, uj in enumerate(nodes):
        basis = np.ones_like(q)
        for m, um in enumerate(nodes):
            if m != j:
                basis = basis * (q - um) / (uj - um)
        out.append(float(np.sum(w * basis)))
    return out


def deis(denoiser: Denoise, x: torch.Tensor, timesteps: tuple[float, ...], process: NoiseProcess,
         generator: GeneratorArg = None, *, order: int = 3) -> torch.Tensor:
    check_grid(timesteps)
    pts = [ve_point(process, t) for t in timesteps]
    u = [p[1] for p in pts]
    xb = x / pts[0][0]
    eps: list[torch.Tensor] = []  # newest first
    for i in range(len(timesteps) - 1):
        a = pts[i][0]
        eps.insert(0, (xb - denoise_ve(denoiser, xb, timesteps[i], a)) / u[i])
        del eps[order:]
        coeffs = rho_ab_coefficients(tuple(u[i - j] for j in range(len(eps))), u[i], u[i + 1])
        xb = xb + sum(c * e for c, e in zip(coeffs, eps))
    return denoise_ve(denoiser, xb, timesteps[-1], pts[-1][0])


register(NamedSampler(
    name="deis", fn=deis, nfe=lambda n, p: n,
    params={"order": Param(3, integer(1, 4), "points in the Lagrange polynomial (global order)")},
    description="DEIS rho-AB: exact integral of the noise prediction's Lagrange polynomial in sigma",
    paper="Zhang & Chen, Fast Sampling of Diffusion Models with Exponential Integrator, ICLR 2023"))
