"""Multi-fidelity evaluation (issue 19 item 2): cheap scores first, full evaluations only for what they promote.

With `options.fidelity = {"low_samples": m, "keep": q, "seed_keep": q0}` every batch a search method hands to
`ctx.evaluate` is first scored on the first m samples of the search split (a prefix of the full evaluation's
(noise, prompt) pairs: sample i's seed depends on (seed, split, i) only, so every candidate meets the same
draws), and only the best share q of the batch by that score (successive halving with one rung) gets the full
`n_samples` evaluation, which is the study's ordinary trial. A seeding stage (`RUNG_SOURCES`) promotes its best
share q0, and only those within the best q0 of every low score so far (`LowLedger.screen`, `rung`). The grid
refinement runs its optimiser on low scores and promotes each round's best itself (refine_low.py).

A low-fidelity score is stored as a trial of the job's study in state PRUNED: user attributes `fidelity: "low"`,
`n_samples`, `low_value`, `promoted`, the schedule, and the score as the intermediate value at step
`low_samples`, so optuna-dashboard shows it beside the full trials, Optuna's `best_trial` never returns it, and
nothing that reads COMPLETE trials (the ledger, the winner, the final table, the results document, warm starts)
ever meets it. The predictor fits low-fidelity pairs as a ranking group of their own (`low_group`), so they are
only compared with each other.

Model calls: an evaluation of a schedule of NFE k on n samples costs n x k calls. `call_budget` turns the job's
budget into calls: `options.budget_calls` when set, else `budget` full evaluations' worth, so a multi-fidelity
search with `budget` B spends what B full evaluations spend. The search methods count in *slots*: a slot is one
candidate, which costs a low evaluation plus its share q of a full one (`slot_calls`); without fidelity a slot
is one full evaluation, as before.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import optuna
from optuna.trial import TrialState

from ..evaluation.base import EvalRequest, EvalResult, Evaluator
from ..schedule import SolverSchedule
from .options import Fidelity
from .study import ATTR, Candidate, Evaluated, chash, schedule_from_json, schedule_params

__all__ = ["LOW", "FIDELITY", "PROMOTED", "LOW_VALUE", "UNSCREENED_SOURCES", "RUNG_SOURCES", "low_group",
           "is_low_group", "LowLedger", "n_promoted", "affordable", "call_budget", "slot_calls", "whole"]

LOW = "low"
FIDELITY = "fidelity"           # user attribute: "low" on low-fidelity trials (full trials carry none)
PROMOTED = "promoted"           # user attribute of a low-fidelity trial: its schedule got the full evaluation
LOW_VALUE = "low_value"         # user attribute: the low-fidelity score (also the intermediate value)
UNSCREENED_SOURCES = ("refine",)   # ctx.evaluate runs these in full directly (refine_low.py promotes its own)
# Seeding candidates (most of them far from the best) are promoted by the rung rule (`LowLedger.screen`).
RUNG_SOURCES = ("baseline", "variant", "random", "warm")

_LOW_GROUP = 5_000   # predictor groups: NFE (< 1000) for full scores, this + NFE for low ones, warm >= 10000


def low_group(nfe: int) -> int:
    """The predictor's ranking group of the low-fidelity pairs at `nfe`."""
    return _LOW_GROUP + int(nfe)


def is_low_group(group: int) -> bool:
    return _LOW_GROUP <= group < 2 * _LOW_GROUP


def n_promoted(keep: float, n: int) -> int:
    """How many of n low-fidelity scores are promoted: ceil(keep x n) (one at least for a non-empty batch)."""
    return 0 if n <= 0 else min(n, max(1, math.ceil(keep * n - 1e-9)))


def affordable(left_calls: float, n_candidates: int, low_calls: float, full_calls: float, keep: float) -> int:
    """The most of `n_candidates` that can be screened with their promotions within `left_calls`."""
    m = n_candidates
    while m > 0 and m * low_calls + n_promoted(keep, m) * full_calls > left_calls + 1e-9:
        m -= 1
    return m


def call_budget(budget_evaluations: int, n_samples: int, nfe: int, budget_calls: Optional[float]) -> float:
    """Model calls an NFE may spend: its share of `budget_calls`, else `budget_evaluations` full evaluations."""
    return float(budget_calls) if budget_calls is not None else float(budget_evaluations * n_samples * nfe)


def whole(units: float) -> int:
    """How many whole units `units` holds, with a quotient's round-off (2.9999999999) counted as the next one."""
    return int(math.floor(units + 1e-9))


def slot_calls(fidelity: Optional[Fidelity], n_samples: int, nfe: int) -> float:
    """Model calls of one slot: a full evaluation, or a screened candidate (low score + its share of a full one)."""
    if fidelity is None:
        return float(n_samples * nfe)
    return float(nfe) * (fidelity.low_samples + fidelity.keep * n_samples)


class LowLedger:
    """The study's low-fidelity evaluations, by canonical hash (PRUNED trials with `fidelity: "low"`)."""

    def __init__(self, study: optuna.Study, evaluator: Evaluator, request: EvalRequest,
                 with_params: bool = True) -> None:
        self.study = study
        self.evaluator = evaluator
        self.request = request               # the search request with n_samples = low_samples
        self.with_params = with_params
        self.done: dict[str, Evaluated] = {}
        self.promoted: set[str] = set()
        self.errors: dict[str, str] = {}     # hash -> error of a failed low-fidelity evaluation

    @classmethod
    def for_search(cls, study: optuna.Study, evaluator: Evaluator, request: EvalRequest, fidelity: Fidelity,
                   with_params: bool = True) -> "LowLedger":
        return cls(study, evaluator, dataclasses.replace(request, n_samples=int(fidelity.low_samples)), with_params)

    @property
    def n_samples(self) -> int:
        return int(self.request.n_samples)

    # ----- resume -------------------------------------------------------------------------------------
    def load(self) -> int:
        """Read the low-fidelity trials already in the study (of this sample count); returns how many."""
        for t in sorted(self.study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)), key=lambda t: t.number):
            a = t.user_attrs
            if a.get(FIDELITY) != LOW or ATTR.SCHEDULE not in a or a.get(ATTR.N_SAMPLES) != self.n_samples:
                continue
            value = a.get(LOW_VALUE)
            ev = self._record(t.number, a, float(value) if isinstance(value, (int, float)) else math.inf)
            if not ev.ok:
                self.errors[chash(ev.schedule)] = str(a.get(ATTR.ERROR, ""))
            if a.get(PROMOTED):
                self.promoted.add(chash(ev.schedule))
        return len(self.done)

    def _record(self, number: int, attrs: dict, value: float) -> Evaluated:
        sched = schedule_from_json(attrs[ATTR.SCHEDULE])
        ev = Evaluated(schedule=sched, value=value, nfe=int(attrs.get(ATTR.NFE, sched.nfe)),
                       source=str(attrs.get(ATTR.SOURCE, "")), label=str(attrs.get(ATTR.BASELINE, "")),
                       trial_number=number, predicted=attrs.get(ATTR.PREDICTED))
        self.done.setdefault(chash(sched), ev)
        return self.done[chash(sched)]

    # ----- queries ------------------------------------------------------------------------------------
    def at(self, nfe: int) -> list[Evaluated]:
        return [e for e in self.done.values() if e.nfe == nfe]

    def calls(self, nfe: int) -> int:
        return sum(self.n_samples * e.nfe for e in self.at(nfe))

    def solver_pairs(self, nfe: Optional[int] = None) -> tuple[list[SolverSchedule], list[float]]:
        pairs = [(e.schedule, e.value) for e in self.done.values()
                 if isinstance(e.schedule, SolverSchedule) and (nfe is None or e.nfe == nfe)]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    # ----- evaluation ---------------------------------------------------------------------------------
    def score(self, candidates: Sequence[Candidate]) -> tuple[list[Candidate], list[EvalResult], list[float]]:
        """Score the candidates not scored yet on the low-fidelity request (one evaluator call); nothing is
        stored (`store` does). Returns (those candidates, their results, their values: +inf for a failure)."""
        fresh = [c for c in {chash(c.schedule): c for c in candidates}.values() if chash(c.schedule) not in self.done]
        if not fresh:
            return [], [], []
        scheds = [c.schedule for c in fresh]
        try:
            results = list(self.evaluator.evaluate(scheds, self.request))
            if len(results) != len(scheds):
                raise ValueError(f"the evaluator returned {len(results)} results for {len(scheds)} schedules")
        except Exception as e:  # noqa: BLE001 - as the ledger: a raising evaluator fails the batch, not the search
            results = [EvalResult(chash(s), math.inf, s.nfe, 0.0, error=f"{type(e).__name__}: {e}") for s in scheds]
        values = [float(r.value) if r.ok and r.value is not None and math.isfinite(r.value) else math.inf
                  for r in results]
        return fresh, results, values

    def store(self, fresh: Sequence[Candidate], results: Sequence[EvalResult], values: Sequence[float],
              up: set[int]) -> list[Evaluated]:
        """One PRUNED trial per scored candidate (`up`: the indices promoted to a full evaluation)."""
        trials = [self._trial(c, r, v, i in up) for i, (c, r, v) in enumerate(zip(fresh, results, values))]
        numbers = self._add(trials)
        scored = [self._record(numbers.get(chash(c.schedule), -1), t.user_attrs, v)
                  for c, t, v in zip(fresh, trials, values)]
        self.errors.update({chash(c.schedule): str(t.user_attrs.get(ATTR.ERROR, ""))
                            for c, t, v in zip(fresh, trials, values) if not math.isfinite(v)})
        self.promoted.update(chash(fresh[i].schedule) for i in up)
        return scored

    def screen(self, candidates: Sequence[Candidate], keep: float, limit: Optional[int] = None,
               rung: bool = False) -> tuple[list[Evaluated], list[Evaluated]]:
        """Score the new candidates at low fidelity, store them, and return (every new score, the promoted ones,
        best first): the best `keep` share of the batch (at most `limit`). With `rung`, only those of them that
        also rank within the best `keep` share of every low score at their NFE so far (the batch included), the
        promotion rule of asynchronous successive halving: a batch of poor candidates promotes fewer."""
        fresh, results, values = self.score(candidates)
        if not fresh:
            return [], []
        order = sorted((i for i, v in enumerate(values) if math.isfinite(v)), key=lambda i: (values[i], i))
        n = n_promoted(keep, len(fresh))
        picked = order[:n if limit is None else min(n, limit)]
        if rung and picked:
            nfe = fresh[0].schedule.nfe
            every = sorted([e.value for e in self.at(nfe)] + list(values))
            bar = every[n_promoted(keep, len(every)) - 1]
            picked = [i for i in picked if values[i] <= bar]
        scored = self.store(fresh, results, values, set(picked))
        return scored, [scored[i] for i in picked]

    def _trial(self, c: Candidate, res: EvalResult, value: float, promote: bool) -> optuna.trial.FrozenTrial:
        ok = math.isfinite(value)
        attrs = {ATTR.SCHEDULE: c.schedule.to_json(), ATTR.HASH: chash(c.schedule), ATTR.NFE: c.schedule.nfe,
                 ATTR.SOURCE: c.source, ATTR.GENERATION: c.generation, ATTR.METRIC: self.request.metric,
                 ATTR.SEED: self.request.seed, ATTR.N_SAMPLES: self.n_samples, ATTR.SPLIT: self.request.split,
                 ATTR.SECONDS: float(res.seconds), FIDELITY: LOW, LOW_VALUE: value if ok else None,
                 PROMOTED: bool(promote)}
        if c.label:
            attrs[ATTR.BASELINE] = c.label
        if c.predicted is not None and math.isfinite(c.predicted):
            attrs[ATTR.PREDICTED] = float(c.predicted)
        if not ok:
            attrs[ATTR.ERROR] = res.error or f"non-finite metric {res.value!r}"
        params, dists = schedule_params(c.schedule) if self.with_params else ({}, {})
        return optuna.trial.create_trial(state=TrialState.PRUNED, params=params, distributions=dists,
                                         user_attrs=attrs, intermediate_values={self.n_samples: value} if ok else None)

    def _add(self, trials: list[optuna.trial.FrozenTrial]) -> dict[str, int]:
        """Store the trials; returns their trial numbers by schedule hash."""
        before = len(self.study.get_trials(deepcopy=False))
        try:
            self.study.add_trials(trials)
        except ValueError:
            # A param the study holds with another distribution (an older study): store them without params.
            self.study.add_trials([optuna.trial.create_trial(state=t.state, user_attrs=t.user_attrs,
                                                             intermediate_values=t.intermediate_values)
                                   for t in trials])
        return {t.user_attrs[ATTR.HASH]: t.number for t in self.study.get_trials(deepcopy=False)[before:]
                if t.user_attrs.get(FIDELITY) == LOW}
