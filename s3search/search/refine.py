"""Grid refinement: a local optimiser on the timestep grid of the best schedules, their steps and rules fixed.

At 4-10 NFE the grid decides much of a schedule's error, and it is a smooth, low-dimensional problem (n + 2
numbers for n steps) that the S³ loop's mutations and grid jitters, ranked by a predictor that cannot order
small moves, tune slowly. Run on the final share of an NFE's budget, with one of two optimisers
(`refine_method`):

- "cmaes": CMA-ES (the `cmaes` package, which Optuna's CMA-ES sampler also uses), a population per generation,
  step sizes and correlations adapted to the grid's valley.
- "gp": Bayesian optimisation with Optuna's GPSampler (a Gaussian process on the evaluations so far, the next
  grid where expected improvement peaks), one evaluation at a time in a box of `refine_box` around the start.
  A GP models a smooth objective of a few dimensions from few points, which is this problem: 50 evaluations.

With `refine_arms` > 1 the best schedule of each of that many structures (first-step rule, final rule) gets its
own optimiser, since an untuned grid says little about what a structure can reach (gmm-64d NFE 5, seed 2: the
analytical-first, no-final-denoise structure's best scored 0.37 against the incumbent's 0.22, and its grid alone
took it to 0.071 where the incumbent's stopped at 0.092). Each arm runs one round in turn (a CMA-ES generation,
or as many GP steps), then every further round goes to the arm whose last round improved it most.

Not resumable as an optimiser state: a resumed refinement starts fresh arms from the ledger.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
import optuna
from cmaes import CMA

from ..schedule import SolverSchedule
from .context import SearchContext
from .options import SearchOptions
from .study import Candidate, chash

__all__ = ["refine_budget", "refine_grid", "refine_starts", "Arm", "optimiser", "STALE_ROUNDS"]

STALE_ROUNDS = 20   # an arm that many rounds without one new evaluation is done


def refine_budget(options: SearchOptions, budget: int) -> int:
    """Evaluations of an NFE's `budget` kept for grid refinement (`refine_share` of it, rounded)."""
    return int(round(float(options.refine_share) * budget))


def refine_starts(ctx: SearchContext, nfe: int, n: int) -> list[tuple[SolverSchedule, float]]:
    """The best evaluated schedule of each of the n best structures (first-step rule, final rule), best first."""
    out: dict[tuple[str, str], tuple[SolverSchedule, float]] = {}
    for e in ctx.ranked_in_space(nfe):
        out.setdefault((e.schedule.first_step, e.schedule.final), (e.schedule, e.value))
        if len(out) >= n:
            break
    return list(out.values())


class _Optimiser(Protocol):
    batch: int             # points asked, evaluated and told together
    batches_per_round: int

    def ask(self) -> np.ndarray: ...

    def tell(self, pairs: Sequence[tuple[np.ndarray, float]]) -> None: ...


class _Cma:
    """CMA-ES; one round is one generation (told together)."""

    def __init__(self, x0: np.ndarray, bounds: np.ndarray, options: SearchOptions, seed: int) -> None:
        pop = options.refine_population
        self.opt = CMA(mean=x0, sigma=float(options.refine_sigma), bounds=bounds, seed=seed,
                       population_size=int(pop) if pop else None)
        self.batch, self.batches_per_round = self.opt.population_size, 1

    def ask(self) -> np.ndarray:
        return self.opt.ask()

    def tell(self, pairs: Sequence[tuple[np.ndarray, float]]) -> None:
        self.opt.tell(list(pairs))


class _Gp:
    """Optuna's GPSampler over the box of `refine_box` around x0 (inside the space's bounds), on asinh(value /
    start value): log-like where values span decades (a diverging grid scores 1e3 times the start), defined at
    zero and below for metrics that reach them. One round is as many single steps as a CMA-ES generation has in
    this dimension (4 + 3 ln d), so the arms' rounds are compared over the same number of evaluations."""

    def __init__(self, x0: np.ndarray, bounds: np.ndarray, options: SearchOptions, seed: int, start_value: float) -> None:
        half = float(options.refine_box)
        lo, hi = np.maximum(bounds[:, 0], x0 - half), np.minimum(bounds[:, 1], x0 + half)
        self.dists = {f"x{i}": optuna.distributions.FloatDistribution(float(a), float(b))
                      for i, (a, b) in enumerate(zip(lo, hi))}
        self.scale = abs(start_value) if math.isfinite(start_value) and start_value != 0 else 1.0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler = optuna.samplers.GPSampler(seed=seed, deterministic_objective=True, n_startup_trials=4)
        self.study = optuna.create_study(direction="minimize", sampler=sampler)
        self.study.add_trial(optuna.trial.create_trial(
            params={k: float(np.clip(v, d.low, d.high)) for (k, d), v in zip(self.dists.items(), x0)},
            distributions=self.dists, value=self._y(start_value)))
        self.pending: list[optuna.trial.Trial] = []
        self.batch, self.batches_per_round = 1, 4 + int(3 * math.log(len(x0)))

    def _y(self, value: float) -> float:
        return math.asinh(value / self.scale)

    def ask(self) -> np.ndarray:
        trial = self.study.ask(self.dists)
        self.pending.append(trial)
        return np.array([trial.params[k] for k in self.dists])

    def tell(self, pairs: Sequence[tuple[np.ndarray, float]]) -> None:
        for trial, (_, value) in zip(self.pending, pairs):
            self.study.tell(trial, self._y(value))
        self.pending = []


@dataclass
class Arm:
    """One refined schedule: its grid optimiser and how its rounds went (shared with the low-fidelity refine)."""

    start: SolverSchedule
    opt: _Optimiser
    best: float
    rounds: int = 0
    gain: float = math.inf    # relative improvement of its last round (inf: not run yet)
    stale: int = 0


def optimiser(ctx: SearchContext, start: SolverSchedule, value: float) -> _Optimiser:
    """The grid optimiser of `options.refine_method` started at `start`'s grid, whose score is `value`."""
    x0, bounds = ctx.space.grid_vector(start)
    seed = int(ctx.rng.integers(2**31 - 1))
    if ctx.options.refine_method == "gp":
        return _Gp(x0, bounds, ctx.options, seed, value)
    return _Cma(x0, bounds, ctx.options, seed)


def refine_grid(ctx: SearchContext, nfe: int) -> None:
    """Spend the NFE's remaining budget on the grids of its best evaluated schedules, one arm for the best of
    each of the `refine_arms` best structures."""
    arms = [Arm(s, optimiser(ctx, s, v), v) for s, v in refine_starts(ctx, nfe, int(ctx.options.refine_arms))]
    while ctx.remaining(nfe) > 0 and not ctx.stopped():
        live = [a for a in arms if a.stale < STALE_ROUNDS]
        if not live:
            break
        arm = max(live, key=lambda a: a.gain)   # first the unrun arms in rank order, then the most improving
        if not _round(ctx, nfe, arm):            # the budget ran out inside this round
            break
        top = ctx.ledger.best(nfe)
        ctx.log.append({"nfe": nfe, "refine_round": arm.rounds, "refine_arm": arms.index(arm),
                        "evaluations": ctx.ledger.count, "best": top.value if top else math.inf})


def _round(ctx: SearchContext, nfe: int, arm: Arm) -> bool:
    """One round of `arm`; False when the budget ran out before all of it was evaluated."""
    fresh, new = 0, math.inf
    for _ in range(arm.opt.batches_per_round):
        xs = [arm.opt.ask() for _ in range(arm.opt.batch)]
        scheds = [ctx.space.with_grid(arm.start, x) for x in xs]
        # ctx.evaluate drops copies and what the study already holds; those are told their stored value.
        done = ctx.evaluate([Candidate(s, source="refine", generation=arm.rounds + 1) for s in scheds], nfe)
        found = [ctx.ledger.done.get(chash(s)) for s in scheds]
        if any(e is None for e in found):
            return False
        values = [e.value if e.ok else ctx.worst(nfe) for e in found]
        arm.opt.tell(list(zip(xs, values)))
        fresh += len(done)
        new = min(new, *values)
        if ctx.remaining(nfe) <= 0:
            break
    arm.rounds += 1
    arm.gain = (arm.best - new) / max(abs(arm.best), 1e-12) if new < arm.best else 0.0
    arm.best = min(arm.best, new)
    arm.stale = 0 if fresh else arm.stale + 1
    return True
