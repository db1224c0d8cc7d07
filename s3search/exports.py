"""Exports of a solver schedule into the conventions of the tools where users sample.

Every export is a plain JSON-ready dict. The grids follow each tool's convention:

- diffusers: ``sigmas`` are N + 1 sigmas ending in 0.0 and ``timesteps`` the N network times, where
  N = len(schedule.timesteps): the tool evaluates the model at every one of our times and its last step, to sigma
  0, is our final rule "denoise" (x = D(x_N, t_N)). For a discrete VP model the sigmas are VE sigmas and the
  timesteps the integer training steps of the model's own betas (`betas`: the schedule's own process when it is
  discrete, else the 1000-step linear-beta DDPM process unless told); for a flow schedule (SD3, FLUX) they are
  the flow sigma t in [0, 1] and 1000 t, as FlowMatchEulerDiscreteScheduler writes them.
- k-diffusion: a sigmas list (and `k_diffusion_sigmas` gives the tensor) [s_0, ..., s_N, 0.0] of VE sigmas, the
  scale every k-diffusion sampler works on (a flow model runs there as model(x / (1 - t), t / (1 - t))).
- ComfyUI: the sigmas as a comma-separated string, for a custom-sigmas node: VE sigmas, or for a flow schedule the
  flow sigmas, which is what ComfyUI's flow models (SD3, FLUX) take.

"VE sigma" is the process's sigma / alpha = exp(-lambda): the noise level of x / alpha, which is what
k-diffusion, ComfyUI's VP models and the diffusers Euler / DPM-Solver schedulers call sigma. The flow process
reaches t_top = 1 - 1e-6 at most (t = 1 is pure noise, lambda = -inf); a flow sigma list writes t_top as 1.0,
the pipelines' own first sigma.

No stock tool runs a schedule whose solver changes per step, so each export also lists ``segments``: consecutive
steps grouped under the stock sampler closest to them, with the sigma slice each covers (inclusive of both ends,
as ComfyUI's SplitSigmas and k-diffusion slices share their boundary sigma). ``options`` are exactly the keyword
arguments the named k-diffusion function takes for those steps (``{}`` where there is none), ``diffusers`` the
class and constructor arguments closest to them. ``exact`` says whether running that segment with the named
sampler reproduces our steps (judged against the k-diffusion / ComfyUI implementations, whose history restarts at
every segment). The exact route is always ours: `S3Scheduler` for diffusers and `sample_schedule` for
k-diffusion / ComfyUI code.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

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
    "flow_sigmas",
    "betas_process",
    "mean_json",
    "BETAS",
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
# Where each tool's exact route takes the data mean of first_step="mean-x0" (the `data_mean` the export carries).
_MEAN_ROUTE = {
    "diffusers": "the scheduler config's data_mean (S3Scheduler.from_config(..., data_mean=...))",
    "k-diffusion": "sample_schedule(..., data_mean=export['data_mean'])",
    "comfyui": "sample_schedule(..., data_mean=export['data_mean']) in the sampler node",
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


def _is_flow(schedule: Schedule) -> bool:
    return isinstance(_process(schedule), processes.RectifiedFlow)


def ve_sigmas(schedule: Schedule) -> list[float]:
    """The VE sigma exp(-lambda) of every schedule time, noisiest first (no trailing zero)."""
    proc = _process(schedule)
    # sigma / alpha equals exp(-lambda) and is exact for EDM, whose time is the sigma itself.
    return [proc.sigma(float(t)) / proc.alpha(float(t)) for t in schedule.timesteps]


def flow_sigmas(schedule: Schedule) -> list[float]:
    """A flow schedule's times as the flow sigmas of SD3 / FLUX / FlowMatchEuler (t_top written 1.0), no trailing 0."""
    if not _is_flow(schedule):
        raise ValueError(f"process={schedule.process!r}: flow sigmas are the times of a flow schedule")
    top = processes.FLOW_T_TOP
    # The flow process stops at t_top because t = 1 has lambda = -inf; the pipelines call that first step 1.0.
    return [1.0 if math.isclose(float(t), top, rel_tol=0.0, abs_tol=1e-12) else float(t) for t in schedule.timesteps]


def _with_final(schedule: Schedule, sig: list[float]) -> list[float]:
    # final="denoise" is the tool's last step to sigma 0; final="none" stops at sigma_N with noise left.
    return sig + [0.0] if schedule.final == "denoise" else sig


def _tool_sigmas(schedule: Schedule) -> list[float]:
    return _with_final(schedule, ve_sigmas(schedule))


# ----- segments ------------------------------------------------------------------------------------------------
_FLOW_KWARGS = {"prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": 1.0}
_SOLVER_ORDER = {"DPMSolverMultistepScheduler": 3, "UniPCMultistepScheduler": 3, "DEISMultistepScheduler": 3}


@dataclass(frozen=True)
class _Family:
    comfyui: Optional[str]
    k_diffusion: Optional[str]
    diffusers: Optional[tuple[str, dict[str, Any]]]
    # pattern(position in segment, step) -> whether the tool takes exactly this step there; None: never exact.
    pattern: Optional[Callable[[int, StepSpec], bool]] = None
    # The k-diffusion function's keyword arguments: eta where it takes one, and what it must be told besides
    # (dpmpp_2m_sde runs the midpoint rule unless told solver_type="heun").
    takes_eta: bool = False
    fixed: tuple[tuple[str, Any], ...] = ()
    # diffusers on a flow model: the class and arguments (None: no flow-matching counterpart).
    diffusers_flow: Optional[tuple[str, dict[str, Any]]] = None


def _is(step: StepSpec, order: int, derivative: Optional[str] = None) -> bool:
    # Stock multistep samplers use the most recent points only: custom lags never match.
    return (step.order == order and step.corrector == "none" and not step.canonical().lags
            and (derivative is None or step.derivative == derivative))


def _with_flow(cls: str, kwargs: dict[str, Any]) -> tuple[tuple[str, dict[str, Any]], tuple[str, dict[str, Any]]]:
    return (cls, kwargs), (cls, {**kwargs, **_FLOW_KWARGS})


_DPM2 = {"algorithm_type": "dpmsolver++", "solver_order": 2}
_SDE2 = {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}
_SDE2_HEUN = {**_SDE2, "solver_type": "heun"}
_DPM3 = {"algorithm_type": "dpmsolver++", "solver_order": 3}


def _family(comfyui: str, k_diffusion: Optional[str], cls: str, kwargs: dict[str, Any],
            pattern: Optional[Callable[[int, StepSpec], bool]] = None, **kw: Any) -> _Family:
    ve, flow = _with_flow(cls, kwargs)
    return _Family(comfyui, k_diffusion, ve, pattern, diffusers_flow=kw.pop("diffusers_flow", flow), **kw)


# Warm-up orders follow the k-diffusion code: 2M takes an order-1 first step; 3M-SDE takes order 1, then the
# exact phi_2 order-2 step ("taylor"), then its 3M rule.
_FAMILIES: dict[str, _Family] = {
    "euler": _family("euler", "sample_euler", "EulerDiscreteScheduler", {}, lambda i, s: _is(s, 1),
                     diffusers_flow=("FlowMatchEulerDiscreteScheduler", {"shift": 1.0})),
    "euler_ancestral": _family("euler_ancestral", "sample_euler_ancestral", "EulerAncestralDiscreteScheduler", {},
                               lambda i, s: _is(s, 1), takes_eta=True, diffusers_flow=None),
    "dpmpp_2m": _family("dpmpp_2m", "sample_dpmpp_2m", "DPMSolverMultistepScheduler", _DPM2,
                        lambda i, s: _is(s, 1) if i == 0 else _is(s, 2, "dpmpp")),
    "dpmpp_2m_sde": _family("dpmpp_2m_sde", "sample_dpmpp_2m_sde", "DPMSolverMultistepScheduler", _SDE2,
                            lambda i, s: _is(s, 1) if i == 0 else _is(s, 2, "dpmpp"), takes_eta=True),
    "dpmpp_2m_sde_heun": _family("dpmpp_2m_sde_heun", "sample_dpmpp_2m_sde", "DPMSolverMultistepScheduler",
                                 _SDE2_HEUN, lambda i, s: _is(s, 1) if i == 0 else _is(s, 2, "taylor"),
                                 takes_eta=True, fixed=(("solver_type", "heun"),)),
    "dpmpp_3m_sde": _family("dpmpp_3m_sde", "sample_dpmpp_3m_sde", "DPMSolverMultistepScheduler", _DPM3,
                            lambda i, s: _is(s, 1) if i == 0 else _is(s, 2, "taylor") if i == 1
                            else _is(s, 3, "dpmpp"), takes_eta=True),
    # Heun in the VE noise level (k-diffusion, ComfyUI, diffusers' HeunDiscrete) or in flow time (FlowMatchHeun,
    # which takes no custom sigmas): the closest tools to trapezoidal steps, never exact on a searched grid.
    "heun": _family("heun", "sample_heun", "HeunDiscreteScheduler", {},
                    diffusers_flow=("FlowMatchHeunDiscreteScheduler", {"shift": 1.0})),
    "uni_pc": _family("uni_pc", None, "UniPCMultistepScheduler", {"solver_type": "bh1"}),
    "uni_pc_bh2": _family("uni_pc_bh2", None, "UniPCMultistepScheduler", {"solver_type": "bh2"}),
    "deis": _family("deis", None, "DEISMultistepScheduler", {}),
    "sa_solver": _family("sa_solver", None, "SASolverScheduler", {}),
    "sa_solver_pece": _family("sa_solver_pece", None, "SASolverScheduler", {}),
}
# On a flow model ComfyUI's samplers take their steps in log(sigma) of the flow sigma, which is not the flow
# process's logSNR: only Euler, whose step is the same in any frame, runs our steps exactly there.
_FLOW_FRAME_EXACT = frozenset({"euler"})


def _closest(step: StepSpec) -> str:
    """The stock sampler closest to one step."""
    s = step.canonical()
    stochastic = float(s.eta) > 0.0
    if s.derivative == "trapezoid" and s.corrector == "implicit":
        return "heun"
    if s.corrector == "implicit":
        return "sa_solver_pece"
    if s.corrector == "unic":
        if s.derivative in ("bh1", "bh2") and not stochastic:
            return "uni_pc" if s.derivative == "bh1" else "uni_pc_bh2"
        return "sa_solver"
    if s.order == 1:
        return "euler_ancestral" if stochastic else "euler"
    if s.derivative in ("bh1", "bh2"):
        return "uni_pc" if s.derivative == "bh1" else "uni_pc_bh2"
    if s.order == 2:
        if s.derivative == "taylor":
            return "dpmpp_2m_sde_heun"
        return "dpmpp_2m_sde" if stochastic else "dpmpp_2m"
    if s.order == 3 and s.derivative == "dpmpp":
        return "dpmpp_3m_sde"
    return "deis"


def _matches(name: str, eta: float, pos: int, step: StepSpec, exact_families: Optional[frozenset]) -> bool:
    """Whether stock sampler `name`, run with `eta` on a segment, takes our `step` exactly at position `pos`."""
    fam = _FAMILIES[name]
    if fam.pattern is None or step.prediction != "data":
        return False
    if exact_families is not None and name not in exact_families:
        return False
    s = step.canonical()
    if not math.isclose(float(s.eta), eta, rel_tol=1e-12, abs_tol=1e-15):
        return False  # one segment, one eta
    if name in ("euler", "dpmpp_2m") and eta != 0.0:
        return False
    if name == "euler_ancestral" and eta != 1.0:
        return False  # k-diffusion's ancestral split equals our eta step only at eta = 1
    return fam.pattern(pos, s)


@dataclass(frozen=True)
class Segment:
    """Steps [start, stop) of the tool's grid, run by one stock sampler over sigmas[start : stop + 1]."""

    start: int
    stop: int
    sampler: str
    eta: float
    order: int                  # the highest order among its steps (approximate segments)
    exact: bool
    params: tuple[tuple[str, Any], ...] = ()   # a named sampler's own parameters

    def options(self) -> dict[str, Any]:
        """Exactly the keyword arguments the segment's k-diffusion function takes for these steps."""
        fam = _FAMILIES.get(self.sampler)
        if fam is None or fam.k_diffusion is None:
            return {}
        return {**({"eta": self.eta} if fam.takes_eta else {}), **dict(fam.fixed)}

    def diffusers(self, flow: bool) -> Optional[dict[str, Any]]:
        fam = _FAMILIES.get(self.sampler)
        spec = None if fam is None else (fam.diffusers_flow if flow else fam.diffusers)
        if spec is None:
            return None
        cls, kwargs = spec[0], dict(spec[1])
        if cls in _SOLVER_ORDER and "solver_order" not in kwargs:
            kwargs["solver_order"] = min(max(self.order, 1), _SOLVER_ORDER[cls])
        if cls == "SASolverScheduler":
            kwargs["predictor_order"] = min(max(self.order, 1), 4)
        return {"class": cls, "kwargs": kwargs}

    def to_dict(self, sigmas: list[float], flow: bool = False) -> dict[str, Any]:
        fam = _FAMILIES.get(self.sampler)
        out = {
            "steps": [self.start, self.stop],
            "sigmas": sigmas[self.start:self.stop + 1],
            "sampler": self.sampler,
            "comfyui": fam.comfyui if fam else self.sampler,
            "k_diffusion": fam.k_diffusion if fam else None,
            "diffusers": self.diffusers(flow),
            "options": self.options(),
            "exact": self.exact,
        }
        if self.params:
            out["params"] = dict(self.params)
        return out


def _exact_runs(steps: list[StepSpec], a: int, exact_families: Optional[frozenset]) -> list[tuple[int, str, float]]:
    """(longest exact run, sampler, eta) for every stock sampler a step near `a` proposes."""
    runs = []
    for j in range(a, min(a + 3, len(steps))):
        # A warm-up step proposes a lower-order sampler, so look at the next few steps too.
        name = _closest(steps[j])
        eta = float(steps[j].canonical().eta)
        length = 0
        while a + length < len(steps) and _matches(name, eta, length, steps[a + length], exact_families):
            length += 1
        if length:
            runs.append((length, name, eta))
    return runs


def _solver_segments(schedule: SolverSchedule, exact_families: Optional[frozenset] = None) -> list[Segment]:
    """`exact_families`: the stock samplers that may be claimed exact (None: every one with a pattern)."""
    steps = list(schedule.steps)
    n = len(steps)
    # Dynamic programme over segmentations: fewest steps left without an exact stock sampler, then fewest
    # segments. best[a] = (cost, first segment) for steps a..n-1.
    best: list[Any] = [None] * (n + 1)
    best[n] = ((0, 0), None)
    for a in range(n - 1, -1, -1):
        (inexact, count), _ = best[a + 1]
        s = steps[a].canonical()
        choice = ((inexact + 1, count + 1), Segment(a, a + 1, _closest(s), float(s.eta), s.order, exact=False))
        for length, fam, eta in _exact_runs(steps, a, exact_families):
            for stop in range(a + 1, a + length + 1):
                (i2, c2), _ = best[stop]
                if (i2, c2 + 1) < choice[0]:
                    order = max(st.order for st in steps[a:stop])
                    choice = ((i2, c2 + 1), Segment(a, stop, fam, eta, order, exact=True))
        best[a] = choice
    out: list[Segment] = []
    a = 0
    while a < n:
        seg = best[a][1]
        prev = out[-1] if out else None
        if (prev is not None and not prev.exact and not seg.exact and prev.sampler == seg.sampler
                and prev.eta == seg.eta):
            # Neighbouring approximate steps under the same stock sampler form one segment.
            out[-1] = replace(prev, stop=seg.stop, order=max(prev.order, seg.order))
        else:
            out.append(seg)
        a = seg.stop
    if schedule.final == "denoise":
        # Every stock sampler's step to sigma 0 returns the denoised prediction, as our final rule does.
        out[-1] = replace(out[-1], stop=out[-1].stop + 1)
    if schedule.first_step != "model":
        out[0] = replace(out[0], exact=False)
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
    params = tuple(sorted(dict(getattr(schedule, "params", ()) or ()).items()))
    return [Segment(0, n, comfy or sampler, 0.0, 1, exact=False, params=params)]


def _segments(schedule: Schedule, sigmas: list[float], flow_frame: bool = False,
              diffusers_flow: bool = False) -> list[dict[str, Any]]:
    if _is_named(schedule):
        segs = _named_segments(schedule)
    else:
        segs = _solver_segments(schedule, _FLOW_FRAME_EXACT if flow_frame else None)
    return [s.to_dict(sigmas, diffusers_flow) for s in segs]


def segments(schedule: Schedule) -> list[dict[str, Any]]:
    """The stock-sampler segments covering the k-diffusion grid, as dicts (see the module docstring)."""
    return _segments(schedule, _tool_sigmas(schedule))


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
        notes.append("exact=true means the k-diffusion / ComfyUI sampler, called with the segment's options, "
                     "takes the same update rule on that slice (stochastic samplers draw their own noise)"
                     + ("; diffusers' schedulers of the same name differ in details such as lower_order_final"
                        if tool == "diffusers" else ""))
    notes.append(f"exact: {_EXACT_ROUTE[tool]}")
    return notes


# ----- the model's betas ---------------------------------------------------------------------------------------
BETAS = ("linear", "scaled_linear")
_NAMED_BETAS = {
    "linear": {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},                 # DDPM
    "scaled_linear": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},  # SD, SDXL
}
_BETA_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
              "rescale_betas_zero_snr")
Betas = Union[str, dict, Sequence[float], processes.VPDiscrete]


def _numpy_betas(config: dict[str, Any]) -> processes.VPDiscrete:
    # diffusers' own formulas for the two usual schedules, for when diffusers is not installed.
    n = int(config.get("num_train_timesteps", 1000))
    start, end = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
    kind = config.get("beta_schedule", "linear")
    if config.get("trained_betas") is not None:
        return processes.VPDiscrete(betas=tuple(float(b) for b in config["trained_betas"]))
    if kind == "linear":
        return processes.VPDiscrete(betas=tuple(np.linspace(start, end, n).tolist()))
    if kind == "scaled_linear":
        return processes.VPDiscrete(betas=tuple((np.linspace(start**0.5, end**0.5, n) ** 2).tolist()))
    raise ValueError(f"betas: beta_schedule={kind!r} needs diffusers installed (linear and scaled_linear do not)")


def betas_process(betas: Betas) -> processes.VPDiscrete:
    """The discrete VP process of a model's betas.

    `betas`: "linear" (DDPM's 1000 betas 1e-4 .. 0.02) or "scaled_linear" (Stable Diffusion's 0.00085 .. 0.012),
    a diffusers scheduler config (dict; its beta keys are read as s3search's model registry reads them), a list of
    betas, or a VPDiscrete.
    """
    if isinstance(betas, processes.VPDiscrete):
        return betas
    if isinstance(betas, str):
        if betas not in _NAMED_BETAS:
            raise ValueError(f"betas={betas!r} must be one of {', '.join(BETAS)}, a scheduler config or a list")
        betas = dict(_NAMED_BETAS[betas])
    if isinstance(betas, dict):
        config = {k: betas[k] for k in _BETA_KEYS if k in betas and betas[k] is not None}
        try:
            from .models.local.noise import process_from_scheduler_config

            return process_from_scheduler_config(config, "betas")
        except ImportError:
            return _numpy_betas(config)
    values = [float(b) for b in betas]
    if len(values) < 2 or not all(0.0 < b < 1.0 for b in values):
        raise ValueError("betas must be at least 2 values in (0, 1)")
    return processes.VPDiscrete(betas=tuple(values))


def _scheduler_betas(betas: Betas) -> dict[str, Any]:
    """The beta settings an S3Scheduler config needs to see the same model."""
    if isinstance(betas, str):
        return dict(_NAMED_BETAS[betas])
    if isinstance(betas, dict):
        return {k: betas[k] for k in _BETA_KEYS if k in betas}
    values = betas.betas if isinstance(betas, processes.VPDiscrete) else betas
    return {"num_train_timesteps": len(values), "trained_betas": [float(b) for b in values]}


def _same_betas(a: processes.NoiseProcess, b: processes.VPDiscrete) -> bool:
    # The default DDPM betas, whether float64 here or float32 in a diffusers config, are one model.
    return a == b or (isinstance(a, processes.VPDiscrete) and len(a.betas) == len(b.betas)
                      and bool(np.allclose(a.betas, b.betas, rtol=1e-6, atol=0.0)))


# ----- the data mean of first_step="mean-x0" ---------------------------------------------------------------------
def _needs_mean(schedule: Schedule) -> bool:
    return not _is_named(schedule) and schedule.first_step == "mean-x0"


def mean_json(data_mean: Any) -> Any:
    """The data mean as JSON data (a number or nested lists of floats), checked finite."""
    values = np.asarray(data_mean.detach().cpu().numpy() if hasattr(data_mean, "detach") else data_mean,
                        dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise ValueError("data_mean must be finite")
    return values.tolist()


def _mean_fields(schedule: Schedule, data_mean: Any, tool: str) -> tuple[dict[str, Any], list[str]]:
    """({"data_mean": ...} when the schedule needs it and it is known, notes) for one tool's export."""
    if not _needs_mean(schedule):
        return {}, []
    if data_mean is None:
        return {}, [f"first_step=mean-x0 needs the model's data mean ({_MEAN_ROUTE[tool]}); this export was made "
                    "without it"]
    return {"data_mean": mean_json(data_mean)}, [f"first_step=mean-x0: data_mean is the model's data mean, for "
                                                 f"{_MEAN_ROUTE[tool]}"]


# ----- the formats ---------------------------------------------------------------------------------------------
def to_json(schedule: Schedule) -> dict[str, Any]:
    """The native schedule JSON (the document `load_schedule` reads back)."""
    return schedule.to_dict()


def _discrete_timesteps(schedule: Schedule, discrete: processes.VPDiscrete) -> tuple[list[int], list[str]]:
    proc = _process(schedule)
    n_train = len(discrete.betas)
    notes: list[str] = []
    same = _same_betas(proc, discrete)
    lo, hi = discrete.sigma_ve(discrete.t_min), discrete.sigma_ve(discrete.t_max)
    out = []
    for t in schedule.timesteps:
        sigma = proc.sigma_ve(float(t))
        t_d = float(t) if same else discrete.t_of_sigma_ve(min(max(sigma, lo), hi))
        out.append(int(min(max(round(discrete.model_time(t_d)), 0), n_train - 1)))
    if not same:
        notes.append(f"timesteps map each VE sigma onto the nearest training step of a {n_train}-step discrete "
                     f"VP model (betas {discrete.betas[0]:.6g} .. {discrete.betas[-1]:.6g}); schedule process is "
                     f"{schedule.process}")
        outside = [s for s in (proc.sigma_ve(float(t)) for t in schedule.timesteps) if not lo <= s <= hi]
        if outside:
            notes.append(f"{len(outside)} sigma(s) lie outside the model's range {lo:.4g} .. {hi:.4g} and map to "
                         "its first or last training step")
    exact_ints = all(abs(discrete.model_time(float(t)) - round(discrete.model_time(float(t)))) < 1e-6
                     for t in schedule.timesteps) if same else False
    if not exact_ints:
        notes.append("integer timesteps are rounded; pass `sigmas` (exact) where the scheduler accepts them")
    if any(b >= a for a, b in zip(out, out[1:])):
        notes.append("rounding made some integer timesteps repeat; use `sigmas` or S3Scheduler instead")
    return out, notes


def _flow_diffusers(schedule: Schedule) -> tuple[list[float], list[float], list[str]]:
    """(N flow timesteps 1000 t, N + 1 flow sigmas ending 0.0, notes) in FlowMatchEuler's convention."""
    sig = flow_sigmas(schedule)
    notes = ["flow schedule: sigmas are the flow time t in [0, 1] (x_t = (1 - t) x0 + t eps) and timesteps are "
             "1000 t, as FlowMatchEulerDiscreteScheduler, SD3 and FLUX write them; the sigmas already hold the "
             "shift, so pass sigmas[:-1] to set_timesteps (or a pipeline's sigmas=) of a scheduler built with "
             "shift=1.0 and use_dynamic_shifting=False, which would shift them again otherwise"]
    if sig[0] == 1.0:
        notes.append(f"the first sigma 1.0 is the flow process's t_top = {processes.FLOW_T_TOP!r} (t = 1 is pure "
                     "noise, where no logSNR step starts), the pipelines' own first sigma")
    return [1000.0 * s for s in sig], sig + [0.0], notes


def to_diffusers(schedule: Schedule, discrete: Optional[processes.VPDiscrete] = None,
                 betas: Optional[Betas] = None, data_mean: Any = None) -> dict[str, Any]:
    """diffusers arrays: N timesteps (no trailing 0), N + 1 sigmas ending in 0.0, plus segments.

    A discrete VP model's timesteps are its integer training steps: `betas` names the model's betas (see
    `betas_process`; `discrete` is the same as a process), by default the schedule's own process when it is
    discrete, else the 1000-step linear-beta DDPM process "vp-discrete". A flow schedule without `betas` is
    written for flow models (flow sigmas, 1000 t). `data_mean` (first_step="mean-x0") goes into the scheduler
    config, where S3Scheduler reads it.
    """
    if discrete is not None and betas is not None:
        raise ValueError("pass betas or discrete, not both")
    if discrete is not None:
        betas = discrete
    proc = _process(schedule)
    scheduler_config: dict[str, Any] = {"schedule": schedule.to_dict()}
    flow = betas is None and _is_flow(schedule)
    if flow:
        timesteps, sigmas, notes = _flow_diffusers(schedule)
        num_train = 1000
    else:
        model = betas_process(betas) if betas is not None else \
            proc if isinstance(proc, processes.VPDiscrete) else processes.get("vp-discrete")
        if betas is not None:
            scheduler_config.update(_scheduler_betas(betas))
        timesteps, notes = _discrete_timesteps(schedule, model)
        sigmas = ve_sigmas(schedule) + [0.0]
        num_train = len(model.betas)
        if betas is None and not isinstance(proc, processes.VPDiscrete):
            notes.append("no betas given: timesteps are for the DDPM betas; name the model's (betas=, the CLI's "
                         "--betas, e.g. scaled_linear for Stable Diffusion or its scheduler_config.json)")
    mean, mean_notes = _mean_fields(schedule, data_mean, "diffusers")
    scheduler_config.update(mean)
    notes += mean_notes
    segs = _segments(schedule, sigmas[:-1] if schedule.final == "none" else sigmas,
                     diffusers_flow=_is_flow(schedule))
    if schedule.final == "none":
        notes.append("diffusers grids always end at sigma 0, so a diffusers scheduler takes one more step than "
                     "this schedule (final=none)")
        segs[-1]["sigmas"] = segs[-1]["sigmas"] + [0.0]
    return {
        "format": "diffusers",
        "num_inference_steps": len(timesteps),
        "num_train_timesteps": num_train,
        "timesteps": timesteps,
        "sigmas": sigmas,
        "scheduler": {"class": "s3search.integrations.diffusers_scheduler.S3Scheduler", "config": scheduler_config},
        "segments": segs,
        "notes": notes + _notes(schedule, "diffusers", segs),
        "nfe": schedule.nfe,
        "schedule": schedule.to_dict(),
    }


def k_diffusion_sigmas(schedule: Schedule, device: Any = None):
    """The k-diffusion sigmas tensor (float64 values rounded to float32, as k-diffusion's own schedules)."""
    import torch

    return torch.tensor(_tool_sigmas(schedule), dtype=torch.float32, device=device)


def to_k_diffusion(schedule: Schedule, data_mean: Any = None) -> dict[str, Any]:
    """k-diffusion: the VE sigmas list [s_0, ..., s_N, 0.0] (no 0.0 for final=none) and segments; `data_mean`
    (first_step="mean-x0") is carried for `sample_schedule`."""
    segs = segments(schedule)
    mean, mean_notes = _mean_fields(schedule, data_mean, "k-diffusion")
    notes = mean_notes + _notes(schedule, "k-diffusion", segs)
    if _is_flow(schedule):
        notes.insert(0, "flow schedule on k-diffusion's VE scale: call the flow model as "
                        "model(x / (1 - t), t / (1 - t)), with sigma_ve = t / (1 - t)")
    return {
        "format": "k-diffusion",
        "sigmas": _tool_sigmas(schedule),
        **mean,
        "segments": segs,
        "notes": notes,
        "nfe": schedule.nfe,
        "schedule": schedule.to_dict(),
    }


def _sigmas_string(values: list[float]) -> str:
    return ", ".join(repr(float(v)) for v in values)


def to_comfyui(schedule: Schedule, data_mean: Any = None) -> dict[str, Any]:
    """ComfyUI: the sigmas as a comma-separated string (for a custom-sigmas node) and segments (sampler names).

    A flow schedule gives flow sigmas (SD3 / FLUX in ComfyUI take sigma = t); any other gives VE sigmas.
    `data_mean` (first_step="mean-x0") is carried for the node's `sample_schedule`.
    """
    flow = _is_flow(schedule)
    sig = _with_final(schedule, flow_sigmas(schedule) if flow else ve_sigmas(schedule))
    segs = _segments(schedule, sig, flow_frame=flow, diffusers_flow=flow)
    for s in segs:
        s["sigmas_string"] = _sigmas_string(s["sigmas"])
    mean, mean_notes = _mean_fields(schedule, data_mean, "comfyui")
    notes = mean_notes + _notes(schedule, "comfyui", segs)
    if flow:
        notes.insert(0, "flow schedule: sigmas are the flow time t in [0, 1], as ComfyUI's SD3 / FLUX models take "
                        f"them; 1.0 stands for the flow process's t_top = {processes.FLOW_T_TOP!r}; ComfyUI's "
                        "samplers other than euler step in log(sigma), not the flow logSNR, and are not claimed "
                        "exact here")
    return {
        "format": "comfyui",
        "sigmas": _sigmas_string(sig),
        **mean,
        "segments": segs,
        "notes": notes,
        "nfe": schedule.nfe,
        "schedule": schedule.to_dict(),
    }


_EXPORTERS: dict[str, Callable[..., dict[str, Any]]] = {
    "json": to_json,
    "diffusers": to_diffusers,
    "k-diffusion": to_k_diffusion,
    "comfyui": to_comfyui,
}


def export(schedule: Schedule, format: str, betas: Optional[Betas] = None, data_mean: Any = None) -> dict[str, Any]:
    """The schedule in `format` (one of FORMATS); `betas` names a discrete model's betas for the diffusers
    timesteps (see `to_diffusers`; the other formats do not depend on them); `data_mean` is the model's data
    mean, carried where the schedule needs it (first_step="mean-x0") and the format is a tool's."""
    key = _ALIASES.get(format, format) if isinstance(format, str) else format
    if key not in _EXPORTERS:
        raise ValueError(f"format={format!r} is unknown; known formats: {', '.join(FORMATS)}")
    if data_mean is not None:
        mean_json(data_mean)  # a bad value is refused whatever the format
    if key == "diffusers":
        return to_diffusers(schedule, betas=betas, data_mean=data_mean)
    if betas is not None:
        betas_process(betas)  # a bad value is refused whatever the format
    if key == "json":
        return to_json(schedule)
    return _EXPORTERS[key](schedule, data_mean=data_mean)
