"""What a search method gets to work with: the space, the ledger (the only way to evaluate), a generator,
the budget per NFE, progress reporting and the stop flag. Methods spend budget only through `ctx.evaluate`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ..schedule import SolverSchedule
from ..space import SearchSpace
from .config import Progress, ProgressFn, SearchConfig, StopFn
from .study import Candidate, Evaluated, Ledger, chash

__all__ = ["SearchContext", "OPTION_DEFAULTS", "REFINE_METHODS", "check_options"]

REFINE_METHODS = ("gp", "cmaes")   # grid refinement optimisers (refine.py)

# Every key of SearchConfig.options this package reads, with its default.
OPTION_DEFAULTS: dict[str, Any] = {
    "space": {},                    # SpaceOptions fields
    "t_min": None, "t_max": None,   # time range of searched schedules (default: the process's)
    "seed_baselines": True,         # evaluate every baseline first (stage 1), then the best on more grids
    "baselines": None,              # restrict to these baseline names
    "baseline_grids": None,         # stage-2 grids (default baselines_seed.SEED_GRIDS)
    "top_baselines_on_grids": 5,    # how many stage-1 baselines go on to stage 2
    "baseline_spread_grids": 1,     # stage 3: every baseline on this many of the best grids of stages 1-2
    "max_seed_fraction": 0.5,       # at most this share of the budget goes to baselines
    "variants_of_best": 3,          # the best k baselines in the space, with every other first-step / final
                                    # rule pair (analytical first step, no final denoise), at the same NFE
    "init_random": None,            # random schedules after the baselines (default: max(8, budget / 20))
    "batch_size": 10,               # true evaluations per S³ generation (k)
    "population": 128,              # candidates kept by the predictor-scored evolution
    "children": 128,                # children per evolution generation (the neighbour pool is twice this)
    "generations": 4,               # predictor-scored generations per true-evaluation round
    "direct": 0.3,                  # share of each batch drawn next to the two best without the predictor
    "niche_within": None,           # > 1: half the local effort goes next to the best structure (first
                                    # step, final rule), half next to the others whose best is within this
                                    # factor of the best. Default: 1 (off) with baselines seeded, 3 without
                                    # (docs/bench/search.md, "Structure niches")
    "refine_share": 0.5,            # the last share of each NFE's budget: grid refinement of the best schedules
    "refine_method": "gp",          # "gp" (Optuna's GPSampler, one evaluation at a time) | "cmaes"
    "refine_arms": 3,               # refine the best schedule of this many structures (first step, final rule)
    "refine_box": 1.0,              # gp: half-width of its box around the start (log-weights and lambda)
    "refine_sigma": 0.2,            # cmaes: initial step size (log-weights and lambda, nats)
    "refine_population": None,      # cmaes: population (default: the cmaes default, 4 + 3 ln(dimension))
    "explore": 0.3,                 # share of each batch from the freely evolved population (the rest: the
                                    # predicted best neighbours of the best evaluated schedules)
    "predictor_params": {},         # passed to predictors.get
    "warm_start": None,             # {"storage": url (default: the study's), "studies": [names]}
    "evaluator": {},                # LocalEvaluator keyword arguments when run_search builds one
    "test_baselines": True,         # test-score every baseline's best grid for the final table
    "validate_top": 5,              # the winner is the best of the top k (search split) on fresh validation
                                    # seeds; 0 = the search split's best
    "validate_baselines": 3,        # ... and the best k baselines (each on its best grid) compete with them
    "validation_samples": None,     # samples per validation evaluation (default: n_test_samples)
}


def check_options(options: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(OPTION_DEFAULTS))
    if unknown:
        raise ValueError(f"options.{unknown[0]} is not a search option (known: {', '.join(sorted(OPTION_DEFAULTS))})")
    _check_number(options, "niche_within", lambda v: v >= 1, "a number >= 1 (1: off) or null", nullable=True)
    _check_number(options, "refine_share", lambda v: 0.0 <= v < 1.0, "a number in [0, 1)")
    _check_number(options, "refine_sigma", lambda v: 0.0 < v <= 5.0, "a number in (0, 5]")
    if "refine_method" in options and options["refine_method"] not in REFINE_METHODS:
        raise ValueError(f"options.refine_method must be one of {list(REFINE_METHODS)}, "
                         f"not {options['refine_method']!r}")
    _check_number(options, "refine_box", lambda v: 0.0 < v <= 6.0, "a number in (0, 6]")
    _check_number(options, "refine_arms", lambda v: isinstance(v, int) and 1 <= v <= 16, "an integer in [1, 16]")
    _check_number(options, "refine_population", lambda v: isinstance(v, int) and 2 <= v <= 1000,
                  "an integer in [2, 1000] or null", nullable=True)
    return {**OPTION_DEFAULTS, **options}


def _check_number(options: dict[str, Any], key: str, ok: Callable[[float], bool], what: str,
                  nullable: bool = False) -> None:
    """Raise ValueError naming options.<key> unless its value (when given) is a finite number passing `ok`."""
    if key not in options or (nullable and options[key] is None):
        return
    v = options[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
        raise ValueError(f"options.{key} must be {what}, not {v!r}")


@dataclass
class SearchContext:
    config: SearchConfig
    options: dict[str, Any]
    space: SearchSpace
    ledger: Ledger
    rng: np.random.Generator
    budgets: dict[int, int]                       # true evaluations allowed per NFE (baselines included)
    progress_fn: Optional[ProgressFn] = None
    should_stop: Optional[StopFn] = None
    warm_pairs: list[tuple[Any, float, int]] = field(default_factory=list)   # (schedule, value, group)
    predictor_tau: Optional[float] = None
    log: list[dict[str, Any]] = field(default_factory=list)                   # per-round records

    def spent(self, nfe: int) -> int:
        return sum(1 for e in self.ledger.done.values() if e.nfe == nfe)

    def remaining(self, nfe: int) -> int:
        return max(0, self.budgets[nfe] - self.spent(nfe))

    def ranked_in_space(self, nfe: int) -> list[Evaluated]:
        """This NFE's successful evaluations of schedules in the space, best first."""
        return sorted((e for e in self.ledger.done.values() if e.nfe == nfe and e.ok
                       and isinstance(e.schedule, SolverSchedule) and self.space.contains(e.schedule)),
                      key=lambda e: e.value)

    def worst(self, nfe: int) -> float:
        """A value worse than every successful one at this NFE: what a sampler is told for a failed schedule."""
        vals = [e.value for e in self.ledger.done.values() if e.nfe == nfe and e.ok]
        return 2.0 * max(vals) + 1.0 if vals else 1e12

    def stopped(self) -> bool:
        return bool(self.should_stop and self.should_stop())

    def evaluate(self, candidates: Sequence[Candidate], nfe: int) -> list[Evaluated]:
        """Evaluate new candidates, never beyond this NFE's budget nor after a stop; reports progress afterwards."""
        if self.stopped():   # the one gate every method spends through, so a cancel holds for all of them
            return []
        fresh, seen = [], set()
        for c in candidates:
            h = chash(c.schedule)
            if h not in seen and not self.ledger.seen(c.schedule):
                seen.add(h)
                fresh.append(c)
        out = self.ledger.evaluate(fresh[: self.remaining(nfe)])
        self.report(f"nfe={nfe}: {len(out)} evaluated ({', '.join(sorted({c.source for c in fresh}))})")
        return out

    def report(self, message: str) -> None:
        if self.progress_fn is None:
            return
        best = self.ledger.best()
        self.progress_fn(Progress(evaluations=self.ledger.count, budget=self.config.budget,
                                  best_value=best.value if best else math.inf,
                                  best_schedule=best.schedule if best else None, message=message,
                                  predictor_tau=self.predictor_tau))
