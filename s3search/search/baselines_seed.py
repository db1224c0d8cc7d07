"""Every baseline of the sampler core at one NFE, on its grids: the search's starting points and yardsticks.

Two stages keep the seed affordable at small budgets:
1. every baseline on its conventional grid (the grid its paper or reference code uses);
2. once stage 1 is scored, the best few baselines on each other standard grid, so the comparison is against
   each strong baseline *on its best grid*, not on a grid we happened to pick;
3. every baseline on the grids that served the best ones (`best_grids`), which catches a method that ranks
   low on its conventional grid but well on another.
Labels are "<baseline>@<grid>"; the comparison table keeps, per baseline, its best grid on the search split.
"""

from __future__ import annotations

import functools
from typing import Iterable, Optional, Sequence

import torch

from .. import baselines, grids, processes
from ..schedule import SolverSchedule
from ..space import target_first_steps
from .study import AnySchedule, Candidate, Evaluated

__all__ = ["CONVENTIONAL_GRID", "SEED_GRIDS", "FLOW_SEED_GRIDS", "seed_grids", "label", "parse_label",
           "conventional", "on_grids", "best_per_baseline", "best_grids", "runs_on", "runnable_names"]

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
           t_end: Optional[float]) -> Optional[AnySchedule]:
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
             target: str = "any") -> list[Candidate]:
    """Stage 2: the named baselines on every grid in `grid_names` that exists and fits the process (and that
    `target` runs)."""
    process = processes.get(process).name
    known = set(grids.names())
    out = []
    for name in names:
        for grid in grid_names:
            if grid not in known:
                continue
            sched = _build(name, nfe, process, grid, t_start, t_end)
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
