"""Exports of a solver schedule into the conventions of the tools where users sample.

Every export is a plain JSON-ready dict. The grids follow each tool's convention:

- diffusers: ``timesteps`` are N integer training-step indices (no trailing 0) and ``sigmas`` are N + 1 VE
  sigmas ending in 0.0, where N = len(schedule.timesteps): the tool evaluates the model at every one of our
  times and its last step, to sigma 0, is our final rule "denoise" (x = D(x_N, t_N)).
- k-diffusion: a sigmas list (and `k_diffusion_sigmas` gives the tensor) [s_0, ..., s_N, 0.0].
- ComfyUI: the same sigmas as a comma-separated string, for a custom-sigmas node.

"VE sigma" is the process's sigma / alpha = exp(-lambda): the noise level of x / alpha, which is what
k-diffusion, ComfyUI and the diffusers Euler / DPM-Solver schedulers call sigma.

No stock tool runs a schedule whose solver changes per step, so each export also lists ``segments``: consecutive
steps grouped under the stock sampler closest to them, with the sigma slice each covers (inclusive of both ends,
as ComfyUI's SplitSigmas and k-diffusion slices share their boundary sigma). ``exact`` says whether running that
segment with the named sampler reproduces our steps (judged against the k-diffusion / ComfyUI implementations,
whose history restarts at every segment). The exact route is always ours: `S3Scheduler` for diffusers and
`sample_schedule` for k-diffusion / ComfyUI code.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

from . import processes
from .schedule import SolverSchedule, StepSpec

__all__ = [
    "FORMATS",
    "Segment",
    "export",
    "load_schedule",
    "segments",
    "to_json",
    "to_diffusers",
    "to_k_diffusion",
    "to_comfyui",
    "k_diffusion_sigmas",
    "ve_sigmas",
]

FORMATS = ("json", "diffusers", "k-diffusion", "comfyui")
_ALIASES = {"k_diffusion": "k-diffusion", "kdiffusion": "k-diffusion", "comfy": "comfyui"}

# A NamedSchedule (s3search.named) is handled by duck typing so this module stays importable before it exists.
Schedule = Any
_EXACT_ROUTE = {
    "diffusers": "s3search.integrations.diffusers_scheduler.S3Scheduler(schedule=...) runs every step exactly",
    "k-diffusion": "s3search.integrations.k_diffusion.sample_schedule(model, x, sigmas, schedule) runs every "
                   "step exactly",
    "comfyui": "call s3search.integrations.k_diffusion.sample_schedule from a custom sampler node to run every "
               "step exactly",
}


def _is_named(schedule: Schedule) -> bool:
    return hasattr(schedule, "sampler") and not isinstance(schedule, SolverSchedule)


def load_schedule(doc: Union[str, dict]) -> Schedule:
    """A SolverSchedule, or a NamedSchedule when the document names a `sampler`, from JSON text or a dict."""
    if isinstance(doc, str):
        try:
            doc = json.loads(doc)
        except json.JSONDecodeError as e:
            raise ValueError(f"schedule is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ValueError("schedule must be a JSON object")
    if "sampler" in doc:
        from .named import NamedSchedule  # type: ignore[attr-defined]

        return NamedSchedule.from_dict(doc)
    return SolverSchedule.from_dict(doc)


def _process(schedule: Schedule) -> processes.NoiseProcess:
    return processes.get(schedule.process)


def ve_sigmas(schedule: Schedule) -> list[float]:
    """The VE sigma exp(-lambda) of every schedule time, noisiest first (no trailing zero)."""
    proc = _process(schedule)
    # sigma / alpha equals exp(-lambda) and is exact for EDM, whose time is the sigma itself.
    return [proc.sigma(float(t)) / proc.alpha(float(t)) for t in schedule.timesteps]


def _tool_sigmas(schedule: Schedule) -> list[float]:
    # final="denoise" is the tool's last step to sigma 0; final="none" stops at sigma_N with noise left.
    sig = ve_sigmas(schedule)
    return sig + [0.0] if schedule.final == "denoise" else sig


# ----- segments ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Family:
    comfyui: Optional[str]
    k_diffusion: Optional[str]
    diffusers: Optional[tuple[str, dict[str, Any]]]
    # pattern(position in segment, step, options) -> whether the tool takes exactly this step there; None: never
    # claimed exact.
    pattern: Optional[Callable[[int, StepSpec], bool]] = None


def _is(step: StepSpec, order: int, derivative: Optional[str] = None) -> bool:
    # Stock multistep samplers use the most recent points only: custom lags never match.
    return (step.order == order and step.corrector == "none" and not step.canonical().lags
            and (derivative is None or step.derivative == derivative))


# Warm-up orders follow the k-diffusion code: 2M takes an order-1 first step; 3M-SDE takes order 1, then the
# exact phi_2 order-2 step ("taylor"), then its 3M rule.
_FAMILIES: dict[str, _Family] = {
    "euler": _Family("euler", "sample_euler", ("EulerDiscreteScheduler", {}), lambda i, s: _is(s, 1)),
    "euler_ancestral": _Family("euler_ancestral", "sample_euler_ancestral",
                               ("EulerAncestralDiscreteScheduler", {}), lambda i, s: _is(s, 1)),
    "dpmpp_2m": _Family("dpmpp_2m", "sample_dpmpp_2m",
                        ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
                        lambda i, s: _is(s, 1) if i == 0 else _is(s, 2, "dpmpp")),
    "dpmpp_2m_sde": _Family("dpmpp_2m_sde", "sample_dpmpp_2m_sde",
                            ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
                            lambda i, s: _is(s, 1) if i == 0 else _is(s, 2, "dpmpp")),
    "dpmpp_2m_sde_heun": _Family("dpmpp_2m_sde_heun", "sample_dpmpp_2m_sde",
                                 ("DPMSolverMultistepScheduler",
                                  {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "solver_type": "heun"}),
                                 lambda i, s: _is(s, 1) if i == 0 else _is(s, 2, "taylor")),
    "dpmpp_3m_sde": _Family("dpmpp_3m_sde", "sample_dpmpp_3m_sde",
                            ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 3}),
                            lambda i, s: _is(s, 1) if i == 0 else _is(s, 2, "taylor") if i == 1
                            else _is(s, 3, "dpmpp")),
    "uni_pc": _Family("uni_pc", None, ("UniPCMultistepScheduler", {"solver_type": "bh1"})),
    "uni_pc_bh2": _Family("uni_pc_bh2", None, ("UniPCMultistepScheduler", {"solver_type": "bh2"})),
    "deis": _Family("deis", None, ("DEISMultistepScheduler", {})),
    "sa_solver": _Family("sa_solver", None, ("SASolverScheduler", {})),
    "sa_solver_pece": _Family("sa_solver_pece", None, ("SASolverScheduler", {})),
}


def _closest(step: StepSpec) -> tuple[str, dict[str, Any]]:
    """The stock sampler closest to one step, with the options that sampler needs."""
    s = step.canonical()
    eta = float(s.eta)
    stochastic = eta > 0.0
    opts: dict[str, Any] = {"eta": eta, "order": s.order} if stochastic else {"order": s.order}
    if s.corrector == "implicit":
        return "sa_solver_pece", opts
    if s.corrector == "unic":
        if s.derivative in ("bh1", "bh2") and not stochastic:
            return ("uni_pc" if s.derivative == "bh1" else "uni_pc_bh2"), opts
        return "sa_solver", opts
    if s.order == 1:
        return ("euler_ancestral" if stochastic else "euler"), opts
    if s.derivative in ("bh1", "bh2"):
        return ("uni_pc" if s.derivative == "bh1" else "uni_pc_bh2"), {**opts, "corrector": False}
    if s.order == 2:
        if s.derivative == "taylor":
            return "dpmpp_2m_sde_heun", {"eta": eta, "order": 2}
        return ("dpmpp_2m_sde" if stochastic else "dpmpp_2m"), opts
    if s.order == 3 and s.derivative == "dpmpp":
        return "dpmpp_3m_sde", {"eta": eta, "order": 3}
    return "deis", opts


def _same_options(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if set(a) != set(b):
        return False
    return all(math.isclose(a[k], b[k], rel_tol=1e-12, abs_tol=1e-15) if isinstance(a[k], float) else a[k] == b[k]
               for k in a)


def _exact_options(name: str, step: StepSpec) -> dict[str, Any]:
    """The options a stock sampler needs to reproduce this step (eta for the SDE families)."""
    eta = float(step.eta)
    if name in ("dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde"):
        return {"eta": eta}
    return {"eta": eta} if eta > 0 else {}


def _matches(name: str, options: dict[str, Any], pos: int, step: StepSpec) -> bool:
    fam = _FAMILIES[name]
    if fam.pattern is None or step.prediction != "data":
        return False
    s = step.canonical()
    if name == "euler" and s.eta != 0.0:
        return False
    if name == "euler_ancestral" and s.eta != 1.0:
        return False  # k-diffusion's ancestral split equals our eta step only at eta = 1
    if name in ("dpmpp_2m",) and s.eta != 0.0:
        return False
    if name in ("dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde"):
        if not _same_options(options, _exact_options(name, s)):
            return False
    return fam.pattern(pos, s)


@dataclass(frozen=True)
class Segment:
    """Steps [start, stop) of the tool's grid, run by one stock sampler over sigmas[start : stop + 1]."""

    start: int
    stop: int
    sampler: str
    options: dict[str, Any]
    exact: bool

    def to_dict(self, sigmas: list[float]) -> dict[str, Any]:
        fam = _FAMILIES.get(self.sampler)
        diffusers = None
        if fam is not None and fam.diffusers is not None:
            diffusers = {"class": fam.diffusers[0], "kwargs": dict(fam.diffusers[1])}
        return {
            "steps": [self.start, self.stop],
            "sigmas": sigmas[self.start:self.stop + 1],
            "sampler": self.sampler,
            "comfyui": fam.comfyui if fam else self.sampler,
            "k_diffusion": fam.k_diffusion if fam else None,
            "diffusers": diffusers,
            "options": dict(self.options),
            "exact": self.exact,
        }


def _exact_runs(steps: list[StepSpec], a: int) -> list[tuple[int, str, dict[str, Any]]]:
    """(longest exact run, sampler, options) for every stock sampler a step near `a` proposes."""
    runs = []
    for j in range(a, min(a + 3, len(steps))):
        # A warm-up step proposes a lower-order sampler, so look at the next few steps too.
        name, _ = _closest(steps[j])
        options = _exact_options(name, steps[j].canonical())
        length = 0
        while a + length < len(steps) and _matches(name, options, length, steps[a + length]):
            length += 1
        if length:
            runs.append((length, name, options))
    return runs


def _solver_segments(schedule: SolverSchedule) -> list[Segment]:
    steps = list(schedule.steps)
    n = len(steps)
    # Dynamic programme over segmentations: fewest steps left without an exact stock sampler, then fewest
    # segments. best[a] = (cost, first segment) for steps a..n-1.
    best: list[Any] = [None] * (n + 1)
    best[n] = ((0, 0), None)
    for a in range(n - 1, -1, -1):
        (inexact, count), _ = best[a + 1]
        name, options = _closest(steps[a])
        choice = ((inexact + 1, count + 1), Segment(a, a + 1, name, options, exact=False))
        for length, fam, opts in _exact_runs(steps, a):
            for stop in range(a + 1, a + length + 1):
                (i2, c2), _ = best[stop]
                if (i2, c2 + 1) < choice[0]:
                    choice = ((i2, c2 + 1), Segment(a, stop, fam, opts, exact=True))
        best[a] = choice
    out: list[Segment] = []
    a = 0
    while a < n:
        seg = best[a][1]
        prev = out[-1] if out else None
        if (prev is not None and not prev.exact and not seg.exact and prev.sampler == seg.sampler
                and steps[prev.start].eta == steps[seg.start].eta):
            # Neighbouring approximate steps under the same stock sampler form one segment.
            options = {**prev.options, **seg.options, "order": max(prev.options.get("order", 1),
                                                                    seg.options.get("order", 1))}
            options.pop("corrector", None)
            out[-1] = Segment(prev.start, seg.stop, seg.sampler, options, exact=False)
        else:
            out.append(seg)
        a = seg.stop
    if schedule.final == "denoise":
        # Every stock sampler's step to sigma 0 returns the denoised prediction, as our final rule does.
        last = out[-1]
        out[-1] = Segment(last.start, last.stop + 1, last.sampler, last.options, last.exact)
    if schedule.first_step != "model":
        first = out[0]
        out[0] = Segment(first.start, first.stop, first.sampler, first.options, exact=False)
    return out


# Named samplers (s3search.named) that a stock tool also ships.
_NAMED_TO_COMFY = {
    "seeds_2": "seeds_2", "seeds-2": "seeds_2", "seeds_3": "seeds_3", "seeds-3": "seeds_3",
    "er_sde": "er_sde", "er-sde": "er_sde", "edm_heun": "heun", "edm-heun": "heun", "heun": "heun",
    "ipndm": "ipndm", "deis": "deis",
}


def _named_segments(schedule: Schedule) -> list[Segment]:
    n = len(schedule.timesteps) - (0 if schedule.final == "denoise" else 1)
    sampler = str(schedule.sampler)
    base = sampler.split("(")[0]
    comfy = next((v for k, v in _NAMED_TO_COMFY.items() if base.lower().startswith(k)), None)
    params = dict(getattr(schedule, "params", ()) or ())
    return [Segment(0, n, comfy or sampler, params, exact=False)]


def segments(schedule: Schedule) -> list[dict[str, Any]]:
    """The stock-sampler segments covering the tool grid, as dicts (see the module docstring)."""
    sig = _tool_sigmas(schedule)
    segs = _named_segments(schedule) if _is_named(schedule) else _solver_segments(schedule)
    return [s.to_dict(sig) for s in segs]


def _notes(schedule: Schedule, tool: str, segs: list[dict[str, Any]]) -> list[str]:
    notes = []
    if len(segs) > 1:
        notes.append(f"{tool} has no sampler that changes the solver per step; the closest stock samplers are "
                     f"listed per segment (run each on its sigma slice; history restarts at every segment, so "
                     f"the result differs from this schedule)")
    if any(not s["exact"] for s in segs):
        notes.append("segments marked exact=false only approximate this schedule's steps")
    if not _is_named(schedule):
        if schedule.first_step != "model":
            notes.append(f"first_step={schedule.first_step} takes the first step without a model evaluation; "
                         f"stock samplers evaluate the model at sigma_0 instead")
        if any(s.prediction == "noise" for s in schedule.steps):
            notes.append("noise-prediction steps have no exact stock equivalent (the listed samplers use the "
                         "data-prediction form)")
    if schedule.final == "none":
        notes.append("final=none: this schedule stops at sigma_N without denoising")
    if any(s["exact"] for s in segs):
        notes.append("exact=true means the k-diffusion / ComfyUI sampler takes the same update rule on that slice "
                     "(stochastic samplers draw their own noise)" + ("; diffusers' schedulers of the same name "
                     "differ in details such as lower_order_final" if tool == "diffusers" else ""))
    notes.append(f"exact: {_EXACT_ROUTE[tool]}")
    return notes


# ----- the formats ---------------------------------------------------------------------------------------------
def to_json(schedule: Schedule) -> dict[str, Any]:
    """The native schedule JSON (the document `load_schedule` reads back)."""
    return schedule.to_dict()


def _discrete_timesteps(schedule: Schedule, discrete: processes.VPDiscrete) -> tuple[list[int], list[str]]:
    proc = _process(schedule)
    n_train = len(discrete.betas)
    notes: list[str] = []
    same = isinstance(proc, processes.VPDiscrete) and proc == discrete
    out = []
    for t in schedule.timesteps:
        t_d = float(t) if same else discrete.t_of_sigma_ve(proc.sigma_ve(float(t)))
        out.append(int(min(max(round(discrete.model_time(t_d)), 0), n_train - 1)))
    if not same:
        notes.append(f"timesteps map each VE sigma onto the nearest training step of a {n_train}-step discrete "
                     f"VP model ({discrete.name} betas); schedule process is {schedule.process}")
    exact_ints = all(abs(discrete.model_time(float(t)) - round(discrete.model_time(float(t)))) < 1e-6
                     for t in schedule.timesteps) if same else False
    if not exact_ints:
        notes.append("integer timesteps are rounded; pass `sigmas` (exact) where the scheduler accepts them")
    if any(b >= a for a, b in zip(out, out[1:])):
        notes.append("rounding made some integer timesteps repeat; use `sigmas` or S3Scheduler instead")
    return out, notes


def to_diffusers(schedule: Schedule, discrete: Optional[processes.VPDiscrete] = None) -> dict[str, Any]:
    """diffusers arrays: N int timesteps (no trailing 0), N + 1 VE sigmas ending in 0.0, plus segments.

    `discrete` is the training process of the discrete model whose step indices the timesteps are (default: the
    schedule's own process when it is discrete, else the 1000-step linear-beta DDPM process "vp-discrete").
    """
    proc = _process(schedule)
    if discrete is None:
        discrete = proc if isinstance(proc, processes.VPDiscrete) else processes.get("vp-discrete")
    timesteps, notes = _discrete_timesteps(schedule, discrete)
    sigmas = ve_sigmas(schedule) + [0.0]
    segs = segments(schedule)
    if schedule.final == "none":
        notes.append("diffusers grids always end at sigma 0, so a diffusers scheduler takes one more step than "
                     "this schedule (final=none)")
        segs = [dict(s) for s in segs]
        segs[-1]["sigmas"] = segs[-1]["sigmas"] + [0.0]
    return {
        "format": "diffusers",
        "num_inference_steps": len(timesteps),
        "num_train_timesteps": len(discrete.betas),
        "timesteps": timesteps,
        "sigmas": sigmas,
        "scheduler": {"class": "s3search.integrations.diffusers_scheduler.S3Scheduler",
                      "config": {"schedule": schedule.to_dict()}},
        "segments": segs,
        "notes": notes + _notes(schedule, "diffusers", segs),
        "nfe": schedule.nfe,
        "schedule": schedule.to_dict(),
    }


def k_diffusion_sigmas(schedule: Schedule, device: Any = None):
    """The k-diffusion sigmas tensor (float64 values rounded to float32, as k-diffusion's own schedules)."""
    import torch

    return torch.tensor(_tool_sigmas(schedule), dtype=torch.float32, device=device)


def to_k_diffusion(schedule: Schedule) -> dict[str, Any]:
    """k-diffusion: the sigmas list [s_0, ..., s_N, 0.0] (no 0.0 for final=none) and segments."""
    segs = segments(schedule)
    return {
        "format": "k-diffusion",
        "sigmas": _tool_sigmas(schedule),
        "segments": segs,
        "notes": _notes(schedule, "k-diffusion", segs),
        "nfe": schedule.nfe,
        "schedule": schedule.to_dict(),
    }


def to_comfyui(schedule: Schedule) -> dict[str, Any]:
    """ComfyUI: the sigmas as a comma-separated string (for a custom-sigmas node) and segments (sampler names)."""
    sig = _tool_sigmas(schedule)
    segs = segments(schedule)
    for s in segs:
        s["sigmas_string"] = ", ".join(repr(float(v)) for v in s["sigmas"])
    return {
        "format": "comfyui",
        "sigmas": ", ".join(repr(float(v)) for v in sig),
        "segments": segs,
        "notes": _notes(schedule, "comfyui", segs),
        "nfe": schedule.nfe,
        "schedule": schedule.to_dict(),
    }


_EXPORTERS: dict[str, Callable[[Schedule], dict[str, Any]]] = {
    "json": to_json,
    "diffusers": to_diffusers,
    "k-diffusion": to_k_diffusion,
    "comfyui": to_comfyui,
}


def export(schedule: Schedule, format: str) -> dict[str, Any]:
    """The schedule in `format` (one of FORMATS)."""
    key = _ALIASES.get(format, format) if isinstance(format, str) else format
    if key not in _EXPORTERS:
        raise ValueError(f"format={format!r} is unknown; known formats: {', '.join(FORMATS)}")
    return _EXPORTERS[key](schedule)
