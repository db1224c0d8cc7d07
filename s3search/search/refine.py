"""Grid refinement: CMA-ES on the timestep grid of the incumbent, its steps and rules held fixed.

At 4-10 NFE the grid decides much of a schedule's error, and it is a smooth, low-dimensional problem (n + 2
numbers for n steps) that the S³ loop's mutations and grid jitters, ranked by a predictor that cannot order
small moves, tune slowly. CMA-ES (the `cmaes` package, which Optuna's CMA-ES sampler also uses) adapts its step
sizes and correlations to the grid's valley. Run on the final share of an NFE's budget.

Not resumable as a CMA state: a resumed refinement starts a fresh CMA-ES at the incumbent, from the ledger.
"""

from __future__ import annotations

import math

import numpy as np
from cmaes import CMA

from ..schedule import SolverSchedule
from .context import SearchContext
from .study import Candidate, chash

__all__ = ["refine_budget", "refine_grid"]


def refine_budget(options: dict, budget: int) -> int:
    """Evaluations of an NFE's `budget` kept for grid refinement (`refine_share` of it, rounded)."""
    return int(round(float(options.get("refine_share", 0.0)) * budget))


def _penalty(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return 2.0 * max(finite) + 1.0 if finite else 1e12


def refine_grid(ctx: SearchContext, nfe: int) -> None:
    """Spend the NFE's remaining budget on CMA-ES over the grid of its best evaluated schedule."""
    ours = [e for e in ctx.ledger.done.values() if e.nfe == nfe and e.ok and isinstance(e.schedule, SolverSchedule)
            and ctx.space.contains(e.schedule)]
    if not ours:
        return
    incumbent = min(ours, key=lambda e: (e.value, e.trial_number)).schedule
    x0, bounds = ctx.space.grid_vector(incumbent)
    pop = ctx.options.get("refine_population")
    opt = CMA(mean=x0, sigma=float(ctx.options["refine_sigma"]), bounds=bounds,
              seed=int(ctx.rng.integers(2**31 - 1)), population_size=int(pop) if pop else None)
    known = [e.value for e in ctx.ledger.done.values() if e.nfe == nfe]
    stale = 0
    while ctx.remaining(nfe) > 0 and not ctx.stopped() and stale < 20:
        xs = [opt.ask() for _ in range(opt.population_size)]
        scheds = [ctx.space.with_grid(incumbent, x) for x in xs]
        fresh = [Candidate(s, source="refine", generation=opt.generation + 1) for s in
                 {chash(s): s for s in scheds if not ctx.ledger.seen(s)}.values()]
        done = {chash(e.schedule): e for e in ctx.evaluate(fresh, nfe)}
        values = []
        for s in scheds:
            e = done.get(chash(s)) or ctx.ledger.done.get(chash(s))
            values.append(e.value if e is not None else math.nan)
        if any(math.isnan(v) for v in values):   # the budget ran out inside this generation
            break
        known += [done[h].value for h in done]
        stale = 0 if done else stale + 1
        opt.tell([(x, v if math.isfinite(v) else _penalty(known)) for x, v in zip(xs, values)])
        top = ctx.ledger.best(nfe)
        ctx.log.append({"nfe": nfe, "refine_generation": opt.generation, "evaluations": ctx.ledger.count,
                        "best": top.value if top else math.inf})
