"""A stand-in for `run_search` with the same signature and study behaviour, cheap and deterministic.

It walks a fixed list of candidate schedules, one Optuna trial per evaluation, and resumes from the trials
already COMPLETE in the study, as the real search does. `paced_fake_search(seconds)` is the same with that much
time per evaluation (the job contract has no option for it: a test passes the paced one as the runner's search).
"""

from __future__ import annotations

import math
import time

from optuna.trial import TrialState

from s3search.schedule import SolverSchedule, StepSpec
from s3search.search.config import Progress, SearchResult


def candidate(nfe: int, k: int) -> SolverSchedule:
    n = nfe - 1                                    # model at t_0 + one per step, final reuses nothing
    t_end = 0.002 * (1.0 + 0.01 * k)
    ratio = (t_end / 80.0) ** (1.0 / n)
    ts = tuple(80.0 * ratio ** i for i in range(n)) + (t_end,)
    return SolverSchedule(process="edm", timesteps=ts, steps=tuple(StepSpec() for _ in range(n)), name=f"fake-{k}")


def value_of(k: int) -> float:
    return 1.0 + 1.0 / (1.0 + k)                   # improves with k: best-so-far moves every evaluation


def paced_fake_search(seconds: float):
    """`fake_search` taking `seconds` per evaluation."""
    def search(config, study, *, evaluator=None, progress=None, should_stop=None) -> SearchResult:
        return fake_search(config, study, evaluator=evaluator, progress=progress, should_stop=should_stop,
                           delay=seconds)
    return search


def fake_search(config, study, *, evaluator=None, progress=None, should_stop=None, delay: float = 0.0
                ) -> SearchResult:
    nfe = config.nfe[0]
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):   # left by a dead runner
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    seen = {t.user_attrs["k"] for t in done}
    best_k = min(seen, key=value_of) if seen else None
    k = 0
    while len(seen) < config.budget:
        if should_stop is not None and should_stop():
            break
        if k in seen:
            k += 1
            continue
        sched = candidate(nfe, k)
        trial = study.ask()
        trial.set_user_attr("k", k)
        trial.set_user_attr("schedule", sched.to_json())
        trial.set_user_attr("nfe", sched.nfe)
        trial.set_user_attr("predicted_score", value_of(k) + 0.1)
        time.sleep(delay)
        study.tell(trial, value_of(k))
        seen.add(k)
        if best_k is None or value_of(k) < value_of(best_k):
            best_k = k
        if progress is not None:
            progress(Progress(evaluations=len(seen), budget=config.budget, best_value=value_of(best_k),
                              best_schedule=candidate(nfe, best_k), message=f"evaluated {k}"))
        k += 1
    if best_k is None:
        return SearchResult(best=candidate(nfe, 0), best_value=math.inf, test_value=math.inf, baselines={},
                            evaluations=0)
    return SearchResult(best=candidate(nfe, best_k), best_value=value_of(best_k), test_value=value_of(best_k) + 0.01,
                        baselines={"ddim": 3.0, "dpmpp-2m": 2.5}, evaluations=len(seen))


def failing_search(config, study, **_):
    raise RuntimeError("the model exploded")
