"""Jobs: submit (idempotent), list, read, cancel, trials (paged), best schedule (exported).

The router is built per app (`build_router(settings)`): the request schema's bounds are the server's limits,
so what the OpenAPI document allows is what the server accepts. (No `from __future__ import annotations`
here: FastAPI reads the annotations of the routes defined inside `build_router`, whose types are local.)
"""

import hashlib
import importlib
import json
import math
import os
from datetime import datetime, timezone
from typing import Annotated, Any, Literal, Optional

from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.responses import JSONResponse

from s3search.schedule import SolverSchedule
from s3search.search.config import ConfigError, Limits, SearchConfig, check_limits
from studies import jobs as repo
from studies.models import Job
from studies.results import job_results, open_job_study, page_of_trials, record_export

from ..catalog import model_names
from ..deps import OwnerDep, SessionDep, SettingsDep, StorageDep
from ..errors import validation_error
from ..schemas import (ErrorBody, JobBest, JobLinks, JobList, JobProgress, JobPublic, TrialPage, TrialPublic,
                       job_create_model)
from ..settings import Settings

__all__ = ["build_router", "to_public", "limits_of", "page_of_trials", "finite"]

JobId = Annotated[str, Path(pattern=r"^[0-9a-f]{32}$", description="job id (32 hex digits)")]
IdempotencyKey = Annotated[Optional[str], Header(alias="Idempotency-Key", min_length=1, max_length=200,
                                                 pattern=r"^[\x21-\x7e]+$")]
Offset = Annotated[int, Query(ge=0, le=1_000_000_000)]
_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody}, 404: {"model": ErrorBody}, 422: {"model": ErrorBody}}
BetasName = Literal["model", "linear", "scaled_linear"]
_BETAS_DOC = ("the model's betas for the diffusers timesteps: model (the job's model's own scheduler config, read "
              "from its folder), linear (DDPM), scaled_linear (Stable Diffusion). Default: model where the job's "
              "model is a diffusers folder with a discrete-beta scheduler config, else the schedule's own process "
              "when it is discrete, else the DDPM betas (the export's notes say which)")


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


def limits_of(settings: Settings) -> Limits:
    return Limits(min_nfe=settings.min_nfe, max_nfe=settings.max_nfe, max_nfe_values=settings.max_nfe_values,
                  max_samples=settings.max_samples, max_test_samples=settings.max_test_samples,
                  max_budget=settings.max_budget, max_guidance_scale=settings.max_guidance_scale)


def _problems(e: ConfigError) -> list[dict[str, Any]]:
    return [_err(p.field, p.message) for p in e.problems]


def config_of(body: Any, settings: Settings) -> tuple[Optional[SearchConfig], list[dict[str, Any]]]:
    """The body as the search's typed config, checked against the contract and the server's limits. The
    model's existence is checked by the caller (404); the rest (metric, space, predictor) by `preflight`."""
    lo, hi = body.nfe_ends()
    if lo > hi:
        return None, [_err("nfe.max", f"max={hi} is below min={lo}")]
    # Bounds were checked on the ends already; a range's length is checked before it is expanded.
    if hi - lo + 1 > settings.max_nfe_values:
        return None, [_err("nfe", f"{hi - lo + 1} NFE values; at most {settings.max_nfe_values} per job")]
    doc = {"model": body.model, "nfe": body.nfe_values(), "metric": body.metric, "n_samples": body.n_samples,
           "n_test_samples": body.n_test_samples, "budget": body.budget, "method": body.method,
           "predictor": body.predictor, "seed": body.seed, "options": body.given_options(),
           "prompt_set": body.prompt_set, "guidance_scale": body.guidance_scale}
    try:
        config = SearchConfig.from_dict(doc, allow_server_only=False)
        check_limits(config, limits_of(settings))
        _check_call_budget(config, settings)
    except ConfigError as e:
        return None, _problems(e)
    return config, []


def _check_call_budget(config: SearchConfig, settings: Settings) -> None:
    """A call budget may buy no more than the server's evaluation budget limit of full evaluations."""
    calls = config.options.budget_calls
    cap = settings.max_budget * config.n_samples * max(config.nfe)
    if calls is not None and calls > cap:
        raise ConfigError.one("options.budget_calls", f"options.budget_calls={calls} is above the limit {cap} "
                                                      f"(max_budget x n_samples x NFE)")


def preflight_errors(config: SearchConfig) -> tuple[Optional[SearchConfig], Optional[JSONResponse]]:
    """What a runner would fail on, found now: the model's metric, prompts, search space and predictor. An
    unknown prompt set is a 404 (like an unknown model), the rest 422s naming their field."""
    from s3search.search.run import UnknownPromptSet, preflight

    try:
        return preflight(config), None
    except UnknownPromptSet as e:
        return None, JSONResponse({"detail": str(e), "errors": _problems(e)}, status_code=404)
    except ConfigError as e:
        return None, validation_error(_problems(e))


def warm_start_refusal(session: Any, owner: str, config: SearchConfig, settings: Settings
                       ) -> Optional[JSONResponse]:
    """A 404 naming each warm-start job that is not the caller's (missing or another owner's: the answer is
    the same, so no one learns of others' jobs) and an unknown saved predictor; None when all are there."""
    from studies.warm import predictor_problem, unknown_jobs

    spec = config.options.warm_start
    if spec is None:
        return None
    errors = [{**_err(f"options.warm_start.jobs[{i}]", f"options.warm_start.jobs[{i}]: job {spec.jobs[i]} not "
                                                       "found"), "loc": ["body", "options", "warm_start", "jobs", i]}
              for i in unknown_jobs(session, owner, spec.jobs)]
    problem = predictor_problem(settings.predictors_dir, spec.predictor) if spec.predictor is not None else None
    if problem:
        errors.append(_err("options.warm_start.predictor", f"options.warm_start.predictor: {problem}"))
    if not errors:
        return None
    return JSONResponse({"detail": "; ".join(e["message"] for e in errors), "errors": errors}, status_code=404)


def spec_hash(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _utc(t: Optional[datetime]) -> Optional[datetime]:
    """The job table keeps naive UTC (studies.db.utcnow); responses carry the offset, as date-time requires."""
    return None if t is None else (t if t.tzinfo else t.replace(tzinfo=timezone.utc))


def _local(t: Optional[datetime]) -> Optional[datetime]:
    """Optuna stamps trials with naive local time: attach this machine's offset."""
    return None if t is None else (t if t.tzinfo else t.astimezone())


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
    fraction = getattr(job, "fraction", None)
    if fraction is None:        # a job stored before the column, or not started
        fraction = 1.0 if job.status == "succeeded" else min(0.999, job.evaluations / max(job.budget, 1))
    return JobPublic(
        id=job.id, status=job.status, spec=job.spec, error=job.error, result=finite(job.result), best=best,
        progress=JobProgress(evaluations=job.evaluations, budget=job.budget, fraction=float(fraction),
                             message=job.message or "", predictor_tau=finite(job.predictor_tau)),
        cancel_requested=job.cancel_requested, attempts=job.attempts, study_name=job.study_name,
        created_at=_utc(job.created_at), started_at=_utc(job.started_at), finished_at=_utc(job.finished_at),
        updated_at=_utc(job.updated_at),
        links=JobLinks(self=base, trials=f"{base}/trials", schedule=f"{base}/schedule", cancel=f"{base}/cancel",
                       dashboard=dashboard))


def _not_found(job_id: str) -> JSONResponse:
    return JSONResponse({"detail": f"job {job_id} not found"}, status_code=404)


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
        datetime_start=_local(t.datetime_start), datetime_complete=_local(t.datetime_complete))


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


def _model_entry(name: str) -> Any:
    """The registry entry of a model folder (a built-in pipeline or the server's registry file), read without
    loading any weights; None for models built in code (mixtures, digits)."""
    from s3search.models import digits_t2i, registry
    from s3search.models.local import parse_registry

    entries = {e.name: e for e in digits_t2i.entries()}
    path = os.environ.get(registry.ENV_REGISTRY, "").strip()
    if path:
        entries.update({e.name: e for e in parse_registry(path)})   # the file overrides built-ins, as in registry
    return entries.get(name)


def _model_scheduler_config(name: str) -> Optional[dict[str, Any]]:
    """The discrete-beta scheduler config of a diffusers model folder, or None (no folder, a flow-matching
    scheduler, no readable config): what `betas=model` names."""
    try:
        entry = _model_entry(name)
    except (OSError, ValueError):
        return None
    if entry is None or entry.kind not in ("diffusers-pipeline", "diffusers-unet"):
        return None
    root = entry.resolve(entry.path)   # a registry file's relative paths are relative to the file
    for candidate in (root / "scheduler" / "scheduler_config.json", root / "scheduler_config.json"):
        try:
            config = json.loads(candidate.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(config, dict):
            return None
        flow = ("shift" in config or config.get("prediction_type") == "flow_prediction"
                or str(config.get("_class_name", "")).startswith("FlowMatch"))
        return None if flow else config
    return None


def _model_data_mean(name: str) -> Any:
    """The model's data mean (for a mean-x0 winner's export), or None where the model cannot say."""
    from s3search.models import registry

    try:
        return getattr(registry.get(name).denoiser, "data_mean", None)
    except (KeyError, OSError, ValueError, ImportError, RuntimeError):
        return None


def _export_betas(betas: Optional[str], format: str, schedule: Any, model: str) -> tuple[Any, Optional[str]]:
    """(the betas to export with, an error message for the `betas` query parameter or None)."""
    if betas in ("linear", "scaled_linear"):
        return betas, None
    if betas is None and (format != "diffusers" or getattr(schedule, "process", "") == "flow"):
        return None, None
    config = _model_scheduler_config(model)
    if config is None and betas == "model":
        return None, (f"betas=model: model={model!r} has no discrete-beta scheduler config (a diffusers folder's "
                      "scheduler_config.json); name the betas (linear, scaled_linear) instead")
    return config, None


def _jsonable(x: Any) -> Any:
    if hasattr(x, "tolist"):
        return x.tolist()
    if hasattr(x, "to_dict"):
        return x.to_dict()
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


# ----- routes ------------------------------------------------------------------------------------------------
def build_router(settings: Settings) -> APIRouter:
    """The /v1/jobs routes, with this server's limits in the request schema."""
    router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
    JobCreate = job_create_model(limits_of(settings))
    Limit = Annotated[Optional[int], Query(ge=1, le=settings.max_page_size,
                                           description=f"page size; default {min(50, settings.max_page_size)}")]

    @router.post("", status_code=202, response_model=JobPublic,
                 responses={**_ERRORS, 409: {"model": ErrorBody}, 413: {"model": ErrorBody},
                            415: {"model": ErrorBody}, 429: {"model": ErrorBody}, 431: {"model": ErrorBody}})
    def submit_job(body: JobCreate, owner: OwnerDep, session: SessionDep, storage: StorageDep,  # type: ignore[valid-type]
                   settings: SettingsDep, response: Response, idempotency_key: IdempotencyKey = None) -> Any:
        known = model_names()
        if body.model not in known:
            return JSONResponse({"detail": f"model={body.model!r} is unknown; known models: {', '.join(known)}",
                                 "errors": [_err("model", "unknown model")], "known": known}, status_code=404)
        config, errors = config_of(body, settings)
        if errors:
            return validation_error(errors)
        config, refusal = preflight_errors(config)
        if refusal is not None:
            return refusal
        refusal = warm_start_refusal(session, owner, config, settings)
        if refusal is not None:
            return refusal
        spec = config.to_dict(include_server_only=False)
        try:
            job, created = repo.create_job(session, owner=owner, spec=spec, budget=config.budget,
                                           idempotency_key=idempotency_key, request_hash=spec_hash(spec),
                                           max_active=settings.max_active_jobs_per_owner)
        except repo.QuotaExceeded:
            return JSONResponse({"detail": f"at most {settings.max_active_jobs_per_owner} active (queued or "
                                           "running) jobs per owner; wait for one to finish or cancel one"},
                                status_code=429)
        except repo.IdempotencyConflict as e:
            return JSONResponse({"detail": str(e), "errors": [{"field": "Idempotency-Key", "message": str(e),
                                                               "loc": ["header", "Idempotency-Key"]}]},
                                status_code=409)
        if created:
            open_job_study(session, storage, job)
        response.headers["Location"] = f"/v1/jobs/{job.id}"
        if not created:
            response.headers["Idempotent-Replayed"] = "true"
        return to_public(job, settings)

    @router.get("", response_model=JobList, responses=_ERRORS)
    def list_jobs(owner: OwnerDep, session: SessionDep, settings: SettingsDep, limit: Limit = None,
                  offset: Offset = 0,
                  status: Optional[Literal["queued", "running", "succeeded", "failed", "cancelled"]] = None) -> Any:
        size = limit or min(50, settings.max_page_size)
        items = repo.list_jobs(session, owner=owner, status=status, limit=size, offset=offset)
        return JobList(items=[to_public(j, settings) for j in items], limit=size, offset=offset,
                       total=repo.count_jobs(session, owner=owner, status=status))

    @router.get("/{job_id}", response_model=JobPublic, responses=_ERRORS)
    async def get_job(job_id: JobId, owner: OwnerDep, request: Request) -> Any:
        # The hot read path, with no thread-pool hop when the key is cached: an async endpoint (a sync one is a
        # hop of its own), no SessionDep (its close is another), the public columns read on the event loop
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

    @router.get("/{job_id}/trials", response_model=TrialPage, responses=_ERRORS)
    def list_trials(job_id: JobId, owner: OwnerDep, session: SessionDep, settings: SettingsDep,
                    storage: StorageDep, limit: Limit = None, offset: Offset = 0,
                    state: Optional[Literal["COMPLETE", "FAIL", "RUNNING", "PRUNED", "WAITING"]] = None) -> Any:
        size = limit or min(50, settings.max_page_size)
        job = repo.get_job(session, job_id, owner)
        if job is None:
            return _not_found(job_id)
        try:
            study_id = storage.get_study_id_from_name(job.study_name)
        except KeyError:
            total, page = 0, []
        else:
            total, page = page_of_trials(storage, study_id, state, size, offset)
        nxt = None
        if offset + size < total:
            nxt = (f"/v1/jobs/{job_id}/trials?limit={size}&offset={offset + size}"
                   + (f"&state={state}" if state else ""))
        return TrialPage(items=[_trial_public(t) for t in page], total=total, limit=size, offset=offset, next=nxt)

    @router.get("/{job_id}/schedule", responses={**_ERRORS, 501: {"model": ErrorBody}},
                response_model=dict[str, Any],
                description="The best schedule so far (`X-Job-Status` says whether the job is done). format=json "
                            "is the native document: a solver schedule (s3search/schemas/solver-schedule.schema"
                            ".json) or, when the best is a named sampler, a named schedule (named-schedule.schema"
                            ".json); both run with s3search as they are.")
    def get_schedule(job_id: JobId, owner: OwnerDep, session: SessionDep,
                     format: Annotated[Literal["json", "diffusers", "k-diffusion", "comfyui"],
                                       Query(description="json: the native schedule document")] = "json",
                     betas: Annotated[Optional[BetasName], Query(description=_BETAS_DOC)] = None) -> Any:
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
        model = str((job.spec or {}).get("model", ""))
        betas_value, problem = _export_betas(betas, format, schedule, model)
        if problem is not None:
            return validation_error([{"field": "betas", "message": problem, "loc": ["query", "betas"]}])
        # Only a mean-x0 schedule needs the mean, and only then is the model asked for it.
        mean = _model_data_mean(model) if getattr(schedule, "first_step", None) == "mean-x0" else None
        try:
            exports = importlib.import_module("s3search.exports")
            document = exports.export(schedule, format, betas=betas_value, data_mean=mean)
        except (ImportError, AttributeError):
            return JSONResponse({"detail": f"format={format!r}: the exporter is not installed on this server"},
                                status_code=501)
        except ValueError as e:
            name = "betas" if str(e).startswith("betas") else "format"
            return validation_error([{"field": name, "message": str(e), "loc": ["query", name]}])
        document = finite(json.loads(json.dumps(document, default=_jsonable)))
        record_export(session, job.id, format, schedule.canonical_hash(), document)
        return JSONResponse(document, headers=headers)

    @router.get("/{job_id}/results", responses={**_ERRORS, 409: {"model": ErrorBody}},
                response_model=dict[str, Any],
                description="The finished job as a results document (docs/exports.md, \"Results format\"): per "
                            "NFE the winner's test value, schedule and search history, and every baseline's test "
                            "value and schedule. `s3search plots --results FILE` draws it.")
    def get_results(job_id: JobId, owner: OwnerDep, session: SessionDep, storage: StorageDep) -> Any:  # type: ignore[valid-type]
        job = repo.get_job(session, job_id, owner)
        if job is None:
            return _not_found(job_id)
        document = job_results(storage, job)
        if document is None:
            return JSONResponse({"detail": f"job {job_id} has no test-split results yet (status {job.status})"},
                                status_code=409)
        return JSONResponse(finite(document), headers={"X-Job-Status": job.status})

    return router
