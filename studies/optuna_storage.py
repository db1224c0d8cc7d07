"""The Optuna RDB storage on the service's own database, so the dashboard and the API read the same trials."""

from __future__ import annotations

import time
from typing import Any, Callable

import optuna
from optuna.storages import RDBStorage
from sqlalchemy import create_engine, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from .db import database_url, is_sqlite, sqlite_immediate_transactions

__all__ = ["optuna_storage_url", "optuna_storage", "load_study"]


def optuna_storage_url(url: str | None = None) -> str:
    """The URL Optuna and optuna-dashboard take for our database (same driver normalisation)."""
    return database_url(url)


StorageFactory = Callable[..., RDBStorage]     # (url, *, engine_kwargs) -> storage: RDBStorage or a subclass


def optuna_storage(url: str | None = None, *, factory: StorageFactory = RDBStorage, **engine_kwargs: Any) -> RDBStorage:
    url = optuna_storage_url(url)
    if is_sqlite(url):
        engine_kwargs.setdefault("connect_args", {"timeout": 30, "check_same_thread": False})
    else:
        engine_kwargs.setdefault("pool_pre_ping", True)
    storage = _create(url, engine_kwargs, factory)
    if is_sqlite(url):
        # Optuna's transactions read and then write; in a process that also heartbeats, a deferred SQLite
        # transaction would fail with "database is locked" instead of waiting. Pooled connections were made
        # before the hook, so drop them.
        sqlite_immediate_transactions(storage.engine)
        storage.engine.dispose()
    return storage


def _create(url: str, engine_kwargs: dict[str, Any], factory: StorageFactory, attempts: int = 5) -> RDBStorage:
    """RDBStorage creates Optuna's tables on first use; two processes doing that at once on a fresh database
    collide. Serialise with an advisory lock on PostgreSQL, and retry (the loser then finds the tables)."""
    lock_engine = None if is_sqlite(url) else create_engine(url, poolclass=NullPool)
    try:
        for attempt in range(attempts):
            try:
                if lock_engine is None:
                    return factory(url, engine_kwargs=dict(engine_kwargs))
                with lock_engine.connect() as conn:
                    conn.execute(text("SELECT pg_advisory_lock(733105)"))
                    try:
                        return factory(url, engine_kwargs=dict(engine_kwargs))
                    finally:
                        conn.execute(text("SELECT pg_advisory_unlock(733105)"))
                        conn.commit()
            except (SQLAlchemyError, optuna.exceptions.StorageInternalError):
                if attempt == attempts - 1:
                    raise
                time.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")
    finally:
        if lock_engine is not None:
            lock_engine.dispose()


def load_study(storage: RDBStorage, study_name: str) -> optuna.Study | None:
    try:
        return optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        return None
