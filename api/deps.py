"""Request dependencies (Annotated): settings, a database session per request, the caller's identity."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import AsyncIterator
from typing import Annotated, Optional

from fastapi import Depends, HTTPException, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from optuna.storages import RDBStorage
from sqlalchemy.orm import Session, sessionmaker

from studies.keys import verify_key
from studies.optuna_storage import optuna_storage

from .settings import Settings

__all__ = ["SettingsDep", "SessionDep", "OwnerDep", "StorageDep", "API_KEY_HEADER", "API_KEY_SCHEME", "BEARER_SCHEME",
           "KeyCache"]

API_KEY_HEADER = "X-API-Key"
_storage_lock = threading.Lock()


# Dependencies that do no I/O are `async def`: FastAPI runs sync dependencies in the thread pool, one hop each,
# which costs more than the work itself here. Creating a Session does no I/O (it connects on first use).
async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_session(request: Request) -> AsyncIterator[Session]:
    session = request.app.state.sessions()
    try:
        yield session
    finally:
        await run_in_threadpool(session.close)


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


class KeyCache:
    """Owners of recently verified keys, for `ttl_s` seconds: a revoked key stops working within that time.

    Entries are keyed by SHA-256 of the key, so the process never keeps a key it was sent in memory."""

    def __init__(self, ttl_s: float, max_entries: int = 10_000):
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _id(key: str) -> str:
        return hashlib.sha256(key.encode()).hexdigest()

    def get(self, key: str) -> Optional[str]:
        if self.ttl_s <= 0:
            return None
        hit = self._entries.get(self._id(key))
        if hit is None or hit[1] < time.monotonic():
            return None
        return hit[0]

    def put(self, key: str, owner: str) -> None:
        if self.ttl_s <= 0:
            return
        with self._lock:
            if len(self._entries) >= self.max_entries:
                self._entries.clear()
            self._entries[self._id(key)] = (owner, time.monotonic() + self.ttl_s)


def _verify_owner(sessions: sessionmaker[Session], key: str) -> Optional[str]:
    with sessions() as session:
        row = verify_key(session, key)
        return None if row is None else row.owner


# Declared as security schemes so the OpenAPI document lists them and /docs has an Authorize button; with
# auto_error=False neither answers by itself, so a missing key gets our 401 (with WWW-Authenticate) below.
API_KEY_SCHEME = APIKeyHeader(name=API_KEY_HEADER, scheme_name="ApiKey", auto_error=False,
                              description="an API key from `s3search keys create`")
BEARER_SCHEME = HTTPBearer(scheme_name="Bearer", auto_error=False,
                           description="the same API key as `Authorization: Bearer <key>`")


async def get_owner(request: Request,
                    x_api_key: Annotated[Optional[str], Security(API_KEY_SCHEME)] = None,
                    bearer: Annotated[Optional[HTTPAuthorizationCredentials], Security(BEARER_SCHEME)] = None) -> str:
    # No SessionDep here: a cached key needs no database, and a generator dependency costs a thread-pool hop
    # (its close) on every request. A cache miss opens its own session inside its one hop.
    key = x_api_key or (bearer.credentials.strip() if bearer is not None else None)
    owner = None
    if key:
        cache: KeyCache = request.app.state.key_cache
        owner = cache.get(key)
        if owner is not None:
            return owner
        owner = await run_in_threadpool(_verify_owner, request.app.state.sessions, key)
        if owner is not None:
            cache.put(key, owner)
    if owner is None:
        raise HTTPException(401, detail=f"a valid API key is required in the {API_KEY_HEADER} header",
                            headers={"WWW-Authenticate": f'ApiKey header="{API_KEY_HEADER}"'})
    return owner


OwnerDep = Annotated[str, Depends(get_owner)]
