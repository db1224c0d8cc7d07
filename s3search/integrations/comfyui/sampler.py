"""The SAMPLER half of the ComfyUI node: a k-diffusion sampler function that runs a solver schedule exactly.

ComfyUI's custom samplers are `comfy.samplers.KSAMPLER(sampler_function, extra_options)`. KSAMPLER scales the
initial noise with the model's own `model_sampling.noise_scaling(sigmas[0], ...)`, calls
`sampler_function(model, x, sigmas, extra_args=..., callback=..., disable=..., **extra_options)` with `model` a
wrapped denoiser (model(x, sigma, **extra_args) -> denoised) and passes the result through
`model_sampling.inverse_noise_scaling(sigmas[-1], samples)`. `sample_s3_schedule` is such a sampler_function
(the schedule arrives as the extra option `schedule`), built on `s3search.integrations.k_diffusion.sample_schedule`.

Two frames, taken from the model's `model_sampling`:

- "ve" (EPS, v-prediction, EDM models: SD 1.x/2.x, SDXL): sigmas are VE sigmas and x = x0 + sigma * eps, which
  is k-diffusion's own convention, so the call goes to `sample_schedule` as it is.
- "flow" (ComfyUI's CONST models: SD3, FLUX): sigmas are the flow time t in [0, 1] and x = (1 - t) x0 + t eps.
  The model is called on the VE scale through x_ve = x / (1 - t), sigma_ve = t / (1 - t), and a sigma of 1.0
  stands for the flow process's t_top, as `exports.flow_sigmas` writes it.

`final: none` schedules stop at their last time without a final denoise. The node's SIGMAS carry that end (no
trailing 0.0); when other sigma nodes force a trailing 0.0 onto a final-none grid it is ignored here, and the
returned latent is the noisy state x / alpha at the schedule's last sigma in either case (ComfyUI's inverse
noise scaling included).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal, Optional, Sequence

import torch

from s3search import processes
from s3search.integrations.k_diffusion import sample_schedule

__all__ = ["Frame", "FRAMES", "comfy_sampler", "frame_of", "frame_of_sampling", "sample_s3_schedule",
           "schedule_sigmas"]

Frame = Literal["ve", "flow"]
FRAMES: tuple[str, ...] = ("ve", "flow")

# float32 keeps about 7 digits: a grid that matches the schedule's own to this tolerance is that grid.
_OWN_GRID_RTOL = 2e-6


def frame_of_sampling(model_sampling: Any) -> Frame:
    """The frame of a ComfyUI `model_sampling` object: "flow" for CONST models, "ve" for the others."""
    names = {cls.__name__ for cls in type(model_sampling).__mro__}
    # The image-to-image CONST variants replace the noise scaling with the latent itself: no noise to integrate.
    odd = sorted(n for n in names if n.startswith("IMG_TO_IMG"))
    if odd:
        raise ValueError(f"model_sampling {type(model_sampling).__name__} ({odd[0]}) is an image-to-image model; "
                         "a solver schedule needs a noise-to-data model")
    # Matching the class name rather than importing comfy.model_sampling keeps this testable without ComfyUI;
    # ComfyUI builds its samplings as mixins (ModelSamplingFlux + CONST), so CONST is always in the MRO.
    return "flow" if "CONST" in names else "ve"


def _model_sampling(model: Any) -> Optional[Any]:
    # The sampler's model is KSamplerX0Inpaint -> CFGGuider (model_patcher) -> BaseModel (model_sampling);
    # a node's MODEL is a ModelPatcher. A plain k-diffusion denoiser has neither and is on the VE scale.
    obj = model
    for _ in range(4):
        if obj is None:
            return None
        patcher = getattr(obj, "model_patcher", None)
        getter = getattr(patcher if patcher is not None else obj, "get_model_object", None)
        if callable(getter):
            try:
                return getter("model_sampling")
            except (AttributeError, KeyError):
                pass
        found = getattr(obj, "model_sampling", None)
        if found is not None:
            return found
        obj = getattr(obj, "inner_model", None)
    return None


def frame_of(model: Any) -> Frame:
    """The frame of a ComfyUI MODEL or sampler-side model ("ve" for a plain k-diffusion denoiser)."""
    sampling = _model_sampling(model)
    return "ve" if sampling is None else frame_of_sampling(sampling)


def _check_frame(frame: str) -> Frame:
    if frame not in FRAMES:
        raise ValueError(f"frame={frame!r} is unknown; known frames: {', '.join(FRAMES)}")
    return frame  # type: ignore[return-value]


def _is_flow_schedule(schedule: Any) -> bool:
    return isinstance(processes.get(schedule.process), processes.RectifiedFlow)


def _own_ve(schedule: Any) -> list[float]:
    proc = processes.get(schedule.process)
    # sigma / alpha rather than exp(-lambda): exact for EDM, whose time is the sigma itself.
    return [proc.sigma(float(t)) / proc.alpha(float(t)) for t in schedule.timesteps]


def _own_flow(schedule: Any) -> list[float]:
    if _is_flow_schedule(schedule):
        top = processes.FLOW_T_TOP
        # ComfyUI's flow models start at sigma 1.0; the flow process stops at t_top because t = 1 has no logSNR.
        return [1.0 if math.isclose(float(t), top, rel_tol=0.0, abs_tol=1e-12) else float(t)
                for t in schedule.timesteps]
    return [s / (1.0 + s) for s in _own_ve(schedule)]


def schedule_sigmas(schedule: Any, frame: Optional[str] = None) -> list[float]:
    """The schedule's grid as ComfyUI SIGMAS in `frame`, with the trailing 0.0 only for final=denoise.

    frame=None is the export convention (`exports.to_comfyui`): flow sigmas for a flow schedule, VE otherwise.
    """
    if frame is None:
        frame = "flow" if _is_flow_schedule(schedule) else "ve"
    values = _own_flow(schedule) if _check_frame(frame) == "flow" else _own_ve(schedule)
    return values + [0.0] if schedule.final == "denoise" else values


def _values(sigmas: Any) -> list[float]:
    return [float(v) for v in torch.as_tensor(sigmas).detach().reshape(-1).cpu().tolist()]


def _drop_forced_zero(schedule: Any, given: list[float]) -> list[float]:
    # ComfyUI's schedulers end every grid in 0.0; a final-none schedule has no step to 0 to spend it on.
    n = len(schedule.timesteps)
    if schedule.final == "none" and len(given) == n + 1 and given[-1] == 0.0:
        return given[:-1]
    return given


def _matches(values: Sequence[float], own: Sequence[float]) -> bool:
    return len(values) == len(own) and all(math.isclose(a, b, rel_tol=_OWN_GRID_RTOL, abs_tol=0.0)
                                           for a, b in zip(values, own))


def _flow_to_ve(t: float, i: int) -> float:
    if not math.isfinite(t) or t <= 0.0 or t > 1.0:
        raise ValueError(f"sigmas[{i}]={t!r} is not a flow sigma in (0, 1] (the model is a flow model: are these "
                         "VE sigmas? connect the same MODEL to the s3search node)")
    t = min(t, processes.FLOW_T_TOP)
    return t / (1.0 - t)


def _ve_grid(schedule: Any, run: list[float], frame: Frame) -> list[float]:
    """The VE sigmas `sample_schedule` gets: the schedule's own float64 values when `run` is its own grid."""
    body, tail = (run[:-1], [0.0]) if run and run[-1] == 0.0 else (run, [])
    own = _own_flow(schedule) if frame == "flow" else _own_ve(schedule)
    if _matches(body, own):
        return _own_ve(schedule) + tail
    if frame == "flow":
        return [_flow_to_ve(t, i) for i, t in enumerate(body)] + tail
    if _is_flow_schedule(schedule) and _matches(body, _own_flow(schedule)):
        raise ValueError("sigmas are this flow schedule's flow sigmas but the model is not a flow model: connect "
                         "the MODEL to the s3search node so its SIGMAS are VE sigmas")
    return body + tail


def _frame_model(model: Callable[..., torch.Tensor], frame: Frame) -> Callable[..., torch.Tensor]:
    if frame == "ve":
        return model

    def on_ve_scale(x_ve: torch.Tensor, sigma_ve: torch.Tensor, **extra: Any) -> torch.Tensor:
        keep = 1.0 / (1.0 + sigma_ve)  # 1 - t: the flow model's alpha
        return model(x_ve * keep.reshape(-1, *([1] * (x_ve.ndim - 1))), sigma_ve * keep, **extra)

    return on_ve_scale


def _step_callback(callback: Optional[Callable[[dict[str, Any]], None]], grid: list[float], frame: Frame,
                   total_steps: int) -> Optional[Callable[[dict[str, Any]], None]]:
    # ComfyUI's callback reads "i" as the step for its progress bar and previews "denoised"; our evaluations
    # (correctors, multi-stage steps) outnumber the steps, so "i" becomes the step whose start sigma is reached.
    if callback is None:
        return None
    positive = [s for s in grid if s > 0.0]

    def relay(info: dict[str, Any]) -> None:
        sigma = float(info["sigma"])
        step = sum(1 for s in positive if s > sigma * (1.0 + 1e-9))
        out = dict(info, i=min(step, max(total_steps - 1, 0)), evaluation=info["i"])
        if frame == "flow":
            keep = 1.0 / (1.0 + sigma)
            out.update(x=info["x"] * keep, sigma=sigma * keep, sigma_hat=sigma * keep)
        callback(out)

    return relay


def _generator(x: torch.Tensor, extra_args: dict[str, Any]) -> Optional[torch.Generator]:
    # ComfyUI passes the node's noise seed in extra_args; stochastic steps draw from it, so a seed reproduces.
    seed = extra_args.get("seed")
    if seed is None:
        return None
    return torch.Generator(device=x.device).manual_seed(int(seed) % (2 ** 63))


def sample_s3_schedule(model: Callable[..., torch.Tensor], x: torch.Tensor, sigmas: Any,
                       extra_args: Optional[dict[str, Any]] = None,
                       callback: Optional[Callable[[dict[str, Any]], None]] = None, disable: Any = None, *,
                       schedule: Any, frame: Optional[str] = None, data_mean: Any = None) -> torch.Tensor:
    """Run `schedule` on `sigmas` with a k-diffusion / ComfyUI model; x is the noisy input at sigmas[0].

    `frame` defaults to the model's own (`frame_of`): "ve" for a plain k-diffusion denoiser. Returns the
    denoised sample (final=denoise); for final=none the state at the schedule's last sigma, on the VE scale
    once ComfyUI's inverse noise scaling at sigmas[-1] is applied (so on the VE scale itself in frame "ve").
    extra_args reach the model unchanged; extra_args["seed"] seeds the schedule's stochastic steps.
    `data_mean` is the model's data mean for first_step="mean-x0" (the same in every frame: it is an x0).
    """
    extra_args = {} if extra_args is None else extra_args
    frame = frame_of(model) if frame is None else _check_frame(frame)
    given = _values(sigmas)
    if not given:
        raise ValueError("sigmas is empty")
    run = _drop_forced_zero(schedule, given)
    grid = _ve_grid(schedule, run, frame)
    keep_0 = 1.0 if frame == "ve" or grid[0] == 0.0 else 1.0 / (1.0 + grid[0])
    # Passed only when there is one, so schedules without first_step="mean-x0" need no data_mean support.
    mean = {} if data_mean is None else {"data_mean": torch.as_tensor(data_mean, dtype=x.dtype, device=x.device)}
    out = sample_schedule(_frame_model(model, frame), x if keep_0 == 1.0 else x / keep_0,
                          torch.tensor(grid, dtype=torch.float64), schedule,
                          generator=_generator(x, extra_args), extra_args=extra_args,
                          callback=_step_callback(callback, grid, frame, len(given) - 1), disable=disable, **mean)
    if schedule.final == "none" and frame == "flow":
        # KSAMPLER divides by 1 - sigmas[-1]; handing back x_ve * (1 - sigmas[-1]) makes its result x_ve.
        return out * (1.0 - min(given[-1], processes.FLOW_T_TOP))
    return out


def comfy_sampler(schedule: Any, data_mean: Any = None) -> Any:
    """ComfyUI's SAMPLER object (`comfy.samplers.KSAMPLER`) running `schedule`; needs ComfyUI's `comfy`."""
    try:
        from comfy.samplers import KSAMPLER  # ComfyUI's own package, present only inside ComfyUI
    except ImportError as e:
        raise ImportError(f"comfy.samplers is not importable ({e}): the SAMPLER output is built inside ComfyUI; "
                          "outside it call s3search.integrations.comfyui.sampler.sample_s3_schedule") from None
    options: dict[str, Any] = {"schedule": schedule}
    if data_mean is not None:
        options["data_mean"] = data_mean
    return KSAMPLER(sample_s3_schedule, extra_options=options)
