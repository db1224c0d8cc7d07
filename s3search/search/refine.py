"""Grid refinement: CMA-ES on the timestep grid of the best schedules, their steps and rules held fixed.

At 4-10 NFE the grid decides much of a schedule's error, and it is a smooth, low-dimensional problem (n + 2
numbers for n steps) that the S³ loop's mutations and grid jitters, ranked by a predictor that cannot order
small moves, tune slowly. CMA-ES (the `cmaes` package, which Optuna's CMA-ES sampler also uses) adapts its step
sizes and correlations to the grid's valley. Run on the final share of an NFE's budget.

With `refine_arms` > 1 the best schedule of each of that many structures (first-step rule, final rule) gets its
own CMA-ES, since an untuned grid says little about what a structure can reach (gmm-64d NFE 5, seed 2: the
analytical-first, no-final-denoise structure's best scored 0.37 against the incumbent's 0.22, and its grid alone
took it to 0.071 where the incumbent's stopped at 0.092). Each arm runs one generation in turn, then every
further generation goes to the arm whose last generation improved it most (relative to its best before).

Not resumable as a CMA state: a resumed refinement starts fresh CMA-ES arms from the ledger.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cmaes import CMA

from ..schedule import SolverSchedule
from .context import SearchContext
from .study import Candidate, chash

__all__ = ["refine_budget", "refine_grid", "refine_starts"]

_STALE_GENERATIONS = 20   # an arm that many generations without a new best of its own is done


def refine_budget(options: dict, budget: int) -> int:
    """Evaluations of an NFE's `budget` kept for grid refinement (`refine_share` of it, rounded)."""
    return int(round(float(options["refine_share"]) * budget))


def refine_starts(ctx: SearchContext, nfe: int, n: int) -> list[tuple[SolverSchedule, float]]:
    """The best evaluated schedule of each of the n best structures (first-step rule, final rule), best first."""
    out: dict[tuple[str, str], tuple[SolverSchedule, float]] = {}
    for e in ctx.ranked_in_space(nfe):
        out.setdefault((e.schedule.first_step, e.schedule.final), (e.schedule, e.value))
        if len(out) >= n:
            break
    return list(out.values())


@dataclass
class _Arm:
    start: SolverSchedule
    opt: CMA
    best: float
    gain: float = math.inf    # relative improvement of its last generation (inf: not run yet)
    stale: int = 0


def refine_grid(ctx: SearchContext, nfe: int) -> None:
    """Spend the NFE's remaining budget on CMA-ES over the grids of its best evaluated schedules, one arm for
    the best of each of the `refine_arms` best structures."""
    pop = ctx.options["refine_population"]
    arms = []
    for start, value in refine_starts(ctx, nfe, int(ctx.options["refine_arms"])):
        x0, bounds = ctx.space.grid_vector(start)
        opt = CMA(mean=x0, sigma=float(ctx.options["refine_sigma"]), bounds=bounds,
                  seed=int(ctx.rng.integers(2**31 - 1)), population_size=int(pop) if pop else None)
        arms.append(_Arm(start, opt, value))
    while ctx.remaining(nfe) > 0 and not ctx.stopped():
        live = [a for a in arms if a.stale < _STALE_GENERATIONS]
        if not live:
            break
        arm = max(live, key=lambda a: a.gain)   # first the unrun arms in rank order, then the most improving
        if not _generation(ctx, nfe, arm):       # the budget ran out inside this generation
            break
        top = ctx.ledger.best(nfe)
        ctx.log.append({"nfe": nfe, "refine_generation": arm.opt.generation, "refine_arm": arms.index(arm),
                        "evaluations": ctx.ledger.count, "best": top.value if top else math.inf})


def _generation(ctx: SearchContext, nfe: int, arm: _Arm) -> bool:
    """One CMA-ES generation of `arm`; False when the budget ran out before all of it was evaluated."""
    opt = arm.opt
    xs = [opt.ask() for _ in range(opt.population_size)]
    scheds = [ctx.space.with_grid(arm.start, x) for x in xs]
    # ctx.evaluate drops copies and what the study already holds; those are told their stored value.
    done = ctx.evaluate([Candidate(s, source="refine", generation=opt.generation + 1) for s in scheds], nfe)
    found = [ctx.ledger.done.get(chash(s)) for s in scheds]
    if any(e is None for e in found):
        return False
    values = [e.value if e.ok else ctx.worst(nfe) for e in found]
    opt.tell(list(zip(xs, values)))
    new = min(values)
    arm.gain = (arm.best - new) / max(abs(arm.best), 1e-12) if new < arm.best else 0.0
    arm.best = min(arm.best, new)
    arm.stale = 0 if done else arm.stale + 1
    return True
