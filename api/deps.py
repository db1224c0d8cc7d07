"""Request dependencies (Annotated): settings, a database session per request, the caller's identity."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Annotated, Optional

from fastapi import Depends, Header, HTTPException, Request
from optuna.storages import RDBStorage
from sqlalchemy.orm import Session

from studies.keys import verify_key
from studies.optuna_storage import optuna_storage

from .settings import Settings

__all__ = ["SettingsDep", "SessionDep", "OwnerDep", "StorageDep", "API_KEY_HEADER"]

API_KEY_HEADER = "X-API-Key"
_storage_lock = threading.Lock()


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    with request.app.state.sessions() as session:
        yield session


def get_storage(request: Request) -> RDBStorage:
    # Building an RDBStorage checks the schema; do it once per app.
    state = request.app.state
    if getattr(state, "optuna_storage", None) is None:
        with _storage_lock:
            if getattr(state, "optuna_storage", None) is None:
                state.optuna_storage = optuna_storage(state.settings.database_url)
    return state.optuna_storage


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
StorageDep = Annotated[RDBStorage, Depends(get_storage)]


def get_owner(session: SessionDep,
              x_api_key: Annotated[Optional[str], Header(alias=API_KEY_HEADER, include_in_schema=True)] = None,
              authorization: Annotated[Optional[str], Header(include_in_schema=False)] = None) -> str:
    key = x_api_key
    if key is None and authorization and authorization.lower().startswith("bearer "):
        key = authorization[7:].strip()
    row = verify_key(session, key) if key else None
    if row is None:
        raise HTTPException(401, detail=f"a valid API key is required in the {API_KEY_HEADER} header",
                            headers={"WWW-Authenticate": f'ApiKey header="{API_KEY_HEADER}"'})
    return row.owner


OwnerDep = Annotated[str, Depends(get_owner)]
