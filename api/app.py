"""The FastAPI application factory."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Optional

from fastapi import FastAPI

from studies.db import make_engine, make_session_factory
from studies.job_reader import JobReader
from studies.migrate import upgrade

from .deps import KeyCache
from .errors import install_error_handlers
from .routes import catalog, health, jobs
from .settings import Settings

__all__ = ["create_app"]


def create_app(settings: Optional[Settings] = None) -> FastAPI:
    settings = settings or Settings()
    if settings.model_registry:
        # The model registry reads its file from the environment; the runner does the same.
        os.environ["S3SEARCH_MODEL_REGISTRY"] = settings.model_registry
    engine = make_engine(settings.database_url)
    if settings.migrate_on_start:
        upgrade(engine)
    reader = JobReader(engine)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        await reader.aclose()

    app = FastAPI(title="s3search", version="1", max_body_size=settings.max_request_bytes, lifespan=lifespan,
                  description="Search few-step diffusion solver schedules (S³) as jobs; read trials and schedules.")
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessions = make_session_factory(engine)
    app.state.job_reader = reader
    app.state.optuna_storage = None
    app.state.key_cache = KeyCache(settings.key_cache_ttl_s)
    _warm_up()
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(jobs.router)
    app.include_router(catalog.router)
    return app


def _warm_up() -> None:
    """Import what a submission validates against now, not on the first request: with several workers, each
    worker's first submission would otherwise wait seconds for torch and the search package to import."""
    from . import catalog
    from .routes.jobs import search_errors  # noqa: F401

    catalog.model_names(), catalog.metric_names(), catalog.predictor_names(), catalog.baseline_names()
    try:
        import s3search.search.run  # noqa: F401
    except ImportError:
        pass


def app_from_env() -> FastAPI:
    """Entry point for `uvicorn --factory api.app:app_from_env`."""
    return create_app(Settings())
