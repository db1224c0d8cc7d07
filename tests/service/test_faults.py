"""Fault tests with real runner processes and the real search: SIGKILL and resume, two runners sharing a
PostgreSQL database, cancel within one evaluation."""

from __future__ import annotations

import json
import signal
import time

import optuna
import pytest
from optuna.trial import TrialState

from studies import jobs as repo
from studies.db import make_engine, make_session_factory
from studies.optuna_storage import optuna_storage

from .procs import cli, cli_env, stop

SPEC = {"model": "gmm-64d", "nfe": [4], "metric": "fd", "n_samples": 64, "n_test_samples": 64, "budget": 14,
        "method": "s3", "predictor": "ridge", "seed": 0,
        # One schedule per evaluator call (the search checks should_stop between calls; its random seeding
        # stage otherwise sends max(8, budget / 20) schedules in one call).
        "options": {"batch_size": 1, "init_random": 1}}


@pytest.fixture()
def sessions_of(db_url):
    engine = make_engine(db_url)
    yield make_session_factory(engine)
    engine.dispose()


def submit(sessions, **changes) -> str:
    spec = {**SPEC, **changes}
    with sessions() as s:
        return repo.create_job(s, owner="faults", spec=spec, budget=spec["budget"])[0].id


def job_of(sessions, job_id):
    with sessions() as s:
        return repo.get_job(s, job_id)


def wait_for(sessions, job_id, cond, timeout=240.0, what=""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = job_of(sessions, job_id)
        if cond(job):
            return job
        if job.status == "failed":
            raise AssertionError(f"job failed: {job.error}")
        time.sleep(0.2)
    raise TimeoutError(f"{what}: job is {job.status} with {job.evaluations} evaluations")


def done_trials(db_url, study_name):
    """Trials the search counts as evaluated: COMPLETE, or FAIL with the evaluation's own error."""
    storage = optuna_storage(db_url)
    trials = optuna.load_study(study_name=study_name, storage=storage).get_trials()
    storage.engine.dispose()
    return [t for t in trials if t.state == TrialState.COMPLETE
            or (t.state == TrialState.FAIL and "error" in t.user_attrs)]


def _logs(tmp_path):
    for log in sorted(tmp_path.glob("*.log")):
        print(f"--- {log.name} ---\n{log.read_text()[-2500:]}")


def test_sigkilled_runner_is_resumed_without_evaluating_a_trial_twice(db_url, sessions_of, tmp_path):
    env = cli_env(db_url)
    job_id = submit(sessions_of)
    first = cli(["runner", "--id", "first", "--heartbeat", "0.5", "--stale-after", "4"], env, tmp_path / "first.log")
    second = None
    try:
        wait_for(sessions_of, job_id, lambda j: j.status == "running" and j.evaluations >= 4, what="first runner")
        stop(first, signal.SIGKILL)
        killed = job_of(sessions_of, job_id)
        assert killed.status == "running" and killed.runner_id == "first"
        second = cli(["runner", "--id", "second", "--heartbeat", "0.5", "--stale-after", "4"], env,
                     tmp_path / "second.log")
        job = wait_for(sessions_of, job_id, lambda j: j.status == "succeeded", what="second runner")
    finally:
        stop(first, signal.SIGKILL)
        if second is not None:
            stop(second)
        _logs(tmp_path)
    assert job.attempts == 2 and job.runner_id == "second" and job.evaluations == SPEC["budget"]
    done = done_trials(db_url, job.study_name)
    hashes = [t.user_attrs["schedule_hash"] for t in done]
    assert len(done) == SPEC["budget"] and len(set(hashes)) == len(hashes)


@pytest.mark.postgres
@pytest.mark.slow          # about a minute: ten real searches
def test_two_runners_on_postgres_run_each_of_ten_jobs_once(postgres_url, tmp_path):
    engine = make_engine(postgres_url)
    sessions = make_session_factory(engine)
    env = cli_env(postgres_url)
    runners = [cli(["runner", "--id", f"r{i}", "--heartbeat", "0.5"], env, tmp_path / f"r{i}.log") for i in (1, 2)]
    try:
        deadline = time.monotonic() + 120
        while not all("on postgresql" in (tmp_path / f"r{i}.log").read_text() for i in (1, 2)):
            assert time.monotonic() < deadline, "runners did not start"
            time.sleep(0.3)
        ids = [submit(sessions, budget=3, seed=i) for i in range(10)]
        jobs = [wait_for(sessions, j, lambda job: job.status == "succeeded", what="ten jobs") for j in ids]
    finally:
        for r in runners:
            stop(r)
        _logs(tmp_path)
    assert all(j.attempts == 1 for j in jobs)
    assert {j.runner_id for j in jobs} == {"r1", "r2"}
    for j in jobs:
        assert len(done_trials(postgres_url, j.study_name)) == 3
    engine.dispose()


def test_cancel_stops_a_real_search_within_one_evaluation(db_url, sessions_of, tmp_path):
    env = cli_env(db_url)
    job_id = submit(sessions_of, budget=200)
    runner = cli(["runner", "--heartbeat", "0.5"], env, tmp_path / "runner.log")
    try:
        job = wait_for(sessions_of, job_id, lambda j: j.evaluations >= 3, what="running")
        with sessions_of() as s:
            repo.request_cancel(s, job_id, "faults")
        at_cancel = len(done_trials(db_url, job.study_name))
        job = wait_for(sessions_of, job_id, lambda j: j.status == "cancelled", timeout=60, what="cancel")
    finally:
        stop(runner)
        _logs(tmp_path)
    after = len(done_trials(db_url, job.study_name))
    assert after <= at_cancel + 1                 # one schedule per call: one evaluation may finish, no more
    assert job.result is not None and json.dumps(job.result)   # the best so far is kept
