"""Every baseline of the sampler core at one NFE, on its grids: the search's starting points and yardsticks.

Two stages keep the seed affordable at small budgets:
1. every baseline on its conventional grid (the grid its paper or reference code uses);
2. once stage 1 is scored, the best few baselines on each other standard grid, so the comparison is against
   each strong baseline *on its best grid*, not on a grid we happened to pick;
3. every baseline on the grids that served the best ones (`best_grids`), which catches a method that ranks
   low on its conventional grid but well on another.
Labels are "<baseline>@<grid>"; the comparison table keeps, per baseline, its best grid on the search split.

With `ays_grids` a grid optimised for the job's model (Align Your Steps, `s3search.ays`) joins the grids of
stages 2 and 3 under the name "ays-opt". It is not a registry grid, since it belongs to one model: the stages
take it as an explicit `GridSource` (steps -> process times).
"""

from __future__ import annotations

import functools
from typing import Callable, Iterable, Mapping, Optional, Sequence

import torch

from .. import ays, baselines, grids, processes
from ..schedule import SolverSchedule
from ..space import target_first_steps
from .study import AnySchedule, Candidate, Evaluated

__all__ = ["CONVENTIONAL_GRID", "SEED_GRIDS", "FLOW_SEED_GRIDS", "AYS_GRID", "GridSource", "seed_grids", "label",
           "parse_label", "conventional", "on_grids", "best_per_baseline", "best_grids", "runs_on",
           "runnable_names", "ays_steps", "model_data_sampler", "ays_result", "ays_grid_sources", "clear_ays_cache"]

# The grid each method's reference code uses by default (DPM-Solver / UniPC: logSNR; EDM-family codes: rho = 7;
# Li et al. and DDIM on discrete models: time-uniform).
CONVENTIONAL_GRID: dict[str, str] = {
    "ddim": "time-uniform", "ddim_eta1": "time-uniform", "edm_heun": "edm", "ipndm": "edm", "deis": "edm",
    "er_sde_1": "edm", "er_sde_2": "edm", "er_sde_3": "edm", "seeds_1": "logsnr", "seeds_2": "logsnr",
    "seeds_3": "logsnr", "li_accelerated_ode": "time-uniform", "li_accelerated_ddpm": "time-uniform",
}
SEED_GRIDS = ("logsnr", "edm", "time-uniform", "quadratic", "kl-optimal", "ays-sdxl")
# SD3's shifted grid (shift 3). On the search's range the other flow pipeline grids are this one again
# (flow-dpm, flow-unipc) or nearly (flow-dynamic, shift e^1.15), so one is enough.
FLOW_SEED_GRIDS = ("flow-shift",)
AYS_GRID = "ays-opt"
GridSource = Callable[[int], tuple[float, ...]]   # steps -> process times, noisiest first


def seed_grids(process: str) -> tuple[str, ...]:
    """The standard grids for `process`: SEED_GRIDS, plus the flow pipeline grid on the flow process."""
    return SEED_GRIDS + FLOW_SEED_GRIDS if processes.get(process).name == "flow" else SEED_GRIDS


def label(name: str, grid: str) -> str:
    return f"{name}@{grid}"


def parse_label(text: str) -> tuple[str, str]:
    name, _, grid = text.partition("@")
    return name, grid


@functools.lru_cache(maxsize=4096)
def _first_call_at_start(schedule: AnySchedule) -> bool:
    """Whether a named sampler's first model evaluation is at x_T itself (a dry run with a zero denoiser).

    Samplers that move x_T first (noise churn, an ancestral first step) are evaluated elsewhere, so a diffusers
    pipeline's own first network call, made at x_T, is wasted on them."""
    from ..integrator import sample

    first: list[torch.Tensor] = []

    def denoiser(x: torch.Tensor, t: float) -> torch.Tensor:
        if not first:
            first.append(x.clone())
        return torch.zeros_like(x)

    x_T = torch.randn((1, 3), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sample(denoiser, x_T, schedule, generator=torch.Generator().manual_seed(1))
    return bool(first) and torch.equal(first[0], x_T)


def runs_on(schedule: AnySchedule, target: str) -> bool:
    """Whether `target` runs `schedule` exactly at its NFE (space.TARGETS; the rules are space.py's)."""
    allowed = target_first_steps(target)
    if allowed is None:
        return True
    if isinstance(schedule, SolverSchedule):
        return schedule.first_step in allowed
    # A named sampler has no first-step rule: what matters is where its first evaluation is.
    return "model" not in allowed or _first_call_at_start(schedule)


def runnable_names(target: str, nfes: Iterable[int], process: str,
                   names: Optional[Sequence[str]] = None) -> tuple[str, ...]:
    """The baselines (of `names`, default all) that `target` runs at every NFE where they exist, on their
    conventional grid: what a search for that target may seed with."""
    process = processes.get(process).name
    out = []
    for name in names if names is not None else baselines.names():
        built = [_build(name, nfe, process, CONVENTIONAL_GRID.get(name, "logsnr"), None, None) for nfe in nfes]
        if all(s is None or runs_on(s, target) for s in built):
            out.append(name)
    return tuple(out)


def _build(name: str, nfe: int, process: str, grid: str, t_start: Optional[float],
           t_end: Optional[float], extra: Optional[Mapping[str, GridSource]] = None) -> Optional[AnySchedule]:
    if extra and grid in extra:
        return _on_source(name, nfe, process, extra[grid])
    if grid.startswith("ays-"):
        # An Align-Your-Steps table keeps its own noise levels where they fit the requested range (that range is
        # the table's point: SDXL's starts at sigma 14.6); stretched onto [t_end, t_start] only otherwise.
        native = _try(name, nfe, process, grid, None, None)
        if native is not None and _inside(native, t_start, t_end):
            return native
    return _try(name, nfe, process, grid, t_start, t_end)


def _try(name: str, nfe: int, process: str, grid: str, t_start: Optional[float],
         t_end: Optional[float]) -> Optional[AnySchedule]:
    try:
        sched = baselines.for_nfe(name, nfe, process, grid=grid, t_start=t_start, t_end=t_end)
    except ValueError:   # this baseline cannot make exactly `nfe` evaluations, or the grid does not fit
        return None
    return sched if sched.nfe == nfe else None


def _on_source(name: str, nfe: int, process: str, source: GridSource) -> Optional[AnySchedule]:
    m = baselines.num_timesteps_for(name, nfe, process)
    if m is None:
        return None
    try:
        sched = baselines.get(name, source(m - 1), process)
    except ValueError:
        return None
    return sched if sched.nfe == nfe else None


def _inside(schedule: AnySchedule, t_start: Optional[float], t_end: Optional[float]) -> bool:
    ts = schedule.timesteps
    return (t_start is None or ts[0] <= t_start * (1 + 1e-9)) and (t_end is None or ts[-1] >= t_end * (1 - 1e-9))


def conventional(nfe: int, process: str, *, names: Optional[Sequence[str]] = None,
                 t_start: Optional[float] = None, t_end: Optional[float] = None,
                 target: str = "any") -> list[Candidate]:
    """Stage 1: each baseline on its conventional grid (falling back to logSNR); only those `target` runs."""
    process = processes.get(process).name
    out = []
    for name in names if names is not None else baselines.names():
        for grid in dict.fromkeys((CONVENTIONAL_GRID.get(name, "logsnr"), "logsnr")):
            sched = _build(name, nfe, process, grid, t_start, t_end)
            if sched is not None and runs_on(sched, target):
                out.append(Candidate(sched, source="baseline", label=label(name, grid)))
                break
    return out


def on_grids(names: Iterable[str], nfe: int, process: str, *, grid_names: Sequence[str] = SEED_GRIDS,
             t_start: Optional[float] = None, t_end: Optional[float] = None,
             target: str = "any", extra_grids: Optional[Mapping[str, GridSource]] = None) -> list[Candidate]:
    """Stage 2: the named baselines on every grid in `grid_names` that exists and fits the process (and that
    `target` runs). `extra_grids` names grids outside the registry (the job's "ays-opt")."""
    process = processes.get(process).name
    extra = dict(extra_grids or {})
    known = set(grids.names()) | set(extra)
    out = []
    for name in names:
        for grid in grid_names:
            if grid not in known:
                continue
            sched = _build(name, nfe, process, grid, t_start, t_end, extra)
            if sched is not None and runs_on(sched, target):
                out.append(Candidate(sched, source="baseline", label=label(name, grid)))
    return out


def best_per_baseline(evaluated: Iterable[Evaluated], nfe: int) -> dict[str, Evaluated]:
    """Baseline name -> its best evaluated grid at this NFE (search split)."""
    best: dict[str, Evaluated] = {}
    for e in evaluated:
        if e.source != "baseline" or not e.label or e.nfe != nfe or not e.ok:
            continue
        name, _ = parse_label(e.label)
        if name not in best or e.value < best[name].value:
            best[name] = e
    return best


def best_grids(evaluated: Iterable[Evaluated], nfe: int) -> list[str]:
    """The grids of the evaluated baselines at this NFE, best first by the best value each grid reached."""
    best: dict[str, float] = {}
    for e in evaluated:
        if e.source != "baseline" or not e.label or e.nfe != nfe or not e.ok:
            continue
        _, grid = parse_label(e.label)
        best[grid] = min(best.get(grid, float("inf")), e.value)
    return sorted(best, key=best.get)


# ----- Align Your Steps grids of the job's model ----------------------------------------------------------
_AYS_CACHE: dict[tuple, ays.AYSResult] = {}
AYS_SETTINGS = ays.AYSSettings()   # what a search's ays_grids uses (the `s3search ays` defaults)


def ays_steps(nfe: int, process: str) -> int:
    """The steps of the AYS grid for `nfe`: those of the one-evaluation-per-step baselines with a final
    denoise (DDIM, DPM-Solver++(2M), iPNDM: nfe - 1); other step counts interpolate it (AYSResult.grid)."""
    m = baselines.num_timesteps_for("dpmpp_2m", nfe, process)
    if m is None or m < 3:
        raise ValueError(f"nfe={nfe!r}: an AYS grid needs at least 2 steps (nfe >= 3)")
    return m - 1


def model_data_sampler(spec) -> Optional[ays.DataSampler]:
    """Training data of a model for the KLUB: its reference sampler, else draws from its finite data set."""
    if spec.reference_sampler is not None:
        return spec.reference_sampler
    if spec.reference_set is None:
        return None
    data_set = spec.reference_set

    def draw(n: int, gen: torch.Generator) -> torch.Tensor:
        data = data_set()
        return data[torch.randint(0, data.shape[0], (n,), generator=gen)]

    return draw


def ays_result(model: str, nfe: int, *, t_start: Optional[float] = None, t_end: Optional[float] = None,
               settings: Optional[ays.AYSSettings] = None,
               callback: Optional[ays.ProgressCallback] = None) -> ays.AYSResult:
    """The AYS grid of `model` for `nfe`, optimised once per (model, fingerprint, nfe, range, settings) in
    this process: repeated searches of a runner reuse it."""
    from ..models import registry

    settings = settings if settings is not None else AYS_SETTINGS
    spec = registry.get(model)
    process = spec.process
    key = (model, spec.fingerprint, process.name, int(nfe), t_start, t_end, settings)
    if key not in _AYS_CACHE:
        sampler = model_data_sampler(spec)
        if sampler is None:
            raise ValueError(f"model={model!r} has no data sampler or data set, which the AYS objective needs")
        _AYS_CACHE[key] = ays.optimise_with(settings, spec.denoiser, sampler, ays_steps(nfe, process.name),
                                            process, t_start, t_end, callback)
    return _AYS_CACHE[key]


def ays_grid_sources(model: str, nfe: int, *, t_start: Optional[float] = None, t_end: Optional[float] = None,
                     settings: Optional[ays.AYSSettings] = None) -> dict[str, GridSource]:
    """{"ays-opt": steps -> times} for `on_grids`."""
    return {AYS_GRID: ays_result(model, nfe, t_start=t_start, t_end=t_end, settings=settings).grid}


def clear_ays_cache() -> None:
    _AYS_CACHE.clear()
