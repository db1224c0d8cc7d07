"""Liveness (the process answers) and readiness (the database answers and is migrated)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from studies.migrate import current_revision, head_revision

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "database unreachable or not migrated"}})
def readyz(request: Request) -> JSONResponse:
    engine = request.app.state.engine
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        revision = current_revision(engine)
    except Exception as e:  # noqa: BLE001 - any database failure means "not ready"
        return JSONResponse({"status": "unavailable", "detail": f"database: {type(e).__name__}"}, status_code=503)
    head = head_revision()
    if revision != head:
        return JSONResponse({"status": "unavailable", "detail": f"database at revision {revision}, need {head}"},
                            status_code=503)
    return JSONResponse({"status": "ready", "revision": revision})
