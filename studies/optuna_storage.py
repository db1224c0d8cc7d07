"""The Optuna RDB storage on the service's own database, so the dashboard and the API read the same trials."""

from __future__ import annotations

from typing import Any

import optuna
from optuna.storages import RDBStorage

from .db import database_url, is_sqlite, sqlite_immediate_transactions

__all__ = ["optuna_storage_url", "optuna_storage", "load_study"]


def optuna_storage_url(url: str | None = None) -> str:
    """The URL Optuna and optuna-dashboard take for our database (same driver normalisation)."""
    return database_url(url)


def optuna_storage(url: str | None = None, **engine_kwargs: Any) -> RDBStorage:
    url = optuna_storage_url(url)
    if is_sqlite(url):
        engine_kwargs.setdefault("connect_args", {"timeout": 30, "check_same_thread": False})
    else:
        engine_kwargs.setdefault("pool_pre_ping", True)
    storage = RDBStorage(url, engine_kwargs=engine_kwargs)
    if is_sqlite(url):
        # Optuna's transactions read and then write; in a process that also heartbeats, a deferred SQLite
        # transaction would fail with "database is locked" instead of waiting. Pooled connections were made
        # before the hook, so drop them.
        sqlite_immediate_transactions(storage.engine)
        storage.engine.dispose()
    return storage


def load_study(storage: RDBStorage, study_name: str) -> optuna.Study | None:
    try:
        return optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        return None
