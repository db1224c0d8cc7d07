"""GET /v1/models, /v1/baselines, /v1/predictors, /v1/options."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from ..catalog import baseline_names, metric_names, model_names, predictor_names
from ..deps import OwnerDep, SettingsDep
from s3search.search.options import option_defaults, option_rules

from ..schemas import EXPORT_FORMATS, METHODS, BaselineList, ErrorBody, ModelList, OptionInfo, Options, PredictorList

router = APIRouter(prefix="/v1", tags=["catalog"])
_ERRORS: dict[int | str, dict[str, Any]] = {401: {"model": ErrorBody}}


@router.get("/models", response_model=ModelList, responses=_ERRORS)
def list_models(_owner: OwnerDep) -> ModelList:
    return ModelList(models=model_names())


@router.get("/predictors", response_model=PredictorList, responses=_ERRORS,
            description="The saved predictors a job may warm-start from (options.warm_start.predictor).")
def list_saved_predictors(_owner: OwnerDep, settings: SettingsDep) -> PredictorList:
    import predictors

    return PredictorList(predictors=predictors.saved_names(settings.predictors_dir) if settings.predictors_dir
                         else [])


@router.get("/baselines", response_model=BaselineList, responses=_ERRORS)
def list_baselines(_owner: OwnerDep) -> BaselineList:
    return BaselineList(baselines=baseline_names())


@router.get("/options", response_model=Options, responses=_ERRORS)
def options(_owner: OwnerDep, settings: SettingsDep) -> Options:
    limits = {k: int(getattr(settings, k)) for k in (
        "min_nfe", "max_nfe", "max_nfe_values", "max_samples", "max_test_samples", "max_budget", "max_options",
        "max_request_bytes", "max_page_size")}
    return Options(search_options=search_options(), methods=list(METHODS), metrics=metric_names(), predictors=predictor_names(),
                   export_formats=list(EXPORT_FORMATS), limits=limits)


def search_options() -> dict[str, OptionInfo]:
    """Every option a request may set, from the search contract (server-only options are left out)."""
    defaults = option_defaults()
    return {name: OptionInfo(type=rule.kind, default=defaults[name], nullable=rule.nullable, minimum=rule.ge,
                             exclusive_minimum=rule.gt, maximum=rule.le, exclusive_maximum=rule.lt,
                             choices=list(rule.choices) if rule.choices else None, description=rule.doc)
            for name, rule in option_rules().items() if not rule.server_only}
