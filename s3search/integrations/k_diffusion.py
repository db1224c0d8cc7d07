"""A k-diffusion-style sampler function that runs any solver schedule: `sample_schedule(model, x, sigmas, schedule)`.

k-diffusion's convention: `model(x, sigma * s_in, **extra_args) -> denoised`, with x on the VE / EDM scale
(x = x0 + sigma * noise) and `sigmas` a decreasing grid that ends in 0.0 when the last step denoises. The schedule's
per-step choices are applied on `sigmas`: when they are the schedule's own grid (as `exports.k_diffusion_sigmas`
returns, float32 included) its exact times are kept; otherwise the schedule is re-timed to the given sigmas
through its process (t = t_of_sigma_ve(sigma)). The work is done by `s3search.integrator.sample`, on the
schedule's process: a VP schedule sees x_vp = alpha x_ve and D_vp(x, t) = model(x / alpha, sigma / alpha), which is
the same exponential-integrator step (docs/math.md §2), so the result does not depend on the frame.

first_step="mean-x0" takes E[x0 | x_T] to be the data mean, which a k-diffusion model does not know: pass it as
`data_mean` (the k-diffusion and ComfyUI exports carry it as `data_mean`).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Callable, Optional

import torch

from .. import processes
from ..integrator import sample
from ..noise import GeneratorArg

__all__ = ["sample_schedule", "retime"]


def _sigma_ve(proc: processes.NoiseProcess, t: float) -> float:
    # sigma / alpha rather than exp(-lambda): exact for EDM, where the time is the sigma itself.
    return proc.sigma(t) / proc.alpha(t)


def _time_of(proc: processes.NoiseProcess, sigma: float) -> float:
    return sigma if isinstance(proc, processes.EDM) else proc.t_of_sigma_ve(sigma)


def retime(schedule: Any, sigmas: Any) -> Any:
    """`schedule` with its times moved to the k-diffusion grid `sigmas` (unchanged when they already match)."""
    values = [float(s) for s in torch.as_tensor(sigmas).detach().reshape(-1).cpu().tolist()]
    n = len(schedule.timesteps)
    if schedule.final == "denoise":
        if len(values) != n + 1 or values[-1] != 0.0:
            raise ValueError(f"sigmas must hold {n + 1} values ending in 0.0 for this schedule "
                             f"({n} times, final=denoise); got {len(values)} ending in {values[-1] if values else None}")
        values = values[:-1]
    elif len(values) != n or values[-1] <= 0.0:
        raise ValueError(f"sigmas must hold {n} positive values for this schedule (final=none); got {len(values)}")
    if any(not math.isfinite(v) or v <= 0.0 for v in values):
        raise ValueError("sigmas must be finite and positive before the trailing 0.0")
    proc = processes.get(schedule.process)
    own = [_sigma_ve(proc, float(t)) for t in schedule.timesteps]
    # float32 round trips of the schedule's own grid keep its exact times.
    if all(math.isclose(a, b, rel_tol=2e-6, abs_tol=0.0) for a, b in zip(values, own)):
        return schedule
    try:
        return replace(schedule, timesteps=tuple(_time_of(proc, v) for v in values))
    except ValueError as e:
        raise ValueError(f"sigmas do not fit the schedule's process {schedule.process!r}: {e}") from None


def sample_schedule(model: Callable[..., torch.Tensor], x: torch.Tensor, sigmas: Any, schedule: Any,
                    generator: GeneratorArg = None, extra_args: Optional[dict[str, Any]] = None,
                    callback: Optional[Callable[[dict[str, Any]], None]] = None,
                    disable: Any = None, data_mean: Any = None) -> torch.Tensor:
    """Run `schedule` on the grid `sigmas` with a k-diffusion model; x is the noisy input at sigmas[0].

    Returns the denoised sample (final=denoise) or x at sigmas[-1] on the VE scale (final=none). `callback`
    receives k-diffusion's dict {x, i, sigma, sigma_hat, denoised} at every model evaluation; `disable` is accepted
    for signature compatibility (there is no progress bar). `data_mean`: the data mean, for first_step="mean-x0"
    (one sample's shape, or broadcastable to it).
    """
    extra_args = {} if extra_args is None else extra_args
    sched = retime(schedule, sigmas)
    if getattr(sched, "first_step", "model") == "mean-x0" and data_mean is None:
        raise ValueError("schedule.first_step='mean-x0' needs the data mean: pass data_mean=... (the export's "
                         "data_mean)")
    proc = processes.get(sched.process)
    s_in = x.new_ones([x.shape[0]])
    calls = [0]

    def denoiser(x_p: torch.Tensor, t: float) -> torch.Tensor:
        alpha, sigma = proc.alpha(t), _sigma_ve(proc, t)
        x_ve = x_p if alpha == 1.0 else x_p / alpha
        denoised = model(x_ve, sigma * s_in, **extra_args)
        if callback is not None:
            callback({"x": x_ve, "i": calls[0], "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        calls[0] += 1
        return denoised

    # x0 is the same on every frame, so the mean is handed over as it is (the integrator reads this attribute).
    denoiser.data_mean = data_mean  # type: ignore[attr-defined]

    alpha_0 = proc.alpha(sched.timesteps[0])
    out = sample(denoiser, x if alpha_0 == 1.0 else x * alpha_0, sched, generator=generator)
    if sched.final == "none":
        alpha_n = proc.alpha(sched.timesteps[-1])
        return out if alpha_n == 1.0 else out / alpha_n
    return out
