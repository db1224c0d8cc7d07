"""iPNDM (Zhang & Chen's improved PNDM; diff-sampler solvers.py), docs/math.md §6.2.

Adams-Bashforth in VE coordinates, x_{i+1} = x_i + (s_{i+1} - s_i) AB_k(d), d = (x - D) / s, with the
fixed-step coefficients even on non-uniform grids (as the reference), orders warming up 1, 2, 3, 4.
"""

from __future__ import annotations

import torch

from ..noise import GeneratorArg
from ..processes import NoiseProcess
from ._common import Denoise, check_grid, denoise_ve, ve_point
from .registry import NamedSampler, Param, integer, register

__all__ = ["ipndm", "AB_COEFFICIENTS"]

# Weights of d_0, d_{-1}, ... for orders 1..4 (uniform-step Adams-Bashforth).
AB_COEFFICIENTS = {1: (1.0,), 2: (1.5, -0.5), 3: (23 / 12, -16 / 12, 5 / 12),
                   4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def ipndm(denoiser: Denoise, x: torch.Tensor, timesteps: tuple[float, ...], process: NoiseProcess,
          generator: GeneratorArg = None, *, max_order: int = 4) -> torch.Tensor:
    check_grid(timesteps)
    pts = [ve_point(process, t) for t in timesteps]
    xb = x / pts[0][0]
    ds: list[torch.Tensor] = []  # newest first
    for i in range(len(timesteps) - 1):
        (a, s), (_, s_n) = pts[i], pts[i + 1]
        ds.insert(0, (xb - denoise_ve(denoiser, xb, timesteps[i], a)) / s)
        del ds[max_order:]
        coeffs = AB_COEFFICIENTS[len(ds)]
        slope = sum(c * d for c, d in zip(coeffs, ds))
        xb = xb + (s_n - s) * slope
    return denoise_ve(denoiser, xb, timesteps[-1], pts[-1][0])


register(NamedSampler(
    name="ipndm", fn=ipndm, nfe=lambda n, p: n,
    params={"max_order": Param(4, integer(1, 4), "highest Adams-Bashforth order")},
    description="iPNDM: Adams-Bashforth up to order 4 on the probability-flow ODE in sigma, 1 NFE per step",
    paper="Zhang & Chen, Fast Sampling of Diffusion Models with Exponential Integrator (DEIS), ICLR 2023"))
