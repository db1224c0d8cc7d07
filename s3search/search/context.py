"""What a search method gets to work with: the space, the ledger (the only way to evaluate), a generator,
the budget per NFE, progress reporting and the stop flag. Methods spend budget only through `ctx.evaluate`.

The budget is counted in model calls (samples x NFE of every search evaluation, `call_budgets`); methods see it
in slots (`budgets`, `spent`, `remaining`): one full evaluation, or with `options.fidelity` one screened
candidate (a low-fidelity score plus its share of a full evaluation; search/fidelity.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
from optuna.trial import TrialState

from ..schedule import SolverSchedule
from ..space import SearchSpace
from .config import Progress, ProgressFn, SearchConfig, SearchFailed, StopFn
from .fidelity import RUNG_SOURCES, UNSCREENED_SOURCES, LowLedger, affordable, slot_calls, whole
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
    budgets: dict[int, int]                       # slots allowed per NFE (baselines included): see the module
    progress_fn: Optional[ProgressFn] = None
    should_stop: Optional[StopFn] = None
    warm_pairs: list[tuple[Any, float, int]] = field(default_factory=list)   # (schedule, value, group)
    predictor_tau: Optional[float] = None
    log: list[dict[str, Any]] = field(default_factory=list)                   # per-round records
    final_work: float = 0.0       # validation and test work, in search evaluations (for Progress.fraction)
    final_done: float = 0.0
    low: Optional[LowLedger] = None               # options.fidelity: the low-fidelity scores
    call_budgets: dict[int, float] = field(default_factory=dict)   # model calls per NFE (empty: budgets' worth)

    # ----- budget ------------------------------------------------------------------------------------------
    def full_calls(self, nfe: int) -> int:
        """Model calls of this NFE's full evaluations (failures included: they were run)."""
        n = int(self.ledger.request.n_samples)
        return sum(n * e.nfe for e in self.ledger.done.values() if e.nfe == nfe)

    def calls(self, nfe: Optional[int] = None) -> int:
        """Model calls spent at this NFE (every NFE: None), low and full fidelity."""
        if nfe is None:
            return sum(self.calls(n) for n in self.budgets)
        return self.full_calls(nfe) + (self.low.calls(nfe) if self.low is not None else 0)

    def call_budget(self, nfe: int) -> float:
        if nfe in self.call_budgets:
            return self.call_budgets[nfe]
        return float(self.budgets[nfe]) * self._slot(nfe)

    def _slot(self, nfe: int) -> float:
        return slot_calls(self.options.fidelity if self.low is not None else None,
                          int(self.ledger.request.n_samples), nfe)

    def spent(self, nfe: int) -> float:
        """Slots spent at this NFE: full evaluations, or with fidelity the calls spent over a slot's calls."""
        if self.low is None and not self.call_budgets:
            return sum(1 for e in self.ledger.done.values() if e.nfe == nfe)
        return self.calls(nfe) / self._slot(nfe)

    def remaining(self, nfe: int) -> int:
        return max(0, whole(self.budgets[nfe] - self.spent(nfe)))

    def count(self, nfe: int, sources: Sequence[str]) -> int:
        """Candidates of these sources evaluated at this NFE, at any fidelity (a promoted one once): what the
        seeding caps count."""
        hashes = {h for h, e in self.ledger.done.items() if e.nfe == nfe and e.source in sources}
        if self.low is not None:
            hashes |= {h for h, e in self.low.done.items() if e.nfe == nfe and e.source in sources}
        return len(hashes)

    def evaluated(self) -> set[str]:
        """Hashes of every schedule evaluated at any fidelity (what a method should not propose again)."""
        return set(self.ledger.done) | (set(self.low.done) if self.low is not None else set())

    def low_ranked(self, nfe: int) -> list[Evaluated]:
        """This NFE's successful low-fidelity scores, best first (empty without fidelity)."""
        if self.low is None:
            return []
        return sorted((e for e in self.low.at(nfe) if e.ok), key=lambda e: (e.value, e.trial_number))

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
        if self.low is not None:
            return self._screened(fresh, nfe)
        if self.call_budgets:   # a call budget: as many full evaluations as its calls buy
            n = whole((self.call_budget(nfe) - self.calls(nfe)) / self._full(nfe))
            out = self.ledger.evaluate(fresh[: max(0, n)])
        else:
            out = self.ledger.evaluate(fresh[: self.remaining(nfe)])
        self.fail_if_hopeless()
        self.report(f"nfe={nfe}: {len(out)} evaluated ({', '.join(sorted({c.source for c in fresh}))})")
        return out

    def _full(self, nfe: int) -> float:
        return float(self.ledger.request.n_samples * nfe)

    def _screened(self, fresh: list[Candidate], nfe: int) -> list[Evaluated]:
        """With fidelity: candidates of the refinement are evaluated in full; the others are scored at low
        fidelity first (at most as many as the calls left pay for, with their promotions) and the best `keep`
        share of them gets the full evaluation (a batch of seeding candidates: the best `seed_keep` share, by
        the rung rule of fidelity.LowLedger.screen). Returns the full evaluations."""
        assert self.low is not None and self.options.fidelity is not None
        keep = float(self.options.fidelity.keep)   # a loop batch's share
        left = self.call_budget(nfe) - self.calls(nfe)
        full, low = self._full(nfe), float(self.low.n_samples * nfe)
        direct = [c for c in fresh if c.source in UNSCREENED_SOURCES]
        screened = [c for c in fresh if c.source not in UNSCREENED_SOURCES and chash(c.schedule) not in self.low.done]
        out: list[Evaluated] = []
        if direct:
            out += self.ledger.evaluate(direct[: max(0, whole(left / full))])
            left = self.call_budget(nfe) - self.calls(nfe)
        rung = bool(screened) and all(c.source in RUNG_SOURCES for c in screened)
        share = float(self.options.fidelity.seed_keep) if rung else keep
        m = affordable(left, len(screened), low, full, share)
        if m == 0 and screened and left >= low:   # the last calls: low scores only, no promotion left to pay
            m = min(len(screened), whole(left / low))
        if m > 0:
            limit = whole((left - m * low) / full)
            scored, up = self.low.screen(screened[:m], share, limit=limit, rung=rung)
            by_hash = {chash(c.schedule): c for c in screened[:m]}
            promote = [by_hash[chash(e.schedule)] for e in up]
            out += self.ledger.evaluate(promote)
            self.report(f"nfe={nfe}: {len(scored)} scored at low fidelity ({self.low.n_samples} samples), "
                        f"{len(promote)} promoted ({', '.join(sorted({c.source for c in screened[:m]}))})")
        self.fail_if_hopeless()
        if direct:
            self.report(f"nfe={nfe}: {len(direct)} evaluated ({', '.join(sorted({c.source for c in direct}))})")
        return out

    def fail_if_hopeless(self) -> None:
        """Raise SearchFailed when nothing has succeeded yet and the first evaluations (at least two, or the
        whole budget) all failed with one error: a missing weights file or a broken metric fails every
        candidate alike, and the rest of the budget would be spent on the same failure."""
        if self.low is not None and not any(e.ok for e in self.ledger.done.values()) \
                and len(self.low.done) >= 2 and not any(e.ok for e in self.low.done.values()):
            errors = set(self.low.errors.values())   # with fidelity the first evaluations are low ones
            if len(errors) == 1:
                raise SearchFailed(f"the first {len(self.low.done)} low-fidelity evaluations all failed with the "
                                   f"same error, so the search stopped: {errors.pop() or 'no error message'}")
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
        if self.low is not None or self.call_budgets:
            budget = float(sum(self.budgets.values()))
            done = min(budget, sum(self.spent(n) for n in self.budgets))
        else:
            budget, done = float(self.config.budget), float(min(self.ledger.count, self.config.budget))
        total = budget + self.final_work
        return min(1.0, (done + self.final_done) / total) if total else 1.0

    def report(self, message: str, *, done: bool = False) -> None:
        if self.progress_fn is None:
            return
        best = self.ledger.best()
        if self.low is not None or self.call_budgets:
            total = sum(self.call_budget(n) for n in self.budgets)
            message += f" [{self.calls():,} of {total:,.0f} model calls]"
        self.progress_fn(Progress(evaluations=self.ledger.count, budget=self.config.budget,
                                  best_value=best.value if best else math.inf,
                                  best_schedule=best.schedule if best else None, message=message,
                                  predictor_tau=self.predictor_tau,
                                  fraction=1.0 if done else min(self.fraction(), 0.999)))
