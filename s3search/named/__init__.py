"""Samplers that the solver-schedule space cannot express (multi-stage SEEDS, EDM Heun, flow Heun, ...), run by name.

    from s3search.named import NamedSchedule, run_named
    sched = NamedSchedule(sampler="seeds_2", process="edm", timesteps=(80.0, 10.0, 1.0, 0.1))
    x0 = run_named(denoiser, x_T, sched, generator=torch.Generator().manual_seed(0))

Every sampler takes (denoiser, x, timesteps, process, generator, **params), steps through the timesteps and
returns D(x_N, t_N), the same final rule as the integrator. One module per paper registers its samplers.
"""

from __future__ import annotations

from typing import Callable

import torch

from .. import processes
from ..noise import GeneratorArg
from .registry import NamedSampler, Param, get_sampler, register, sampler_names
from .schedule import NAMED_SCHEMA_VERSION, NamedSchedule
from . import deis, edm, er_sde, flow, ipndm, li_accelerated, seeds  # noqa: F401  (each registers its samplers)

__all__ = ["NamedSchedule", "NamedSampler", "Param", "run_named", "get_sampler", "sampler_names", "register",
           "NAMED_SCHEMA_VERSION"]


def run_named(denoiser: Callable[[torch.Tensor, float], torch.Tensor], x_T: torch.Tensor,
              schedule: NamedSchedule, generator: GeneratorArg = None) -> torch.Tensor:
    """Run `schedule` from x_T; the integrator's `sample` hands NamedSchedules here."""
    sampler = get_sampler(schedule.sampler)
    process = processes.get(schedule.process)
    with torch.no_grad():
        return sampler.fn(denoiser, x_T, schedule.timesteps, process, generator, **schedule.resolved_params)

