"""Named baselines: the published samplers, each available on any timestep grid of any process.

    from s3search import baselines
    sched = baselines.get("dpmpp_2m", timesteps=[80.0, ..., 0.002], process="edm")
    x0 = sample(denoiser, x_T, sched, generator=torch.Generator().manual_seed(0))

A baseline is a SolverSchedule where the method is a point of the schedule space (DDIM, DPM-Solver++, UniPC,
SA-Solver, SEEDS-1, ER-SDE-1 with phi = sigma^(1 + eta), Heun in flow time), otherwise a NamedSchedule run by its own function
(s3search.named). Every schedule ends with x = D(x_N, t_N): the step to sigma = 0 of k-diffusion and diffusers.
Where two references differ (DPM-Solver++(3M) warm-up and final steps), a parameter picks which one to follow.

diffusers' flow-matching schedulers are baselines on flow grids (docs/baselines.md): FlowMatchEuler is `ddim`,
DPMSolverMultistep and UniPCMultistep with use_flow_sigmas are `dpmpp_2m` and `unipc_bh2_2`, each unchanged,
and FlowMatchHeun is `flow_heun`, the trapezoidal corrector with an extra evaluation (derivative "trapezoid",
corrector "implicit") at every step: all four are points of the schedule space.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from . import grids, processes
from .named import NamedSchedule, get_sampler
from .named.registry import Param, choice, integer, number, optional_number
from .processes import NoiseProcess
from .schedule import SolverSchedule, StepSpec

__all__ = ["Baseline", "Schedule", "names", "get", "info", "describe", "num_timesteps_for", "for_nfe"]

Schedule = Union[SolverSchedule, NamedSchedule]
Builder = Callable[[tuple[float, ...], str, dict[str, Any]], Schedule]


def _boolean(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{path}={value!r} must be true or false")
    return value


@dataclass(frozen=True)
class Baseline:
    name: str
    description: str
    paper: str
    build: Builder
    params: Mapping[str, Param] = field(default_factory=dict)
    named: Optional[str] = None   # the named sampler it runs on, when it is not a point of the schedule space

    def resolve(self, params: Mapping[str, Any]) -> dict[str, Any]:
        if self.named is not None:
            return dict(params)  # NamedSchedule checks them against the sampler
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            known = ", ".join(sorted(self.params)) or "none"
            raise ValueError(f"params.{unknown[0]} is not a parameter of baseline {self.name!r} (known: {known})")
        return {k: (p.check(params[k], f"params.{k}") if k in params else p.default) for k, p in self.params.items()}

    @property
    def param_defaults(self) -> dict[str, Any]:
        if self.named is not None:
            return {k: p.default for k, p in get_sampler(self.named).params.items()}
        return {k: p.default for k, p in self.params.items()}


# ----- schedule-space baselines ------------------------------------------------------------------------------
def _steps(n: int, make: Callable[[int], StepSpec]) -> tuple[StepSpec, ...]:
    return tuple(make(i) for i in range(n))


def _schedule(ts: tuple[float, ...], process: str, steps: tuple[StepSpec, ...]) -> SolverSchedule:
    return SolverSchedule(process=process, timesteps=ts, steps=steps)


def _ddim(ts, process, p):
    return _schedule(ts, process, _steps(len(ts) - 1, lambda i: StepSpec(eta=p["eta"])))


def _dpmpp_2m(ts, process, p):
    return _schedule(ts, process, _steps(len(ts) - 1, lambda i: StepSpec(
        order=min(2, i + 1), derivative="dpmpp" if i else "taylor")))


def _dpmpp_3m(ts, process, p, eta: float = 0.0):
    # k-diffusion: order 1, then order 2 with the exact phi_2 weight ("taylor"), then 3M; its last step goes
    # to sigma = 0, our final denoise. diffusers (final_sigmas_type="zero"): order 2 is the 2M midpoint rule, and
    # with lower_order_final and fewer than 15 evaluations the step before the final one is order 2 as well.
    n = len(ts) - 1
    warm = p["warmup"]

    def step(i: int) -> StepSpec:
        order = min(3, i + 1)
        if p["lower_order_final"] and len(ts) < 15 and i == n - 1:
            order = min(order, 2)
        derivative = {1: "taylor", 2: warm, 3: "dpmpp"}[order]
        return StepSpec(order=order, derivative=derivative, eta=eta)
    return _schedule(ts, process, _steps(n, step))


def _dpmpp_3m_sde(ts, process, p):
    return _dpmpp_3m(ts, process, {"warmup": "taylor", "lower_order_final": False}, eta=p["eta"])


def _dpmpp_2m_sde(solver_type: str) -> Builder:
    # k-diffusion's 2M SDE: 'midpoint' is the 2M rule with kernel rate (1 + eta) h; 'heun' is its exact
    # linear-in-lambda integral (taylor).
    derivative = "dpmpp" if solver_type == "midpoint" else "taylor"

    def build(ts, process, p):
        return _schedule(ts, process, _steps(len(ts) - 1, lambda i: StepSpec(
            order=min(2, i + 1), derivative=derivative if i else "taylor", eta=p["eta"])))
    return build


def _unipc(variant: str, order: int) -> Builder:
    # diffusers UniPCMultistepScheduler: UniP-p predictor with warm-up min(p, i + 1) and, with lower_order_final,
    # min(p, evaluations left); UniC on every step. The corrector of the last step would only change x_N, which
    # the final denoise does not use (it reuses the evaluation at the predicted point), so it is left off.
    def build(ts, process, p):
        n, m = len(ts) - 1, len(ts)

        def step(i: int) -> StepSpec:
            k = min(order, i + 1)
            if p["lower_order_final"]:
                k = min(k, m - i)
            return StepSpec(order=k, derivative=variant, corrector="unic" if i < n - 1 else "none")
        return _schedule(ts, process, _steps(n, step))
    return build


def _sa_solver(ts, process, p):
    # Stochastic Adams: predictor of order p (Lagrange in lambda, exact integrals), corrector with the new point
    # (order p + 1), eta = tau^2 where the step's target noise level lies inside [tau_sigma_min, tau_sigma_max].
    proc = processes.get(process)
    lo, hi = p["tau_sigma_min"], p["tau_sigma_max"]
    n = len(ts) - 1

    def step(i: int) -> StepSpec:
        sv = proc.sigma_ve(ts[i + 1])
        inside = (lo is None or sv >= lo) and (hi is None or sv <= hi)
        return StepSpec(order=min(p["predictor_order"], i + 1), derivative="taylor",
                        corrector="unic" if i < n - 1 else "none", eta=p["tau"] ** 2 if inside else 0.0)
    return _schedule(ts, process, _steps(n, step))


def _seeds_1(ts, process, p):
    prediction = "data" if p["form"] == "data" else "noise"
    return _schedule(ts, process, _steps(len(ts) - 1, lambda i: StepSpec(prediction=prediction, eta=1.0)))


_ER_SDE_1_EXPONENTS = {1: 1.0, 2: 2.0, 4: 1.5, 5: 2.5}   # phi = sigma^(1 + eta) choices


def _er_sde_1(ts, process, p):
    # phi = sigma^(1 + eta) makes ER-SDE-1 the eta-family first-order step; other phi run by name.
    phi = p.get("phi", get_sampler("er_sde_1").params["phi"].default)
    s_noise = p.get("s_noise", 1.0)
    if phi in _ER_SDE_1_EXPONENTS and s_noise == 1.0:
        eta = _ER_SDE_1_EXPONENTS[phi] - 1.0
        return _schedule(ts, process, _steps(len(ts) - 1, lambda i: StepSpec(eta=eta)))
    return NamedSchedule(sampler="er_sde_1", process=process, timesteps=ts, params=p)


def _flow_heun(ts, process, p):
    # Heun's second evaluation at the corrected point is the next step's first: PECE, one step per interval.
    return _schedule(ts, process, _steps(len(ts) - 1, lambda i: StepSpec(derivative="trapezoid",
                                                                           corrector="implicit")))


def _named(sampler: str) -> Builder:
    def build(ts, process, p):
        return NamedSchedule(sampler=sampler, process=process, timesteps=ts, params=p)
    return build


_ETA = Param(1.0, number(0.0, 10.0), "stochasticity: 0 = ODE, 1 = the reverse SDE")
_LOF = Param(True, _boolean, "lower orders on the last steps, as diffusers")

_DPM = "Lu et al., DPM-Solver++ (arXiv 2211.01095)"
_UNIPC = "Zhao et al., UniPC, NeurIPS 2023 (arXiv 2302.04867)"
_BASELINES: dict[str, Baseline] = {}


def _add(b: Baseline) -> None:
    _BASELINES[b.name] = b


_add(Baseline("ddim", "DDIM (eta = 0): first-order data prediction, the probability-flow ODE; equals Euler in sigma",
              "Song et al., Denoising Diffusion Implicit Models, ICLR 2021", _ddim,
              {"eta": Param(0.0, number(0.0, 10.0), "stochasticity")}))
_add(Baseline("ddim_eta1", "DDIM with eta = 1: the DDPM posterior step (ancestral sampling)",
              "Song et al., Denoising Diffusion Implicit Models, ICLR 2021", _ddim, {"eta": _ETA}))
_add(Baseline("dpmpp_2m", "DPM-Solver++(2M): second-order multistep, 1 NFE per step", _DPM, _dpmpp_2m))
_add(Baseline("dpmpp_3m", "DPM-Solver++(3M) as k-diffusion (3M SDE with eta = 0; set warmup=dpmpp, "
              "lower_order_final=true for diffusers)", _DPM, _dpmpp_3m,
              {"warmup": Param("taylor", choice("taylor", "dpmpp"), "order-2 warm-up step: k-diffusion (taylor) "
                               "or diffusers (dpmpp)"),
               "lower_order_final": Param(False, _boolean, "order 2 on the last step when fewer than 15 "
                                          "timesteps, as diffusers")}))
_add(Baseline("dpmpp_2m_sde", "SDE-DPM-Solver++(2M), midpoint rule (k-diffusion default)", _DPM,
              _dpmpp_2m_sde("midpoint"), {"eta": _ETA}))
_add(Baseline("dpmpp_2m_sde_heun", "SDE-DPM-Solver++(2M), heun rule (exact linear integral)", _DPM,
              _dpmpp_2m_sde("heun"), {"eta": _ETA}))
_add(Baseline("dpmpp_3m_sde", "SDE-DPM-Solver++(3M) as k-diffusion", _DPM, _dpmpp_3m_sde, {"eta": _ETA}))
for _variant in ("bh1", "bh2"):
    for _order in (2, 3):
        _add(Baseline(f"unipc_{_variant}_{_order}", f"UniPC, B(h) = {_variant}, UniP-{_order} with UniC "
                      f"(order {_order + 1}), as diffusers' UniPCMultistepScheduler", _UNIPC,
                      _unipc(_variant, _order), {"lower_order_final": _LOF}))
_add(Baseline("sa_solver", "SA-Solver: stochastic Adams predictor-corrector (data prediction, exact Lagrange "
              "integrals, eta = tau^2)", "Xue et al., SA-Solver, NeurIPS 2023 (arXiv 2309.05019)", _sa_solver,
              {"tau": Param(1.0, number(0.0, 3.0), "stochasticity tau (eta = tau^2)"),
               "predictor_order": Param(3, integer(1, 3), "predictor order (corrector is one higher)"),
               "tau_sigma_min": Param(None, optional_number(0.0), "tau applies where sigma_VE >= this"),
               "tau_sigma_max": Param(None, optional_number(0.0), "tau applies where sigma_VE <= this")}))
_add(Baseline("seeds_1", "SEEDS-1: the exact eta = 1 step (data or noise prediction form)",
              "Gonzalez et al., SEEDS, NeurIPS 2023 (arXiv 2305.14267)", _seeds_1,
              {"form": Param("data", choice("data", "noise"), "prediction form")}))
for _k in (2, 3):
    _add(Baseline(f"seeds_{_k}", get_sampler(f"seeds_{_k}").description, get_sampler(f"seeds_{_k}").paper,
                  _named(f"seeds_{_k}"), named=f"seeds_{_k}"))
_add(Baseline("er_sde_1", get_sampler("er_sde_1").description + " (phi = sigma^(1+eta) runs as an eta step)",
              get_sampler("er_sde_1").paper, _er_sde_1, named="er_sde_1"))
_add(Baseline("flow_heun", "Heun (2nd order, 2 NFE per step) on the rectified-flow ODE in flow time, as diffusers' "
              "FlowMatchHeunDiscreteScheduler", "Liu et al., Flow Straight and Fast (rectified flow), ICLR 2023; "
              "diffusers FlowMatchHeunDiscreteScheduler", _flow_heun))
for _name in ("er_sde_2", "er_sde_3", "deis", "ipndm", "edm_heun", "li_accelerated_ode",
              "li_accelerated_ddpm"):
    _add(Baseline(_name, get_sampler(_name).description, get_sampler(_name).paper, _named(_name), named=_name))


# ----- public API ------------------------------------------------------------------------------------------
def names() -> list[str]:
    """Every registered baseline."""
    return sorted(_BASELINES)


def info(name: str) -> Baseline:
    if name not in _BASELINES:
        raise ValueError(f"baseline={name!r} is unknown; known baselines: {', '.join(names())}")
    return _BASELINES[name]


def describe() -> list[dict[str, Any]]:
    """One JSON-ready entry per baseline: name, description, paper, parameter defaults, how it runs."""
    probe = grids.logsnr(processes.get("edm"), 3)
    return [{"name": b.name, "description": b.description, "paper": b.paper, "params": b.param_defaults,
             "kind": "named" if isinstance(get(b.name, probe, "edm"), NamedSchedule) else "schedule"}
            for b in (_BASELINES[n] for n in names())]


def _process_name(process: Union[str, NoiseProcess]) -> str:
    if isinstance(process, NoiseProcess):
        if processes.get(process.name) != process:
            raise ValueError(f"process={process.name!r}: schedules name a registered process; this instance "
                             "differs from the registered one")
        return process.name
    processes.get(process)
    return process


def get(name: str, timesteps: Sequence[float], process: Union[str, NoiseProcess], **params: Any) -> Schedule:
    """Baseline `name` on `timesteps` (noisiest first, all > 0; the last model call is D(x_N, t_N))."""
    baseline = info(name)
    if isinstance(timesteps, (str, bytes)) or not isinstance(timesteps, Sequence):
        raise ValueError("timesteps must be a sequence of numbers")
    ts = tuple(float(t) if isinstance(t, int) and not isinstance(t, bool) else t for t in timesteps)
    sched = baseline.build(ts, _process_name(process), baseline.resolve(params))
    return replace(sched, name=name)


def num_timesteps_for(name: str, nfe: int, process: Union[str, NoiseProcess] = "edm",
                      **params: Any) -> Optional[int]:
    """The number of timesteps at which baseline `name` makes exactly `nfe` evaluations (None if none does)."""
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"nfe={nfe!r} must be a positive integer")
    proc = processes.get(_process_name(process))
    for m in range(2, nfe + 2):
        ts = grids.logsnr(proc, m - 1)
        got = get(name, ts, proc.name, **params).nfe
        if got == nfe:
            return m
        if got > nfe:
            return None
    return None


def for_nfe(name: str, nfe: int, process: Union[str, NoiseProcess], grid: str = "logsnr",
            t_start: Optional[float] = None, t_end: Optional[float] = None, **params: Any) -> Schedule:
    """Baseline `name` on the named grid with as many timesteps as make exactly `nfe` evaluations."""
    m = num_timesteps_for(name, nfe, process, **params)
    if m is None:
        raise ValueError(f"nfe={nfe}: baseline {name!r} cannot make exactly {nfe} evaluations")
    ts = grids.get(grid, _process_name(process), m - 1, t_start, t_end)
    return get(name, ts, process, **params)
