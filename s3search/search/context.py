"""What a search method gets to work with: the space, the ledger (the only way to evaluate), a generator,
the budget per NFE, progress reporting and the stop flag. Methods spend budget only through `ctx.evaluate`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
from optuna.trial import TrialState

from ..schedule import SolverSchedule
from ..space import SearchSpace
from .config import Progress, ProgressFn, SearchConfig, SearchFailed, StopFn
from .options import REFINE_METHODS, SearchOptions
from .study import ATTR, Candidate, Evaluated, Ledger, chash

__all__ = ["SearchContext", "REFINE_METHODS"]

@dataclass
class SearchContext:
    config: SearchConfig
    options: SearchOptions
    space: SearchSpace
    ledger: Ledger
    rng: np.random.Generator
    budgets: dict[int, int]                       # true evaluations allowed per NFE (baselines included)
    progress_fn: Optional[ProgressFn] = None
    should_stop: Optional[StopFn] = None
    warm_pairs: list[tuple[Any, float, int]] = field(default_factory=list)   # (schedule, value, group)
    predictor_tau: Optional[float] = None
    log: list[dict[str, Any]] = field(default_factory=list)                   # per-round records
    final_work: float = 0.0       # validation and test work, in search evaluations (for Progress.fraction)
    final_done: float = 0.0

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
        self.fail_if_hopeless()
        self.report(f"nfe={nfe}: {len(out)} evaluated ({', '.join(sorted({c.source for c in fresh}))})")
        return out

    def fail_if_hopeless(self) -> None:
        """Raise SearchFailed when nothing has succeeded yet and the first evaluations (at least two, or the
        whole budget) all failed with one error: a missing weights file or a broken metric fails every
        candidate alike, and the rest of the budget would be spent on the same failure."""
        if self.ledger.count < min(2, self.config.budget) or any(e.ok for e in self.ledger.done.values()):
            return
        errors = {str(t.user_attrs.get(ATTR.ERROR, "")) for t in
                  self.ledger.study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
                  if ATTR.SCHEDULE in t.user_attrs}
        if len(errors) == 1:
            error = errors.pop() or "no error message"
            raise SearchFailed(f"the first {self.ledger.count} evaluations all failed with the same error, "
                               f"so the search stopped: {error}")

    def fraction(self) -> float:
        """The job's share done: evaluations, then validation and test weighted by their sample counts."""
        total = self.config.budget + self.final_work
        return min(1.0, (min(self.ledger.count, self.config.budget) + self.final_done) / total) if total else 1.0

    def report(self, message: str, *, done: bool = False) -> None:
        if self.progress_fn is None:
            return
        best = self.ledger.best()
        self.progress_fn(Progress(evaluations=self.ledger.count, budget=self.config.budget,
                                  best_value=best.value if best else math.inf,
                                  best_schedule=best.schedule if best else None, message=message,
                                  predictor_tau=self.predictor_tau,
                                  fraction=1.0 if done else min(self.fraction(), 0.999)))
