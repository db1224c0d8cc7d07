"""Heun on the rectified-flow ODE, as diffusers' FlowMatchHeunDiscreteScheduler runs it (SD3-family pipelines).

The flow ODE is dx/dt = v = (x - D) / t in flow coordinates, x_f = x / (alpha + sigma) at flow time
t_f = sigma / (alpha + sigma) (x_f = (1 - t_f) x0 + t_f eps), which is the state itself on the flow process and a
fixed rescaling on any other. Heun steps between the given times in t_f, then x = D(x_N, t_N): diffusers' last
step, an Euler step to sigma 0, lands on that same point (x - t v = D).

The step is the trapezoidal rule in t_f, not a polynomial in lambda (it differs at second order from EDM Heun, the
trapezoidal rule in the VE noise level). The baseline `flow_heun` runs the same rule as a point of the schedule
space (derivative "trapezoid", corrector "implicit"); this sampler is kept as the independent implementation it
is tested against, and so that named-schedule documents written before the rule joined the space still run.
"""

from __future__ import annotations

import torch

from ..noise import GeneratorArg
from ..processes import NoiseProcess
from ._common import Denoise, check_grid
from .registry import NamedSampler, register

__all__ = ["flow_heun"]


def _flow_point(process: NoiseProcess, t: float) -> tuple[float, float]:
    """(alpha + sigma, flow time sigma / (alpha + sigma)) of process time t."""
    scale = process.alpha(t) + process.sigma(t)
    return scale, process.sigma(t) / scale


def _velocity(denoiser: Denoise, xf: torch.Tensor, t: float, scale: float, tf: float) -> torch.Tensor:
    return (xf - denoiser(xf * scale if scale != 1.0 else xf, t)) / tf


def flow_heun(denoiser: Denoise, x: torch.Tensor, timesteps: tuple[float, ...], process: NoiseProcess,
              generator: GeneratorArg = None) -> torch.Tensor:
    check_grid(timesteps)
    scale, tf = _flow_point(process, timesteps[0])
    xf = x / scale if scale != 1.0 else x
    for t, t_next in zip(timesteps[:-1], timesteps[1:]):
        scale_n, tf_n = _flow_point(process, t_next)
        v = _velocity(denoiser, xf, t, scale, tf)
        x_pred = xf + (tf_n - tf) * v
        v_next = _velocity(denoiser, x_pred, t_next, scale_n, tf_n)
        xf = xf + (tf_n - tf) * ((v + v_next) / 2.0)
        scale, tf = scale_n, tf_n
    return denoiser(xf * scale if scale != 1.0 else xf, timesteps[-1])


register(NamedSampler(
    name="flow_heun", fn=flow_heun, nfe=lambda n, p: 2 * n - 1,
    description="Heun (2nd order, 2 NFE per step) on the rectified-flow ODE in flow time, as diffusers' "
                "FlowMatchHeunDiscreteScheduler",
    paper="Liu et al., Flow Straight and Fast (rectified flow), ICLR 2023; diffusers FlowMatchHeunDiscreteScheduler"))
