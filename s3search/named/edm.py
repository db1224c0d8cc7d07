"""EDM Heun sampler with churn (Karras et al. 2022, Algorithm 2; NVlabs/edm generate.py), docs/math.md §6.3.

Runs in VE coordinates (x / alpha, sigma / alpha), so it serves every process. Heun steps between the given
times, then x = D(x_N, t_N): the same as EDM's Euler step to sigma = 0, without churn on that last call
(EDM and k-diffusion also churn before it; tests compare with churn kept off the last time).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..noise import GeneratorArg, randn_rows
from ..processes import NoiseProcess
from ._common import Denoise, check_grid, denoise_ve, ve_point
from .registry import NamedSampler, Param, number, optional_number, register

__all__ = ["edm_heun"]


def edm_heun(denoiser: Denoise, x: torch.Tensor, timesteps: tuple[float, ...], process: NoiseProcess,
             generator: GeneratorArg = None, *, s_churn: float = 0.0, s_tmin: float = 0.0,
             s_tmax: Optional[float] = None, s_noise: float = 1.0) -> torch.Tensor:
    check_grid(timesteps)
    # EDM counts the step to sigma = 0, which here is the final denoise: len(timesteps) steps in all.
    gamma_max = min(s_churn / len(timesteps), math.sqrt(2.0) - 1.0)
    a0, _ = ve_point(process, timesteps[0])
    xb = x / a0
    for t, t_next in zip(timesteps[:-1], timesteps[1:]):
        _, s = ve_point(process, t)
        a_n, s_n = ve_point(process, t_next)
        in_range = s >= s_tmin and (s_tmax is None or s <= s_tmax)
        gamma = gamma_max if in_range else 0.0
        # Churn: raise the noise level to s_hat with fresh noise.
        if gamma > 0:
            s_hat = s * (1.0 + gamma)
            t_hat = process.t_of_sigma_ve(s_hat)
            xb = xb + (math.sqrt(s_hat**2 - s**2) * s_noise) * randn_rows(xb, generator)
        else:
            s_hat, t_hat = s, t
        # Euler predictor, then the trapezoidal (Heun) corrector.
        d = (xb - denoise_ve(denoiser, xb, t_hat, process.alpha(t_hat))) / s_hat
        x_pred = xb + (s_n - s_hat) * d
        d_next = (x_pred - denoise_ve(denoiser, x_pred, t_next, a_n)) / s_n
        xb = xb + (s_n - s_hat) * ((d + d_next) / 2.0)
    a_last, _ = ve_point(process, timesteps[-1])
    return denoise_ve(denoiser, xb, timesteps[-1], a_last)


register(NamedSampler(
    name="edm_heun", fn=edm_heun, nfe=lambda n, p: 2 * n - 1,
    params={"s_churn": Param(0.0, number(0.0, 1e6), "churn amount (0: deterministic)"),
            "s_tmin": Param(0.0, number(0.0), "churn only where sigma >= s_tmin (EDM sigma = sigma/alpha)"),
            "s_tmax": Param(None, optional_number(0.0), "churn only where sigma <= s_tmax (null: no bound)"),
            "s_noise": Param(1.0, number(0.0, 10.0), "churn noise multiplier")},
    stochastic=lambda p: p["s_churn"] > 0 and p["s_noise"] > 0,
    description="EDM Heun (2nd order, 2 NFE per step) with optional churn",
    paper="Karras et al., Elucidating the Design Space of Diffusion-Based Generative Models, NeurIPS 2022"))
