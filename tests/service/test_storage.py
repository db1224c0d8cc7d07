"""The storage layer on SQLite and PostgreSQL: migrations, keys, idempotent submission, claims, fencing."""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from sqlalchemy import inspect, select, update

from s3search.evaluation.base import EvalRequest, EvalResult
from s3search.schedule import SolverSchedule, StepSpec
from studies import jobs as repo
from studies.cache import CachedEvaluator
from studies.db import make_engine, make_session_factory, normalize_url, utcnow
from studies.keys import create_key, list_keys, revoke_key, verify_key
from studies.migrate import current_revision, head_revision, upgrade
from studies.models import ApiKey, EvalCacheEntry, Job
from studies.optuna_storage import optuna_storage


def _spec(i: int = 0) -> dict:
    return {"model": "gmm-64d", "nfe": [5], "budget": 4, "seed": i}


def test_normalize_url_picks_psycopg_and_rejects_others():
    assert normalize_url("postgres://u@h/db").startswith("postgresql+psycopg://")
    assert normalize_url("sqlite:///x.db") == "sqlite:///x.db"
    with pytest.raises(ValueError, match="database_url"):
        normalize_url("mysql://u@h/db")
    with pytest.raises(ValueError, match="database_url"):
        normalize_url("  ")


def test_migrations_reach_head_and_coexist_with_optuna(db_url, engine):
    assert current_revision(engine) == head_revision()
    storage = optuna_storage(db_url)            # Optuna creates its own tables in the same database
    import optuna
    optuna.create_study(study_name="x", storage=storage)
    upgrade(db_url)                              # idempotent, and Optuna's alembic_version is not ours
    names = set(inspect(engine).get_table_names())
    assert {"s3s_jobs", "s3s_api_keys", "s3s_exports", "s3s_eval_cache", "s3s_alembic_version",
            "studies", "trials", "alembic_version"} <= names
    assert current_revision(engine) == head_revision()
    storage.engine.dispose()


def test_api_keys_are_stored_hashed_and_revocable(sessions):
    with sessions() as s:
        row, key = create_key(s, "alice", "laptop")
        assert verify_key(s, key).owner == "alice"
        stored = s.get(ApiKey, row.id)
        secret = key.split("_", 2)[2]
        assert secret not in (stored.digest, stored.salt) and len(stored.digest) == 64
        assert verify_key(s, key[:-1] + ("A" if key[-1] != "A" else "B")) is None
        assert verify_key(s, "garbage") is None and verify_key(s, None) is None
        _, key2 = create_key(s, "alice")
        assert row.salt != s.get(ApiKey, key2.split("_")[1]).salt
        assert revoke_key(s, row.id) and not revoke_key(s, row.id)
        assert verify_key(s, key) is None and verify_key(s, key2) is not None
        assert [k.owner for k in list_keys(s, "alice")] == ["alice", "alice"]
        with pytest.raises(ValueError, match="owner"):
            create_key(s, "bad owner!")


def test_idempotent_submission(sessions):
    with sessions() as s:
        a, created = repo.create_job(s, owner="o", spec=_spec(), budget=4, idempotency_key="k", request_hash="h1")
        assert created
        b, created = repo.create_job(s, owner="o", spec=_spec(), budget=4, idempotency_key="k", request_hash="h1")
        assert not created and b.id == a.id
        with pytest.raises(repo.IdempotencyConflict):
            repo.create_job(s, owner="o", spec=_spec(1), budget=4, idempotency_key="k", request_hash="h2")
        c, created = repo.create_job(s, owner="p", spec=_spec(), budget=4, idempotency_key="k", request_hash="h1")
        assert created and c.id != a.id        # keys are per owner
        assert repo.count_jobs(s, owner="o") == 1


def test_concurrent_same_idempotency_key_makes_one_job(sessions):
    def submit(_):
        with sessions() as s:
            return repo.create_job(s, owner="o", spec=_spec(), budget=4, idempotency_key="same",
                                   request_hash="h")[0].id

    with ThreadPoolExecutor(6) as ex:
        ids = set(ex.map(submit, range(12)))
    assert len(ids) == 1
    with sessions() as s:
        assert repo.count_jobs(s, owner="o") == 1


def test_quota_refuses_a_new_job_at_the_limit_but_replays_an_existing_key(sessions):
    with sessions() as s:
        first, _ = repo.create_job(s, owner="o", spec=_spec(), budget=4, idempotency_key="k1", request_hash="h",
                                   max_active=2)
        repo.create_job(s, owner="o", spec=_spec(1), budget=4, max_active=2)             # no key: counted too
        with pytest.raises(repo.QuotaExceeded) as exc:
            repo.create_job(s, owner="o", spec=_spec(2), budget=4, idempotency_key="k2", request_hash="h",
                            max_active=2)
        assert exc.value.limit == 2 and repo.count_jobs(s, owner="o") == 2
        again, created = repo.create_job(s, owner="o", spec=_spec(), budget=4, idempotency_key="k1",
                                         request_hash="h", max_active=2)
        assert not created and again.id == first.id                 # a retry at the limit gets its job
        with pytest.raises(repo.IdempotencyConflict):
            repo.create_job(s, owner="o", spec=_spec(9), budget=4, idempotency_key="k1", request_hash="other",
                            max_active=2)
        assert repo.create_job(s, owner="p", spec=_spec(), budget=4, max_active=2)[1]     # per owner
        claimed = repo.claim_next(s, "r")                            # running still counts ...
        with pytest.raises(repo.QuotaExceeded):
            repo.create_job(s, owner="o", spec=_spec(3), budget=4, max_active=2)
        assert repo.finish(s, claimed.id, claimed.claim_token, "succeeded")   # ... a final job does not
        assert repo.create_job(s, owner="o", spec=_spec(3), budget=4, max_active=2)[1]
        assert repo.count_active(s, "o") == 2


def test_concurrent_submissions_never_pass_the_quota(sessions):
    start = threading.Barrier(8)

    def submit(i: int) -> str:
        start.wait(10)
        with sessions() as s:
            try:
                return repo.create_job(s, owner="o", spec=_spec(i), budget=4, idempotency_key=f"fresh-{i}",
                                       request_hash="h", max_active=3)[0].id
            except repo.QuotaExceeded:
                return "refused"

    with ThreadPoolExecutor(8) as ex:
        outcomes = list(ex.map(submit, range(8)))
    assert outcomes.count("refused") == 5
    with sessions() as s:
        assert repo.count_active(s, "o") == 3


def test_progress_fraction_is_public_kept_without_a_report_and_one_on_success(engine, sessions):
    with sessions() as s:
        job, _ = repo.create_job(s, owner="o", spec=_spec(), budget=4)
        assert repo.get_job(s, job.id).fraction is None
        c = repo.claim_next(s, "r")
        assert repo.record_progress(s, job.id, c.claim_token, evaluations=1, best_value=None, best_schedule=None,
                                    fraction=0.3)
        assert repo.record_progress(s, job.id, c.claim_token, evaluations=2, best_value=None, best_schedule=None)
        assert repo.get_job(s, job.id).fraction == 0.3
        assert repo.read_job(engine, job.id, "o").fraction == 0.3
        assert repo.finish(s, job.id, c.claim_token, "succeeded")
        assert repo.get_job(s, job.id).fraction == 1.0
        other, _ = repo.create_job(s, owner="o", spec=_spec(1), budget=4)
        c = repo.claim_next(s, "r")
        repo.record_progress(s, other.id, c.claim_token, evaluations=1, best_value=None, best_schedule=None,
                             fraction=0.4)
        assert repo.finish(s, other.id, c.claim_token, "cancelled")
        assert repo.get_job(s, other.id).fraction == 0.4               # a cancelled job did not get there


def test_each_job_claimed_once_by_concurrent_runners(sessions):
    with sessions() as s:
        ids = {repo.create_job(s, owner="o", spec=_spec(i), budget=4)[0].id for i in range(10)}
    claimed: list[str] = []
    lock = threading.Lock()

    def runner(name: str) -> None:
        while True:
            with sessions() as s:
                job = repo.claim_next(s, name)
            if job is None:
                return
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=runner, args=(f"r{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(claimed) == sorted(ids)


def test_stale_claim_is_recovered_and_the_old_runner_fenced(sessions):
    with sessions() as s:
        job, _ = repo.create_job(s, owner="o", spec=_spec(), budget=4)
        first = repo.claim_next(s, "r1", stale_after_s=30)
        assert first.id == job.id and first.status == "running" and first.attempts == 1
        assert repo.claim_next(s, "r2", stale_after_s=30) is None     # alive: not claimable
        old = first.claim_token
        assert repo.heartbeat(s, job.id, old).owned
        # r1 stops heartbeating (it died): push its heartbeat into the past.
        s.execute(update(Job).where(Job.id == job.id).values(heartbeat_at=utcnow() - timedelta(seconds=120)))
        s.commit()
        second = repo.claim_next(s, "r2", stale_after_s=30)
        assert second.id == job.id and second.runner_id == "r2" and second.attempts == 2
        assert second.message == "resuming"
        # r1 wakes up: none of its writes land.
        assert not repo.heartbeat(s, job.id, old).owned
        assert not repo.record_progress(s, job.id, old, evaluations=9, best_value=1.0, best_schedule=None)
        assert not repo.finish(s, job.id, old, "succeeded")
        assert repo.cancel_requested(s, job.id, old)
        assert not repo.cancel_requested(s, job.id, second.claim_token)
        assert repo.finish(s, job.id, second.claim_token, "succeeded", result={"x": 1})
        done = repo.get_job(s, job.id)
        assert done.status == "succeeded" and done.result == {"x": 1} and done.finished_at is not None


def test_job_whose_runner_keeps_dying_fails(sessions):
    with sessions() as s:
        job, _ = repo.create_job(s, owner="o", spec=_spec(), budget=4)
        for _ in range(2):
            assert repo.claim_next(s, "r", stale_after_s=30, max_attempts=2) is not None
            s.execute(update(Job).where(Job.id == job.id).values(heartbeat_at=utcnow() - timedelta(seconds=99)))
            s.commit()
        assert repo.claim_next(s, "r", stale_after_s=30, max_attempts=2) is None
        dead = repo.get_job(s, job.id)
        assert dead.status == "failed" and "died 2 times" in dead.error


def test_cancel_queued_and_running(sessions):
    with sessions() as s:
        q, _ = repo.create_job(s, owner="o", spec=_spec(), budget=4)
        assert repo.request_cancel(s, q.id, "someone-else") is None
        assert repo.request_cancel(s, q.id, "o").status == "cancelled"
        assert repo.claim_next(s, "r") is None                       # a cancelled job is never claimed
        r, _ = repo.create_job(s, owner="o", spec=_spec(1), budget=4)
        claimed = repo.claim_next(s, "r")
        assert not repo.heartbeat(s, r.id, claimed.claim_token).cancel_requested
        job = repo.request_cancel(s, r.id, "o")
        assert job.status == "running" and job.cancel_requested
        assert repo.heartbeat(s, r.id, claimed.claim_token).cancel_requested
        assert repo.cancel_requested(s, r.id, claimed.claim_token)
        assert repo.finish(s, r.id, claimed.claim_token, "cancelled")
        assert repo.request_cancel(s, r.id, "o").status == "cancelled"


def test_list_jobs_filters_by_owner_and_status(sessions):
    with sessions() as s:
        for i in range(3):
            repo.create_job(s, owner="a", spec=_spec(i), budget=4)
        repo.create_job(s, owner="b", spec=_spec(), budget=4)
        assert len(repo.list_jobs(s, owner="a")) == 3
        assert len(repo.list_jobs(s, owner="a", limit=2, offset=2)) == 1
        assert repo.count_jobs(s, owner="a", status="queued") == 3
        with pytest.raises(ValueError, match="status"):
            repo.list_jobs(s, status="nope")


class _CountingEvaluator:
    def __init__(self):
        self.seen: list[str] = []

    def evaluate(self, schedules, request):
        out = []
        for sch in schedules:
            self.seen.append(sch.canonical_hash())
            out.append(EvalResult(schedule_hash=sch.canonical_hash(), value=float(len(sch.timesteps)),
                                  nfe=sch.nfe, seconds=0.01))
        return out


def _schedule(n: int) -> SolverSchedule:
    ts = tuple(80.0 * (0.5 ** i) for i in range(n + 1))
    return SolverSchedule(process="edm", timesteps=ts, steps=tuple(StepSpec() for _ in range(n)))


def test_cached_evaluator_pays_each_evaluation_once(sessions):
    inner = _CountingEvaluator()
    ev = CachedEvaluator(inner, sessions)
    req = EvalRequest(model="m", metric="fd", n_samples=10)
    a, b = _schedule(3), _schedule(4)
    r1 = ev.evaluate([a, b], req)
    r2 = ev.evaluate([b, a, _schedule(5)], req)
    assert [r.value for r in r1] == [4.0, 5.0] and [r.value for r in r2] == [5.0, 4.0, 6.0]
    assert len(inner.seen) == 3 and ev.hits == 2
    ev.evaluate([a], EvalRequest(model="m", metric="fd", n_samples=10, split="test"))   # other split: paid
    assert len(inner.seen) == 4
    with sessions() as s:
        assert len(s.scalars(select(EvalCacheEntry)).all()) == 4
    assert math.isfinite(r2[0].seconds)


def test_sqlite_reads_start_deferred_and_writes_immediate(tmp_path):
    from sqlalchemy import event

    from studies.db import read_only

    url = f"sqlite:///{tmp_path / 'modes.db'}"
    upgrade(url)
    engine = make_engine(url)
    begins: list[str] = []
    event.listen(engine, "before_cursor_execute",
                 lambda conn, cur, stmt, *a: begins.append(stmt) if stmt.startswith("BEGIN") else None)
    sessions = make_session_factory(engine)
    with sessions() as s:
        job, _ = repo.create_job(s, owner="o", spec=_spec(), budget=4)
    assert begins and all(b == "BEGIN IMMEDIATE" for b in begins)
    begins.clear()
    with sessions() as s:
        assert repo.get_job(s, job.id).id == job.id
        repo.list_jobs(s, owner="o")
    assert begins == ["BEGIN", "BEGIN"]
    begins.clear()
    with sessions() as s:                      # a read does not leave its mark on the session's next write
        repo.get_job(s, job.id)
        repo.request_cancel(s, job.id, "o")
    assert begins[0] == "BEGIN" and begins[1] == "BEGIN IMMEDIATE"
    # A session that already holds a transaction keeps it (the mark cannot change a running transaction).
    with sessions() as s:
        s.execute(select(Job.id)).all()
        read_only(s)
        assert s.in_transaction()
    engine.dispose()
