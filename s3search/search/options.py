"""`SearchOptions`: every search option as a typed field with its bounds, checked once, here.

Each field carries its rule in its metadata (`Rule`: bounds, allowed values, whether only the server may set
it, a one-line description). `__post_init__` checks every field against its rule and raises `ConfigError`
naming each bad field (`options.batch_size must be an integer >= 1, not 0`); the CLI, the runner and the API
build the object with `from_dict` and store it with `to_dict`, and the API's request schema is generated from
the same rules (`fields()`), so the bounds a client reads in the OpenAPI are the ones enforced here.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from ..space import TARGETS, SpaceOptions

__all__ = ["ConfigError", "FieldProblem", "Rule", "WarmStart", "Fidelity", "SearchOptions", "REFINE_METHODS",
           "option_rules", "WARM_START_PUBLIC", "JOB_ID_PATTERN", "PREDICTOR_NAME_PATTERN", "MAX_WARM_JOBS"]

REFINE_METHODS = ("gp", "cmaes")   # grid refinement optimisers (refine.py)


@dataclass(frozen=True)
class FieldProblem:
    field: str          # dotted path from the job's root: "options.batch_size", "budget"
    message: str


class ConfigError(ValueError):
    """One or more fields of a search config are invalid; `problems` names each of them."""

    def __init__(self, problems: list[FieldProblem]):
        self.problems = list(problems)
        super().__init__("; ".join(p.message for p in self.problems))

    @classmethod
    def one(cls, field_path: str, message: str) -> "ConfigError":
        return cls([FieldProblem(field_path, message)])

    @property
    def fields(self) -> list[str]:
        return [p.field for p in self.problems]


@dataclass(frozen=True)
class Rule:
    """The bounds and meaning of one option. `kind` is the JSON type: integer, number, boolean, string,
    strings (a list of names), object (free JSON keyword arguments), space, warm_start, fidelity."""

    kind: str
    doc: str
    ge: Optional[float] = None
    gt: Optional[float] = None
    le: Optional[float] = None
    lt: Optional[float] = None
    choices: Optional[tuple[str, ...]] = None
    nullable: bool = False
    server_only: bool = False   # names server resources (database URLs, devices): never from a request

    def bounds_text(self) -> str:
        parts = [f">= {_num(self.ge)}" if self.ge is not None else "", f"> {_num(self.gt)}" if self.gt is not None
                 else "", f"<= {_num(self.le)}" if self.le is not None else "",
                 f"< {_num(self.lt)}" if self.lt is not None else ""]
        return " and ".join(p for p in parts if p)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _opt(default: Any, kind: str, doc: str, **rule: Any) -> Any:
    make = {"default_factory": default} if callable(default) else {"default": default}
    return field(metadata={"rule": Rule(kind, doc, **rule)}, **make)


# A job id (studies.jobs: 32 hex digits) and a saved predictor's name (a plain folder name: never a path).
JOB_ID_PATTERN = r"^[0-9a-f]{32}$"
PREDICTOR_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
MAX_WARM_JOBS = 16
# What a request may name: jobs of its owner and predictors the server has. The rest names server resources
# (study names in any storage, a database URL, a folder), so only the CLI and the runner set it.
WARM_START_PUBLIC = ("jobs", "predictor")


@dataclass(frozen=True)
class WarmStart:
    """What pre-trains the predictor: earlier studies' (schedule, value) pairs, and/or a saved predictor.

    Over REST a job names `jobs` (its owner's earlier job ids) and `predictor` (a name the server has); the
    runner turns them into `studies` (with the service's storage) and `predictor_path`. The CLI sets those
    directly."""

    studies: tuple[str, ...] = ()
    storage: Optional[str] = None        # default: the study's own storage
    jobs: tuple[str, ...] = ()
    predictor: Optional[str] = None
    predictor_path: Optional[str] = None

    def public(self) -> dict[str, Any]:
        return {"jobs": list(self.jobs), "predictor": self.predictor}


@dataclass(frozen=True)
class Fidelity:
    """Multi-fidelity evaluation (search/fidelity.py): a candidate is first scored on the first `low_samples`
    samples of the search split (the same (noise, prompt) pairs as a full evaluation, a prefix of them), and only
    the best `keep` share of each loop batch so scored gets the full evaluation (`seed_keep` of a seeding
    stage, which is mostly far from the best). Low-fidelity scores train the predictor as a group of their own;
    they never win and never enter the final table."""

    low_samples: int
    keep: float = 1 / 3
    seed_keep: float = 1 / 9   # share of a seeding stage (baselines, variants, random) promoted

    def to_dict(self) -> dict[str, Any]:
        return {"low_samples": self.low_samples, "keep": self.keep, "seed_keep": self.seed_keep}


FIDELITY_KEEP_MIN = 0.01


@dataclass(frozen=True)
class SearchOptions:
    space: Mapping[str, Any] = _opt(dict, "space", "SpaceOptions fields: which values each per-step choice may "
                                    "take (first_steps unset: mean-x0 is added when the model has a data mean)")
    target: Optional[str] = _opt(None, "string", "the runtime the winner is for: the space and the baselines keep "
                                 "what it runs at the searched NFE (default: diffusers for a diffusers-pipeline "
                                 "model, else any)", choices=TARGETS, nullable=True)
    t_min: Optional[float] = _opt(None, "number", "smallest time of searched schedules (default: the process's)",
                                  gt=0, nullable=True)
    t_max: Optional[float] = _opt(None, "number", "largest time of searched schedules (default: the process's)",
                                  gt=0, nullable=True)
    seed_baselines: bool = _opt(True, "boolean", "evaluate every baseline first, then the best on more grids")
    baselines: Optional[tuple[str, ...]] = _opt(None, "strings", "restrict seeding to these baseline names",
                                                nullable=True)
    baseline_grids: Optional[tuple[str, ...]] = _opt(None, "strings", "grids of seeding stage 2 (default: six "
                                                     "standard grids, and flow-shift on the flow process)", nullable=True)
    ays_grids: bool = _opt(False, "boolean", "optimise an Align Your Steps grid for the job's model at each NFE "
                           "(s3search.ays, settings of `s3search ays`) and seed baselines on it as grid ays-opt "
                           "in stages 2 and 3; its model calls are not trials")
    top_baselines_on_grids: int = _opt(5, "integer", "how many stage-1 baselines go on to stage 2", ge=0, le=100)
    baseline_spread_grids: int = _opt(1, "integer", "stage 3: every baseline on this many of the best grids",
                                      ge=0, le=50)
    max_seed_fraction: float = _opt(0.5, "number", "at most this share of the budget goes to baselines",
                                    ge=0, le=1)
    variants_of_best: int = _opt(3, "integer", "the best k baselines with every other first-step / final "
                                 "rule (within the seeding share)",
                                 ge=0, le=50)
    init_random: Optional[int] = _opt(None, "integer", "random schedules after the baselines (default: "
                                      "max(8, budget / 20), within the seeding share)", ge=0, le=10_000, nullable=True)
    loop_share: float = _opt(0.3, "number", "share of each NFE's budget kept for the predictor loop: seeding "
                             "past stage 1 shrinks to leave it (0: seeding is capped by max_seed_fraction alone)",
                             ge=0, lt=1)
    batch_size: int = _opt(10, "integer", "true evaluations per S3 generation", ge=1, le=1000)
    population: int = _opt(128, "integer", "candidates kept by the predictor-scored evolution", ge=1, le=20_000)
    children: int = _opt(128, "integer", "children per evolution generation", ge=1, le=20_000)
    generations: int = _opt(4, "integer", "predictor-scored generations per true-evaluation round", ge=1, le=200)
    direct: float = _opt(0.3, "number", "share of each batch drawn next to the two best without the predictor",
                         ge=0, le=1)
    niche_within: Optional[float] = _opt(None, "number", "structure niches: factor of the best within which "
                                         "other structures share the local effort (default: 1, off, with "
                                         "baselines seeded; 3 without)", ge=1, le=1e6, nullable=True)
    refine_share: float = _opt(0.15, "number", "the last share of each NFE's budget: grid refinement", ge=0, lt=1)
    refine_method: str = _opt("gp", "string", "grid refinement optimiser", choices=REFINE_METHODS)
    refine_arms: int = _opt(3, "integer", "refine the best schedule of this many structures", ge=1, le=16)
    refine_box: float = _opt(1.0, "number", "gp: half-width of the box around the start", gt=0, le=6)
    refine_sigma: float = _opt(0.2, "number", "cmaes: initial step size (nats)", gt=0, le=5)
    refine_population: Optional[int] = _opt(None, "integer", "cmaes: population (default: 4 + 3 ln(dimension))",
                                            ge=2, le=1000, nullable=True)
    explore: float = _opt(0.3, "number", "share of each batch from the freely evolved population", ge=0, le=1)
    predictor_params: Mapping[str, Any] = _opt(dict, "object", "keyword arguments of the predictor")
    test_baselines: bool = _opt(True, "boolean", "test-score every baseline's best grid for the final table")
    validate_top: int = _opt(5, "integer", "the winner is the best of the top k on fresh validation seeds "
                             "(0: the search split's best)", ge=0, le=100)
    validate_baselines: int = _opt(3, "integer", "the best k baselines compete in the validation", ge=0, le=100)
    validation_samples: Optional[int] = _opt(None, "integer", "samples per validation evaluation (default: "
                                             "n_test_samples)", ge=2, le=10_000_000, nullable=True)
    warm_start: Optional[WarmStart] = _opt(None, "warm_start", "what pre-trains the predictor: {\"jobs\": [earlier "
                                           "job ids of the same owner], \"predictor\": a predictor saved on the "
                                           "server (GET /v1/predictors)}; any NFE, any model of the same process",
                                           nullable=True)
    fidelity: Optional[Fidelity] = _opt(None, "fidelity", "multi-fidelity search: {\"low_samples\": N (a prefix "
                                        "of the search split's samples, below n_samples), \"keep\": share of each "
                                        "loop batch promoted to a full evaluation (default 1/3), \"seed_keep\": "
                                        "the same for a seeding stage (default 1/9)}; null: every evaluation is "
                                        "full", nullable=True)
    budget_calls: Optional[int] = _opt(None, "integer", "the budget in model calls (samples x NFE, summed over "
                                       "every search evaluation, low and full fidelity) instead of `budget`; "
                                       "validation and test calls are not counted", ge=1, le=10**15, nullable=True)
    evaluator: Mapping[str, Any] = _opt(dict, "object", "LocalEvaluator keyword arguments", server_only=True)

    def __post_init__(self) -> None:
        problems: list[FieldProblem] = []
        for f in dataclasses.fields(self):
            message = _check(f.name, getattr(self, f.name), f.metadata["rule"])
            if message:
                problems.append(FieldProblem(f"options.{f.name}", message))
        if not problems and self.t_min is not None and self.t_max is not None and self.t_min >= self.t_max:
            problems.append(FieldProblem("options.t_max", f"options.t_max={self.t_max!r} must be above "
                                                          f"options.t_min={self.t_min!r}"))
        if problems:
            raise ConfigError(problems)

    # ----- documents ---------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, doc: Any, *, allow_server_only: bool = True) -> "SearchOptions":
        """From JSON-like data; unknown keys, wrong types and out-of-bounds values raise ConfigError naming them."""
        if isinstance(doc, SearchOptions):
            return doc
        if not isinstance(doc, Mapping):
            raise ConfigError.one("options", f"options must be an object, not {type(doc).__name__}")
        rules = option_rules()
        problems = []
        for key in doc:
            if key not in rules:
                problems.append(FieldProblem(f"options.{key}", f"options.{key} is not a search option (known: "
                                             f"{', '.join(k for k, r in rules.items() if not r.server_only)})"))
            elif rules[key].server_only and not allow_server_only:
                problems.append(FieldProblem(f"options.{key}", f"options.{key} is set by the server, not by a "
                                                               "request"))
        if problems:
            raise ConfigError(problems)
        values: dict[str, Any] = {}
        for key, value in doc.items():
            try:
                values[key] = (_warm_start(value, allow_server_only) if rules[key].kind == "warm_start"
                               and not isinstance(value, WarmStart) else _convert(key, value, rules[key]))
            except ConfigError as e:
                problems += e.problems
        if problems:
            raise ConfigError(problems)
        return cls(**values)

    def to_dict(self, *, include_server_only: bool = True) -> dict[str, Any]:
        """Every option as JSON data (the form `from_dict` reads back to an equal object)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.metadata["rule"].server_only and not include_server_only:
                continue
            value = getattr(self, f.name)
            # A request's document holds what a request may set: the runner's resolution stays out of it.
            out[f.name] = value.public() if isinstance(value, WarmStart) and not include_server_only \
                else _to_json(value)
        return out

    def replace(self, **changes: Any) -> "SearchOptions":
        return dataclasses.replace(self, **changes)


def option_rules() -> dict[str, Rule]:
    """Every option's rule, by name, in declaration order (what the API's schema is generated from)."""
    return {f.name: f.metadata["rule"] for f in dataclasses.fields(SearchOptions)}


def option_defaults() -> dict[str, Any]:
    return SearchOptions().to_dict()


# ----- checks ------------------------------------------------------------------------------------------------
def _what(rule: Rule) -> str:
    base = {"integer": "an integer", "number": "a finite number", "boolean": "true or false",
            "string": "a string", "strings": "a list of names", "object": "an object",
            "fidelity": "an object {low_samples, keep, seed_keep}"}.get(rule.kind, rule.kind)
    if rule.choices is not None:
        base = f"one of {list(rule.choices)}"
    bounds = rule.bounds_text()
    return base + (f" {bounds}" if bounds else "") + (" or null" if rule.nullable else "")


def _check(name: str, value: Any, rule: Rule) -> str:
    """An error message for options.<name>, or '' when the value obeys the rule."""
    if value is None:
        return "" if rule.nullable else f"options.{name} must be {_what(rule)}, not null"
    ok = {"integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
          "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
          "boolean": lambda v: isinstance(v, bool),
          "string": lambda v: isinstance(v, str),
          "strings": lambda v: isinstance(v, tuple) and all(isinstance(x, str) for x in v),
          "object": lambda v: isinstance(v, Mapping) and all(isinstance(k, str) for k in v),
          "space": lambda v: isinstance(v, Mapping),
          "warm_start": lambda v: isinstance(v, WarmStart),
          "fidelity": lambda v: isinstance(v, Fidelity)}[rule.kind](value)
    if not ok or not _in_bounds(value, rule):
        return f"options.{name} must be {_what(rule)}, not {_short(value)}"
    if rule.choices is not None and value not in rule.choices:
        return f"options.{name} must be {_what(rule)}, not {_short(value)}"
    if rule.kind == "strings":
        return _check_names(name, value)
    if rule.kind == "object":
        return _check_json(f"options.{name}", value)
    if rule.kind == "space":
        return _check_space(value)
    return ""


def _check_space(value: Mapping[str, Any]) -> str:
    try:
        SpaceOptions.from_dict(dict(value))
    except (ValueError, TypeError) as e:
        return f"options.space: {e}"
    return ""


def _in_bounds(value: Any, rule: Rule) -> bool:
    if rule.kind not in ("integer", "number"):
        return True
    return ((rule.ge is None or value >= rule.ge) and (rule.gt is None or value > rule.gt)
            and (rule.le is None or value <= rule.le) and (rule.lt is None or value < rule.lt))


def _check_names(name: str, values: tuple[str, ...]) -> str:
    """Baseline and grid names must be ones the library has: a typo would otherwise seed nothing silently."""
    if name == "baselines":
        from .. import baselines
        known = baselines.names()
    elif name == "baseline_grids":
        from .. import grids
        known = grids.names()
    else:  # pragma: no cover - every "strings" option is listed above
        return ""
    if not values:
        return f"options.{name} must not be empty (null: the default)"
    bad = [v for v in values if v not in known]
    return f"options.{name}: {bad[0]!r} is unknown; known: {', '.join(known)}" if bad else ""


def _check_json(path: str, value: Any, depth: int = 0) -> str:
    if depth > 8:
        return f"{path} is nested too deep"
    if value is None or isinstance(value, (bool, str, int)):
        return ""
    if isinstance(value, float):
        return "" if math.isfinite(value) else f"{path}={value!r} must be finite"
    if isinstance(value, (list, tuple)):
        return next((m for i, v in enumerate(value) if (m := _check_json(f"{path}[{i}]", v, depth + 1))), "")
    if isinstance(value, Mapping):
        return next((m for k, v in value.items() if (m := _check_json(f"{path}.{k}", v, depth + 1))), "")
    return f"{path} holds a {type(value).__name__}, which is not JSON"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ----- conversion from and to JSON data ----------------------------------------------------------------------
def _convert(name: str, value: Any, rule: Rule) -> Any:
    """JSON data to the field's Python form (lists to tuples, objects to nested dataclasses)."""
    if value is None:
        return None
    if rule.kind == "strings" and isinstance(value, list):
        return tuple(value)
    if rule.kind == "space" and isinstance(value, Mapping):
        return {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
    if rule.kind == "warm_start":
        if isinstance(value, WarmStart):
            return value
        return _warm_start(value)
    if rule.kind == "fidelity":
        return value if isinstance(value, Fidelity) else _fidelity(value)
    if rule.kind == "object" and isinstance(value, Mapping):
        return dict(value)
    return value


def _warm_start(value: Any, allow_server_only: bool = True) -> Optional[WarmStart]:
    path = "options.warm_start"
    if value is None:
        return None
    known = set(WarmStart.__dataclass_fields__) if allow_server_only else set(WARM_START_PUBLIC)
    if not isinstance(value, Mapping):
        raise ConfigError.one(path, f"{path} must be an object with 'jobs' (earlier job ids) and/or "
                                    "'predictor' (a saved predictor's name)")
    problems = [FieldProblem(f"{path}.{k}", f"{path}.{k} is set by the server, not by a request"
                             if k in WarmStart.__dataclass_fields__ else
                             f"{path}.{k} is not a warm-start field (known: {', '.join(sorted(known))})")
                for k in value if k not in known]
    if problems:
        raise ConfigError(problems)
    for key in ("studies", "jobs"):
        names = value.get(key, [])
        if not isinstance(names, (list, tuple)) or not all(isinstance(s, str) for s in names):
            problems.append(FieldProblem(f"{path}.{key}", f"{path}.{key} must be a list of names"))
        elif key == "jobs":
            problems += _job_id_problems(names)
    for key in ("storage", "predictor_path"):
        if value.get(key) is not None and not isinstance(value.get(key), str):
            problems.append(FieldProblem(f"{path}.{key}", f"{path}.{key} must be a string or null"))
    name = value.get("predictor")
    if name is not None and not (isinstance(name, str) and re.fullmatch(PREDICTOR_NAME_PATTERN, name)):
        problems.append(FieldProblem(f"{path}.predictor", f"{path}.predictor must be the name of a saved "
                                                          f"predictor (matching {PREDICTOR_NAME_PATTERN}), not a path"))
    if problems:
        raise ConfigError(problems)
    return WarmStart(studies=tuple(value.get("studies", ())), storage=value.get("storage"),
                     jobs=tuple(value.get("jobs", ())), predictor=name, predictor_path=value.get("predictor_path"))


def _fidelity(value: Any) -> Optional[Fidelity]:
    """options.fidelity from JSON data; ConfigError names each bad field (options.fidelity.low_samples, ...)."""
    path = "options.fidelity"
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ConfigError.one(path, f"{path} must be an object {{\"low_samples\": N, \"keep\": share}} or null, "
                                    f"not {_short(value)}")
    known = set(Fidelity.__dataclass_fields__)
    problems = [FieldProblem(f"{path}.{k}", f"{path}.{k} is not a fidelity field (known: {', '.join(sorted(known))})")
                for k in value if k not in known]
    if "low_samples" not in value:
        problems.append(FieldProblem(f"{path}.low_samples", f"{path}.low_samples is required (samples per "
                                                            "low-fidelity evaluation)"))
    else:
        n = value["low_samples"]
        if isinstance(n, bool) or not isinstance(n, int) or not 2 <= n <= 10_000_000:
            problems.append(FieldProblem(f"{path}.low_samples", f"{path}.low_samples must be an integer >= 2 and "
                                                                f"<= 10000000, not {_short(n)}"))
    shares = {k: value.get(k, getattr(Fidelity, k)) for k in ("keep", "seed_keep")}
    for key, share in shares.items():
        if (isinstance(share, bool) or not isinstance(share, (int, float)) or not math.isfinite(share)
                or not FIDELITY_KEEP_MIN <= share <= 1):
            problems.append(FieldProblem(f"{path}.{key}", f"{path}.{key} must be a number >= {FIDELITY_KEEP_MIN} "
                                                          f"and <= 1, not {_short(share)}"))
    if problems:
        raise ConfigError(problems)
    return Fidelity(low_samples=int(value["low_samples"]), keep=float(shares["keep"]),
                    seed_keep=float(shares["seed_keep"]))


def _job_id_problems(ids: Any) -> list[FieldProblem]:
    path = "options.warm_start.jobs"
    if len(ids) > MAX_WARM_JOBS:
        return [FieldProblem(path, f"{path} may name at most {MAX_WARM_JOBS} jobs, not {len(ids)}")]
    return [FieldProblem(f"{path}[{i}]", f"{path}[{i}]={_short(j)} is not a job id (32 hex digits)")
            for i, j in enumerate(ids) if not re.fullmatch(JOB_ID_PATTERN, j)]


def _to_json(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple):
        return [_to_json(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _to_json(v) for k, v in value.items()}
    return value


def space_field_kinds() -> dict[str, tuple[str, Any, Optional[tuple[str, ...]]]]:
    """SpaceOptions' fields as (JSON kind, default, allowed names for a list of names), for the API's schema."""
    from .. import space as space_module
    from ..schedule import CORRECTORS, DERIVATIVES, FINALS, FIRST_STEPS, PREDICTIONS

    allowed = {"predictions": PREDICTIONS, "derivatives": DERIVATIVES, "correctors": CORRECTORS,
               "first_steps": FIRST_STEPS, "finals": FINALS, "base_grids": space_module.BASE_GRIDS}
    hints = typing.get_type_hints(SpaceOptions)
    out = {}
    for f in dataclasses.fields(SpaceOptions):
        kind = {int: "integer", float: "number"}.get(hints[f.name], "strings")
        out[f.name] = (kind, _to_json(f.default), allowed.get(f.name))
    return out


def name_choices(option: str) -> Optional[tuple[str, ...]]:
    """The names a list-of-names option may hold (baselines, grids), for the API's schema."""
    if option == "baselines":
        from .. import baselines
        return tuple(baselines.names())
    if option == "baseline_grids":
        from .. import grids
        return tuple(grids.names())
    return None
