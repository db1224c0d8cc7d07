"""Fault tests with real runner processes, real signals and the real search: a runner frozen past its claim
(SIGSTOP, then SIGCONT while the rescuer runs), SIGKILL and resume, two runners sharing a database, cancel.

Every test ends with `assert_accounted`: nothing lost (each evaluation seen during the test is still in the study
and the result counts it), nothing duplicated (no schedule evaluated twice), nothing left RUNNING or WAITING, and
every other trial says why it holds no evaluation (discarded when the search ended, or stale on resume).
The PostgreSQL runs are in the slow suite (conftest); the SQLite runs are in the default one.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from studies import jobs as repo
from studies.db import is_sqlite, make_engine, make_session_factory, normalize_url
from studies.models import Job
from studies.optuna_storage import optuna_storage

from .procs import cli, cli_env, stop

SPEC = {"model": "gmm-64d", "nfe": [4], "metric": "fd", "n_samples": 64, "n_test_samples": 64, "budget": 14,
        "method": "s3", "predictor": "ridge", "seed": 0,
        # One schedule per evaluator call (the search checks should_stop between calls; its random seeding
        # stage otherwise sends max(8, budget / 20) schedules in one call).
        "options": {"batch_size": 1, "init_random": 1}}
FAST_POLL = {"S3S_POLL_INTERVAL_S": "0.2"}


@pytest.fixture()
def sessions_of(db_url):
    engine = make_engine(db_url)
    yield make_session_factory(engine)
    engine.dispose()


def submit(sessions, **changes) -> str:
    spec = {**SPEC, **changes}
    with sessions() as s:
        return repo.create_job(s, owner="faults", spec=spec, budget=spec["budget"])[0].id


def job_of(sessions, job_id) -> Job:
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


def runner(name: str, env: dict, tmp_path: Path, stale_after: float = 4.0):
    return cli(["runner", "--id", name, "--heartbeat", "0.5", "--stale-after", str(stale_after)], env,
               tmp_path / f"{name}.log")


def study_trials(db_url, study_name) -> list[FrozenTrial]:
    storage = optuna_storage(db_url)
    try:
        return optuna.load_study(study_name=study_name, storage=storage).get_trials()
    finally:
        storage.engine.dispose()


def study_state(db_url, study_name) -> tuple:
    """Everything a runner may write to a study: its attributes and every trial's state, values and attributes."""
    storage = optuna_storage(db_url)
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
        trials = [(t.number, t.state.name, t.values, t.user_attrs, t.system_attrs, t.datetime_start,
                   t.datetime_complete) for t in study.get_trials()]
        return trials, study.user_attrs, storage.get_study_system_attrs(study._study_id)
    finally:
        storage.engine.dispose()


def changes(before: tuple, after: tuple) -> list:
    """What differs between two (study_state, job_row) snapshots, briefly."""
    (b_trials, b_attrs, b_sys), b_job = before
    (a_trials, a_attrs, a_sys), a_job = after
    out: list = [("trial", t[:2]) for t in a_trials if t not in b_trials]
    out += [("study attr", k) for k in set(b_attrs) | set(a_attrs) if b_attrs.get(k) != a_attrs.get(k)]
    out += [("study system attr", k) for k in set(b_sys) | set(a_sys) if b_sys.get(k) != a_sys.get(k)]
    return out + [("job", k) for k in b_job if b_job[k] != a_job[k]]


def job_row(sessions, job_id) -> dict:
    job = job_of(sessions, job_id)
    return {c.name: getattr(job, c.name) for c in Job.__table__.columns}


def is_done(t: FrozenTrial) -> bool:
    """A trial the search counts as evaluated: COMPLETE, or FAIL with the evaluation's own error."""
    return t.state == TrialState.COMPLETE or (t.state == TrialState.FAIL and "error" in t.user_attrs)


def done_trials(db_url, study_name) -> list[FrozenTrial]:
    return [t for t in study_trials(db_url, study_name) if is_done(t)]


def evaluated(db_url, study_name) -> dict[int, tuple[str, float | None]]:
    """trial number -> (schedule hash, value) of every evaluation in the study now."""
    return {t.number: (t.user_attrs["schedule_hash"], t.value) for t in done_trials(db_url, study_name)}


def assert_accounted(db_url, job: Job, seen: dict[int, tuple[str, float | None]] | None = None
                     ) -> list[FrozenTrial]:
    """The final job's study holds only trials its result accounts for; returns them. `seen`: evaluations
    observed earlier in the test, each of which must still be there unchanged."""
    seen = seen or {}
    trials = study_trials(db_url, job.study_name)
    left = [(t.number, t.state.name) for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert not left, f"trials left unfinished: {left}"
    done = [t for t in trials if is_done(t)]
    hashes = [t.user_attrs["schedule_hash"] for t in done]
    assert len(set(hashes)) == len(hashes), "a schedule was evaluated twice"
    now = {t.number: (t.user_attrs["schedule_hash"], t.value) for t in done}
    lost = {n: hv for n, hv in seen.items() if now.get(n) != hv}
    assert not lost, f"evaluations lost or changed: {lost}"
    unexplained = [(t.number, t.state.name, sorted(t.user_attrs)) for t in trials if not is_done(t)
                   and "schedule" in t.user_attrs and not ({"discarded", "stale"} & set(t.user_attrs))]
    assert not unexplained, f"trials that are neither evaluations nor discarded: {unexplained}"
    assert job.result is not None
    assert job.result["evaluations"] == job.evaluations == len(done)
    if job.status == "succeeded":
        assert job.result["best_value"] in {t.value for t in done} and job.fraction == 1.0
    return trials


def in_transaction(db_url: str) -> bool:
    """Whether some connection to the database is inside a transaction now (from outside its process)."""
    if is_sqlite(db_url):
        conn = sqlite3.connect(make_url(db_url).database, timeout=0.2, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
            return False
        except sqlite3.OperationalError:
            return True               # "database is locked": a frozen writer holds it
        finally:
            conn.close()
    engine = create_engine(normalize_url(db_url))
    try:
        with engine.connect() as c:
            return bool(c.execute(text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                       "AND pid <> pg_backend_pid() AND state <> 'idle'")).scalar())
    finally:
        engine.dispose()


def freeze(proc, db_url: str, tries: int = 50) -> None:
    """SIGSTOP `proc` between two database transactions. Frozen inside one, it would hold the SQLite file lock
    (or PostgreSQL row locks, until idle_in_transaction_session_timeout) and stall everyone: a different fault
    from the one tested here."""
    for _ in range(tries):
        os.killpg(proc.pid, signal.SIGSTOP)
        time.sleep(0.05)
        if not in_transaction(db_url):
            return
        os.killpg(proc.pid, signal.SIGCONT)
        time.sleep(0.03)
    raise AssertionError("could not freeze the runner outside a transaction")


def thaw_and_stop(proc) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGCONT)     # a stopped process would hold SIGTERM until continued
    stop(proc)


def _logs(tmp_path):
    for log in sorted(tmp_path.glob("*.log")):
        print(f"--- {log.name} ---\n{log.read_text()[-2500:]}")


def _wait_log(path: Path, needle: str, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text_ = path.read_text()
        if needle in text_:
            return text_
        time.sleep(0.2)
    raise TimeoutError(f"{needle!r} not in {path.name}")


def test_a_runner_frozen_past_its_claim_writes_nothing_after_waking(db_url, sessions_of, tmp_path):
    """SIGSTOP a runner past --stale-after and let a second runner resume the job; freeze the second for a moment
    and SIGCONT the first: it drops the job without writing to the study or the job row, and once the second
    goes on, the job ends with a study that holds only what its result accounts for."""
    env = cli_env(db_url, **FAST_POLL)
    job_id = submit(sessions_of, budget=24)
    # The first never takes a job back from a frozen runner (60 s); the second resumes one after 3 s.
    first = runner("first", env, tmp_path, stale_after=60)
    second = None
    try:
        wait_for(sessions_of, job_id, lambda j: j.evaluations >= 4, what="first runner")
        freeze(first, db_url)
        frozen = job_of(sessions_of, job_id)
        seen = evaluated(db_url, frozen.study_name)
        second = runner("second", env, tmp_path, stale_after=3)
        wait_for(sessions_of, job_id, lambda j: j.runner_id == "second" and j.evaluations >= len(seen) + 3,
                 what="second runner resuming")
        # With the second frozen too, whatever changes in the database from here on is the first's doing.
        freeze(second, db_url)
        before = study_state(db_url, frozen.study_name), job_row(sessions_of, job_id)
        os.killpg(first.pid, signal.SIGCONT)
        first_log = _wait_log(tmp_path / "first.log", "claim lost")
        time.sleep(1.0)                        # a late write would land now
        after = study_state(db_url, frozen.study_name), job_row(sessions_of, job_id)
        os.killpg(second.pid, signal.SIGCONT)
        job = wait_for(sessions_of, job_id, lambda j: j.status == "succeeded", what="second runner")
        assert first.poll() is None            # the stale runner dropped the job and went on polling
    finally:
        for p in (first, second):
            if p is not None:
                thaw_and_stop(p)
        _logs(tmp_path)
    assert after == before, f"the stale runner wrote after losing its claim: {changes(before, after)}"
    assert frozen.status == "running" and frozen.runner_id == "first" and frozen.evaluations >= 4
    assert f"job {job_id} failed" not in first_log and f"job {job_id} cancelled" not in first_log
    assert job.attempts == 2 and job.runner_id == "second" and job.evaluations == 24
    trials = assert_accounted(db_url, job, seen)
    assert all("schedule" in t.user_attrs for t in trials), "a trial without a schedule (an unqueued ask)"


def test_sigkilled_runner_is_resumed_without_evaluating_a_trial_twice(db_url, sessions_of, tmp_path):
    env = cli_env(db_url, **FAST_POLL)
    job_id = submit(sessions_of)
    first = runner("first", env, tmp_path)
    second = None
    try:
        wait_for(sessions_of, job_id, lambda j: j.status == "running" and j.evaluations >= 4, what="first runner")
        stop(first, signal.SIGKILL)
        killed = job_of(sessions_of, job_id)
        seen = evaluated(db_url, killed.study_name)
        second = runner("second", env, tmp_path)
        job = wait_for(sessions_of, job_id, lambda j: j.status == "succeeded", what="second runner")
    finally:
        stop(first, signal.SIGKILL)
        if second is not None:
            stop(second)
        _logs(tmp_path)
    assert killed.status == "running" and killed.runner_id == "first" and len(seen) >= 4
    assert job.attempts == 2 and job.runner_id == "second" and job.evaluations == SPEC["budget"]
    assert_accounted(db_url, job, seen)


def _jobs_on_two_runners(env: dict, sessions, tmp_path: Path, n_jobs: int, started: str) -> list[Job]:
    """Start runners r1 and r2, wait until both logged `started`, submit n jobs and wait for all to succeed."""
    runners = [runner(f"r{i}", env, tmp_path) for i in (1, 2)]
    try:
        deadline = time.monotonic() + 120
        while not all(started in (tmp_path / f"r{i}.log").read_text() for i in (1, 2)):
            assert time.monotonic() < deadline, "runners did not start"
            time.sleep(0.3)
        ids = [submit(sessions, budget=3, seed=i) for i in range(n_jobs)]
        return [wait_for(sessions, j, lambda job: job.status == "succeeded", what=f"{n_jobs} jobs") for j in ids]
    finally:
        for r in runners:
            stop(r)
        _logs(tmp_path)


def test_two_runners_on_one_database_run_each_job_once(db_url, sessions_of, tmp_path):
    jobs = _jobs_on_two_runners(cli_env(db_url, **FAST_POLL), sessions_of, tmp_path, 4, " on ")
    assert all(j.attempts == 1 for j in jobs)
    assert {j.runner_id for j in jobs} == {"r1", "r2"}
    for j in jobs:
        assert len(assert_accounted(db_url, j)) >= 3 and j.evaluations == 3


@pytest.mark.postgres
@pytest.mark.slow          # about a minute: ten real searches
def test_two_runners_on_postgres_run_each_of_ten_jobs_once(postgres_url, tmp_path):
    engine = make_engine(postgres_url)
    sessions = make_session_factory(engine)
    jobs = _jobs_on_two_runners(cli_env(postgres_url), sessions, tmp_path, 10, "on postgresql")
    assert all(j.attempts == 1 for j in jobs)
    assert {j.runner_id for j in jobs} == {"r1", "r2"}
    for j in jobs:
        assert len(done_trials(postgres_url, j.study_name)) == 3
        assert_accounted(postgres_url, j)
    engine.dispose()


def test_cancel_stops_a_real_search_within_one_evaluation(db_url, sessions_of, tmp_path):
    env = cli_env(db_url, **FAST_POLL)
    job_id = submit(sessions_of, budget=200)
    proc = runner("runner", env, tmp_path)
    try:
        job = wait_for(sessions_of, job_id, lambda j: j.evaluations >= 3, what="running")
        with sessions_of() as s:
            repo.request_cancel(s, job_id, "faults")
        at_cancel = evaluated(db_url, job.study_name)
        job = wait_for(sessions_of, job_id, lambda j: j.status == "cancelled", timeout=60, what="cancel")
    finally:
        stop(proc)
        _logs(tmp_path)
    trials = assert_accounted(db_url, job, at_cancel)
    assert len([t for t in trials if is_done(t)]) <= len(at_cancel) + 1   # one per call: one may finish, no more
    # Cancelled during the baseline stage: its queue was discarded, not left WAITING.
    assert any(t.user_attrs.get("discarded") == "search ended" for t in trials)
