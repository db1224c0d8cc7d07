"""A diffusers scheduler that runs any solver schedule inside a diffusers pipeline, exactly as `sample` does.

A diffusers pipeline calls its network once per entry of `scheduler.timesteps`, on the sample the previous `step`
returned. `S3Scheduler` therefore lists, in `timesteps`, every time at which `s3search.integrator.sample`
evaluates the model (the schedule's evaluation plan: a corrector's evaluation at the predicted point and an
implicit corrector's second evaluation appear as repeated entries, as diffusers' Heun scheduler repeats its
times), and `step` hands back, as `prev_sample`, the state at which `sample` wants the next evaluation.

`step` does not re-implement any update rule: it feeds each model output to an `integrator.Integration`, the
resumable form of `sample` that `sample` itself runs, so every step costs one evaluation's share of the update
arithmetic and the result is bitwise what `sample` returns for the same x_T, network, noise and generator. A
NamedSchedule (a sampler outside the schedule space) runs `sample` on a helper thread that pauses at each model
call, which is also O(1) a step.

The network and its process come from the scheduler config, so `S3Scheduler.from_config(pipe.scheduler.config,
schedule=...)` keeps what the pipeline's own scheduler says:

- a DDPM / DDIM / Euler / PNDM / DPM-Solver config (betas: linear, scaled_linear, squaredcos_cap_v2 or
  trained_betas; prediction_type epsilon, v_prediction or sample): the network is a discrete VP model with those
  betas, built as s3search's model registry builds it (`models.local.noise.process_from_scheduler_config`), and
  its `timesteps` are (fractional) training-step indices;
- a flow-matching config (FlowMatchEulerDiscreteScheduler: it has `shift`), or prediction_type="flow_prediction":
  the network predicts the velocity on the flow process and takes 1000 t (SD3, FLUX).

A schedule on the model's own process (vp-discrete with the default DDPM betas, flow) runs on it directly; a
schedule on any other process (Stable Diffusion's models are searched on edm) runs on the model through the
registry's logSNR view (`models.local.noise.process_view`): the pipeline's latents hold x on the schedule's
process, `scale_model_input` multiplies them by alpha_model / alpha_schedule at the matched time, and the
network's timestep is that time's. The shift of a flow pipeline is already in a flow schedule's times, so the
`mu` and the default sigmas a flow pipeline passes to `set_timesteps` are ignored.

first_step="mean-x0" takes the data mean from the config field `data_mean` (given at construction, saved with
the config; shaped like one sample of the pipeline's latents, or broadcastable to it). first_step="zero-x0" /
"mean-x0" and samplers whose first evaluation is not at x_T (EDM churn) cost one discarded network call, because
the pipeline calls its network at x_T before the first `step`. Pipelines that skip timesteps (img2img
`strength`) or change the sample between steps (inpainting) are refused by `step`.
"""

from __future__ import annotations

import math
import queue
import threading
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput
from diffusers.utils import logging

from .. import processes
from ..denoisers import Denoiser, from_eps, from_flow, from_v, from_x0
from ..integrator import Integration, sample as run_sample
from ..schedule import SolverSchedule, evaluation_plan

__all__ = ["S3Scheduler", "pipeline_times"]

logger = logging.get_logger(__name__)

_ADAPTERS = {"epsilon": from_eps, "sample": from_x0, "v_prediction": from_v, "flow_prediction": from_flow}
GeneratorArg = Union[None, torch.Generator, Sequence[torch.Generator]]


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
    """(process times of the pipeline's network calls, whether the first call's output is discarded)."""
    if isinstance(schedule, SolverSchedule):
        return _plan_times(schedule)
    return _dry_run_times(schedule)


# ----- the network's side ---------------------------------------------------------------------------------------
def _model_process(config: dict[str, Any], prediction: str) -> processes.NoiseProcess:
    if prediction == "flow_prediction":
        return processes.get("flow")
    from ..models.local.noise import process_from_scheduler_config

    return process_from_scheduler_config(config, "S3Scheduler config")


def _same_process(schedule_proc: processes.NoiseProcess, model_proc: processes.NoiseProcess) -> bool:
    """Whether the schedule runs on the network's own process (the registry's rule, models.local.noise.exposure):
    a discrete model with the default DDPM betas up to their float32 rounding is the registered vp-discrete."""
    if schedule_proc == model_proc:
        return True
    return (isinstance(schedule_proc, processes.VPDiscrete) and isinstance(model_proc, processes.VPDiscrete)
            and len(schedule_proc.betas) == len(model_proc.betas)
            and bool(np.allclose(schedule_proc.betas, model_proc.betas, rtol=1e-6, atol=0.0)))


@dataclass(frozen=True)
class _Call:
    """One network call: the schedule's time, the model-process time it is evaluated at, the input scaling."""

    t: float
    t_model: float
    scale: Optional[float]      # x_model = scale * x_schedule; None: the same process, nothing to scale
    network_time: float


def _calls(times: list[float], schedule_proc: processes.NoiseProcess, model_proc: processes.NoiseProcess,
           direct: bool, num_train_timesteps: int) -> list[_Call]:
    out = []
    for t in times:
        if direct:
            t_model, scale = t, None
        else:
            # As process_view computes it, so the network sees the very numbers a search evaluated it on.
            t_model = model_proc.t_of_lambda(schedule_proc.lambda_(t))
            t_model = min(max(t_model, model_proc.t_min), model_proc.t_max)
            scale = model_proc.alpha(t_model) / schedule_proc.alpha(t)
        if isinstance(model_proc, processes.VPDiscrete):
            network_time = model_proc.model_time(t_model)
        else:
            network_time = float(num_train_timesteps) * t_model
        out.append(_Call(t, t_model, scale, network_time))
    return out


# ----- FLUX's packed latents ------------------------------------------------------------------------------------
def _unpacked_size(packed: torch.Tensor, size: Optional[tuple[int, int]]) -> Optional[tuple[int, int]]:
    """The latent (height, width) of FLUX-packed latents [B, (h/2)(w/2), 4C]: given, or square when that fits."""
    if packed.ndim != 3 or packed.shape[-1] % 4:
        return None
    if size is not None:
        h, w = size
        if (h // 2) * (w // 2) != packed.shape[1]:
            raise ValueError(f"latent_size={size}: {packed.shape[1]} packed patches are not (h/2)(w/2)")
        return h, w
    side = math.isqrt(packed.shape[1])
    return (2 * side, 2 * side) if side * side == packed.shape[1] else None


def _unpack(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    b, _, c = x.shape
    h, w = size
    return x.view(b, h // 2, w // 2, c // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c // 4, h, w)


def _pack(x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


# ----- named schedules: sample on a helper thread, paused at each model call ------------------------------------
class _Stopped(Exception):
    """Unwinds a paused run that the pipeline will not finish."""


class _ThreadedRun:
    """`Integration`'s interface for a NamedSchedule: `sample` runs on a thread that waits at each model call.

    Only one of the two threads runs at a time (each waits for the other's hand-over), so the generator sees the
    draws of a straight run, in the same order.
    """

    def __init__(self, x_T: torch.Tensor, schedule: Any, generator: GeneratorArg) -> None:
        self._to_worker: queue.SimpleQueue = queue.SimpleQueue()
        self._to_caller: queue.SimpleQueue = queue.SimpleQueue()
        self.wanted: Optional[tuple[torch.Tensor, float]] = None
        self.result: Optional[torch.Tensor] = None
        threading.Thread(target=self._work, args=(x_T, schedule, generator), daemon=True,
                         name="s3search-named-run").start()
        self._receive()

    @property
    def done(self) -> bool:
        return self.wanted is None

    def _work(self, x_T: torch.Tensor, schedule: Any, generator: GeneratorArg) -> None:
        def denoiser(x: torch.Tensor, t: float) -> torch.Tensor:
            self._to_caller.put(("wanted", (x, float(t))))
            kind, data = self._to_worker.get()
            if kind == "stop":
                raise _Stopped
            return data

        try:
            out = run_sample(denoiser, x_T, schedule, generator=generator)
        except _Stopped:
            return
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread, which raises it
            self._to_caller.put(("error", e))
            return
        self._to_caller.put(("done", out))

    def _receive(self) -> None:
        kind, value = self._to_caller.get()
        if kind == "error":
            self.wanted = None
            raise value
        self.wanted, self.result = (value, None) if kind == "wanted" else (None, value)

    def give(self, data: torch.Tensor) -> None:
        self._to_worker.put(("data", data))
        self._receive()

    def close(self) -> None:
        if self.wanted is not None:
            self._to_worker.put(("stop", None))
            self.wanted = None


# ----- the scheduler --------------------------------------------------------------------------------------------
def _prediction(prediction_type: Optional[str], shift: Optional[float], schedule: Any) -> str:
    if prediction_type is None:
        # No prediction_type in the config: a flow-matching scheduler's (it has a shift), or a flow schedule.
        flow = shift is not None or getattr(schedule, "process", None) == "flow"
        return "flow_prediction" if flow else "epsilon"
    if prediction_type not in _ADAPTERS:
        raise ValueError(f"prediction_type={prediction_type!r} must be one of {', '.join(_ADAPTERS)}")
    return prediction_type


def _as_mean(data_mean: Any) -> Optional[torch.Tensor]:
    if data_mean is None:
        return None
    try:
        mean = torch.as_tensor(data_mean, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"data_mean must be a number or a (nested) list of numbers: {e}") from None
    if not bool(torch.isfinite(mean).all()):
        raise ValueError("data_mean must be finite")
    return mean


def _is_flux_default(sigmas: Any) -> bool:
    """FluxPipeline passes np.linspace(1, 1/n, n) whenever its caller gives no sigmas."""
    values = np.asarray(sigmas, dtype=np.float64).reshape(-1)
    n = len(values)
    return n > 0 and bool(np.allclose(values, np.linspace(1.0, 1.0 / n, n), rtol=0.0, atol=1e-9))


class S3Scheduler(SchedulerMixin, ConfigMixin):
    """Runs a solver schedule (JSON in the config) in any diffusers pipeline loop; see the module docstring.

    Typical use, keeping the pipeline's network settings:
        pipe.scheduler = S3Scheduler.from_config(pipe.scheduler.config, schedule=schedule.to_dict())

    Two attributes serve pipelines that do not hand `step` everything: `noise_generator` is used by the
    stochastic steps when the pipeline passes no generator to `step` (SD3 and FLUX never do); `latent_size`
    (latent height, width) unpacks FLUX's packed latents of a non-square image, so that the noise and the data
    mean are laid out as on unpacked latents (square images are unpacked without it).
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
        rescale_betas_zero_snr: bool = False,
        prediction_type: Optional[str] = None,
        shift: Optional[float] = None,
        data_mean: Optional[Any] = None,
    ) -> None:
        if schedule is None:
            raise ValueError("schedule is required: a SolverSchedule / NamedSchedule or its JSON")
        sched = _load(schedule)
        prediction = _prediction(prediction_type, shift, sched)
        mean = _as_mean(data_mean)
        # Keep the config JSON-clean and canonical whatever form the schedule and the mean came in.
        self.register_to_config(schedule=sched.to_dict(), prediction_type=prediction,
                                data_mean=None if mean is None else mean.tolist())
        if not isinstance(sched, SolverSchedule) and getattr(sched, "first_step", "model") == "mean-x0":
            raise ValueError("first_step='mean-x0' applies to solver schedules only")
        if getattr(sched, "first_step", "model") == "mean-x0" and mean is None:
            raise ValueError("schedule.first_step='mean-x0' needs the data mean: pass data_mean=... (one sample's "
                             "mean, shaped like the pipeline's latents without the batch dimension)")
        model_proc = _model_process({"num_train_timesteps": num_train_timesteps, "beta_start": beta_start,
                                     "beta_end": beta_end, "beta_schedule": beta_schedule,
                                     "trained_betas": trained_betas,
                                     "rescale_betas_zero_snr": rescale_betas_zero_snr}, prediction)
        self._schedule = sched
        self._process = processes.get(sched.process)
        self._model_process = model_proc
        self._direct = _same_process(self._process, model_proc)
        self._adapter = _ADAPTERS[prediction]
        self._data_mean = mean
        # The scale of the start noise on the schedule's process, as s3search's evaluator draws x_T.
        self.init_noise_sigma = self._process.sigma(float(sched.timesteps[0]))
        self.noise_generator: GeneratorArg = None
        self.latent_size: Optional[tuple[int, int]] = None
        self._run: Any = None
        self.set_timesteps()

    # ----- what the schedule runs on ---------------------------------------------------------------------------
    @property
    def schedule(self):
        return self._schedule

    @property
    def model_process(self) -> processes.NoiseProcess:
        """The network's own process, from the config (what s3search's model registry builds for this model)."""
        return self._model_process

    def denoiser(self, net: Any) -> Denoiser:
        """`net(x, network_time) -> output` as D(x, t) on the schedule's process, as `step` converts outputs.

        With `s3search.sample` this gives what the pipeline gives with this scheduler, for networks without
        prompts (DDPM / DDIM pipelines); text-to-image pipelines have `s3search.models.pipelines` for that.
        """
        time_map = None if isinstance(self._model_process, processes.VPDiscrete) else \
            (lambda t: float(self.config.num_train_timesteps) * t)
        model = self._adapter(net, self._model_process, time_map=time_map)
        if self._direct:
            model.process = self._process
            model.data_mean = self._data_mean
            return model
        from ..models.local.noise import process_view

        view = process_view(model, self._process)
        view.data_mean = self._data_mean
        return view

    # ----- diffusers interface ---------------------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: Optional[int] = None, device: Union[str, torch.device] = None,
                      timesteps: Optional[list[int]] = None, sigmas: Optional[list[float]] = None,
                      mu: Optional[float] = None) -> None:
        """List the network calls of the schedule; the schedule fixes the grid, so custom grids are refused.

        `mu` (a flow pipeline's resolution shift) is ignored: the schedule's times already hold the shift they
        were searched with. So are the sigmas FluxPipeline passes when its caller gives none.
        """
        if timesteps is not None or (sigmas is not None and not _is_flux_default(sigmas)):
            raise ValueError("timesteps/sigmas: the solver schedule fixes the grid; build a schedule with the grid "
                             "you want instead")
        times, discard_first = pipeline_times(self._schedule)
        if discard_first:
            times = [float(self._schedule.timesteps[0])] + times
        wanted = num_inference_steps if sigmas is None else len(sigmas)
        if wanted is not None and wanted != len(times):
            logger.warning(f"num_inference_steps={wanted} ignored: the solver schedule makes "
                           f"{len(times)} network calls")
        self._calls = _calls(times, self._process, self._model_process, self._direct,
                             self.config.num_train_timesteps)
        network_times = [c.network_time for c in self._calls]
        integral = all(abs(m - round(m)) < 1e-9 for m in network_times)
        self._times = times
        self._discard_first = discard_first
        self.num_inference_steps = len(times)
        self.timesteps = (torch.tensor([round(m) for m in network_times], dtype=torch.int64) if integral
                          else torch.tensor(network_times, dtype=torch.float32)).to(device)
        self._reset()

    def set_begin_index(self, begin_index: int = 0) -> None:
        if begin_index != 0:
            raise ValueError(f"begin_index={begin_index}: S3Scheduler runs the whole schedule (img2img-style "
                             "starts part-way are not supported)")

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        """The network's input: the latents on the schedule's process, scaled onto the model's at the same logSNR."""
        k = self._step_index
        self._scaled = k
        scale = self._calls[k].scale if k < len(self._calls) else None
        return sample if scale is None else sample * scale

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor,
                  timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = alpha x0 + sigma eps on the schedule's process, at the times of the given network timesteps."""
        values = torch.as_tensor(timesteps).reshape(-1).tolist()
        model = self._model_process
        n = self.config.num_train_timesteps
        t_model = [(float(v) + 1.0) / len(model.betas) if isinstance(model, processes.VPDiscrete) else float(v) / n
                   for v in values]
        t = t_model if self._direct else [self._process.t_of_lambda(model.lambda_(s)) for s in t_model]
        shape = (-1,) + (1,) * (original_samples.ndim - 1)
        alpha = torch.tensor([self._process.alpha(s) for s in t], dtype=original_samples.dtype,
                             device=original_samples.device).reshape(shape)
        sigma = torch.tensor([self._process.sigma(s) for s in t], dtype=original_samples.dtype,
                             device=original_samples.device).reshape(shape)
        return alpha * original_samples + sigma * noise

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor,
             generator: GeneratorArg = None, return_dict: bool = True, eta: float = 0.0,
             use_clipped_model_output: Optional[bool] = None) -> Union[SchedulerOutput, tuple]:
        """Take the network output at `sample`; return the state of the next network call (or the result).

        `eta` and `use_clipped_model_output` are what DDIM pipelines pass; the schedule sets eta per step, so
        only their defaults are accepted.
        """
        if eta != 0.0 or use_clipped_model_output:
            raise ValueError("eta / use_clipped_model_output: the solver schedule fixes eta per step; run the "
                             "pipeline with eta=0.0 and without use_clipped_model_output")
        k = self._step_index
        if k >= len(self._calls):
            raise ValueError(f"step was called {k + 1} times; this schedule makes {len(self._calls)} network "
                             "calls (call set_timesteps to start again)")
        expected = self.timesteps[k].item()
        if not math.isclose(float(torch.as_tensor(timestep).item()), float(expected), rel_tol=0, abs_tol=1e-4):
            raise ValueError(f"timestep={timestep!r}: expected scheduler.timesteps[{k}]={expected}; S3Scheduler "
                             "must be stepped through every entry of its timesteps, in order")
        call = self._calls[k]
        if call.scale is not None and self._scaled != k:
            raise ValueError(f"the pipeline did not call scale_model_input before step {k}: a schedule on process "
                             f"{self._process.name!r} runs on this network (process {self._model_process.name}) "
                             "through scaled inputs, which a pipeline without scale_model_input (DDPMPipeline, "
                             "DDIMPipeline) cannot give; use a schedule on the network's own process")
        generator = self.noise_generator if generator is None else generator
        if k == 0:
            flow = self.config.prediction_type == "flow_prediction"
            self._layout = _unpacked_size(sample, self.latent_size) if flow else None
            self._run = self._start(self._state(sample), generator)
            self._generator = generator
        else:
            if generator is not self._generator:
                raise ValueError("generator: pass the same generator (or None) to every step")
            if self._last is None or not (sample is self._last or torch.equal(sample, self._last)):
                raise ValueError("sample differs from the prev_sample of the previous step; S3Scheduler needs the "
                                 "pipeline to evaluate its network at exactly the sample it returned")
        if not (k == 0 and self._discard_first):
            if self._run.done:
                raise RuntimeError("the schedule finished before its listed network calls; please report this")
            self._run.give(self._data(model_output, sample, call))
        self._step_index += 1
        x_next = self._advance()
        if not return_dict:
            return (x_next,)
        return SchedulerOutput(prev_sample=x_next)

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def __del__(self) -> None:
        run = getattr(self, "_run", None)
        try:
            if run is not None:
                run.close()   # a paused named run's thread would wait for ever otherwise
        except Exception:  # noqa: BLE001 - at interpreter exit the modules it needs may be gone
            pass

    # ----- internals -------------------------------------------------------------------------------------------
    def _reset(self) -> None:
        if self._run is not None:
            self._run.close()
        self._run = None
        self._step_index = 0
        self._scaled: Optional[int] = None
        self._last: Optional[torch.Tensor] = None
        self._generator: GeneratorArg = None
        self._layout: Optional[tuple[int, int]] = None

    def _start(self, x_T: torch.Tensor, generator: GeneratorArg) -> Any:
        if isinstance(self._schedule, SolverSchedule):
            # The pipeline owns its generator between steps: no draw on another thread meanwhile.
            return Integration(x_T, self._schedule, generator, data_mean=self._data_mean, draw_ahead=False)
        return _ThreadedRun(x_T, self._schedule, generator)

    def _state(self, x: torch.Tensor) -> torch.Tensor:
        """The pipeline's tensor in the layout `sample` runs on (FLUX's packed latents unpacked)."""
        return x if self._layout is None else _unpack(x, self._layout)

    def _pipeline(self, x: torch.Tensor) -> torch.Tensor:
        return x if self._layout is None else _pack(x)

    def _data(self, model_output: torch.Tensor, sample: torch.Tensor, call: _Call) -> torch.Tensor:
        """D(x, t) from the network output, with the arithmetic of the model registry's adapter and view."""
        x = self._state(sample)
        out = self._state(model_output).to(x.dtype)
        if call.scale is not None:
            x = x * call.scale
        adapter = self._adapter(lambda _x, _t: out, self._model_process, time_map=lambda t: t)
        return adapter(x, call.t_model)

    def _advance(self) -> torch.Tensor:
        """The next network call's state (checked against the plan), or the finished run's result."""
        run = self._run
        if run.done:
            if self._step_index != len(self._calls):
                raise RuntimeError("the schedule finished before its listed network calls; please report this")
            self._last = None
            return self._pipeline(run.result)
        x, t = run.wanted
        planned = self._times[self._step_index] if self._step_index < len(self._times) else None
        if planned is None or not math.isclose(t, planned, rel_tol=1e-12, abs_tol=1e-15):
            raise RuntimeError(f"sample asked for the model at t={t}, the plan says {planned}; please report this")
        self._last = self._pipeline(x)
        return self._last
