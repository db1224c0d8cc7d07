"""The hot job read (studies.job_reader) gives the same public document as the ORM read, only to the owner,
and survives the database closing its pooled connections."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import text

from api.routes.jobs import to_public
from api.settings import Settings
from studies import jobs as repo
from studies.db import make_engine, make_session_factory
from studies.job_reader import JobReader

SETTINGS = Settings(dashboard_url="http://dash.example:8080")
SCHEDULE = {"type": "solver_schedule", "sigmas": [80.0, 1.5, 0.002], "orders": [2, 1]}


def _job_with_progress(sessions) -> str:
    """A claimed job with every public field the runner fills: progress, best schedule, study id, then a result."""
    with sessions() as s:
        job, _ = repo.create_job(s, owner="alice", spec={"model": "gmm-64d", "nfe": [5], "options": {"a": [1, 2]}},
                                 budget=10)
        claimed = repo.claim_next(s, "runner-1")
        assert claimed is not None and claimed.id == job.id
        token = claimed.claim_token
        assert repo.record_progress(s, job.id, token, evaluations=4, best_value=0.25, best_schedule=SCHEDULE,
                                    message="evaluating", predictor_tau=0.5)
        assert repo.set_study_id(s, job.id, token, 7)
        assert repo.finish(s, job.id, token, "succeeded", result={"best": {"value": 0.25}, "nan": None},
                           message="done")
    return job.id


def _reads(reader: JobReader, *calls: tuple[str, str]) -> list:
    async def go() -> list:
        return [await reader.read(job_id, owner) for job_id, owner in calls]
    return asyncio.run(go())


def test_hot_read_matches_the_orm_document_and_only_for_the_owner(engine, sessions):
    job_id = _job_with_progress(sessions)
    with sessions() as s:
        orm = repo.get_job(s, job_id, "alice")
    reader = JobReader(engine)
    mine, other_owner, unknown = _reads(reader, (job_id, "alice"), (job_id, "bob"), ("0" * 32, "alice"))
    assert other_owner is None and unknown is None
    expected = to_public(orm, SETTINGS).model_dump_json()
    assert to_public(mine, SETTINGS).model_dump_json() == expected
    # A second event loop (another TestClient, a restarted server) gets connections of its own.
    assert to_public(_reads(reader, (job_id, "alice"))[0], SETTINGS).model_dump_json() == expected
    asyncio.run(reader.aclose())


def test_hot_read_sees_each_write_at_once(engine, sessions):
    """No cache: the status and progress a read returns are the committed ones."""
    with sessions() as s:
        job, _ = repo.create_job(s, owner="alice", spec={"model": "gmm-64d"}, budget=3)
    reader = JobReader(engine)

    async def go() -> list:
        seen = [(await reader.read(job.id, "alice")).status]
        with sessions() as s:
            claimed = repo.claim_next(s, "runner-1")
            repo.record_progress(s, job.id, claimed.claim_token, evaluations=2, best_value=None, best_schedule=None)
        row = await reader.read(job.id, "alice")
        seen += [row.status, row.evaluations]
        await reader.aclose()
        return seen

    assert asyncio.run(go()) == ["queued", "running", 2]


@pytest.mark.postgres
def test_a_connection_the_database_closed_is_replaced(postgres_url):
    engine = make_engine(postgres_url)
    job_id = _job_with_progress(make_session_factory(engine))
    reader = JobReader(engine, max_connections=2)

    async def go() -> tuple:
        first = await reader.read(job_id, "alice")
        with engine.connect() as c:      # what a database restart does to the pooled connection
            killed = c.execute(text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                    "WHERE datname = current_database() AND pid <> pg_backend_pid()")).scalar()
        second = await reader.read(job_id, "alice")
        await reader.aclose()
        return first, killed, second

    try:
        first, killed, second = asyncio.run(go())
    finally:
        engine.dispose()
    assert killed >= 1
    assert first is not None and second is not None and second.id == job_id
