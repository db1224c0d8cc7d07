"""Helpers shared by the named samplers: VE coordinates and the model calls made in them."""

from __future__ import annotations

from typing import Callable

import torch

from ..processes import NoiseProcess

Denoise = Callable[[torch.Tensor, float], torch.Tensor]


def ve_point(process: NoiseProcess, t: float) -> tuple[float, float]:
    """(alpha(t), sigma(t) / alpha(t)): the scale and the EDM-equivalent noise level of time t."""
    return process.alpha(t), process.sigma_ve(t)


def denoise_ve(denoiser: Denoise, xb: torch.Tensor, t: float, alpha: float) -> torch.Tensor:
    """D at the VE-coordinate state xb = x / alpha (D does not change under this rescaling)."""
    return denoiser(xb * alpha if alpha != 1.0 else xb, t)


def check_grid(timesteps: tuple[float, ...]) -> None:
    if len(timesteps) < 1:
        raise ValueError("timesteps must hold at least one time")
    for i in range(1, len(timesteps)):
        if not timesteps[i] < timesteps[i - 1]:
            raise ValueError(f"timesteps[{i}]={timesteps[i]!r} must be below timesteps[{i - 1}]")
