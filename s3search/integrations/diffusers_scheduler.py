"""A diffusers scheduler that runs any solver schedule inside a diffusers pipeline, exactly as `sample` does.

A diffusers pipeline calls the UNet once per entry of `scheduler.timesteps`, on the sample the previous `step`
returned. `S3Scheduler` therefore lists, in `timesteps`, every time at which `s3search.integrator.sample` evaluates
the model (the schedule's evaluation plan: a corrector's evaluation at the predicted point and an implicit
corrector's second evaluation appear as repeated entries, as diffusers' Heun scheduler repeats its times), and
`step` hands back, as `prev_sample`, the state at which `sample` wants the next evaluation.

`step` does not re-implement any update rule: it re-runs `sample` itself with a denoiser that answers from the
model outputs received so far and stops at the first evaluation it has no output for. The update arithmetic is
replayed (O(N^2) cheap tensor operations for N evaluations, no extra model calls), the noise generator is
restored from its state at the first `step`, so the result is bitwise what `sample` returns for the same x_T,
model and generator. The schedule travels as JSON in the scheduler config (`save_pretrained` / `from_pretrained`
/ `from_config`).

What does not map: first_step="mean-x0" (the scheduler does not know the data mean; rejected); first_step=
"zero-x0" and samplers whose first evaluation is not at x_T (EDM churn) cost one discarded UNet call, because the
pipeline evaluates the UNet at x_T before the first `step`; pipelines that skip timesteps (img2img `strength`) or
change the sample between steps (inpainting) are rejected by `step`. Only the process "vp-discrete" (the 1000-step
linear-beta DDPM process) maps onto a diffusers UNet's integer timesteps; the config's betas must match it.
"""

from __future__ import annotations

import json
import math
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput
from diffusers.utils import logging

from .. import processes
from ..denoisers import from_eps, from_v, from_x0
from ..integrator import sample as run_sample
from ..schedule import SolverSchedule, evaluation_plan

__all__ = ["S3Scheduler", "pipeline_times"]

logger = logging.get_logger(__name__)

_ADAPTERS = {"epsilon": from_eps, "sample": from_x0, "v_prediction": from_v}
GeneratorArg = Union[None, torch.Generator, Sequence[torch.Generator]]


class _Pause(Exception):
    """Raised by the replay denoiser at the first evaluation it has no model output for."""

    def __init__(self, x: torch.Tensor, t: float) -> None:
        super().__init__()
        self.x, self.t = x, t


def _load(schedule: Any):
    if isinstance(schedule, (str, dict)):
        from ..exports import load_schedule

        return load_schedule(schedule)
    if hasattr(schedule, "to_dict") and hasattr(schedule, "timesteps"):
        return schedule
    raise ValueError("schedule must be a SolverSchedule, a NamedSchedule, or its JSON (text or dict)")


def _plan_times(schedule: SolverSchedule) -> tuple[list[float], bool]:
    """Model-evaluation times of `sample`, in order, from the schedule's evaluation plan (see schedule.py)."""
    ts = schedule.timesteps
    times: list[float] = []
    have_current = schedule.first_step != "model"
    for i, step in enumerate(schedule.steps):
        if not have_current:
            times.append(ts[i])
        times.extend([ts[i + 1]] * {"none": 0, "unic": 1, "implicit": 2}[step.corrector])
        have_current = step.corrector != "none"
    plan = evaluation_plan(schedule)
    times.extend([ts[-1]] * plan[-1])
    if len(times) != sum(plan):
        raise RuntimeError(f"evaluation plan {plan} and the mapped times {times} disagree")
    return times, schedule.first_step != "model"


def _dry_run_times(schedule: Any) -> tuple[list[float], bool]:
    """Evaluation times of a NamedSchedule, by running it once with a zero denoiser on a tiny input."""
    times: list[float] = []
    first_x: list[torch.Tensor] = []

    def denoiser(x: torch.Tensor, t: float) -> torch.Tensor:
        if not first_x:
            first_x.append(x.clone())
        times.append(float(t))
        return torch.zeros_like(x)

    x_T = torch.randn((1, 3), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    run_sample(denoiser, x_T, schedule, generator=torch.Generator().manual_seed(1))
    return times, not (first_x and torch.equal(first_x[0], x_T))


def pipeline_times(schedule: Any) -> tuple[list[float], bool]:
    """(process times of the pipeline's UNet calls, whether the first call's output is discarded)."""
    if isinstance(schedule, SolverSchedule):
        return _plan_times(schedule)
    return _dry_run_times(schedule)


def _config_betas(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str,
                  trained_betas: Optional[Sequence[float]]) -> np.ndarray:
    if trained_betas is not None:
        return np.asarray(trained_betas, dtype=np.float64)
    if beta_schedule == "linear":
        return np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
    if beta_schedule == "scaled_linear":
        return np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64) ** 2
    raise ValueError(f"beta_schedule={beta_schedule!r} is not supported (linear, scaled_linear or trained_betas)")


class S3Scheduler(SchedulerMixin, ConfigMixin):
    """Runs a solver schedule (JSON in the config) in any diffusers pipeline loop; see the module docstring.

    Typical use, keeping the pipeline's beta settings:
        pipe.scheduler = S3Scheduler.from_config(pipe.scheduler.config, schedule=schedule.to_dict())
    """

    config_name = "scheduler_config.json"
    order = 1

    @register_to_config
    def __init__(
        self,
        schedule: Optional[Union[dict, str]] = None,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Optional[list[float]] = None,
        prediction_type: str = "epsilon",
    ) -> None:
        if schedule is None:
            raise ValueError("schedule is required: a SolverSchedule / NamedSchedule or its JSON")
        sched = _load(schedule)
        # Keep the config JSON-clean and canonical whatever form the schedule came in.
        self.register_to_config(schedule=sched.to_dict())
        if prediction_type not in _ADAPTERS:
            raise ValueError(f"prediction_type={prediction_type!r} must be one of {', '.join(_ADAPTERS)}")
        if sched.process != "vp-discrete":
            raise ValueError(f"schedule.process={sched.process!r}: a diffusers UNet takes discrete training steps, "
                             "so S3Scheduler runs schedules on the 'vp-discrete' process only")
        proc = processes.get(sched.process)
        betas = _config_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        ours = np.asarray(proc.betas, dtype=np.float64)
        if betas.shape != ours.shape or not np.allclose(betas, ours, rtol=1e-6, atol=0.0):
            raise ValueError("num_train_timesteps/beta_start/beta_end/beta_schedule do not give the betas of the "
                             f"schedule's process {sched.process!r} (1000 linear betas from 1e-4 to 0.02)")
        if getattr(sched, "first_step", "model") == "mean-x0":
            raise ValueError("schedule.first_step='mean-x0' needs the data mean, which a diffusers scheduler does "
                             "not have; use first_step='zero-x0' or 'model'")
        self._schedule = sched
        self._process = proc
        self._adapter = _ADAPTERS[prediction_type]
        self.init_noise_sigma = 1.0  # VP: x_T ~ N(0, I)
        self.set_timesteps()

    # ----- diffusers interface ---------------------------------------------------------------------------------
    @property
    def schedule(self):
        return self._schedule

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device: Union[str, torch.device] = None,
                      timesteps: Optional[list[int]] = None, sigmas: Optional[list[float]] = None) -> None:
        """List the UNet calls of the schedule; the schedule fixes the grid, so custom grids are refused."""
        if timesteps is not None or sigmas is not None:
            raise ValueError("timesteps/sigmas: the solver schedule fixes the grid; build a schedule with the grid "
                             "you want instead")
        times, discard_first = pipeline_times(self._schedule)
        if discard_first:
            times = [float(self._schedule.timesteps[0])] + times
        if num_inference_steps is not None and num_inference_steps != len(times):
            logger.warning(f"num_inference_steps={num_inference_steps} ignored: the solver schedule makes "
                           f"{len(times)} UNet calls")
        model_times = [self._process.model_time(t) for t in times]
        integral = all(abs(m - round(m)) < 1e-9 for m in model_times)
        self._times = times
        self._discard_first = discard_first
        self.num_inference_steps = len(times)
        self.timesteps = (torch.tensor([round(m) for m in model_times], dtype=torch.int64) if integral
                          else torch.tensor(model_times, dtype=torch.float32)).to(device)
        self._reset()

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        return sample

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor,
                  timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = alpha x0 + sigma eps at the given training-step indices."""
        idx = torch.as_tensor(timesteps).reshape(-1).tolist()
        n = self.config.num_train_timesteps
        t = [(float(i) + 1.0) / n for i in idx]
        shape = (-1,) + (1,) * (original_samples.ndim - 1)
        alpha = torch.tensor([self._process.alpha(s) for s in t], dtype=original_samples.dtype,
                             device=original_samples.device).reshape(shape)
        sigma = torch.tensor([self._process.sigma(s) for s in t], dtype=original_samples.dtype,
                             device=original_samples.device).reshape(shape)
        return alpha * original_samples + sigma * noise

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor,
             generator: GeneratorArg = None, return_dict: bool = True) -> Union[SchedulerOutput, tuple]:
        """Take the model output at `sample`; return the state of the next UNet call (or the final result)."""
        k = self._step_index
        if k >= len(self._times):
            raise ValueError(f"step was called {k + 1} times; this schedule makes {len(self._times)} UNet calls "
                             "(call set_timesteps to start again)")
        expected = self.timesteps[k].item()
        if not math.isclose(float(torch.as_tensor(timestep).item()), float(expected), rel_tol=0, abs_tol=1e-4):
            raise ValueError(f"timestep={timestep!r}: expected scheduler.timesteps[{k}]={expected}; S3Scheduler "
                             "must be stepped through every entry of its timesteps, in order")
        if k == 0:
            self._x_T = sample
            self._generator_state = _snapshot(generator)
        elif self._last is not None and not torch.equal(sample, self._last):
            raise ValueError("sample differs from the prev_sample of the previous step; S3Scheduler needs the "
                             "pipeline to evaluate the UNet at exactly the sample it returned")
        if not (k == 0 and self._discard_first):
            t = self._times[k]
            to_data = self._adapter(lambda x, _tm: model_output, self._process)
            self._outputs.append(to_data(sample, t))
        x_next, t_next = self._replay(generator)
        self._step_index += 1
        if t_next is None:
            if self._step_index != len(self._times):
                raise RuntimeError("the schedule finished before its listed UNet calls; please report this")
            self._last = None
        else:
            planned = self._times[self._step_index] if self._step_index < len(self._times) else None
            if planned is None or not math.isclose(t_next, planned, rel_tol=1e-12, abs_tol=1e-15):
                raise RuntimeError(f"sample asked for the model at t={t_next}, the plan says {planned}; "
                                   "please report this")
            self._last = x_next
        if not return_dict:
            return (x_next,)
        return SchedulerOutput(prev_sample=x_next)

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # ----- internals -------------------------------------------------------------------------------------------
    def _reset(self) -> None:
        self._step_index = 0
        self._outputs: list[torch.Tensor] = []
        self._x_T: Optional[torch.Tensor] = None
        self._last: Optional[torch.Tensor] = None
        self._generator_state: Any = None

    def _replay(self, generator: GeneratorArg) -> tuple[torch.Tensor, Optional[float]]:
        """Run `sample` on the outputs so far: (state at the next evaluation, its time) or (result, None)."""
        outputs = self._outputs
        calls = [0]

        def denoiser(x: torch.Tensor, t: float) -> torch.Tensor:
            k = calls[0]
            calls[0] += 1
            if k < len(outputs):
                return outputs[k]
            raise _Pause(x, t)

        gen = _restore(generator, self._generator_state)
        try:
            result = run_sample(denoiser, self._x_T, self._schedule, generator=gen)
        except _Pause as pause:
            _copy_state(gen, generator)
            return pause.x, float(pause.t)
        _copy_state(gen, generator)
        return result, None


def _snapshot(generator: GeneratorArg) -> Any:
    if generator is None:
        return None
    if isinstance(generator, torch.Generator):
        return generator.get_state()
    return [g.get_state() for g in generator]


def _clone(g: torch.Generator, state: torch.Tensor) -> torch.Generator:
    out = torch.Generator(device=g.device)
    out.set_state(state)
    return out


def _restore(generator: GeneratorArg, state: Any) -> GeneratorArg:
    """Fresh generators at the state of the first step, so every replay draws the same noise."""
    if generator is None or state is None:
        if generator is not None or state is not None:
            raise ValueError("generator: pass the same generator (or None) to every step")
        return None
    if isinstance(generator, torch.Generator):
        return _clone(generator, state)
    if len(generator) != len(state):
        raise ValueError("generator: pass the same list of generators to every step")
    return [_clone(g, s) for g, s in zip(generator, state)]


def _copy_state(src: GeneratorArg, dst: GeneratorArg) -> None:
    # The caller's generator ends where a straight run of `sample` would have left it.
    if src is None:
        return
    if isinstance(src, torch.Generator):
        dst.set_state(src.get_state())  # type: ignore[union-attr]
        return
    for s, d in zip(src, dst):  # type: ignore[arg-type]
        d.set_state(s.get_state())
