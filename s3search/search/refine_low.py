"""Grid refinement of a multi-fidelity search: the optimiser runs on low-fidelity scores, and the best grid of
each round is evaluated in full.

The same arms and optimisers as `refine.refine_grid` (the best schedule of each of the `refine_arms` best
structures on the full-fidelity scores; GP or CMA-ES on the grid vector), but each proposal costs a low-fidelity
evaluation (`options.fidelity.low_samples`), so the refinement share buys about n_samples / low_samples times
more proposals. The optimiser of an arm sees low-fidelity values only (its start is scored at low fidelity too),
so it never compares the two fidelities. A round's proposals are stored as low-fidelity trials (source
`refine`) when the round ends, the promoted one marked; the promoted grid is a full trial of source `refine`.
Like the full-fidelity refinement it does not resume an optimiser's state: a resumed search starts fresh arms.
"""

from __future__ import annotations

import math

from .context import SearchContext
from .refine import STALE_ROUNDS, Arm, optimiser, refine_starts   # one implementation of the optimisers
from .study import Candidate, chash

__all__ = ["refine_grid_low"]


def _left(ctx: SearchContext, nfe: int, pending: int) -> float:
    """Model calls this NFE has left, less `pending` calls scored but not stored yet."""
    return ctx.call_budget(nfe) - ctx.calls(nfe) - pending


def refine_grid_low(ctx: SearchContext, nfe: int) -> None:
    """Spend the NFE's remaining calls on the grids of its best schedules, proposals scored at low fidelity."""
    low = ctx.low
    assert low is not None
    low_calls, full_calls = low.n_samples * nfe, ctx.ledger.request.n_samples * nfe
    arms = []
    for sched, _ in refine_starts(ctx, nfe, int(ctx.options.refine_arms)):
        h = chash(sched)
        if h not in low.done:
            if _left(ctx, nfe, 0) < low_calls:
                break
            fresh, results, values = low.score([Candidate(sched, source="refine")])
            low.store(fresh, results, values, set())
        start = low.done[h].value if h in low.done else math.inf
        if math.isfinite(start):
            arms.append(Arm(sched, optimiser(ctx, sched, start), start))
    while arms and not ctx.stopped() and _left(ctx, nfe, 0) >= low_calls:
        live = [a for a in arms if a.stale < STALE_ROUNDS]
        if not live:
            break
        arm = max(live, key=lambda a: a.gain)
        if not _round(ctx, nfe, arm, low_calls, full_calls):
            break
        top = ctx.ledger.best(nfe)
        ctx.log.append({"nfe": nfe, "refine_round": arm.rounds, "refine_arm": arms.index(arm), "fidelity": "low",
                        "evaluations": ctx.ledger.count, "best": top.value if top else math.inf})


def _round(ctx: SearchContext, nfe: int, arm: Arm, low_calls: int, full_calls: int) -> bool:
    """One round of `arm` on low-fidelity scores, then the full evaluation of its best proposal (when the calls
    pay for it); False when the calls ran out before the round was done."""
    low = ctx.low
    assert low is not None
    pending: dict[str, tuple] = {}            # hash -> (candidate, result, value), stored at the end of the round
    complete, new, best_h = True, math.inf, None
    for _ in range(arm.opt.batches_per_round):
        xs = [arm.opt.ask() for _ in range(arm.opt.batch)]
        scheds = [ctx.space.with_grid(arm.start, x) for x in xs]
        values = []
        for s in scheds:
            h = chash(s)
            if h in low.done:
                values.append(low.done[h].value)
            elif h in pending:
                values.append(pending[h][2])
            elif _left(ctx, nfe, low_calls * len(pending)) < low_calls:
                complete = False
                break
            else:
                fresh, results, vals = low.score([Candidate(s, source="refine", generation=arm.rounds + 1)])
                pending[h] = (fresh[0], results[0], vals[0])
                values.append(vals[0])
        if not complete:
            break
        told = [v if math.isfinite(v) else ctx.worst(nfe) for v in values]
        arm.opt.tell(list(zip(xs, told)))
        for s, v in zip(scheds, values):
            if v < new:
                new, best_h = v, chash(s)
    up = set()
    # The round's best is promoted even when its low score does not beat the arm's: the arm's start was itself
    # promoted for a good low score, which biases that score low, and the full score is what decides.
    promote = best_h is not None and best_h in pending and _left(ctx, nfe, low_calls * len(pending)) >= full_calls
    keys = list(pending)
    if promote:
        up = {keys.index(best_h)}
    if pending:
        low.store([pending[k][0] for k in keys], [pending[k][1] for k in keys], [pending[k][2] for k in keys], up)
    if promote:
        ctx.ledger.evaluate([pending[best_h][0]])
        ctx.report(f"nfe={nfe}: refinement round at low fidelity ({len(pending)} scored), best promoted")
    if not complete:
        return False
    arm.rounds += 1
    arm.gain = (arm.best - new) / max(abs(arm.best), 1e-12) if new < arm.best else 0.0
    arm.best = min(arm.best, new)
    arm.stale = 0 if pending else arm.stale + 1
    return True
