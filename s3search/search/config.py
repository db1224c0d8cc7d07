"""The search contract: what a job asks for, what progress looks like, what comes back."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

from ..evaluation.base import EvalRequest
from ..schedule import SolverSchedule
from ..space import restrict_to_target, target_first_steps
from .options import ConfigError, FieldProblem, SearchOptions

__all__ = ["SearchConfig", "field_default", "default_target", "SearchOptions", "ConfigError", "Limits", "check_limits", "SearchFailed", "METHODS",
           "Progress", "SearchResult", "ProgressFn", "StopFn"]


METHODS = ("s3", "random", "tpe", "cmaes")
MAX_SEED = 2**31 - 1
MAX_GUIDANCE = 100.0


@dataclass(frozen=True)
class SearchConfig:
    """What a search job asks for. Checked when built: a bad field raises ConfigError naming it.

    `options` may be given as a mapping (JSON data); it is turned into `SearchOptions` here. `metric=None`
    means the model's own default metric (`with_model_defaults` resolves it; `run_search` does so itself)."""

    model: str                          # model registry name, e.g. "digits", "gmm-64d"
    nfe: tuple[int, ...]                # one NFE or several
    metric: Optional[str] = None        # metric name, lower is better (None: the model's default)
    n_samples: int = 1000               # samples per search evaluation
    n_test_samples: int = 5000          # samples for the final test evaluation (fresh seeds)
    budget: int = 200                   # true evaluations in total
    method: str = "s3"                  # "s3" | "random" | "tpe" | "cmaes"
    predictor: str = "lightgbm-rank"    # see predictors.names()
    seed: int = 0
    options: SearchOptions = field(default_factory=SearchOptions)
    # Text-to-image models only: which of the model's prompt sets, and the guidance scale (None: the model's).
    prompt_set: Optional[str] = None
    guidance_scale: Optional[float] = None

    def __post_init__(self) -> None:
        if isinstance(self.nfe, int) and not isinstance(self.nfe, bool):
            object.__setattr__(self, "nfe", (self.nfe,))
        elif isinstance(self.nfe, list):
            object.__setattr__(self, "nfe", tuple(self.nfe))
        problems = _config_problems(self)
        try:
            object.__setattr__(self, "options", SearchOptions.from_dict(self.options))
        except ConfigError as e:
            problems += e.problems
        if problems:
            raise ConfigError(problems)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], *, allow_server_only: bool = True) -> "SearchConfig":
        """From a job spec (JSON data): the same document `to_dict` writes."""
        if not isinstance(doc, Mapping):
            raise ConfigError.one("body", "a search config must be an object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in doc if k not in known]
        if unknown:
            raise ConfigError.one(unknown[0], f"{unknown[0]} is not a field of a search job "
                                              f"(known: {', '.join(sorted(known))})")
        missing = [k for k in ("model", "nfe") if k not in doc]
        if missing:
            raise ConfigError.one(missing[0], f"{missing[0]} is required")
        values = dict(doc)
        try:
            values["options"] = SearchOptions.from_dict(values.get("options") or {},
                                                        allow_server_only=allow_server_only)
        except ConfigError as e:
            try:
                cls(**{**values, "options": SearchOptions()})
            except ConfigError as top:
                raise ConfigError(top.problems + e.problems) from None
            raise
        return cls(**values)

    def to_dict(self, *, include_server_only: bool = True) -> dict[str, Any]:
        doc = {"model": self.model, "nfe": list(self.nfe), "metric": self.metric, "n_samples": self.n_samples,
               "n_test_samples": self.n_test_samples, "budget": self.budget, "method": self.method,
               "predictor": self.predictor, "seed": self.seed,
               "options": self.options.to_dict(include_server_only=include_server_only)}
        # Written only when set, so the specs of unconditional jobs stay as they were.
        doc.update({k: getattr(self, k) for k in ("prompt_set", "guidance_scale") if getattr(self, k) is not None})
        return doc

    def eval_request(self, n_samples: int, split: str) -> EvalRequest:
        """The evaluation request of this job on one split: every path builds it here."""
        return EvalRequest(self.model, str(self.metric), n_samples, self.seed, split,  # type: ignore[arg-type]
                           prompt_set=self.prompt_set, guidance_scale=self.guidance_scale)

    def with_model_defaults(self, default_metric: str, model: Any = None) -> "SearchConfig":
        """The same config with the model's defaults filled in (one rule for CLI, API and runner): an unset
        metric set to `default_metric`, an unset target to the model's (`default_target`), and the space and the
        baselines narrowed to what the target runs. `model` is the ModelSpec, looked up by name when not given
        and when the target needs it. ConfigError names a choice the job set that its target does not run."""
        config = self if self.metric else dataclasses.replace(self, metric=default_metric)
        target = self.options.target
        if target is None:
            model = model if model is not None else _model(self.model)
            target = default_target(model)
        options = config.options.replace(target=target)
        if target_first_steps(target) is not None:
            model = model if model is not None else _model(self.model)
            options = _restricted(options, target, config.nfe, model.process.name)
        return config if options == config.options else dataclasses.replace(config, options=options)


def default_target(model: Any) -> str:
    """The target a job on `model` gets when it names none: a diffusers pipeline folder runs in diffusers."""
    kind = dict(getattr(model, "provenance", None) or {}).get("kind")
    return "diffusers" if kind == "diffusers-pipeline" else "any"


def _model(name: str) -> Any:
    from ..models import registry  # here: the contract itself needs no model

    return registry.get(name)


def _restricted(options: SearchOptions, target: str, nfe: tuple[int, ...], process: str) -> SearchOptions:
    """`options` with the space and the seeding baselines narrowed to what `target` runs at the searched NFE."""
    from .baselines_seed import runnable_names

    try:
        space = restrict_to_target(dict(options.space), target)
    except ValueError as e:
        raise ConfigError.one("options.space", str(e)) from None
    runnable = runnable_names(target, nfe, process, names=options.baselines)
    if options.baselines is not None and runnable != options.baselines:
        bad = next(b for b in options.baselines if b not in runnable)
        raise ConfigError.one("options.baselines", f"options.baselines: {bad!r} is not run by target={target!r} at "
                                                   "the searched NFE (docs/search.md, Targets)")
    from .. import baselines as baseline_registry

    # Written out only when it leaves some out, so a job whose target drops nothing keeps `null` (all).
    every = tuple(baseline_registry.names())
    keep = None if runnable == every else runnable
    return options.replace(space=space, baselines=keep if options.baselines is None else options.baselines)


def field_default(name: str) -> Any:
    """A SearchConfig field's default, for front ends (the CLI's options) that show it."""
    return next(f.default for f in dataclasses.fields(SearchConfig) if f.name == name)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _config_problems(c: SearchConfig) -> list[FieldProblem]:
    out: list[FieldProblem] = []

    def bad(name: str, message: str) -> None:
        out.append(FieldProblem(name, message))

    if not isinstance(c.model, str) or not c.model:
        bad("model", f"model={c.model!r} must be a model name")
    if (not isinstance(c.nfe, tuple) or not c.nfe
            or any(not _is_int(n) or n < 1 for n in c.nfe)):
        bad("nfe", f"nfe={c.nfe!r} must be one or more positive integers")
    if c.metric is not None and (not isinstance(c.metric, str) or not c.metric):
        bad("metric", f"metric={c.metric!r} must be a metric name or null (the model's default)")
    for name in ("n_samples", "n_test_samples"):
        v = getattr(c, name)
        if not _is_int(v) or v < 2:
            bad(name, f"{name}={v!r} must be an integer >= 2")
    if not _is_int(c.budget) or c.budget < 1:
        bad("budget", f"budget={c.budget!r} must be a positive integer")
    elif isinstance(c.nfe, tuple) and c.budget < len(set(c.nfe)):
        bad("budget", f"budget={c.budget} is below one evaluation per NFE ({len(set(c.nfe))})")
    if c.method not in METHODS:
        bad("method", f"method={c.method!r} must be one of {', '.join(METHODS)}")
    if c.method == "s3":
        import predictors
        if c.predictor not in predictors.names():
            bad("predictor", f"predictor={c.predictor!r} must be one of {', '.join(predictors.names())}")
    elif not isinstance(c.predictor, str):
        bad("predictor", f"predictor={c.predictor!r} must be a predictor name")
    if not _is_int(c.seed) or not 0 <= c.seed <= MAX_SEED:
        bad("seed", f"seed={c.seed!r} must be an integer in [0, {MAX_SEED}]")
    if c.prompt_set is not None and (not isinstance(c.prompt_set, str) or not c.prompt_set):
        bad("prompt_set", f"prompt_set={c.prompt_set!r} must be the name of one of the model's prompt sets")
    g = c.guidance_scale
    if g is not None and (isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g)
                          or not 0 <= g <= MAX_GUIDANCE):
        bad("guidance_scale", f"guidance_scale={g!r} must be a number in [0, {MAX_GUIDANCE}] or null")
    return out


@dataclass(frozen=True)
class Limits:
    """What a server allows one job to ask for (api.settings fills it from the environment)."""

    min_nfe: int = 1
    max_nfe: int = 1000
    max_nfe_values: int = 1000
    max_samples: int = 10**9
    max_test_samples: int = 10**9
    max_budget: int = 10**9
    max_guidance_scale: float = MAX_GUIDANCE


def check_limits(config: SearchConfig, limits: Limits) -> None:
    """Every size the config can carry, against the server's limits; ConfigError names each field over one."""
    out: list[FieldProblem] = []
    bad = [n for n in config.nfe if not limits.min_nfe <= n <= limits.max_nfe]
    if bad:
        out.append(FieldProblem("nfe", f"NFE {bad[0]} is outside {limits.min_nfe}..{limits.max_nfe}"))
    elif len(set(config.nfe)) > limits.max_nfe_values:
        out.append(FieldProblem("nfe", f"{len(set(config.nfe))} NFE values; at most {limits.max_nfe_values} "
                                       "per job"))
    o = config.options
    for name, value, cap in (("n_samples", config.n_samples, limits.max_samples),
                             ("n_test_samples", config.n_test_samples, limits.max_test_samples),
                             ("budget", config.budget, limits.max_budget),
                             ("options.validation_samples", o.validation_samples, limits.max_test_samples),
                             ("options.batch_size", o.batch_size, limits.max_budget)):
        if value is not None and value > cap:
            out.append(FieldProblem(name, f"{name}={value} is above the limit {cap}"))
    if config.guidance_scale is not None and config.guidance_scale > limits.max_guidance_scale:
        out.append(FieldProblem("guidance_scale", f"guidance_scale={config.guidance_scale} is above the limit "
                                                  f"{limits.max_guidance_scale}"))
    if out:
        raise ConfigError(out)


class SearchFailed(RuntimeError):
    """The search cannot go on: every evaluation fails the same way, or none succeeded."""


@dataclass(frozen=True)
class Progress:
    evaluations: int                    # true evaluations done so far (this run plus resumed ones)
    budget: int
    best_value: float
    best_schedule: Optional[SolverSchedule]
    message: str = ""
    predictor_tau: Optional[float] = None
    fraction: float = 0.0               # of the whole job's work, validation and test included (1.0: done)


@dataclass(frozen=True)
class SearchResult:
    best: SolverSchedule
    best_value: float                   # on the search split
    test_value: float                   # on the test split
    baselines: dict[str, float]         # baseline name -> test value, at the same NFE
    evaluations: int
    validation_value: float = math.nan  # on the validation split, where the winner was chosen (nan: not run)
    # Other metrics the test evaluations reported (FID and CLIP score side by side), by "searched" / baseline name.
    test_extras: dict[str, dict[str, float]] = field(default_factory=dict)


ProgressFn = Callable[[Progress], None]
StopFn = Callable[[], bool]
