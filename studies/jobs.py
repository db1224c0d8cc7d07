"""The job repository: submit (idempotent), claim (row locks), heartbeat, progress, cancel, finish.

Every function takes a Session and ends its own transaction (reads included: on SQLite every transaction holds
the database write lock, so none may stay open between calls). A runner's writes
are fenced by the claim token it got from `claim_next`: once a job was re-claimed from a runner presumed dead,
that runner's late writes change nothing.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional, Sequence

from sqlalchemy import Engine, Row, and_, bindparam, func, or_, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .db import READ_ONLY, read_only, utcnow
from .models import FINAL_STATUSES, JOB_STATUSES, Job

__all__ = ["IdempotencyConflict", "QuotaExceeded", "HeartbeatState", "study_name_for", "create_job", "get_job", "read_job", "PUBLIC_COLUMNS", "PUBLIC_JOB_SELECT", "list_jobs",
           "count_jobs", "count_active", "claim_next", "heartbeat", "cancel_requested", "record_progress", "set_study_id", "finish", "release", "request_cancel"]


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before with a different request body."""

    def __init__(self, job_id: str):
        super().__init__(f"Idempotency-Key already used for job {job_id} with a different body")
        self.job_id = job_id


class QuotaExceeded(Exception):
    """The owner already has `limit` queued or running jobs; nothing was inserted."""

    def __init__(self, limit: int):
        super().__init__(f"at most {limit} queued or running jobs per owner")
        self.limit = limit


@dataclass(frozen=True)
class HeartbeatState:
    owned: bool              # False: the claim was lost (job re-claimed or finished elsewhere); stop at once
    cancel_requested: bool


def study_name_for(job_id: str) -> str:
    return f"s3s-job-{job_id}"


def create_job(session: Session, *, owner: str, spec: dict[str, Any], budget: int,
               idempotency_key: Optional[str] = None, request_hash: Optional[str] = None,
               max_active: Optional[int] = None) -> tuple[Job, bool]:
    """Insert a queued job; with an idempotency key, a retry returns the first job. Returns (job, created).

    With `max_active`, raise QuotaExceeded instead of inserting when the owner already has that many queued or
    running jobs; a retry of an existing key still returns its job. The count and the insert are one transaction
    that holds the owner's lock (PostgreSQL: an advisory lock on the owner; SQLite: BEGIN IMMEDIATE holds the
    database), so concurrent submissions cannot both pass the limit.
    """
    if max_active is not None:
        _lock_owner(session, owner)
    if idempotency_key is not None:
        # Inside the owner's lock when there is one: a concurrent first use of the key has committed by now.
        existing = session.scalar(select(Job).where(Job.owner == owner, Job.idempotency_key == idempotency_key))
        if existing is not None:
            session.commit()
            return _same_or_conflict(existing, request_hash), False
    if max_active is not None and _active(session, owner) >= max_active:
        session.rollback()
        raise QuotaExceeded(max_active)
    job_id = uuid.uuid4().hex
    now = utcnow()
    job = Job(id=job_id, owner=owner, spec=spec, status="queued", cancel_requested=False,
              idempotency_key=idempotency_key, request_hash=request_hash, study_name=study_name_for(job_id),
              budget=budget, evaluations=0, message="queued", attempts=0, created_at=now, updated_at=now)
    session.add(job)
    try:
        session.commit()
    except IntegrityError:
        # A concurrent request with the same key won the insert.
        session.rollback()
        existing = _by_idempotency_key(session, owner, idempotency_key) if idempotency_key else None
        if existing is None:
            raise
        return _same_or_conflict(existing, request_hash), False
    return job, True


def _lock_owner(session: Session, owner: str) -> None:
    """Serialise this owner's submissions until the transaction ends (PostgreSQL; on SQLite the transaction's
    BEGIN IMMEDIATE already holds the whole database)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(733106, hashtext(:owner))"), {"owner": owner})


def _active(session: Session, owner: str) -> int:
    return int(session.scalar(select(func.count()).select_from(Job).where(
        Job.owner == owner, Job.status.in_(("queued", "running")))) or 0)


def _by_idempotency_key(session: Session, owner: str, key: str) -> Optional[Job]:
    job = session.scalar(select(Job).where(Job.owner == owner, Job.idempotency_key == key))
    session.commit()
    return job


def _same_or_conflict(job: Job, request_hash: Optional[str]) -> Job:
    if job.request_hash != request_hash:
        raise IdempotencyConflict(job.id)
    return job


def get_job(session: Session, job_id: str, owner: Optional[str] = None) -> Optional[Job]:
    job = read_only(session).get(Job, job_id, populate_existing=True)
    session.commit()     # end the read: on SQLite every transaction holds the write lock
    if job is None or (owner is not None and job.owner != owner):
        return None
    return job


# What a job's public document shows (api.routes.jobs.to_public): not the owner, claim token, runner or hashes.
PUBLIC_COLUMNS = ("id", "status", "spec", "error", "result", "best_value", "best_schedule", "evaluations", "budget",
                  "message", "predictor_tau", "fraction", "cancel_requested", "attempts", "study_name", "optuna_study_id",
                  "created_at", "started_at", "finished_at", "updated_at")
# Built once with bound parameters: the statement's compiled form is then found in the engine's cache at once.
PUBLIC_JOB_SELECT = select(*(Job.__table__.c[name] for name in PUBLIC_COLUMNS)).where(
    Job.__table__.c.id == bindparam("job_id"), Job.__table__.c.owner == bindparam("owner"))


def read_job(engine: Engine, job_id: str, owner: str) -> Optional[Row[Any]]:
    """The public columns of `owner`'s job, or None (also when another owner has it).

    The hot read path (GET /v1/jobs/{id}): one Core SELECT on a pooled connection, no Session and no ORM object,
    which costs about half of `get_job`. The owner is part of the WHERE clause, so another owner's job is never read."""
    with engine.connect().execution_options(**{READ_ONLY: True}) as conn:
        return conn.execute(PUBLIC_JOB_SELECT, {"job_id": job_id, "owner": owner}).first()


def _list_filter(owner: Optional[str], status: Optional[str]) -> list[Any]:
    if status is not None and status not in JOB_STATUSES:
        raise ValueError(f"status={status!r} must be one of {', '.join(JOB_STATUSES)}")
    cond = []
    if owner is not None:
        cond.append(Job.owner == owner)
    if status is not None:
        cond.append(Job.status == status)
    return cond


def list_jobs(session: Session, *, owner: Optional[str] = None, status: Optional[str] = None,
              limit: int = 50, offset: int = 0) -> Sequence[Job]:
    q = (select(Job).where(*_list_filter(owner, status)).order_by(Job.created_at.desc(), Job.id)
         .limit(limit).offset(offset))
    rows = read_only(session).scalars(q).all()
    session.commit()
    return rows


def count_jobs(session: Session, *, owner: Optional[str] = None, status: Optional[str] = None) -> int:
    n = int(read_only(session).scalar(select(func.count()).select_from(Job).where(*_list_filter(owner, status))) or 0)
    session.commit()
    return n


def count_active(session: Session, owner: str) -> int:
    """Queued and running jobs of `owner` (for the per-owner limit)."""
    n = _active(session, owner)
    session.commit()
    return n


def _claimable(cutoff: Any) -> Any:
    # Queued, or running under a runner whose heartbeat stopped (it died): the latter is resumed.
    return or_(Job.status == "queued", and_(Job.status == "running", Job.heartbeat_at < cutoff))


def claim_next(session: Session, runner_id: str, *, stale_after_s: float = 60.0,
               max_attempts: int = 3) -> Optional[Job]:
    """Claim the oldest claimable job for `runner_id`, or None.

    PostgreSQL: SELECT ... FOR UPDATE SKIP LOCKED, so concurrent runners pick different rows without waiting.
    SQLite: the whole transaction holds the database write lock (BEGIN IMMEDIATE). On both, the UPDATE repeats
    the claimable condition, so a row claimed in between is never claimed twice.
    """
    for _ in range(16):
        now = utcnow()
        cutoff = now - timedelta(seconds=stale_after_s)
        q = select(Job.id, Job.attempts, Job.status).where(_claimable(cutoff)).order_by(Job.created_at, Job.id).limit(1)
        if session.get_bind().dialect.name == "postgresql":
            q = q.with_for_update(skip_locked=True)
        row = session.execute(q).first()
        if row is None:
            session.commit()
            return None
        job_id, attempts, status = row
        base = update(Job).where(Job.id == job_id, _claimable(cutoff))
        if status == "running" and attempts >= max_attempts:
            session.execute(base.values(status="failed", finished_at=now, updated_at=now, claim_token=None,
                                        error=f"runner died {attempts} times while running this job",
                                        message="failed"))
            session.commit()
            continue
        token = uuid.uuid4().hex
        res = session.execute(base.values(
            status="running", runner_id=runner_id, claim_token=token, heartbeat_at=now, updated_at=now,
            attempts=Job.attempts + 1, started_at=func.coalesce(Job.started_at, now),
            message="resuming" if status == "running" else "starting"))
        session.commit()
        if res.rowcount == 1:
            return get_job(session, job_id)
    return None


def _owned(job_id: str, token: str) -> Any:
    return and_(Job.id == job_id, Job.claim_token == token, Job.status == "running")


def heartbeat(session: Session, job_id: str, token: str) -> HeartbeatState:
    now = utcnow()
    res = session.execute(update(Job).where(_owned(job_id, token)).values(heartbeat_at=now))
    cancel = session.scalar(select(Job.cancel_requested).where(Job.id == job_id))
    session.commit()
    return HeartbeatState(owned=res.rowcount == 1, cancel_requested=bool(cancel))


def cancel_requested(session: Session, job_id: str, token: str) -> bool:
    """True when the job should stop: cancel asked, or this runner no longer owns it."""
    row = session.execute(select(Job.cancel_requested, Job.claim_token, Job.status).where(Job.id == job_id)).first()
    session.commit()
    return row is None or bool(row[0]) or row[1] != token or row[2] != "running"


def record_progress(session: Session, job_id: str, token: str, *, evaluations: int,
                    best_value: Optional[float], best_schedule: Optional[dict[str, Any]], message: str = "",
                    predictor_tau: Optional[float] = None, fraction: Optional[float] = None) -> bool:
    """Store a progress report; `fraction` (0..1 of the whole job) is kept as it was when the report has none."""
    now = utcnow()
    values: dict[str, Any] = dict(evaluations=evaluations, best_value=best_value, best_schedule=best_schedule,
                                  message=message, predictor_tau=predictor_tau, heartbeat_at=now, updated_at=now)
    if fraction is not None:
        values["fraction"] = fraction
    res = session.execute(update(Job).where(_owned(job_id, token)).values(**values))
    session.commit()
    return res.rowcount == 1


def set_study_id(session: Session, job_id: str, token: str, study_id: int) -> bool:
    res = session.execute(update(Job).where(_owned(job_id, token)).values(optuna_study_id=study_id))
    session.commit()
    return res.rowcount == 1


def finish(session: Session, job_id: str, token: str, status: str, *, result: Optional[dict[str, Any]] = None,
           error: Optional[str] = None, message: str = "",
           best: Optional[tuple[float | None, dict[str, Any]]] = None) -> bool:
    if status not in FINAL_STATUSES:
        raise ValueError(f"status={status!r} must be one of {', '.join(FINAL_STATUSES)}")
    now = utcnow()
    values: dict[str, Any] = dict(status=status, result=result, error=error, message=message or status,
                                  finished_at=now, updated_at=now, heartbeat_at=now)
    if best is not None:
        values.update(best_value=best[0], best_schedule=best[1])
    if status == "succeeded":
        values["fraction"] = 1.0        # validation and test are done too
    res = session.execute(update(Job).where(_owned(job_id, token)).values(**values))
    session.commit()
    return res.rowcount == 1


def release(session: Session, job_id: str, token: str, message: str = "released by its runner") -> bool:
    """Give a running job back to the queue (runner shutting down); the next runner resumes it."""
    now = utcnow()
    res = session.execute(update(Job).where(_owned(job_id, token)).values(
        status="queued", claim_token=None, runner_id=None, message=message, updated_at=now))
    session.commit()
    return res.rowcount == 1


def request_cancel(session: Session, job_id: str, owner: Optional[str] = None) -> Optional[Job]:
    """Cancel a queued job at once; ask a running one to stop (its runner ends it). Final jobs are unchanged."""
    now = utcnow()
    own = [Job.owner == owner] if owner is not None else []
    session.execute(update(Job).where(Job.id == job_id, Job.status == "queued", *own).values(
        status="cancelled", cancel_requested=True, finished_at=now, updated_at=now, message="cancelled"))
    session.execute(update(Job).where(Job.id == job_id, Job.status == "running", *own).values(
        cancel_requested=True, updated_at=now, message="cancel requested"))
    session.commit()
    return get_job(session, job_id, owner)
