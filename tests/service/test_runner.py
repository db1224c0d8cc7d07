"""The runner against a real database (SQLite and PostgreSQL), with a stand-in search of the same signature."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import optuna
from optuna.trial import TrialState
from sqlalchemy import update

from studies.runner import Runner, RunnerOptions, config_from_spec
from studies import jobs as repo
from studies.db import utcnow
from studies.models import Job
from studies.optuna_storage import optuna_storage

from .fakes import candidate, failing_search, fake_search, paced_fake_search

FAST = RunnerOptions(heartbeat_interval_s=0.2, stale_after_s=2.0, poll_interval_s=0.05)


def _submit(sessions, budget=5, **options) -> str:
    spec = {"model": "gmm-64d", "nfe": [5], "metric": "fd", "n_samples": 10, "n_test_samples": 10,
            "budget": budget, "method": "s3", "predictor": "ridge", "seed": 0, "options": options}
    with sessions() as s:
        return repo.create_job(s, owner="o", spec=spec, budget=budget)[0].id


def _job(sessions, job_id) -> Job:
    with sessions() as s:
        return repo.get_job(s, job_id)


def _complete_ks(db_url, job: Job) -> list[int]:
    storage = optuna_storage(db_url)
    study = optuna.load_study(study_name=job.study_name, storage=storage)
    ks = [t.user_attrs["k"] for t in study.get_trials(states=(TrialState.COMPLETE,))]
    storage.engine.dispose()
    return ks


def test_config_from_spec_round_trip():
    cfg = config_from_spec({"model": "m", "nfe": [4, 5], "budget": 3, "options": {"batch_size": 3}})
    assert cfg.nfe == (4, 5) and cfg.budget == 3 and cfg.options.batch_size == 3
    assert config_from_spec(cfg.to_dict()) == cfg


def test_runner_completes_a_job_and_annotates_the_study(db_url, sessions):
    job_id = _submit(sessions, budget=4)
    runner = Runner(db_url, options=FAST, search_fn=fake_search, runner_id="r1")
    try:
        assert runner.run_once() == job_id
        assert runner.run_once() is None
    finally:
        runner.close()
    job = _job(sessions, job_id)
    assert job.status == "succeeded" and job.evaluations == 4 and job.finished_at is not None
    assert job.result["best"] == candidate(5, 3).to_dict() and job.result["baselines"]["ddim"] == 3.0
    assert job.best_schedule == job.result["best"] and job.optuna_study_id is not None
    assert sorted(_complete_ks(db_url, job)) == [0, 1, 2, 3]
    storage = optuna_storage(db_url)
    study = optuna.load_study(study_name=job.study_name, storage=storage)
    from optuna_dashboard import get_note
    note = get_note(study)
    assert job_id in note and '"gmm-64d"' in note and "dpmpp-2m" in note
    assert study.user_attrs["job_id"] == job_id
    storage.engine.dispose()


def test_a_failing_search_fails_the_job_with_its_reason(db_url, sessions):
    job_id = _submit(sessions)
    runner = Runner(db_url, options=FAST, search_fn=failing_search)
    try:
        runner.run_once()
    finally:
        runner.close()
    job = _job(sessions, job_id)
    assert job.status == "failed" and "the model exploded" in job.error


def test_cancel_stops_within_one_evaluation(db_url, sessions):
    job_id = _submit(sessions, budget=200)
    runner = Runner(db_url, options=FAST, search_fn=paced_fake_search(0.15))
    t = threading.Thread(target=runner.run_once)
    t.start()
    try:
        deadline = time.time() + 60
        while _job(sessions, job_id).evaluations < 2:
            assert time.time() < deadline
            time.sleep(0.05)
        with sessions() as s:
            repo.request_cancel(s, job_id, "o")
        at_cancel = len(_complete_ks(db_url, _job(sessions, job_id)))
        t.join(60)
    finally:
        runner.shutdown.set()
        t.join(5)
        runner.close()
    job = _job(sessions, job_id)
    assert job.status == "cancelled"
    assert len(_complete_ks(db_url, job)) <= at_cancel + 1


def test_resume_after_a_dead_runner_reuses_finished_trials(db_url, sessions):
    job_id = _submit(sessions, budget=6)
    # A runner claims the job, finishes three evaluations, starts a fourth and dies (no heartbeat from here on).
    with sessions() as s:
        dead = repo.claim_next(s, "dead-runner")
    storage = optuna_storage(db_url)
    study = optuna.create_study(study_name=dead.study_name, storage=storage, direction="minimize")
    fake_search(config_from_spec({**dead.spec, "budget": 3}), study)
    orphan = study.ask()
    orphan.set_user_attr("k", 3)
    storage.engine.dispose()
    with sessions() as s:
        s.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=utcnow() - timedelta(seconds=30)))
        s.commit()
    runner = Runner(db_url, options=FAST, search_fn=fake_search, runner_id="r2")
    try:
        assert runner.run_once() == job_id
    finally:
        runner.close()
    job = _job(sessions, job_id)
    assert job.status == "succeeded" and job.attempts == 2 and job.runner_id == "r2"
    ks = _complete_ks(db_url, job)
    assert sorted(ks) == [0, 1, 2, 3, 4, 5]           # each evaluated once, the three old ones reused
    storage = optuna_storage(db_url)
    states = [t.state for t in optuna.load_study(study_name=job.study_name, storage=storage).get_trials()]
    assert states.count(TrialState.FAIL) == 1 and TrialState.RUNNING not in states
    storage.engine.dispose()


def test_shutdown_gives_the_job_back_and_another_runner_finishes_it(db_url, sessions):
    job_id = _submit(sessions, budget=30)
    first = Runner(db_url, options=FAST, search_fn=paced_fake_search(0.05), runner_id="first")
    t = threading.Thread(target=first.run_once)
    t.start()
    deadline = time.time() + 60
    while _job(sessions, job_id).evaluations < 3:
        assert time.time() < deadline
        time.sleep(0.05)
    first.shutdown.set()
    t.join(60)
    first.close()
    job = _job(sessions, job_id)
    assert job.status == "queued" and 3 <= job.evaluations < 30
    second = Runner(db_url, options=FAST, search_fn=fake_search, runner_id="second")
    try:
        assert second.run_once() == job_id
    finally:
        second.close()
    job = _job(sessions, job_id)
    assert job.status == "succeeded" and sorted(_complete_ks(db_url, job)) == list(range(30))


def test_database_hiccups_in_callbacks_do_not_fail_the_job(db_url, sessions, monkeypatch):
    job_id = _submit(sessions, budget=4)
    calls = {"n": 0}
    real = repo.cancel_requested

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] % 2:
            raise RuntimeError("connection reset")
        return real(*args, **kwargs)

    monkeypatch.setattr(repo, "cancel_requested", flaky)
    monkeypatch.setattr(repo, "record_progress", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("timeout")))
    runner = Runner(db_url, options=FAST, search_fn=fake_search)
    try:
        runner.run_once()
    finally:
        runner.close()
    job = _job(sessions, job_id)
    assert job.status == "succeeded" and calls["n"] >= 4


def _trials(db_url, job: Job) -> list[optuna.trial.FrozenTrial]:
    storage = optuna_storage(db_url)
    try:
        return optuna.load_study(study_name=job.study_name, storage=storage).get_trials()
    finally:
        storage.engine.dispose()


def test_a_runner_whose_claim_moved_mid_search_stops_and_writes_nothing(db_url, sessions):
    """The first runner's search pauses (as if frozen) while a second runner re-claims the job; when it goes on,
    its next study write raises ClaimLost: the runner drops the job, and neither the study nor the job row
    change. No heartbeat runs in between (interval 60 s), so only the fenced storage can notice."""
    job_id = _submit(sessions, budget=6)
    paused, resume = threading.Event(), threading.Event()
    after: list = []

    def search(config, study, **kwargs):
        fake_search(_budget(config, 2), study)
        paused.set()
        resume.wait(30)
        try:
            study.enqueue_trial({}, user_attrs={"k": 99})     # raises ClaimLost
        finally:
            after.append(len(study.get_trials()))
        return fake_search(config, study, **kwargs)

    runner = Runner(db_url, options=RunnerOptions(heartbeat_interval_s=60, stale_after_s=2.0, poll_interval_s=0.05),
                    search_fn=search, runner_id="first")
    t = threading.Thread(target=runner.run_once)
    t.start()
    try:
        assert paused.wait(60)
        with sessions() as s:
            s.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=utcnow() - timedelta(seconds=30)))
            s.commit()
            rescued = repo.claim_next(s, "second", stale_after_s=2.0)
        assert rescued.id == job_id
        before = [(x.number, x.state, x.user_attrs) for x in _trials(db_url, rescued)]
        resume.set()
        t.join(60)
    finally:
        resume.set()
        t.join(5)
        runner.close()
    job = _job(sessions, job_id)
    assert job.status == "running" and job.runner_id == "second" and job.claim_token == rescued.claim_token
    assert job.attempts == 2 and job.finished_at is None and job.error is None
    assert [(x.number, x.state, x.user_attrs) for x in _trials(db_url, job)] == before
    assert after == [2]                          # the search saw its write refused; reads still answered


def _budget(config, budget):
    import dataclasses
    return dataclasses.replace(config, budget=budget)


def _queue_and_then(outcome):
    """A search that evaluates one trial, starts another, queues two more and then returns or raises: what a
    search interrupted inside a batch leaves in its study."""
    def search(config, study, **kwargs):
        result = fake_search(_budget(config, 1), study)
        study.ask().set_user_attr("k", 1)
        for k in (2, 3):
            study.enqueue_trial({}, user_attrs={"k": k})
        if outcome == "raise":
            raise RuntimeError("the model exploded mid-batch")
        return result
    return search


def test_the_runner_settles_the_trials_a_search_left_when_the_job_ends(db_url, sessions):
    for outcome, status in (("return", "succeeded"), ("raise", "failed")):
        job_id = _submit(sessions, budget=1)
        runner = Runner(db_url, options=FAST, search_fn=_queue_and_then(outcome))
        try:
            assert runner.run_once() == job_id
        finally:
            runner.close()
        job = _job(sessions, job_id)
        assert job.status == status
        trials = sorted(_trials(db_url, job), key=lambda x: x.number)
        assert [x.state for x in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED,
                                             TrialState.PRUNED], outcome
        assert [x.user_attrs.get("discarded") for x in trials] == [None, "search ended", "search ended",
                                                                   "search ended"]


def test_the_progress_fraction_is_stored_and_a_success_ends_at_one(db_url, sessions):
    from s3search.search.config import Progress
    job_id = _submit(sessions, budget=1)
    stored: list = []

    def search(config, study, *, progress=None, **kwargs):
        for f in (0.25, None, 0.5):            # None: a search that reports no fraction
            progress(Progress(evaluations=1, budget=1, best_value=1.0, best_schedule=None, fraction=f))
            stored.append(_job(sessions, job_id).fraction)
        return fake_search(config, study)

    runner = Runner(db_url, options=FAST, search_fn=search)
    try:
        runner.run_once()
    finally:
        runner.close()
    assert stored == [0.25, 0.25, 0.5]           # a report without one keeps the last
    assert _job(sessions, job_id).fraction == 1.0


def test_a_database_error_while_claiming_does_not_end_the_runner(db_url, sessions, monkeypatch):
    from sqlalchemy.exc import OperationalError
    job_id = _submit(sessions, budget=2)
    real, calls = repo.claim_next, []

    def locked_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:     # SQLite held by a process frozen inside a transaction, until the busy timeout
            raise OperationalError("BEGIN IMMEDIATE", {}, Exception("database is locked"))
        return real(*args, **kwargs)

    monkeypatch.setattr(repo, "claim_next", locked_once)
    runner = Runner(db_url, options=FAST, search_fn=fake_search)
    try:
        assert runner.run_forever(max_jobs=1) == 1
    finally:
        runner.close()
    assert len(calls) == 2 and _job(sessions, job_id).status == "succeeded"
