"""Processes and time inputs of local models: scheduler configs, the registered process a model is offered on."""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
import torch

from ... import processes
from ...denoisers import Denoiser
from .registry_file import LocalModelEntry

__all__ = ["process_from_scheduler_config", "process_view", "exposure", "target_name", "registered", "entry_process",
           "time_map"]


def process_from_scheduler_config(config: dict[str, Any], where: str = "scheduler") -> processes.VPDiscrete:
    """The VPDiscrete process of a diffusers scheduler config, with betas computed by diffusers itself."""
    from diffusers import DDPMScheduler

    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
            "rescale_betas_zero_snr")
    kwargs = {k: config[k] for k in keys if k in config and config[k] is not None}
    if kwargs.get("rescale_betas_zero_snr"):
        raise ValueError(f"{where}: rescale_betas_zero_snr=true gives alpha = 0 at the last step, which no "
                         "logSNR-based sampler can start from; not supported")
    try:
        betas = DDPMScheduler(**kwargs).betas.double().tolist()
    except (NotImplementedError, ValueError, TypeError) as e:
        raise ValueError(f"{where}: unsupported noise schedule {kwargs}: {e}") from None
    if not all(0.0 < b < 1.0 for b in betas):
        raise ValueError(f"{where}: betas must lie in (0, 1)")
    return processes.VPDiscrete(betas=tuple(betas))


def process_view(denoiser: Denoiser, target: str | processes.NoiseProcess) -> Denoiser:
    """The same model on another process, matched by logSNR: x_src = (alpha_src / alpha_dst) x at equal lambda.

    Exact inside the source process's lambda range; outside it the source time is clamped to its end (a
    discrete model has no noise levels beyond its first and last step).
    """
    src, dst = denoiser.process, processes.get(target)
    if src == dst:
        return denoiser

    def fn(x: torch.Tensor, t: float) -> torch.Tensor:
        t_src = src.t_of_lambda(dst.lambda_(t))
        t_src = min(max(t_src, src.t_min), src.t_max)
        return denoiser(x * (src.alpha(t_src) / dst.alpha(t)), t_src)

    return Denoiser(fn=fn, process=dst, data_mean=denoiser.data_mean, name=denoiser.name)


def exposure(proc: processes.NoiseProcess, entry: LocalModelEntry) -> tuple[Optional[processes.NoiseProcess], str]:
    """The registered process a model on `proc` is offered on, and a note for its provenance.

    (registered, "as trained") when `proc` is a registered process (up to float32 rounding of default DDPM
    betas) and the entry names no expose_process; (None, note) when the model must go through `process_view`
    onto `target_name(entry)`.
    """
    if entry.expose_process is None and proc.name in processes.names():
        registered_proc = processes.get(proc.name)
        same = registered_proc == proc
        if not same and isinstance(proc, processes.VPDiscrete) and len(proc.betas) == len(registered_proc.betas):
            same = bool(np.allclose(proc.betas, registered_proc.betas, rtol=1e-6, atol=0.0))
        if same:
            return registered_proc, "as trained"
    note = (f"viewed on {target_name(entry)} from {proc.name} (sigma_ve {proc.sigma_ve(proc.t_min):.4g}.."
            f"{proc.sigma_ve(proc.t_max):.4g})")
    return None, note


def target_name(entry: LocalModelEntry) -> str:
    return entry.expose_process or "edm"


def registered(denoiser: Denoiser, entry: LocalModelEntry) -> tuple[Denoiser, str]:
    """Put the denoiser on a registered process, which is what schedules can name.

    A diffusers model with the default DDPM betas is the registered vp-discrete process up to the float32
    rounding of its betas; any other beta schedule is exposed through `process_view` on expose_process (default
    edm), since a schedule can only name registered processes.
    """
    same, note = exposure(denoiser.process, entry)
    if same is not None:
        denoiser.process = same
        return denoiser, note
    return process_view(denoiser, target_name(entry)), note


def entry_process(entry: LocalModelEntry, value: Any) -> processes.NoiseProcess:
    if isinstance(value, dict):
        return process_from_scheduler_config(value, f"{entry.where}.process")
    return processes.get(value)


def time_map(entry: LocalModelEntry, proc: processes.NoiseProcess) -> Optional[Callable[[float], float]]:
    mode = entry.time_input
    if mode == "auto":
        return None  # the adapters give a discrete network its step index and others t
    if mode == "t":
        return lambda t: t
    if mode == "t*1000":
        return lambda t: 1000.0 * t
    if mode == "sigma":
        return proc.sigma_ve
    if not hasattr(proc, "model_time"):
        raise ValueError(entry.err("time_input", f"'step' needs a discrete process, not {proc.name}"))
    return proc.model_time
