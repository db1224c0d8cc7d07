"""The accelerated samplers of Li, Huang, Efimov, Wei, Chi & Chen (ICML 2024, arXiv 2403.03852), docs/math.md §6.7.

Both are written for a discrete VP chain with cumulative abar_t; on any process we use the VP-equivalent
abar(u) = 1 / (1 + u^2) of the EDM noise level u = sigma / alpha (exact for VP processes), so one grid step
t_i -> t_{i+1} plays the role of the chain's t -> t - 1 with per-step alpha = abar_i / abar_{i+1}.

- ODE (rate 1/T^2): DDIM plus the exact integral, in u, of eps extrapolated linearly in abar through the
  previous (noisier) point: xb' = xb + du eps_i + [int abar du - abar_i du] / (abar_{i-1} - abar_i) (eps_{i-1} - eps_i),
  int abar du = arctan(u_{i+1}) - arctan(u_i). The first step is plain DDIM.
- DDPM-type (rate 1/T): Y+ = Y + sqrt((1 - a)/2) Z; Y' = a^{-1/2} (Y+ + (1 - a) s_t(Y+)) + sqrt((1 - a)/2) Z+,
  with the score taken at Y+ at the same index t, as in the paper (the code scales Z by a further sqrt(a)).
"""

from __future__ import annotations

import math

import torch

from ..noise import GeneratorArg, randn_rows
from ..processes import NoiseProcess
from ._common import Denoise, check_grid, denoise_ve, ve_point
from .registry import NamedSampler, register

__all__ = ["li_accelerated_ode", "li_accelerated_ddpm"]


def _abar(u: float) -> float:
    return 1.0 / (1.0 + u * u)


def li_accelerated_ode(denoiser: Denoise, x: torch.Tensor, timesteps: tuple[float, ...], process: NoiseProcess,
                       generator: GeneratorArg = None) -> torch.Tensor:
    check_grid(timesteps)
    pts = [ve_point(process, t) for t in timesteps]
    xb = x / pts[0][0]
    eps_prev = None
    for i in range(len(timesteps) - 1):
        (a, u), (_, u_n) = pts[i], pts[i + 1]
        eps = (xb - denoise_ve(denoiser, xb, timesteps[i], a)) / u
        # DDIM part: eps frozen over the step.
        out = xb + (u_n - u) * eps
        if eps_prev is not None:
            # Exact integral of the linear-in-abar extrapolation through (abar_{i-1}, eps_{i-1}).
            ab, ab_prev = _abar(u), _abar(pts[i - 1][1])
            integral = (math.atan(u_n) - math.atan(u)) - ab * (u_n - u)
            out = out + (integral / (ab_prev - ab)) * (eps_prev - eps)
        eps_prev, xb = eps, out
    return denoise_ve(denoiser, xb, timesteps[-1], pts[-1][0])


def li_accelerated_ddpm(denoiser: Denoise, x: torch.Tensor, timesteps: tuple[float, ...], process: NoiseProcess,
                        generator: GeneratorArg = None) -> torch.Tensor:
    check_grid(timesteps)
    pts = [ve_point(process, t) for t in timesteps]
    # Y = x_vp = xb sqrt(abar): the VP-equivalent state.
    y = x / pts[0][0] * math.sqrt(_abar(pts[0][1]))
    for i in range(len(timesteps) - 1):
        (a, u), (_, u_n) = pts[i], pts[i + 1]
        ab, ab_n = _abar(u), _abar(u_n)
        step_alpha = ab / ab_n
        beta = 1.0 - step_alpha
        # Half-noise the state, then take the score there at the same noise level.
        y_plus = y + math.sqrt(beta / 2.0) * randn_rows(y, generator)
        xb_plus = y_plus / math.sqrt(ab)
        eps = (xb_plus - denoise_ve(denoiser, xb_plus, timesteps[i], a)) / u
        score = -eps / math.sqrt(1.0 - ab)
        y = (y_plus + beta * score) / math.sqrt(step_alpha) + math.sqrt(beta / 2.0) * randn_rows(y, generator)
    xb = y / math.sqrt(_abar(pts[-1][1]))
    return denoise_ve(denoiser, xb, timesteps[-1], pts[-1][0])


register(NamedSampler(
    name="li_accelerated_ode", fn=li_accelerated_ode, nfe=lambda n, p: n,
    description="Li et al. accelerated ODE sampler: DDIM plus a linear-in-abar eps correction (rate 1/T^2)",
    paper="Li, Huang, Efimov, Wei, Chi & Chen, Accelerating Convergence of Score-Based Diffusion Models, "
          "Provably, ICML 2024 (arXiv 2403.03852)"))
register(NamedSampler(
    name="li_accelerated_ddpm", fn=li_accelerated_ddpm, nfe=lambda n, p: n, stochastic=lambda p: True,
    description="Li et al. accelerated DDPM-type sampler: score at a half-noised point (rate 1/T)",
    paper="Li, Huang, Efimov, Wei, Chi & Chen, Accelerating Convergence of Score-Based Diffusion Models, "
          "Provably, ICML 2024 (arXiv 2403.03852)"))
