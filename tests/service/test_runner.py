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

from .fakes import candidate, failing_search, fake_search

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
    cfg = config_from_spec({"model": "m", "nfe": [4, 5], "budget": 3, "options": {"a": 1}})
    assert cfg.nfe == (4, 5) and cfg.budget == 3 and cfg.metric == "fd" and cfg.options == {"a": 1}


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
    job_id = _submit(sessions, budget=200, eval_seconds=0.15)
    runner = Runner(db_url, options=FAST, search_fn=fake_search)
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
    job_id = _submit(sessions, budget=30, eval_seconds=0.05)
    first = Runner(db_url, options=FAST, search_fn=fake_search, runner_id="first")
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
