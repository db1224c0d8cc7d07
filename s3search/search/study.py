"""Optuna glue: every true evaluation is one trial (ask / tell) of the job's study.

A trial carries the schedule JSON, its hash, NFE, where it came from (baseline label, random, s3, tpe, ...),
the predicted score, the seeds and sample count, the evaluation time and the metric value as user attributes, so
optuna-dashboard shows the search while it runs. Baselines are enqueued trials labelled `baseline=<name>`.

A trial also carries the schedule's choices as Optuna params (`schedule_params`), so the dashboard's importance,
slice and contour plots have something to show: `first_step`, `final`, `grid.t_start` and `grid.t_end` for every
NFE, and `nfe<N>.n_steps` and `nfe<N>.step<i>.{order,prediction,derivative,corrector,eta,lambda_share}` per NFE
(a step position means different things at NFE 4 and 6). Every name has one fixed distribution, which Optuna's
importance needs: it assesses only params every complete trial holds with the same distribution. A named
baseline carries the grid params alone (its per-step choices are not the space's). The params are written with
the queued trial in one storage call; a study that cannot take them (a name already held with another
distribution) gets the trial without them, never a failed trial.

Resume: `Ledger.load` reads every trial already in the study. COMPLETE trials (and trials whose evaluation
itself failed, state FAIL with an `error` attribute) count as done and are never evaluated again; a RUNNING
trial left by a runner that died ends FAIL (marked `stale`) and its schedule goes back into the queue (a WAITING
trial), which the next batch picks up first.

Trials that change underneath (another process finished one first) never crash the search: that process's
outcome stands and ours is dropped. When a search ends, `settle` ends every trial still WAITING or RUNNING
(marked `discarded`), so a finished study holds only trials its result accounts for.
"""

from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from .. import processes
from ..evaluation.base import EvalRequest, EvalResult, Evaluator
from ..schedule import CORRECTORS, DERIVATIVES, FINALS, FIRST_STEPS, MAX_ORDER, PREDICTIONS, SolverSchedule

__all__ = ["AnySchedule", "Evaluated", "Candidate", "Ledger", "schedule_from_json", "ATTR", "chash", "settle",
           "schedule_params", "ETA_HIGH"]

try:  # NamedSchedule is the baselines' type for samplers the space cannot express.
    from ..named import NamedSchedule
except Exception:  # pragma: no cover - the sampling core without the named package
    NamedSchedule = None  # type: ignore[assignment,misc]

AnySchedule = Union[SolverSchedule, "NamedSchedule"]


class ATTR:
    """User-attribute keys (shared with predictors.warm_start and the service's trial listing)."""

    SCHEDULE = "schedule"          # the schedule JSON
    HASH = "schedule_hash"
    NFE = "nfe"
    SOURCE = "source"              # baseline | variant | random | s3 | s3-local | tpe | cmaes | requeued
    BASELINE = "baseline"          # the baseline's label, only on baseline trials
    PREDICTED = "predicted"        # the predictor's score when the candidate was chosen (lower is better)
    METRIC = "metric"
    SEED = "seed"
    N_SAMPLES = "n_samples"
    SPLIT = "split"
    SECONDS = "eval_seconds"
    ERROR = "error"
    GENERATION = "generation"
    FLAT = "flat"                  # the flat encoding of TPE / CMA-ES trials
    EXTRAS = "extras"
    STALE = "stale"                # a RUNNING trial found on resume, ended FAIL and re-queued
    DISCARDED = "discarded"        # why a trial ended unevaluated (the search ended while it waited or ran)


@functools.lru_cache(maxsize=1 << 18)
def chash(schedule: AnySchedule) -> str:
    """`schedule.canonical_hash()`, memoised: the search hashes the same objects many times, and equal
    schedules (the dataclass equality ignores the name) have equal canonical hashes."""
    return schedule.canonical_hash()


def schedule_from_json(text: str) -> AnySchedule:
    doc = json.loads(text)
    if isinstance(doc, dict) and "sampler" in doc:
        if NamedSchedule is None:
            raise ValueError("schedule names a sampler, but s3search.named is not available")
        return NamedSchedule.from_dict(doc)
    return SolverSchedule.from_dict(doc)


@dataclass(frozen=True)
class Evaluated:
    schedule: AnySchedule
    value: float                   # +inf when the evaluation failed
    nfe: int
    source: str
    label: str                     # baseline label, else ""
    trial_number: int
    predicted: Optional[float] = None

    @property
    def ok(self) -> bool:
        return math.isfinite(self.value)


@dataclass(frozen=True)
class Candidate:
    schedule: AnySchedule
    source: str
    label: str = ""
    predicted: Optional[float] = None
    generation: int = 0
    flat: tuple[float, ...] = ()   # the flat encoding a TPE / CMA-ES / random sampler proposed


class Ledger:
    """The study's evaluations, by canonical hash; the only path by which schedules get evaluated."""

    def __init__(self, study: optuna.Study, evaluator: Evaluator, request: EvalRequest,
                 should_stop: Optional[Callable[[], bool]] = None, with_params: bool = True) -> None:
        self.study = study
        self.evaluator = evaluator
        self.request = request
        self.should_stop = should_stop       # enqueue nothing once it says stop (the queue would outlive the search)
        # Params cost an RDB storage a few queries each per trial (tens of ms a trial on SQLite): a benchmark of
        # the search's own overhead may go without them.
        self.with_params = with_params
        self.done: dict[str, Evaluated] = {}
        self.history: list[Evaluated] = []       # in evaluation order (for best-so-far curves)

    # ----- resume -------------------------------------------------------------------------------------
    def load(self, requeue_stale: bool = True) -> int:
        """Read the trials already in the study; returns how many evaluations they hold."""
        trials = sorted(self.study.get_trials(deepcopy=False), key=lambda t: t.number)
        stale = []
        for t in trials:
            if ATTR.SCHEDULE not in t.user_attrs:
                continue
            if _is_done(t):
                self._record_trial(t)
            elif t.state == TrialState.RUNNING and requeue_stale:
                stale.append(t)
        # After every done trial is known, so a stale copy of a done schedule is not queued again.
        for t in stale:
            self._requeue_stale(t)
        return len(self.done)

    def _requeue_stale(self, t: optuna.trial.FrozenTrial) -> None:
        """End a trial a dead runner left RUNNING (FAIL, marked stale) and queue its schedule again."""
        storage = self.study._storage
        try:
            storage.set_trial_user_attr(t._trial_id, ATTR.STALE, True)
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            now = storage.get_trial(t._trial_id)   # finished elsewhere meanwhile: take its outcome as it is
            if _is_done(now):
                self._record_trial(now)
            return
        h = t.user_attrs.get(ATTR.HASH)
        if h not in self.done and h not in {w.user_attrs.get(ATTR.HASH) for w in self.waiting()}:
            _enqueue(self.study, {k: v for k, v in t.user_attrs.items() if k in _REQUEUED_ATTRS},
                     dict(t.params), dict(t.distributions))

    def _record_trial(self, t: optuna.trial.FrozenTrial) -> Evaluated:
        value = float(t.value) if t.state == TrialState.COMPLETE and t.value is not None else math.inf
        return self._record(t.number, t.user_attrs, value)

    def _record(self, number: int, attrs: dict[str, Any], value: float) -> Evaluated:
        sched = schedule_from_json(attrs[ATTR.SCHEDULE])
        h = attrs.get(ATTR.HASH) or chash(sched)
        ev = Evaluated(schedule=sched, value=value, nfe=int(attrs.get(ATTR.NFE, sched.nfe)),
                       source=str(attrs.get(ATTR.SOURCE, "")), label=str(attrs.get(ATTR.BASELINE, "")),
                       trial_number=number, predicted=attrs.get(ATTR.PREDICTED))
        if h not in self.done:
            self.done[h] = ev
            self.history.append(ev)
        return ev

    # ----- queries ------------------------------------------------------------------------------------
    @property
    def count(self) -> int:
        return len(self.done)

    def seen(self, schedule: AnySchedule) -> bool:
        return chash(schedule) in self.done

    def best(self, nfe: Optional[int] = None) -> Optional[Evaluated]:
        pool = [e for e in self.done.values() if e.ok and (nfe is None or e.nfe == nfe)]
        return min(pool, key=lambda e: (e.value, e.trial_number)) if pool else None

    def solver_pairs(self, nfe: Optional[int] = None) -> tuple[list[SolverSchedule], list[float]]:
        """(schedule, value) of every evaluated SolverSchedule (failures included, as +inf)."""
        pairs = [(e.schedule, e.value) for e in self.done.values()
                 if isinstance(e.schedule, SolverSchedule) and (nfe is None or e.nfe == nfe)]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def waiting(self) -> list[optuna.trial.FrozenTrial]:
        return self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,))

    # ----- evaluation ---------------------------------------------------------------------------------
    def enqueue(self, candidates: Iterable[Candidate]) -> int:
        """Put candidates into the study's queue (labelled WAITING trials); skips known and queued hashes, and
        queues nothing once `should_stop` says stop."""
        if self.should_stop is not None and self.should_stop():
            return 0
        queued = {t.user_attrs.get(ATTR.HASH) for t in self.waiting()}
        n = 0
        for c in candidates:
            h = chash(c.schedule)
            if h in self.done or h in queued:
                continue
            attrs = self._attrs(c, h)
            attrs.update({ATTR.METRIC: self.request.metric, ATTR.SEED: self.request.seed,
                          ATTR.N_SAMPLES: self.request.n_samples, ATTR.SPLIT: self.request.split})
            _enqueue(self.study, attrs, *(schedule_params(c.schedule) if self.with_params else ({}, {})))
            queued.add(h)
            n += 1
        return n

    def run_queue(self, limit: int) -> list[Evaluated]:
        """Evaluate up to `limit` queued trials in one evaluator call."""
        pending = self.waiting()[:max(0, limit)]
        trials, scheds = [], []
        for _ in pending:
            trial = self.study.ask()
            attrs = trial.user_attrs
            if ATTR.SCHEDULE not in attrs:
                # The queue emptied under us (someone else popped it) and ask() made a fresh trial: end it.
                trial.set_user_attr(ATTR.DISCARDED, "not a queued schedule")
                self._tell(trial, state=TrialState.FAIL)
                continue
            sched = schedule_from_json(attrs[ATTR.SCHEDULE])
            if chash(sched) in self.done:
                trial.set_user_attr(ATTR.DISCARDED, "already evaluated")
                self._tell(trial, state=TrialState.PRUNED)
                continue
            trials.append(trial)
            scheds.append(sched)
        return self._evaluate(trials, scheds)

    def evaluate(self, candidates: Sequence[Candidate]) -> list[Evaluated]:
        """Queue the new candidates and evaluate that many queued trials (oldest first) in one call.

        Going through the queue means `ask` never hands us a trial someone else enqueued with other attributes,
        and a candidate whose runner dies before `tell` is found on resume and evaluated then.
        """
        return self.run_queue(self.enqueue(candidates))

    def _evaluate(self, trials: list[optuna.Trial], scheds: list[AnySchedule]) -> list[Evaluated]:
        if not trials:
            return []
        req = self.request
        start = time.perf_counter()
        try:
            results = list(self.evaluator.evaluate(scheds, req))
            if len(results) != len(scheds):
                raise ValueError(f"the evaluator returned {len(results)} results for {len(scheds)} schedules")
        except Exception as e:  # an evaluator that raises must not end the search: every trial fails
            seconds = (time.perf_counter() - start) / len(scheds)
            results = [EvalResult(chash(s), math.inf, s.nfe, seconds, error=f"{type(e).__name__}: {e}")
                       for s in scheds]
        out = []
        for trial, sched, res in zip(trials, scheds, results):
            value = float(res.value) if res.ok and res.value is not None and math.isfinite(res.value) else math.inf
            if self._store(trial, res, value):
                out.append(self._record(trial.number, trial.user_attrs, value))
        return out

    def _store(self, trial: optuna.Trial, res: EvalResult, value: float) -> bool:
        """Write one evaluation to its trial; False when another process finished the trial first (it then holds
        that process's outcome, and this one is dropped rather than counted twice)."""
        try:
            # Metric, seeds, sample count and split were written when the trial was queued (one commit each
            # set_user_attr costs on SQLite, so only what the evaluation produced is written here).
            trial.set_user_attr(ATTR.SECONDS, float(res.seconds))
            if res.extras:
                trial.set_user_attr(ATTR.EXTRAS, {k: float(v) for k, v in res.extras.items()})
            if not math.isfinite(value):
                trial.set_user_attr(ATTR.ERROR, res.error or f"non-finite metric {res.value!r}")
        except optuna.exceptions.UpdateFinishedTrialError:
            return False
        return self._tell(trial, value) if math.isfinite(value) else self._tell(trial, state=TrialState.FAIL)

    def _tell(self, trial: optuna.Trial, value: Optional[float] = None,
              state: Optional[TrialState] = None) -> bool:
        """`study.tell`; False when the trial was already finished by another process."""
        try:
            self.study.tell(trial, value, state=state)
        except optuna.exceptions.UpdateFinishedTrialError:
            return False
        except ValueError:           # "Cannot tell a FAIL trial": finished before tell looked
            if not self.study._storage.get_trial(trial._trial_id).state.is_finished():
                raise
            return False
        return True

    def settle(self, reason: str = "search ended") -> int:
        return settle(self.study, reason)

    @staticmethod
    def _attrs(c: Candidate, h: str) -> dict[str, Any]:
        attrs: dict[str, Any] = {ATTR.SCHEDULE: c.schedule.to_json(), ATTR.HASH: h, ATTR.NFE: c.schedule.nfe,
                                 ATTR.SOURCE: c.source, ATTR.GENERATION: c.generation}
        if c.label:
            attrs[ATTR.BASELINE] = c.label
        if c.flat:
            attrs[ATTR.FLAT] = [float(x) for x in c.flat]
        if c.predicted is not None and math.isfinite(c.predicted):
            attrs[ATTR.PREDICTED] = float(c.predicted)
        return attrs


_REQUEUED_ATTRS = (ATTR.SCHEDULE, ATTR.HASH, ATTR.NFE, ATTR.SOURCE, ATTR.BASELINE, ATTR.PREDICTED, ATTR.GENERATION,
                   ATTR.FLAT, ATTR.METRIC, ATTR.SEED, ATTR.N_SAMPLES, ATTR.SPLIT)


ETA_HIGH = 2.0        # the eta param's upper bound: fixed, as its distribution must be; a larger eta goes unrecorded


def _step_name(nfe: int, i: int) -> str:
    # Zero-padded where a schedule may have ten steps or more, so the dashboard's sorted param list is in order.
    return f"nfe{nfe}.step{i + 1:0{len(str(nfe + 1))}d}"


def schedule_params(schedule: AnySchedule) -> tuple[dict[str, Any], dict[str, BaseDistribution]]:
    """The schedule's choices as Optuna (params, distributions); what cannot be encoded is left out.

    Steps are read in canonical form: a choice that cannot change a step's result (the derivative of a
    first-order step) would otherwise show up as importance it does not have. `lambda_share` is the step's part
    of the grid's half-logSNR span, the scale-free increment the search space perturbs.
    """
    params: dict[str, Any] = {}
    dists: dict[str, BaseDistribution] = {}

    def put(name: str, value: Any, dist: BaseDistribution) -> None:
        try:
            if dist._contains(dist.to_internal_repr(value)):
                params[name], dists[name] = value, dist
        except (TypeError, ValueError):
            pass

    try:
        proc = processes.get(schedule.process)
        nfe = int(schedule.nfe)
        ts = [float(t) for t in schedule.timesteps]
        lam = [float(proc.lambda_(t)) for t in ts]
    except Exception:  # noqa: BLE001 - a schedule the params cannot describe simply carries none
        return {}, {}
    t_dist = FloatDistribution(float(proc.t_min), float(proc.t_max), log=proc.t_min > 0)
    put("grid.t_start", ts[0], t_dist)
    put("grid.t_end", ts[-1], t_dist)
    put("final", str(schedule.final), CategoricalDistribution(FINALS))
    put(f"nfe{nfe}.n_steps", len(ts) - 1, IntDistribution(1, 2 * nfe + 2))
    span = lam[-1] - lam[0]
    if math.isfinite(span) and span > 0:
        for i in range(len(ts) - 1):
            put(f"{_step_name(nfe, i)}.lambda_share", (lam[i + 1] - lam[i]) / span, FloatDistribution(0.0, 1.0))
    if not isinstance(schedule, SolverSchedule):
        return params, dists
    put("first_step", schedule.first_step, CategoricalDistribution(FIRST_STEPS))
    for i, step in enumerate(schedule.steps):
        s, name = step.canonical(), _step_name(nfe, i)
        put(f"{name}.order", int(s.order), IntDistribution(1, MAX_ORDER))
        put(f"{name}.prediction", s.prediction, CategoricalDistribution(PREDICTIONS))
        put(f"{name}.derivative", s.derivative, CategoricalDistribution(DERIVATIVES))
        put(f"{name}.corrector", s.corrector, CategoricalDistribution(CORRECTORS))
        put(f"{name}.eta", float(s.eta), FloatDistribution(0.0, ETA_HIGH))
    return params, dists


def _enqueue(study: optuna.Study, attrs: dict[str, Any], params: dict[str, Any],
             dists: dict[str, BaseDistribution]) -> None:
    """Queue one trial (WAITING) with its user attributes and params, in one storage call."""
    if params:
        try:
            study.add_trial(optuna.trial.create_trial(state=TrialState.WAITING, params=params, distributions=dists,
                                                      user_attrs=attrs, system_attrs={"fixed_params": {}}))
            return
        except ValueError:
            # A param name the study already holds with another distribution (a study an older version
            # wrote): the storage rolled the insert back, and the trial goes in without params.
            pass
    study.enqueue_trial({}, user_attrs=attrs)


def _is_done(t: optuna.trial.FrozenTrial) -> bool:
    """An evaluation the search counts: COMPLETE, or FAIL with the evaluation's own error."""
    return t.state == TrialState.COMPLETE or (t.state == TrialState.FAIL and ATTR.ERROR in t.user_attrs)


def settle(study: optuna.Study, reason: str = "search ended") -> int:
    """End every trial of `study` still WAITING (PRUNED) or RUNNING (FAIL), each marked `discarded` with `reason`;
    returns how many. For when the search is over (finished, cancelled, failed): its queue would otherwise stay
    WAITING and an interrupted evaluation RUNNING for good. Neither counts as an evaluation on a later load."""
    storage = study._storage
    n = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING)):
        try:
            if t.state == TrialState.WAITING:
                storage.set_trial_state_values(t._trial_id, TrialState.RUNNING)   # sets its start time
            storage.set_trial_user_attr(t._trial_id, ATTR.DISCARDED, reason)
            storage.set_trial_state_values(
                t._trial_id, TrialState.PRUNED if t.state == TrialState.WAITING else TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue             # finished meanwhile by whoever held it: its outcome stands
        n += 1
    return n
