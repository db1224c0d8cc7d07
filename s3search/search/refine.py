"""Grid refinement: CMA-ES on the timestep grid of the incumbent, its steps and rules held fixed.

At 4-10 NFE the grid decides much of a schedule's error, and it is a smooth, low-dimensional problem (n + 2
numbers for n steps) that the S³ loop's mutations and grid jitters, ranked by a predictor that cannot order
small moves, tune slowly. CMA-ES (the `cmaes` package, which Optuna's CMA-ES sampler also uses) adapts its step
sizes and correlations to the grid's valley. Run on the final share of an NFE's budget.

Not resumable as a CMA state: a resumed refinement starts a fresh CMA-ES at the incumbent, from the ledger.
"""

from __future__ import annotations

import math

from cmaes import CMA

from .context import SearchContext
from .study import Candidate, chash

__all__ = ["refine_budget", "refine_grid"]


def refine_budget(options: dict, budget: int) -> int:
    """Evaluations of an NFE's `budget` kept for grid refinement (`refine_share` of it, rounded)."""
    return int(round(float(options["refine_share"]) * budget))


def refine_grid(ctx: SearchContext, nfe: int) -> None:
    """Spend the NFE's remaining budget on CMA-ES over the grid of its best evaluated schedule."""
    ranked = ctx.ranked_in_space(nfe)
    if not ranked:
        return
    incumbent = ranked[0].schedule
    x0, bounds = ctx.space.grid_vector(incumbent)
    pop = ctx.options["refine_population"]
    opt = CMA(mean=x0, sigma=float(ctx.options["refine_sigma"]), bounds=bounds,
              seed=int(ctx.rng.integers(2**31 - 1)), population_size=int(pop) if pop else None)
    stale = 0
    while ctx.remaining(nfe) > 0 and not ctx.stopped() and stale < 20:
        xs = [opt.ask() for _ in range(opt.population_size)]
        scheds = [ctx.space.with_grid(incumbent, x) for x in xs]
        # ctx.evaluate drops copies and what the study already holds; those are told their stored value.
        done = ctx.evaluate([Candidate(s, source="refine", generation=opt.generation + 1) for s in scheds], nfe)
        found = [ctx.ledger.done.get(chash(s)) for s in scheds]
        if any(e is None for e in found):   # the budget ran out inside this generation
            break
        stale = 0 if done else stale + 1
        opt.tell([(x, e.value if e.ok else ctx.worst(nfe)) for x, e in zip(xs, found)])
        top = ctx.ledger.best(nfe)
        ctx.log.append({"nfe": nfe, "refine_generation": opt.generation, "evaluations": ctx.ledger.count,
                        "best": top.value if top else math.inf})
