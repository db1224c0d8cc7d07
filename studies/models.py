"""SQLAlchemy 2 tables of the service: jobs, API keys, exports, and the evaluation cache.

Table names carry an `s3s_` prefix because Optuna's own tables (studies, trials, alembic_version, ...) live in
the same database.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Optional

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Index, Integer, MetaData, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from .db import utcnow

__all__ = ["Base", "Job", "ApiKey", "Export", "EvalCacheEntry", "JOB_STATUSES", "ACTIVE_STATUSES", "FINAL_STATUSES"]

JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
ACTIVE_STATUSES = ("queued", "running")
FINAL_STATUSES = ("succeeded", "failed", "cancelled")

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSON}


class Job(Base):
    __tablename__ = "s3s_jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default="queued")
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # Idempotent submission: (owner, key) is unique; the body's hash tells a retry from a conflicting reuse.
    idempotency_key: Mapped[Optional[str]] = mapped_column(String(200), nullable=True)
    request_hash: Mapped[Optional[str]] = mapped_column(String(64), nullable=True)
    study_name: Mapped[str] = mapped_column(String(64))
    optuna_study_id: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    budget: Mapped[int] = mapped_column(Integer)
    evaluations: Mapped[int] = mapped_column(Integer, default=0)
    best_value: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    best_schedule: Mapped[Optional[dict[str, Any]]] = mapped_column(JSON, nullable=True)
    predictor_tau: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    # Of the whole job's work, validation and test included (0..1); NULL until the search reports one.
    fraction: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    message: Mapped[str] = mapped_column(Text, default="")
    result: Mapped[Optional[dict[str, Any]]] = mapped_column(JSON, nullable=True)
    error: Mapped[Optional[str]] = mapped_column(Text, nullable=True)
    runner_id: Mapped[Optional[str]] = mapped_column(String(128), nullable=True)
    # A fresh token per claim: a runner that lost its claim (presumed dead, job re-claimed) can no longer write.
    claim_token: Mapped[Optional[str]] = mapped_column(String(32), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    started_at: Mapped[Optional[datetime]] = mapped_column(DateTime, nullable=True)
    finished_at: Mapped[Optional[datetime]] = mapped_column(DateTime, nullable=True)
    heartbeat_at: Mapped[Optional[datetime]] = mapped_column(DateTime, nullable=True)

    __table_args__ = (
        UniqueConstraint("owner", "idempotency_key", name="uq_s3s_jobs_owner_idempotency_key"),
        Index("ix_s3s_jobs_owner_created", "owner", "created_at"),
        Index("ix_s3s_jobs_status_created", "status", "created_at"),
    )


class ApiKey(Base):
    __tablename__ = "s3s_api_keys"

    # The public part of a key ("s3s_<id>_<secret>"); the secret is kept only as an HMAC with a per-key salt.
    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    label: Mapped[str] = mapped_column(String(200), default="")
    salt: Mapped[str] = mapped_column(String(64))
    digest: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    revoked_at: Mapped[Optional[datetime]] = mapped_column(DateTime, nullable=True)


class Export(Base):
    __tablename__ = "s3s_exports"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("s3s_jobs.id", ondelete="CASCADE"))
    format: Mapped[str] = mapped_column(String(32))
    schedule_hash: Mapped[str] = mapped_column(String(64))
    document: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    __table_args__ = (UniqueConstraint("job_id", "format", "schedule_hash", name="uq_s3s_exports_job_format_hash"),)


class EvalCacheEntry(Base):
    __tablename__ = "s3s_eval_cache"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    schedule_hash: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(200))
    metric_key: Mapped[str] = mapped_column(String(200))     # metric name, sample count and split
    seed: Mapped[int] = mapped_column(Integer)
    value: Mapped[Optional[float]] = mapped_column(Float, nullable=True)   # NULL for +inf / failed
    nfe: Mapped[int] = mapped_column(Integer)
    seconds: Mapped[float] = mapped_column(Float)
    error: Mapped[Optional[str]] = mapped_column(Text, nullable=True)
    extras: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    __table_args__ = (UniqueConstraint("schedule_hash", "model", "metric_key", "seed", name="uq_s3s_eval_cache_key"),)
