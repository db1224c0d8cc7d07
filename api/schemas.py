"""Request and response bodies. Responses are built from plain values, never from ORM rows directly."""

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictFloat, StrictStr,
                      StringConstraints, create_model, field_validator)

from s3search.search.config import MAX_SEED, METHODS, Limits, field_default
from s3search.search.options import (FIDELITY_KEEP_MIN, JOB_ID_PATTERN, MAX_WARM_JOBS, PREDICTOR_NAME_PATTERN, Rule,
                                      name_choices, option_defaults, option_rules, space_field_kinds)

__all__ = ["METHODS", "EXPORT_FORMATS", "SearchOptionsIn", "job_create_model", "JobProgress", "JobBest", "JobLinks",
           "JobPublic", "JobList", "TrialPublic", "TrialPage", "ModelList", "BaselineList", "Options",
           "ErrorItem", "ErrorBody", "WarmStartIn", "FidelityIn", "PredictorList"]

EXPORT_FORMATS = ("json", "diffusers", "k-diffusion", "comfyui")
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:+-]{0,127}$"


def _option_type(name: str, rule: Rule) -> Any:
    """The pydantic type of one search option, with the contract's bounds (so the OpenAPI shows them)."""
    bounds = {k: getattr(rule, k) for k in ("ge", "gt", "le", "lt") if getattr(rule, k) is not None}
    if rule.kind == "integer":
        base: Any = json_int(**bounds)
    elif rule.kind == "number":
        base = Union[json_int(**bounds), Annotated[StrictFloat, Field(**bounds)]]
    elif rule.kind == "boolean":
        base = StrictBool
    elif rule.kind == "string":
        base = Literal[rule.choices] if rule.choices else StrictStr   # type: ignore[valid-type]
    elif rule.kind == "strings":
        base = Annotated[list[Literal[name_choices(name)]], Field(min_length=1, max_length=256)]  # type: ignore[misc]
    elif rule.kind == "space":
        base = SpaceOptionsIn
    elif rule.kind == "warm_start":
        base = WarmStartIn
    elif rule.kind == "fidelity":
        base = FidelityIn
    else:
        # patternProperties alone would let other keys through in JSON Schema; the server refuses them.
        base = Annotated[dict[OptionKey, ParamValue], Field(json_schema_extra={"additionalProperties": False})]
    return Optional[base] if rule.nullable else base


def _space_type(kind: str, choices: Optional[tuple[str, ...]]) -> Any:
    if kind == "integer":
        return JsonInt
    if kind == "number":
        return Union[JsonInt, StrictFloat]
    return Annotated[list[Literal[choices]], Field(max_length=64)]  # type: ignore[valid-type]


OptionKey = Annotated[StrictStr, StringConstraints(pattern=NAME_PATTERN)]


def _no_text_or_bool(v: Any) -> Any:
    # JSON Schema's integer admits 6.0, so an integral float is one; text ("6") and booleans are not.
    if isinstance(v, (str, bool, bytes)):
        raise ValueError("Input should be an integer")
    return v


def json_int(**bounds: Any) -> Any:
    """An integer field with bounds that takes 6.0 as 6 (pydantic puts the bounds into the schema only when
    they come before the validator)."""
    return Annotated[int, Field(strict=False, **bounds), BeforeValidator(_no_text_or_bool)]


JsonInt = json_int()
# Keyword arguments of a predictor: numbers, booleans, null or a short name (no free text: it is stored).
ParamValue = Union[JsonInt, StrictFloat, StrictBool, None, Annotated[StrictStr, StringConstraints(
    pattern=NAME_PATTERN)]]

# Generated from s3search.space.SpaceOptions: types here, values checked by SpaceOptions itself.
SpaceOptionsIn = create_model(
    "SpaceOptions", __config__=ConfigDict(extra="forbid", allow_inf_nan=False),
    **{name: (Optional[_space_type(kind, choices)], Field(None, description=f"default {default!r}"))
       for name, (kind, default, choices) in space_field_kinds().items()})

class WarmStartIn(BaseModel):
    """What a job may warm-start from: its owner's earlier jobs and predictors saved on the server, by name."""

    model_config = ConfigDict(extra="forbid")

    jobs: Annotated[list[Annotated[StrictStr, StringConstraints(pattern=JOB_ID_PATTERN)]],
                    Field(max_length=MAX_WARM_JOBS)] = Field(
        default_factory=list, description="ids of earlier jobs of the same owner: their evaluated schedules "
                                          "(any NFE, any model of the same process) pre-train the predictor")
    predictor: Optional[Annotated[StrictStr, StringConstraints(pattern=PREDICTOR_NAME_PATTERN)]] = Field(
        None, description="a predictor saved on the server (GET /v1/predictors): its ranking seeds the search")


_Share = Union[json_int(ge=1, le=1), Annotated[StrictFloat, Field(ge=FIDELITY_KEEP_MIN, le=1)]]


class FidelityIn(BaseModel):
    """Multi-fidelity evaluation (s3search.search.options.Fidelity): low-fidelity scores on a prefix of the search
    split's samples, full evaluations for the best share of each batch."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    low_samples: json_int(ge=2, le=10_000_000) = Field(  # type: ignore[valid-type]
        ..., description="samples per low-fidelity evaluation (the first of the search split's; below n_samples)")
    keep: _Share = Field(1 / 3, description="share of each loop batch promoted to a full evaluation")
    seed_keep: _Share = Field(1 / 9, description="share of a seeding stage promoted to a full evaluation")


def _default(name: str) -> Any:
    return option_defaults()[name]


# Generated from s3search.search.options.SearchOptions: every option a request may set, with its bounds.
SearchOptionsIn = create_model(
    "SearchOptions", __config__=ConfigDict(extra="forbid", allow_inf_nan=False),
    **{name: (_option_type(name, rule), Field(None if rule.nullable else _default(name), description=rule.doc))
       for name, rule in option_rules().items() if not rule.server_only})


def job_create_model(limits: Limits) -> type[BaseModel]:
    """The job body with the server's limits as schema bounds (one model per app: limits come from settings)."""
    nfe_int = json_int(ge=limits.min_nfe, le=limits.max_nfe)

    class NfeRange(BaseModel):
        model_config = ConfigDict(extra="forbid")
        min: nfe_int = Field(..., description="smallest NFE, inclusive")      # type: ignore[valid-type]
        max: nfe_int = Field(..., description="largest NFE, inclusive")      # type: ignore[valid-type]

    class JobCreate(BaseModel):
        """A search job (s3search.search.config.SearchConfig). Sizes are bounded by the server's limits."""

        model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

        model: StrictStr = Field(..., pattern=NAME_PATTERN, description="a name from GET /v1/models")
        nfe: Union[nfe_int, Annotated[list[nfe_int], Field(min_length=1, max_length=limits.max_nfe_values)],  # type: ignore[valid-type]
                   NfeRange] = Field(..., description="one NFE, a list of NFE, or {min, max}")
        metric: Optional[Annotated[StrictStr, Field(pattern=NAME_PATTERN)]] = Field(
            None, description="a metric name; default: the model's own default metric (as the CLI)")
        # Defaults are the contract's, lowered to the server's limit where it is smaller: a default must be a
        # value the server accepts.
        n_samples: json_int(ge=2, le=limits.max_samples) = Field(  # type: ignore[valid-type]
            min(field_default("n_samples"), limits.max_samples), description="samples per evaluation")
        n_test_samples: json_int(ge=2, le=limits.max_test_samples) = Field(  # type: ignore[valid-type]
            min(field_default("n_test_samples"), limits.max_test_samples))
        budget: json_int(ge=1, le=limits.max_budget) = Field(  # type: ignore[valid-type]
            min(field_default("budget"), limits.max_budget), description="true evaluations in total")
        method: Literal[METHODS] = field_default("method")  # type: ignore[valid-type]
        predictor: StrictStr = Field(field_default("predictor"), pattern=NAME_PATTERN)
        seed: json_int(ge=0, le=MAX_SEED) = field_default("seed")  # type: ignore[valid-type]
        options: SearchOptionsIn = Field(default_factory=SearchOptionsIn)  # type: ignore[valid-type]
        prompt_set: Optional[Annotated[StrictStr, Field(pattern=NAME_PATTERN)]] = Field(
            None, description="text-to-image models: one of the model's prompt sets (GET /v1/models); "
                              "default: its default set")
        guidance_scale: Optional[Union[json_int(ge=0, le=limits.max_guidance_scale),  # type: ignore[valid-type]
                                       Annotated[StrictFloat, Field(ge=0, le=limits.max_guidance_scale)]]] = Field(
            None, description="text-to-image models: classifier-free guidance scale; default: the model's")

        @field_validator("options", mode="before")
        @classmethod
        def _utf8_only(cls, options: Any) -> Any:
            # JSON text may carry lone surrogates (\udc00); they cannot be stored or sent back as UTF-8.
            _walk_utf8(options, "options")
            return options

        def nfe_values(self) -> list[int]:
            if isinstance(self.nfe, int):
                return [self.nfe]
            if isinstance(self.nfe, NfeRange):
                return list(range(self.nfe.min, self.nfe.max + 1))
            return sorted(set(self.nfe))

        def nfe_ends(self) -> tuple[int, int]:
            values = [self.nfe.min, self.nfe.max] if isinstance(self.nfe, NfeRange) else self.nfe_values()
            return values[0], values[-1]

        def given_options(self) -> dict[str, Any]:
            return self.options.model_dump(exclude_unset=True)

    return JobCreate


def _walk_utf8(x: Any, path: str) -> None:
    if isinstance(x, str):
        try:
            x.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{path} is not valid Unicode text") from None
    elif isinstance(x, list):
        for i, v in enumerate(x):
            _walk_utf8(v, f"{path}[{i}]")
    elif isinstance(x, dict):
        for k, v in x.items():
            _walk_utf8(k, path)
            _walk_utf8(v, f"{path}.{k}")


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
    created_at: AwareDatetime
    started_at: Optional[AwareDatetime] = None
    finished_at: Optional[AwareDatetime] = None
    updated_at: AwareDatetime
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
    datetime_start: Optional[AwareDatetime] = None
    datetime_complete: Optional[AwareDatetime] = None


class TrialPage(BaseModel):
    items: list[TrialPublic]
    total: int
    limit: int
    offset: int
    next: Optional[str] = None


class ModelList(BaseModel):
    models: list[str]


class PredictorList(BaseModel):
    predictors: list[str]


class BaselineList(BaseModel):
    baselines: list[str]


class OptionInfo(BaseModel):
    type: str
    default: Any = None
    nullable: bool = False
    minimum: Optional[float] = None
    exclusive_minimum: Optional[float] = None
    maximum: Optional[float] = None
    exclusive_maximum: Optional[float] = None
    choices: Optional[list[str]] = None
    description: str


class Options(BaseModel):
    search_options: dict[str, OptionInfo]
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
