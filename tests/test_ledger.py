"""The Ledger when trials change underneath it or outlive the search: settle, no queueing after a stop, a trial
another process finished first, RUNNING trials found on resume. A SQLite study, opened twice where a test needs
a second process's view of it."""

from __future__ import annotations

import math

import optuna
import pytest
from optuna.trial import TrialState

from s3search.evaluation.base import EvalRequest, EvalResult
from s3search.schedule import SolverSchedule, StepSpec
from s3search.search.study import ATTR, Candidate, Ledger, chash, settle

REQUEST = EvalRequest("gmm-64d", "fd", 8, 0, "search")


def schedule(k: int, nfe: int = 4) -> SolverSchedule:
    n = nfe - 1
    t_end = 0.002 * (1.0 + 0.01 * k)
    ratio = (t_end / 80.0) ** (1.0 / n)
    ts = tuple(80.0 * ratio ** i for i in range(n)) + (t_end,)
    return SolverSchedule(process="edm", timesteps=ts, steps=tuple(StepSpec() for _ in range(n)))


class Scores:
    """Scores schedule k as 1 + k / 100; `during` runs inside each evaluate call (another process acting)."""

    def __init__(self, during=None):
        self.during = during
        self.calls = 0

    def evaluate(self, schedules, request):
        self.calls += 1
        if self.during is not None:
            self.during()
        out = []
        for s in schedules:
            k = next(i for i in range(100) if chash(schedule(i)) == chash(s))
            out.append(EvalResult(chash(s), 1.0 + k / 100, s.nfe, 0.01))
        return out


@pytest.fixture()
def url(tmp_path):
    return f"sqlite:///{tmp_path / 'ledger.db'}"


def open_study(url: str) -> optuna.Study:
    return optuna.create_study(study_name="job", storage=url, direction="minimize", load_if_exists=True)


def candidates(*ks: int) -> list[Candidate]:
    return [Candidate(schedule(k), source="random") for k in ks]


def states(study: optuna.Study) -> list[str]:
    return [t.state.name for t in study.get_trials()]


def test_settle_ends_the_queue_and_an_interrupted_trial_and_a_later_load_counts_neither(url):
    study = open_study(url)
    ledger = Ledger(study, Scores(), REQUEST)
    assert len(ledger.evaluate(candidates(0))) == 1
    ledger.enqueue(candidates(1, 2, 3))
    study.ask()                                  # trial 1 popped, its evaluation never told (a crash)
    assert states(study) == ["COMPLETE", "RUNNING", "WAITING", "WAITING"]
    assert settle(study) == 3
    trials = study.get_trials()
    assert states(study) == ["COMPLETE", "FAIL", "PRUNED", "PRUNED"]
    assert all(t.user_attrs[ATTR.DISCARDED] == "search ended" for t in trials[1:])
    assert all(t.datetime_start is not None for t in trials)
    assert settle(study) == 0                    # nothing left to end
    again = Ledger(open_study(url), Scores(), REQUEST)
    assert again.load() == 1 and not again.waiting()


def test_enqueue_after_a_stop_queues_nothing(url):
    stop = {"now": False}
    study = open_study(url)
    ledger = Ledger(study, Scores(), REQUEST, should_stop=lambda: stop["now"])
    assert ledger.enqueue(candidates(0, 1)) == 2
    stop["now"] = True
    assert ledger.enqueue(candidates(2, 3)) == 0
    assert len(ledger.waiting()) == 2


def test_a_trial_another_process_finished_first_is_dropped_not_counted_and_the_search_goes_on(url):
    study = open_study(url)
    other = open_study(url)                      # a second process's view of the same study

    def finish_the_running_one() -> None:
        (t,) = other.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        other.tell(t.number, state=TrialState.FAIL)

    scores = Scores(during=finish_the_running_one)
    ledger = Ledger(study, scores, REQUEST)
    assert ledger.evaluate(candidates(0)) == []  # "Trial#0 has already finished" is not a crash
    assert ledger.count == 0 and states(study) == ["FAIL"]
    assert ATTR.SECONDS not in study.get_trials()[0].user_attrs   # none of this evaluation was written
    scores.during = None
    assert [e.value for e in ledger.evaluate(candidates(1))] == [1.01]
    assert ledger.count == 1 and states(study) == ["FAIL", "COMPLETE"]


def test_a_tell_racing_another_finish_is_dropped(url, monkeypatch):
    """The other process finishes the trial between the Ledger's last attribute write and its tell."""
    study = open_study(url)
    other = open_study(url)
    ledger = Ledger(study, Scores(), REQUEST)
    real_tell = study.tell

    def tell_after_the_other(trial, *args, **kwargs):
        other.tell(trial.number, 5.0)
        return real_tell(trial, *args, **kwargs)

    monkeypatch.setattr(study, "tell", tell_after_the_other)
    assert ledger.evaluate(candidates(0)) == []
    assert study.get_trials()[0].value == 5.0 and ledger.count == 0


def test_load_ends_stale_running_trials_and_requeues_each_schedule_once(url):
    study = open_study(url)
    ledger = Ledger(study, Scores(), REQUEST)
    ledger.evaluate(candidates(0))
    ledger.enqueue(candidates(1, 2))
    study.ask(), study.ask()                     # a runner popped both and died
    # Another copy of schedule 0 left RUNNING too: already evaluated, so it must not be queued again.
    dup = study.ask()
    for key, value in study.get_trials()[0].user_attrs.items():
        dup.set_user_attr(key, value)
    resumed = Ledger(open_study(url), Scores(), REQUEST)
    assert resumed.load() == 1
    trials = study.get_trials()
    stale = [t for t in trials if t.user_attrs.get(ATTR.STALE)]
    assert [t.state for t in stale] == [TrialState.FAIL] * 3
    assert sorted(t.user_attrs[ATTR.HASH] for t in resumed.waiting()) == sorted(chash(schedule(k)) for k in (1, 2))
    assert resumed.load() == 1 and len(resumed.waiting()) == 2       # a second load queues nothing more
    done = resumed.run_queue(5)
    assert sorted(e.value for e in done) == [1.01, 1.02] and resumed.count == 3
    assert not [t for t in study.get_trials() if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert all(math.isfinite(e.value) for e in resumed.done.values())
