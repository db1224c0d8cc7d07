"""Searches to compare S³ against, behind the same interface: random search over the space, and Optuna's
TPE and CMA-ES over the space's flat encoding ([0, 1]^d decoded by `SearchSpace.from_unit`).

The Optuna sampler runs on an in-memory *shadow* study that holds the flat parameters; every true evaluation is
still a trial of the job's study (via the ledger), with the flat vector as the `flat` user attribute. On resume
the shadow study is rebuilt from those attributes. A proposal that decodes to a schedule already evaluated is
told its known value and costs no budget.
"""

from __future__ import annotations

import math
from typing import Callable

import optuna

from .context import SearchContext
from .study import ATTR, Candidate, chash

__all__ = ["run_random", "run_optuna", "SAMPLERS"]

SAMPLERS: dict[str, Callable[[int], optuna.samplers.BaseSampler]] = {
    "tpe": lambda seed: optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=20),
    "cmaes": lambda seed: optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=0,
                                                        warn_independent_sampling=False),
}


def run_random(ctx: SearchContext, nfe: int) -> None:
    """Random valid schedules from the space (the same distribution S³ seeds with)."""
    k = int(ctx.options.batch_size)
    misses = 0
    while ctx.remaining(nfe) > 0 and not ctx.stopped() and misses < 50:
        done = ctx.evaluate([Candidate(ctx.space.random(ctx.rng, nfe), source="random") for _ in range(k)], nfe)
        misses = misses + 1 if not done else 0


def _shadow(ctx: SearchContext, nfe: int, method: str) -> tuple[optuna.Study, dict]:
    dim = ctx.space.unit_dim(nfe)
    dists = {f"u{i:02d}": optuna.distributions.FloatDistribution(0.0, 1.0) for i in range(dim)}
    shadow = optuna.create_study(sampler=SAMPLERS[method](ctx.config.seed + nfe), direction="minimize")
    for t in ctx.ledger.study.get_trials(deepcopy=False):
        flat = t.user_attrs.get(ATTR.FLAT)
        if not flat or len(flat) != dim or t.user_attrs.get(ATTR.NFE) != nfe:
            continue
        h = t.user_attrs.get(ATTR.HASH)
        ev = ctx.ledger.done.get(h)
        if ev is None:
            continue
        shadow.add_trial(optuna.trial.create_trial(
            params={k: float(x) for k, x in zip(dists, flat)}, distributions=dists,
            value=ev.value if ev.ok else ctx.worst(nfe)))
    return shadow, dists


def run_optuna(ctx: SearchContext, nfe: int, method: str) -> None:
    """TPE or CMA-ES over the flat encoding, `batch_size` proposals per round."""
    if method not in SAMPLERS:
        raise ValueError(f"method={method!r} must be one of {', '.join(SAMPLERS)}")
    shadow, dists = _shadow(ctx, nfe, method)
    k = int(ctx.options.batch_size) if method == "tpe" else 1
    stale = 0
    while ctx.remaining(nfe) > 0 and not ctx.stopped() and stale < 200:
        batch = []
        for _ in range(min(k, ctx.remaining(nfe))):
            trial = shadow.ask(dists)
            u = [trial.params[name] for name in dists]
            sched = ctx.space.from_unit(u, nfe)
            known = ctx.ledger.done.get(chash(sched))
            if known is not None:   # already paid for: tell the known value, spend nothing
                shadow.tell(trial, known.value if known.ok else ctx.worst(nfe))
                stale += 1
                continue
            batch.append((trial, Candidate(sched, source=method, flat=tuple(u))))
        if not batch:
            continue
        stale = 0
        # Duplicates inside one batch share one evaluation.
        done = {chash(e.schedule): e for e in ctx.evaluate([c for _, c in batch], nfe)}
        for trial, cand in batch:
            ev = done.get(chash(cand.schedule)) or ctx.ledger.done.get(chash(cand.schedule))
            if ev is None:      # budget ran out before this one
                shadow.tell(trial, state=optuna.trial.TrialState.FAIL)
            else:
                shadow.tell(trial, ev.value if ev.ok and math.isfinite(ev.value) else ctx.worst(nfe))

