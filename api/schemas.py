"""Request and response bodies. Responses are built from plain values, never from ORM rows directly."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_validator, StrictInt, StrictStr, StringConstraints, JsonValue

__all__ = ["METHODS", "EXPORT_FORMATS", "NfeRange", "JobCreate", "JobProgress", "JobBest", "JobLinks",
           "JobPublic", "JobList", "TrialPublic", "TrialPage", "ModelList", "BaselineList", "Options",
           "ErrorItem", "ErrorBody"]

METHODS = ("s3", "random", "tpe", "cmaes")
EXPORT_FORMATS = ("json", "diffusers", "k-diffusion", "comfyui")
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:+-]{0,127}$"


class NfeRange(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min: StrictInt = Field(..., description="smallest NFE, inclusive")
    max: StrictInt = Field(..., description="largest NFE, inclusive")


OptionKey = Annotated[StrictStr, StringConstraints(pattern=NAME_PATTERN)]
# Search options (s3search.search.context.OPTION_DEFAULTS): any JSON; the key set and values are checked by
# the search's own validator at submission. The body size limit bounds their size.
OptionValue = JsonValue


class JobCreate(BaseModel):
    """A search job. Sizes are checked against the server's limits (GET /v1/options)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: StrictStr = Field(..., pattern=NAME_PATTERN, description="a name from GET /v1/models")
    nfe: Union[StrictInt, Annotated[list[StrictInt], Field(min_length=1, max_length=256)], NfeRange] = Field(
        ..., description="one NFE, a list of NFE, or {min, max}")
    metric: StrictStr = Field("fd", pattern=NAME_PATTERN)
    n_samples: StrictInt = Field(1000, ge=1)
    n_test_samples: StrictInt = Field(5000, ge=1)
    budget: StrictInt = Field(200, ge=1, description="true evaluations in total")
    method: Literal["s3", "random", "tpe", "cmaes"] = "s3"
    predictor: StrictStr = Field("lightgbm-rank", pattern=NAME_PATTERN)
    seed: StrictInt = Field(0, ge=0, le=2**31 - 1)
    options: dict[OptionKey, OptionValue] = Field(default_factory=dict)

    @field_validator("options")
    @classmethod
    def _utf8_only(cls, options: dict[str, Any]) -> dict[str, Any]:
        # JSON text may carry lone surrogates (\udc00); they cannot be stored or sent back as UTF-8.
        def walk(x: Any, path: str) -> None:
            if isinstance(x, str):
                try:
                    x.encode("utf-8")
                except UnicodeEncodeError:
                    raise ValueError(f"{path} is not valid Unicode text") from None
            elif isinstance(x, list):
                for i, v in enumerate(x):
                    walk(v, f"{path}[{i}]")
            elif isinstance(x, dict):
                for k, v in x.items():
                    walk(k, path)
                    walk(v, f"{path}.{k}")

        walk(options, "options")
        return options

    def nfe_values(self) -> list[int]:
        if isinstance(self.nfe, int):
            return [self.nfe]
        if isinstance(self.nfe, NfeRange):
            return list(range(self.nfe.min, self.nfe.max + 1))
        return sorted(set(self.nfe))


class JobProgress(BaseModel):
    evaluations: int
    budget: int
    fraction: float
    message: str
    predictor_tau: Optional[float] = None


class JobBest(BaseModel):
    value: Optional[float]
    schedule: dict[str, Any]


class JobLinks(BaseModel):
    self: str
    trials: str
    schedule: str
    cancel: str
    dashboard: Optional[str] = None


class JobPublic(BaseModel):
    id: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    spec: dict[str, Any]
    progress: JobProgress
    best: Optional[JobBest] = None
    result: Optional[dict[str, Any]] = None
    error: Optional[str] = None
    cancel_requested: bool
    attempts: int
    study_name: str
    created_at: datetime
    started_at: Optional[datetime] = None
    finished_at: Optional[datetime] = None
    updated_at: datetime
    links: JobLinks


class JobList(BaseModel):
    items: list[JobPublic]
    total: int
    limit: int
    offset: int


class TrialPublic(BaseModel):
    number: int
    state: str
    value: Optional[float] = None
    nfe: Optional[int] = None
    predicted_score: Optional[float] = None
    schedule: Optional[dict[str, Any]] = None
    user_attrs: dict[str, Any] = Field(default_factory=dict)
    datetime_start: Optional[datetime] = None
    datetime_complete: Optional[datetime] = None


class TrialPage(BaseModel):
    items: list[TrialPublic]
    total: int
    limit: int
    offset: int
    next: Optional[str] = None


class ModelList(BaseModel):
    models: list[str]


class BaselineList(BaseModel):
    baselines: list[str]


class Options(BaseModel):
    methods: list[str]
    metrics: Optional[list[str]]
    predictors: Optional[list[str]]
    export_formats: list[str]
    limits: dict[str, int]


class ErrorItem(BaseModel):
    field: str
    message: str
    loc: list[Union[str, int]] = Field(default_factory=list)


class ErrorBody(BaseModel):
    detail: str
    errors: list[ErrorItem] = Field(default_factory=list)
