"""Jobs: submit (idempotent), list, read, cancel, trials (paged), best schedule (exported)."""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import re
from typing import Annotated, Any, Literal, Optional

from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from optuna.trial import TrialState
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from s3search.schedule import SolverSchedule
from studies import jobs as repo
from studies.models import Export, Job

from ..catalog import metric_names, model_names, predictor_names
from ..deps import OwnerDep, SessionDep, SettingsDep, StorageDep
from ..errors import validation_error
from ..schemas import (ErrorBody, JobBest, JobCreate, JobLinks, JobList, JobProgress, JobPublic,
                       NfeRange, TrialPage, TrialPublic)
from ..settings import Settings

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

JobId = Annotated[str, Path(pattern=r"^[0-9a-f]{32}$", description="job id (32 hex digits)")]
IdempotencyKey = Annotated[Optional[str], Header(alias="Idempotency-Key", min_length=1, max_length=200,
                                                 pattern=r"^[\x21-\x7e]+$")]
Limit = Annotated[Optional[int], Query(ge=1, le=10_000, description="page size; default min(50, max_page_size)")]
Offset = Annotated[int, Query(ge=0, le=1_000_000_000)]
_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody}, 404: {"model": ErrorBody}, 422: {"model": ErrorBody}}


# ----- helpers -----------------------------------------------------------------------------------------------
def finite(x: Any) -> Any:
    """JSON has no inf/nan: they become null, recursively."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x


def _err(field: str, message: str) -> dict[str, Any]:
    return {"field": field, "message": message, "loc": ["body", *field.split(".")]}


def limit_errors(body: JobCreate, settings: Settings) -> list[dict[str, Any]]:
    """The server's limits and known names; each error names its field."""
    errors = []
    if isinstance(body.nfe, NfeRange) and body.nfe.min > body.nfe.max:
        errors.append(_err("nfe.max", f"max={body.nfe.max} is below min={body.nfe.min}"))
    # Bounds first, from the ends of a range: {"min": 1, "max": 10**12} must not be expanded into a list.
    ends = [body.nfe.min, body.nfe.max] if isinstance(body.nfe, NfeRange) else (
        [body.nfe] if isinstance(body.nfe, int) else list(body.nfe))
    bad = [n for n in ends if not settings.min_nfe <= n <= settings.max_nfe]
    if bad:
        errors.append(_err("nfe", f"NFE {bad[0]} is outside {settings.min_nfe}..{settings.max_nfe}"))
    elif len(body.nfe_values()) > settings.max_nfe_values:
        errors.append(_err("nfe", f"{len(body.nfe_values())} NFE values; at most {settings.max_nfe_values} per job"))
    for field, cap in (("n_samples", settings.max_samples), ("n_test_samples", settings.max_test_samples),
                       ("budget", settings.max_budget)):
        if getattr(body, field) > cap:
            errors.append(_err(field, f"{field}={getattr(body, field)} is above the limit {cap}"))
    if len(body.options) > settings.max_options:
        errors.append(_err("options", f"{len(body.options)} options; at most {settings.max_options}"))
    metrics = metric_names()
    if metrics is not None and body.metric not in metrics:
        errors.append(_err("metric", f"metric={body.metric!r} is unknown; known: {', '.join(metrics)}"))
    predictors = predictor_names()
    if predictors is not None and body.predictor not in predictors:
        errors.append(_err("predictor", f"predictor={body.predictor!r} is unknown; known: {', '.join(predictors)}"))
    if not errors:
        errors += search_errors(body)
    return errors


# Options that name server-side resources (database URLs, devices, paths) are the server's to set.
SERVER_ONLY_OPTIONS = ("evaluator", "warm_start")
_FIELD = re.compile(r"^([A-Za-z_][A-Za-z0-9_.\[\]]*)")


def search_errors(body: JobCreate) -> list[dict[str, Any]]:
    """The search's own validation of the config (option names and values), as field errors."""
    for key in SERVER_ONLY_OPTIONS:
        if key in body.options:
            return [_err(f"options.{key}", f"options.{key} is set by the server, not by a request")]
    try:
        from studies.runner import config_from_spec
        from s3search.search.run import check_config
    except ImportError:
        return []
    try:
        check_config(config_from_spec(spec_of(body)))
    except (ValueError, TypeError) as e:
        m = _FIELD.match(str(e))
        return [_err(m.group(1) if m else "options", str(e))]
    return []


def spec_of(body: JobCreate) -> dict[str, Any]:
    """The stored job spec: SearchConfig's fields, with NFE as an explicit sorted list."""
    return {"model": body.model, "nfe": body.nfe_values(), "metric": body.metric, "n_samples": body.n_samples,
            "n_test_samples": body.n_test_samples, "budget": body.budget, "method": body.method,
            "predictor": body.predictor, "seed": body.seed, "options": dict(sorted(body.options.items()))}


def spec_hash(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def to_public(job: Any, settings: Settings) -> JobPublic:
    """The public document of a job: an ORM `Job`, or any row with the columns of studies.jobs.PUBLIC_COLUMNS
    as attributes (what studies.job_reader returns on either backend)."""
    base = f"/v1/jobs/{job.id}"
    dashboard = None
    if job.optuna_study_id is not None and settings.dashboard_url:
        dashboard = f"{settings.dashboard_url.rstrip('/')}/dashboard/studies/{job.optuna_study_id}"
    best = None
    if job.best_schedule is not None:
        best = JobBest(value=finite(job.best_value), schedule=job.best_schedule)
    budget = max(job.budget, 1)
    return JobPublic(
        id=job.id, status=job.status, spec=job.spec, error=job.error, result=finite(job.result), best=best,
        progress=JobProgress(evaluations=job.evaluations, budget=job.budget,
                             fraction=min(1.0, job.evaluations / budget), message=job.message or "",
                             predictor_tau=finite(job.predictor_tau)),
        cancel_requested=job.cancel_requested, attempts=job.attempts, study_name=job.study_name,
        created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at, updated_at=job.updated_at,
        links=JobLinks(self=base, trials=f"{base}/trials", schedule=f"{base}/schedule", cancel=f"{base}/cancel",
                       dashboard=dashboard))


def _page_size(limit: Optional[int], settings: Settings) -> tuple[int, Optional[JSONResponse]]:
    if limit is None:
        return min(50, settings.max_page_size), None
    if limit > settings.max_page_size:
        return limit, validation_error([{"field": "limit", "message": f"at most {settings.max_page_size}",
                                         "loc": ["query", "limit"]}])
    return limit, None


def _not_found(job_id: str) -> JSONResponse:
    return JSONResponse({"detail": f"job {job_id} not found"}, status_code=404)


# ----- routes ------------------------------------------------------------------------------------------------
@router.post("", status_code=202, response_model=JobPublic,
             responses={**_ERRORS, 409: {"model": ErrorBody}, 413: {"model": ErrorBody}, 429: {"model": ErrorBody}})
def submit_job(body: JobCreate, owner: OwnerDep, session: SessionDep, settings: SettingsDep, response: Response,
               idempotency_key: IdempotencyKey = None) -> Any:
    errors = limit_errors(body, settings)
    if errors:
        return validation_error(errors)
    known = model_names()
    if body.model not in known:
        return JSONResponse({"detail": f"model={body.model!r} is unknown; known models: {', '.join(known)}",
                             "errors": [_err("model", "unknown model")], "known": known}, status_code=404)
    spec = spec_of(body)
    if idempotency_key is None and repo.count_active(session, owner) >= settings.max_active_jobs_per_owner:
        return JSONResponse({"detail": f"at most {settings.max_active_jobs_per_owner} active jobs per owner"},
                            status_code=429)
    try:
        job, created = repo.create_job(session, owner=owner, spec=spec, budget=body.budget,
                                       idempotency_key=idempotency_key, request_hash=spec_hash(spec))
    except repo.IdempotencyConflict as e:
        return JSONResponse({"detail": str(e), "errors": [{"field": "Idempotency-Key", "message": str(e),
                                                           "loc": ["header", "Idempotency-Key"]}]},
                            status_code=409)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return to_public(job, settings)


@router.get("", response_model=JobList, responses=_ERRORS)
def list_jobs(owner: OwnerDep, session: SessionDep, settings: SettingsDep, limit: Limit = None, offset: Offset = 0,
              status: Optional[Literal["queued", "running", "succeeded", "failed", "cancelled"]] = None) -> Any:
    limit, error = _page_size(limit, settings)
    if error is not None:
        return error
    items = repo.list_jobs(session, owner=owner, status=status, limit=limit, offset=offset)
    return JobList(items=[to_public(j, settings) for j in items], limit=limit, offset=offset,
                   total=repo.count_jobs(session, owner=owner, status=status))


@router.get("/{job_id}", response_model=JobPublic, responses=_ERRORS)
async def get_job(job_id: JobId, owner: OwnerDep, request: Request) -> Any:
    # The hot read path, with no thread-pool hop when the key is cached: an async endpoint (a sync one is a hop
    # of its own), no SessionDep (its close is another), the public columns read on the event loop
    # (studies.job_reader), and the document serialised once here instead of FastAPI re-validating it.
    state = request.app.state
    job = await state.job_reader.read(job_id, owner)
    if job is None:
        return _not_found(job_id)
    return Response(to_public(job, state.settings).model_dump_json(), media_type="application/json")


@router.post("/{job_id}/cancel", response_model=JobPublic, responses={**_ERRORS, 409: {"model": ErrorBody}})
def cancel_job(job_id: JobId, owner: OwnerDep, session: SessionDep, settings: SettingsDep) -> Any:
    job = repo.get_job(session, job_id, owner)
    if job is None:
        return _not_found(job_id)
    if job.status in ("succeeded", "failed"):
        return JSONResponse({"detail": f"job {job_id} already {job.status}"}, status_code=409)
    job = repo.request_cancel(session, job_id, owner)
    assert job is not None
    return to_public(job, settings)


def _trial_public(t: Any) -> TrialPublic:
    attrs = finite(dict(t.user_attrs))
    schedule = attrs.get("schedule")
    if isinstance(schedule, str):
        try:
            schedule = json.loads(schedule)
        except ValueError:
            schedule = None
    nfe = attrs.get("nfe")
    pred = next((attrs[k] for k in ("predicted_score", "predicted", "prediction") if k in attrs), None)
    return TrialPublic(
        number=t.number, state=t.state.name, value=finite(t.value) if t.values else None,
        nfe=nfe if isinstance(nfe, int) else None, predicted_score=pred if isinstance(pred, (int, float)) else None,
        schedule=schedule if isinstance(schedule, dict) else None,
        user_attrs={k: v for k, v in attrs.items() if k != "schedule"},
        datetime_start=t.datetime_start, datetime_complete=t.datetime_complete)


@router.get("/{job_id}/trials", response_model=TrialPage, responses=_ERRORS)
def list_trials(job_id: JobId, owner: OwnerDep, session: SessionDep, settings: SettingsDep, storage: StorageDep,
                limit: Limit = None, offset: Offset = 0,
                state: Optional[Literal["COMPLETE", "FAIL", "RUNNING", "PRUNED", "WAITING"]] = None) -> Any:
    limit, error = _page_size(limit, settings)
    if error is not None:
        return error
    job = repo.get_job(session, job_id, owner)
    if job is None:
        return _not_found(job_id)
    try:
        study_id = storage.get_study_id_from_name(job.study_name)
    except KeyError:
        total, page = 0, []
    else:
        total, page = page_of_trials(storage, study_id, state, limit, offset)
    nxt = None
    if offset + limit < total:
        nxt = f"/v1/jobs/{job_id}/trials?limit={limit}&offset={offset + limit}" + (f"&state={state}" if state else "")
    return TrialPage(items=[_trial_public(t) for t in page], total=total, limit=limit, offset=offset, next=nxt)


def page_of_trials(storage: Any, study_id: int, state: Optional[str], limit: int, offset: int) -> tuple[int, list[Any]]:
    """(total, one page of FrozenTrials by trial number). Reads only the page's trials: Optuna's public API
    loads a whole study per call, which costs about a second per page at a few thousand trials. The ids come
    from Optuna's `trials` table; if its layout ever differs, fall back to the public API."""
    where = "study_id = :sid" + (" AND state = :state" if state else "")
    params: dict[str, Any] = {"sid": study_id, "state": state, "limit": limit, "offset": offset}
    try:
        with storage.engine.connect() as conn:
            total = int(conn.execute(text(f"SELECT count(*) FROM trials WHERE {where}"), params).scalar_one())
            ids = conn.execute(text(f"SELECT trial_id FROM trials WHERE {where} ORDER BY number "
                                    "LIMIT :limit OFFSET :offset"), params).scalars().all()
        return total, [storage.get_trial(i) for i in ids]
    except SQLAlchemyError:
        states = (TrialState[state],) if state else None
        trials = storage.get_all_trials(study_id, deepcopy=False, states=states)
        return len(trials), trials[offset:offset + limit]


def schedule_from_doc(doc: dict[str, Any]) -> Any:
    """A SolverSchedule, or a NamedSchedule when the best was a named sampler (a baseline)."""
    if "sampler" in doc:
        from s3search.named import NamedSchedule
        return NamedSchedule.from_dict(doc)
    return SolverSchedule.from_dict(doc)


def best_schedule_doc(job: Job) -> Optional[dict[str, Any]]:
    if job.result and isinstance(job.result.get("best"), dict):
        return job.result["best"]
    return job.best_schedule


@router.get("/{job_id}/schedule", responses={**_ERRORS, 501: {"model": ErrorBody}},
            response_model=dict[str, Any])
def get_schedule(job_id: JobId, owner: OwnerDep, session: SessionDep,
                 format: Annotated[Literal["json", "diffusers", "k-diffusion", "comfyui"],
                                   Query(description="json: the native solver schedule")] = "json") -> Any:
    job = repo.get_job(session, job_id, owner)
    if job is None:
        return _not_found(job_id)
    doc = best_schedule_doc(job)
    if doc is None:
        return JSONResponse({"detail": f"job {job_id} has no evaluated schedule yet (status {job.status})"},
                            status_code=404)
    schedule = schedule_from_doc(doc)
    headers = {"X-Job-Status": job.status}
    if format == "json":
        return JSONResponse(schedule.to_dict(), headers=headers)
    try:
        exports = importlib.import_module("s3search.exports")
        document = exports.export(schedule, format)
    except (ImportError, AttributeError):
        return JSONResponse({"detail": f"format={format!r}: the exporter is not installed on this server"},
                            status_code=501)
    except ValueError as e:
        return validation_error([{"field": "format", "message": str(e), "loc": ["query", "format"]}])
    document = finite(json.loads(json.dumps(document, default=_jsonable)))
    _record_export(session, job.id, format, schedule.canonical_hash(), document)
    return JSONResponse(document, headers=headers)


def _jsonable(x: Any) -> Any:
    if hasattr(x, "tolist"):
        return x.tolist()
    if hasattr(x, "to_dict"):
        return x.to_dict()
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


def _record_export(session: Any, job_id: str, fmt: str, schedule_hash: str, document: dict[str, Any]) -> None:
    session.add(Export(job_id=job_id, format=fmt, schedule_hash=schedule_hash, document=document))
    try:
        session.commit()
    except IntegrityError:
        session.rollback()    # this export was recorded before
