"""`run_search`: the one entry point the CLI and the runner call.

Order of work, per NFE: baselines (stage 1: each on its conventional grid; stage 2: the best few on more grids),
then the configured method until that NFE's share of the budget is spent, then the choice of the winner among
the search split's top `validate_top` on the validation split (fresh seeds), then the test evaluation of the
winner and of every baseline's best grid (other fresh seeds, `n_test_samples`). Validation and test scores are
not trials (they would spend budget); they are stored in the study's user attributes under "validation" and
"test" and reused on resume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import numpy as np
import optuna

import predictors
from predictors.warm_start import load_pairs, outside_group

from .. import baselines as baseline_registry
from .. import processes
from ..evaluation.base import EvalRequest, Evaluator
from ..schedule import SolverSchedule
from ..space import SearchSpace, SpaceOptions
from . import baselines_seed
from .alternatives import run_optuna, run_random
from .config import METHODS, ConfigError, ProgressFn, SearchConfig, SearchFailed, SearchResult, StopFn
from .context import SearchContext
from .fidelity import LowLedger, call_budget, slot_calls, whole
from .options import SearchOptions
from .s3 import later_baselines_cap, run_s3
from .study import AnySchedule, Candidate, Evaluated, Ledger, chash

__all__ = ["run_search", "METHODS", "MultiNFEResult", "preflight", "UnknownPromptSet", "build_space",
           "default_evaluator", "NFEResult",
           "best_structural_variant"]


@dataclass(frozen=True)
class NFEResult(SearchResult):
    """A SearchResult that says where its winner came from."""

    # The trial source that proposed the winner (baseline, variant, s3, s3-local, refine, random, tpe, cmaes,
    # requeued) and, for a baseline or one of its variants, its label: a reader must see when the search's
    # "winner" is a baseline it was seeded with.
    winner_source: str = ""
    winner_label: str = ""
    baseline_grids: dict[str, str] = field(default_factory=dict)   # baseline name -> the grid it was scored on
    # The best baseline (search split) and the best evaluated structural variant of it (its label, test value):
    # they split the winner's gain over that baseline into what the structural rules give and what per-step
    # choices add. structural_of empty: not measured (baselines not tested); structural_label empty: no variant
    # of it was evaluated.
    structural_of: str = ""
    structural_label: str = ""
    structural_value: float = math.nan
    # Model calls (samples x NFE) of this NFE's search evaluations, low and full fidelity (validation and test
    # not included), and how many low-fidelity scores (options.fidelity) they hold.
    model_calls: int = 0
    low_evaluations: int = 0


@dataclass(frozen=True)
class MultiNFEResult(NFEResult):
    """A SearchResult for the first NFE of the config, plus one per NFE when several were searched."""

    per_nfe: dict[int, SearchResult] = field(default_factory=dict)
    stopped: bool = False


def preflight(config: SearchConfig) -> SearchConfig:
    """Everything a runner will need, checked before any work: the model, its metric, the space and the
    predictor. Returns the config with the model's defaults filled in; raises ConfigError naming the field
    (KeyError for an unknown model). The API calls this at submission, so an accepted job is one that runs."""
    from ..models import registry

    model = registry.get(config.model)
    config = config.with_model_defaults(model.default_metric)
    problem = registry.metric_error(config.model, config.metric)
    if problem:
        raise ConfigError.one("metric", problem)
    _check_conditioning(config, model)
    _check_budget(config)
    try:
        build_space(config, model.process.name, config.options,
                    has_data_mean=getattr(model.denoiser, "data_mean", None) is not None)
    except ValueError as e:
        field = "options.space" if config.options.space else "options.t_max"
        raise ConfigError.one(field, f"{field}: the search space cannot be built: {e}") from None
    if config.method == "s3":
        try:
            predictors.get(config.predictor, **dict(config.options.predictor_params))
        except (TypeError, ValueError) as e:
            raise ConfigError.one("options.predictor_params", f"options.predictor_params: {e}") from None
    return config


def _check_budget(config: SearchConfig) -> None:
    """What the fidelity and call-budget options need of the job's sample counts and NFE (ConfigError naming
    the field): fewer low-fidelity samples than full ones, and a call budget that pays one full evaluation per
    NFE."""
    o = config.options
    if o.fidelity is not None and config.method != "s3":
        raise ConfigError.one("options.fidelity", f"options.fidelity: multi-fidelity evaluation runs with method s3, "
                                                  f"not method={config.method!r}")
    if o.fidelity is not None and o.fidelity.low_samples >= config.n_samples:
        raise ConfigError.one("options.fidelity.low_samples", f"options.fidelity.low_samples={o.fidelity.low_samples} "
                                                               f"must be below n_samples={config.n_samples}")
    if o.budget_calls is not None:
        nfes = sorted(set(config.nfe))
        need = config.n_samples * max(nfes) * len(nfes)
        if o.budget_calls < need:
            raise ConfigError.one("options.budget_calls", f"options.budget_calls={o.budget_calls} does not pay one "
                                                          f"full evaluation per NFE ({need} model calls: n_samples "
                                                          "x NFE for each NFE)")


class UnknownPromptSet(ConfigError):
    """The job names a prompt set the model does not have (the service answers 404, as for a model)."""


def _check_conditioning(config: SearchConfig, model: Any) -> None:
    if not getattr(model, "conditional", False):
        given = [k for k in ("prompt_set", "guidance_scale") if getattr(config, k) is not None]
        if given:
            raise ConfigError.one(given[0], f"{given[0]}: model={config.model!r} is not text-conditioned")
        return
    sets = dict(getattr(model, "prompt_sets", None) or {})
    if config.prompt_set is not None and config.prompt_set not in sets:
        known = ", ".join(sorted(sets)) or "none"
        raise UnknownPromptSet.one("prompt_set", f"prompt_set={config.prompt_set!r} is not a prompt set of "
                                                 f"model={config.model!r} (known: {known})")


def build_space(config: SearchConfig, process: str | processes.NoiseProcess, options: SearchOptions,
                has_data_mean: bool = False) -> SearchSpace:
    space_opts = dict(options.space)
    if has_data_mean and "first_steps" not in space_opts:
        space_opts["first_steps"] = ("model", "zero-x0", "mean-x0")
    return SearchSpace(process, sorted(set(config.nfe)), t_min=options.t_min, t_max=options.t_max,
                       options=SpaceOptions.from_dict(space_opts))


def default_evaluator(options: SearchOptions) -> Evaluator:
    from ..evaluation.local import LocalEvaluator

    return LocalEvaluator(**dict(options.evaluator))


def _budgets(config: SearchConfig) -> dict[int, int]:
    nfes = sorted(set(config.nfe))
    share, extra = divmod(config.budget, len(nfes))
    return {n: share + (1 if i < extra else 0) for i, n in enumerate(nfes)}


def _call_budgets(config: SearchConfig) -> tuple[dict[int, int], dict[int, float]]:
    """(slots, model calls) per NFE for a search with a call budget or fidelity; ({}, {}) for one without.

    `budget_calls` is split evenly over the NFE; without it an NFE may spend the calls of its share of `budget`
    full evaluations. Slots are what those calls buy (fidelity.slot_calls)."""
    o = config.options
    if o.budget_calls is None and o.fidelity is None:
        return {}, {}
    nfes = sorted(set(config.nfe))
    evals = _budgets(config)
    calls = {n: call_budget(evals[n], config.n_samples, n,
                            None if o.budget_calls is None else o.budget_calls / len(nfes)) for n in nfes}
    slots = {n: whole(calls[n] / slot_calls(o.fidelity, config.n_samples, n)) for n in nfes}
    return slots, calls


def _final_work(config: SearchConfig) -> float:
    """Validation and test work of the whole job, in search evaluations (a sample costs the same on any split):
    an estimate for Progress.fraction, made before the number of distinct candidates is known."""
    o = config.options
    n_val = o.validation_samples or config.n_test_samples
    validated = o.validate_top + o.validate_baselines if o.validate_top > 0 else 0
    # With the baselines, one structural variant of the best of them (the structural gain line).
    tested = 1 + (len(o.baselines or baseline_registry.names()) + 1 if o.test_baselines else 0)
    per_nfe = (validated * n_val + tested * config.n_test_samples) / config.n_samples
    return per_nfe * len(set(config.nfe))


def _seed_baselines(ctx: SearchContext, nfe: int, process: str) -> None:
    o = ctx.options
    cap = max(0, int(o.max_seed_fraction * ctx.budgets[nfe]))
    t_start, t_end = ctx.space.t_max, ctx.space.t_min
    stage1 = baselines_seed.conventional(nfe, process, names=o.baselines, t_start=t_start, t_end=t_end)
    _seed_stage(ctx, nfe, cap, stage1)
    # Stages 2 and 3 share the seeding share with the variants and random seeds (s3.later_baselines_cap), so at
    # small budgets they shrink and the predictor loop keeps its share; stage 1 stays whole for the final table.
    cap = min(cap, later_baselines_cap(o, ctx.budgets[nfe], min(cap, len(stage1))))
    # With fidelity every seeded baseline has a low-fidelity score: rank them all on it (one fidelity).
    pool = ctx.low.at(nfe) if ctx.low is not None else ctx.ledger.done.values()
    best = baselines_seed.best_per_baseline(pool, nfe)
    top = [name for name, _ in sorted(best.items(), key=lambda kv: kv[1].value)][: o.top_baselines_on_grids]
    extra = _ays_grids(ctx, nfe, t_start, t_end) if o.ays_grids else {}
    grids = tuple(o.baseline_grids or baselines_seed.seed_grids(process)) + tuple(extra)
    _seed_stage(ctx, nfe, cap, baselines_seed.on_grids(top, nfe, process, grid_names=grids, t_start=t_start,
                                                        t_end=t_end, extra_grids=extra))
    # Stage 3: every baseline on the grids that served the best ones: a grid that lifts one method often lifts
    # others the conventional-grid ranking left out (gmm-64d NFE 5: iPNDM on AYS-SDXL 0.23, on its own grid
    # outside the top five).
    pool = ctx.low.at(nfe) if ctx.low is not None else ctx.ledger.done.values()
    best_grids = baselines_seed.best_grids(pool, nfe)[: o.baseline_spread_grids]
    _seed_stage(ctx, nfe, cap, baselines_seed.on_grids(o.baselines or baseline_registry.names(), nfe, process,
                                                        grid_names=best_grids, t_start=t_start, t_end=t_end,
                                                        extra_grids=extra))


def _calls_record(ctx: SearchContext, nfe: int) -> dict[str, Any]:
    """What the study records of an NFE's spending: model calls, full and low-fidelity evaluations, the budget."""
    out: dict[str, Any] = {"calls": ctx.calls(nfe), "full_calls": ctx.full_calls(nfe),
                           "full_evaluations": sum(1 for e in ctx.ledger.done.values() if e.nfe == nfe),
                           "call_budget": ctx.call_budget(nfe)}
    if ctx.low is not None:
        out.update({"low_evaluations": len(ctx.low.at(nfe)), "low_samples": ctx.low.n_samples,
                    "promoted": sum(1 for e in ctx.low.at(nfe) if chash(e.schedule) in ctx.low.promoted)})
    return out


def _ays_grids(ctx: SearchContext, nfe: int, t_start: float, t_end: float) -> dict[str, baselines_seed.GridSource]:
    """The job model's AYS grid ("ays-opt"), optimised once per model and settings (baselines_seed caches it);
    none, with a progress note, for a model without training data or an NFE too small for an interior point."""
    if ctx.stopped():
        return {}
    ctx.report(f"nfe={nfe}: optimising the AYS grid (model calls, not trials)")
    try:
        return baselines_seed.ays_grid_sources(ctx.config.model, nfe, t_start=t_start, t_end=t_end)
    except ValueError as e:
        ctx.report(f"nfe={nfe}: no AYS grid: {e}")
        return {}


def _seed_stage(ctx: SearchContext, nfe: int, cap: int, candidates: list[Candidate]) -> None:
    """Enqueue one seeding stage within what is left of the seed cap, and evaluate it."""
    if ctx.stopped():   # queue nothing after a stop: it would be left WAITING in the study
        return
    if ctx.low is not None:   # multi-fidelity: the stage screened at low fidelity, its best share in full
        _screen_stage(ctx, nfe, cap, candidates)
        return
    spent = sum(1 for e in ctx.ledger.done.values() if e.nfe == nfe and e.source == "baseline")
    ctx.ledger.enqueue(candidates[: max(0, cap - spent)])
    _drain(ctx, nfe, cap)


def _screen_stage(ctx: SearchContext, nfe: int, cap: int, candidates: list[Candidate]) -> None:
    known = ctx.evaluated()
    todo = [c for c in {chash(c.schedule): c for c in candidates}.values() if chash(c.schedule) not in known]
    todo = todo[: max(0, cap - ctx.count(nfe, ("baseline",)))]
    # One batch per stage, so its promotions are the best seed_keep share of the whole stage.
    if todo and not ctx.stopped() and ctx.remaining(nfe) > 0:
        ctx.evaluate(todo, nfe)


def _drain(ctx: SearchContext, nfe: int, cap: int) -> None:
    batch = ctx.options.batch_size
    while not ctx.stopped():
        spent = sum(1 for e in ctx.ledger.done.values() if e.nfe == nfe and e.source == "baseline")
        n = min(batch, cap - spent, ctx.remaining(nfe))
        if n <= 0 or not ctx.ledger.waiting():
            return
        if not ctx.ledger.run_queue(n):
            return
        ctx.fail_if_hopeless()
        ctx.report(f"nfe={nfe}: baselines")


def _load_warm(ctx: SearchContext, study: optuna.Study) -> None:
    """ctx.warm_pairs from options.warm_start: the named studies' pairs (any NFE, any model of this process)
    that lie in this search's space at their own NFE, then a saved predictor's scores of a predicted-best and
    a random pool at each NFE of this search. Each (study, NFE) and each (saved predictor, NFE) is a group of
    its own, compared only within itself."""
    spec = ctx.options.warm_start
    if spec is None:
        return
    names = [n for n in spec.studies if n != study.study_name]
    pairs: list[tuple[Any, float, int]] = []
    if names:
        backend = getattr(study._storage, "_backend", study._storage)  # noqa: SLF001 (the same DB by default)
        storage = spec.storage or getattr(backend, "url", None)
        if storage is None:
            raise ValueError("options.warm_start.storage is required when the study is not on an RDB storage")
        found = load_pairs(storage, names, metric=ctx.config.metric, process=ctx.space.process.name)
        inside = _in_space_at_own_nfe(ctx.space, [p.schedule for p in found])
        pairs = [(p.schedule, p.value, outside_group(names.index(p.study), p.schedule.nfe))
                 for p, ok in zip(found, inside) if ok]
    predicted: list[tuple[Any, float, int]] = []
    if spec.predictor_path:
        prior = predictors.load(spec.predictor_path)
        rng = np.random.default_rng([ctx.config.seed, 7])
        predicted = [(s, v, outside_group(len(names), nfe)) for nfe in ctx.space.nfes
                     for s, v in predicted_pool(ctx.space, prior, nfe, rng)]
    ctx.warm_pairs = pairs + predicted
    study.set_user_attr("warm_start_pairs", len(pairs))
    study.set_user_attr("warm_start_predicted", len(predicted))


def _in_space_at_own_nfe(space: SearchSpace, schedules: list[SolverSchedule]) -> list[bool]:
    """Whether each schedule lies in `space` widened to its own NFE (a pair of another NFE still teaches the
    shared predictor, which the search fits across NFE)."""
    spaces: dict[int, Optional[SearchSpace]] = {}
    out = []
    for s in schedules:
        if s.nfe not in spaces:
            try:
                spaces[s.nfe] = SearchSpace(space.process, s.nfe, t_min=space.t_min, t_max=space.t_max,
                                            options=space.options)
            except ValueError:   # that NFE cannot be reached with this space's rules
                spaces[s.nfe] = None
        at = spaces[s.nfe]
        out.append(at is not None and at.contains(s))
    return out


def predicted_pool(space: SearchSpace, prior: predictors.Predictor, nfe: int, rng: np.random.Generator,
                   n_best: int = 32, n_random: int = 32) -> list[tuple[SolverSchedule, float]]:
    """(schedule, predicted score) of the saved predictor's `n_best` at this NFE (a short predictor-scored
    evolution) and of `n_random` random schedules: its ranking where it matters, and a spread that keeps the
    fitted predictor from learning only the top."""
    from .s3 import evolve

    best = evolve(space, prior, [], nfe, rng, population=64, children=64, generations=3)[:n_best]
    spread = [space.random(rng, nfe) for _ in range(n_random)]
    return best + list(zip(spread, prior.predict(spread).tolist()))


# Other metrics an evaluation reports beside its own (EvalResult.extras) that the final table shows next to it:
# FID and CLIP score of a text-to-image model with both configured.
REPORTED_EXTRAS = ("fid", "clip_score")


def _score_missing(ctx: SearchContext, cached: dict[str, Optional[float]], want: dict[str, AnySchedule],
                   req: EvalRequest, label: str, extras: Optional[dict[str, dict[str, float]]] = None
                   ) -> dict[str, Optional[float]]:
    """`cached` with every key of `want` it lacked scored on `req`'s split; None marks a failed or non-finite
    score (the form the study's user attributes store). The reported extras of new scores go into `extras`.
    Progress messages start with `label`; the work done is added to `ctx.final_done` as it is done."""
    todo = list((k, s) for k, s in want.items() if k not in cached)
    # In chunks of a search batch, with a progress report after each: on an image model the validation and
    # test evaluations (more samples per schedule) can take most of a job's time.
    chunk = max(1, ctx.options.batch_size)
    for start in range(0, len(todo), chunk):
        part = todo[start:start + chunk]
        for (key, _), res in zip(part, ctx.ledger.evaluator.evaluate([s for _, s in part], req)):
            cached[key] = float(res.value) if res.ok and math.isfinite(res.value) else None
            shown = {k: float(v) for k, v in (res.extras or {}).items() if k in REPORTED_EXTRAS and math.isfinite(v)}
            if extras is not None and shown:
                extras[key] = shown
        ctx.final_done += len(part) * req.n_samples / ctx.config.n_samples
        ctx.report(f"{label}: {min(start + chunk, len(todo))}/{len(todo)} schedules scored on the {req.split} split "
                   f"({req.n_samples} samples each)")
    return cached


def best_structural_variant(evaluated: Iterable[Evaluated], nfe: int, best_of: dict[str, Evaluated]
                            ) -> tuple[str, Optional[Evaluated]]:
    """(a baseline name, the best evaluated structural variant of it): of the best baseline (search split) that
    has one, else (the best baseline, None).

    A variant is the baseline's steps and grid with other first-step and final rules (s3.seed_variants labels
    it `<baseline label>+<first>/<final>`); only baselines in the search space get variants, so the best one
    often has none. Chosen on the search split, so the test split stays unbiased.
    """
    if not best_of:
        return "", None
    ranked = sorted(best_of.items(), key=lambda kv: kv[1].value)
    done = [e for e in evaluated if e.source == "variant" and e.nfe == nfe and e.ok]
    for name, base in ranked:
        mine = [e for e in done if e.label.startswith(base.label + "+")]
        if mine:
            return name, min(mine, key=lambda e: e.value)
    return ranked[0][0], None


@dataclass(frozen=True)
class SplitScores:
    searched: float
    baselines: dict[str, float]
    extras: dict[str, dict[str, float]]      # reported extras by "searched" / baseline name
    structural: float = math.nan             # the structural variant's value (nan: none scored)


def _test_scores(ctx: SearchContext, study: optuna.Study, nfe: int, best: Evaluated,
                 baselines: dict[str, Evaluated], structural: tuple[str, Optional[Evaluated]] = ("", None)
                 ) -> SplitScores:
    """The winner, every baseline and the structural variant of the best baseline on the test split."""
    cfg = ctx.config
    stored = dict(study.user_attrs.get("test", {}))
    entry = dict(stored.get(str(nfe), {}))
    req = cfg.eval_request(cfg.n_test_samples, "test")
    best_key = "searched:" + chash(best.schedule)
    want = {best_key: best.schedule}
    want.update({"baseline:" + name: e.schedule for name, e in baselines.items()})
    of, variant = structural
    # The winner may be that variant itself: its score is then the winner's, at no extra cost.
    variant_key = None if variant is None else ("searched:" if chash(variant.schedule) == chash(best.schedule)
                                                else "structural:") + chash(variant.schedule)
    if variant is not None and variant_key not in want:
        want[variant_key] = variant.schedule
    extras = dict(entry.get("extras", {}))
    done_before = ctx.final_done
    cached = _score_missing(ctx, dict(entry.get("values", {})), want, req, f"nfe={nfe}", extras)
    entry["extras"] = extras
    # Cached scores cost nothing now, but count as done: the job's fraction must reach its total.
    ctx.final_done = done_before + len(want) * cfg.n_test_samples / cfg.n_samples
    ctx.report(f"nfe={nfe}: test split scored ({len(want)} schedules)")
    entry["values"] = cached
    entry["best_schedule"] = best.schedule.to_json()
    entry["best_key"] = best_key   # a resumed search may have scored earlier winners too
    entry["winner_source"], entry["winner_label"] = best.source, best.label
    entry["baseline_schedules"] = {name: e.schedule.to_json() for name, e in baselines.items()}
    entry["baseline_grids"] = {name: baselines_seed.parse_label(e.label)[1] for name, e in baselines.items()}
    entry["structural"] = None if not of else {
        "baseline": of, "label": variant.label if variant else None, "key": variant_key,
        "schedule": variant.schedule.to_json() if variant else None}
    stored[str(nfe)] = entry
    study.set_user_attr("test", stored)

    def val(key: Optional[str]) -> float:
        v = cached.get(key) if key else None
        return math.inf if v is None else float(v)

    shown = {"searched": extras.get(best_key, {})}
    shown.update({name: extras["baseline:" + name] for name in baselines if "baseline:" + name in extras})
    return SplitScores(val(best_key), {name: val("baseline:" + name) for name in baselines},
                      {k: v for k, v in shown.items() if v}, val(variant_key) if variant_key else math.nan)


def _near(a: AnySchedule, b: AnySchedule, lam, tol: float) -> bool:
    """Same rules on grids no further apart than tol in half-logSNR at any time: one schedule for validation."""
    if not (isinstance(a, SolverSchedule) and isinstance(b, SolverSchedule)):
        return chash(a) == chash(b)
    if (a.first_step, a.final, a.steps) != (b.first_step, b.final, b.steps):
        return False
    return max(abs(lam(x) - lam(y)) for x, y in zip(a.timesteps[1:], b.timesteps[1:])) < tol


def distinct_top(ranked: list[Evaluated], k: int, lam, tol: float = 0.05) -> list[Evaluated]:
    """The k best that are not near-copies of a better one (local search leaves clusters of jittered grids).

    Validating five members of one cluster tests one idea five times; when that idea only suited the search
    seeds, all five fail together (digits NFE 10: each scored 1.95 on the search split, 3.4 on validation).
    """
    out: list[Evaluated] = []
    for e in ranked:
        if len(out) >= k:
            break
        if not any(_near(e.schedule, o.schedule, lam, tol) for o in out):
            out.append(e)
    return out


def _validated_best(ctx: SearchContext, study: optuna.Study, nfe: int) -> tuple[Evaluated, float]:
    """The best of the search split's top k (distinct schedules) on the validation split (fresh seeds): the winner.

    With n samples per search evaluation, the search split's minimum over hundreds of candidates is biased
    towards schedules that suit those particular seeds; re-scoring the few best on seeds no trial used removes
    most of that selection noise, and the test split stays untouched for the final report. Scores are stored in
    the study's user attributes ("validation") and reused on resume; like test scores they are not trials.
    """
    cfg, k = ctx.config, ctx.options.validate_top
    ranked = sorted((e for e in ctx.ledger.done.values() if e.nfe == nfe and e.ok), key=lambda e: e.value)
    if k <= 0 or len(ranked) < 2:
        return ranked[0], math.nan
    # The strongest baselines compete too: a schedule that beat them only on the search seeds must beat them
    # again on fresh ones to be named the winner.
    strong = sorted(baselines_seed.best_per_baseline(ranked, nfe).values(), key=lambda e: e.value)
    mine = distinct_top(ranked, k, ctx.space.process.lambda_)
    top = list({chash(e.schedule): e for e in mine + strong[: ctx.options.validate_baselines]}.values())
    n = ctx.options.validation_samples or cfg.n_test_samples
    stored = dict(study.user_attrs.get("validation", {}))
    before = dict(stored.get(str(nfe), {}))
    req = cfg.eval_request(n, "validation")
    ctx.report(f"nfe={nfe}: validating the top {len(top)} on fresh seeds")
    done_before = ctx.final_done
    cached = _score_missing(ctx, dict(before), {chash(e.schedule): e.schedule for e in top}, req,
                            f"nfe={nfe}")
    ctx.final_done = done_before + len(top) * n / cfg.n_samples
    if cached != before:
        stored[str(nfe)] = cached
        study.set_user_attr("validation", stored)
    scored = [(cached[chash(e.schedule)], e) for e in top if cached.get(chash(e.schedule)) is not None]
    if not scored:
        return ranked[0], math.nan
    value, winner = min(scored, key=lambda ve: (ve[0], ve[1].value))
    ctx.report(f"nfe={nfe}: winner chosen on the validation split among the top {len(top)} ({value:.5g})")
    return winner, value


def run_search(config: SearchConfig, study: optuna.Study, *, evaluator: Evaluator | None = None,
               progress: ProgressFn | None = None, should_stop: StopFn | None = None) -> MultiNFEResult:
    from ..models import registry

    model = registry.get(config.model)
    config = config.with_model_defaults(model.default_metric)
    _check_budget(config)
    options = config.options
    process = model.process.name
    space = build_space(config, process, options, has_data_mean=getattr(model.denoiser, "data_mean", None) is not None)
    evaluator = evaluator if evaluator is not None else default_evaluator(options)
    request = config.eval_request(config.n_samples, "search")
    for key, value in (("model", config.model), ("metric", config.metric), ("n_samples", config.n_samples),
                       ("seed", config.seed), ("nfe", list(config.nfe)), ("method", config.method),
                       ("predictor", config.predictor), ("budget", config.budget), ("process", process)):
        study.set_user_attr(key, value)
    ledger = Ledger(study, evaluator, request)
    ledger.load()
    low = None
    if options.fidelity is not None:
        low = LowLedger.for_search(study, evaluator, request, options.fidelity)
        low.load()
        study.set_user_attr("fidelity", options.fidelity.to_dict())
    slots, calls = _call_budgets(config)
    ctx = SearchContext(config=config, options=options, space=space, ledger=ledger,
                        rng=np.random.default_rng([config.seed, ledger.count + (len(low.done) if low else 0)]),
                        budgets=slots or _budgets(config), progress_fn=progress, should_stop=should_stop,
                        low=low, call_budgets=calls)
    ctx.final_work = _final_work(config)
    _load_warm(ctx, study)
    if ledger.count:
        ctx.report(f"resumed with {ledger.count} evaluations")

    for nfe in sorted(set(config.nfe)):
        if options.seed_baselines:
            _seed_baselines(ctx, nfe, process)
        if config.method == "s3":
            run_s3(ctx, nfe)
        elif config.method == "random":
            run_random(ctx, nfe)
        else:
            run_optuna(ctx, nfe, config.method)
        if ctx.stopped():
            break
    study.set_user_attr("rounds", ctx.log[-200:])
    study.set_user_attr("model_calls", {str(n): _calls_record(ctx, n) for n in sorted(set(config.nfe))})

    stopped = ctx.stopped()
    per_nfe: dict[int, NFEResult] = {}
    for nfe in sorted(set(config.nfe)):
        best, validation = ledger.best(nfe), math.nan
        if best is None:
            continue
        if not stopped:
            best, validation = _validated_best(ctx, study, nfe)
        best_of = baselines_seed.best_per_baseline(ledger.done.values(), nfe)
        # Multi-fidelity: a baseline no batch promoted still gets its row, on its best grid at low fidelity (the
        # table's values are all test-split scores; low and full search-split values are never compared).
        low_only = {} if low is None else {name: e for name, e in baselines_seed.best_per_baseline(
            low.at(nfe), nfe).items() if name not in best_of}
        grids = {name: baselines_seed.parse_label(e.label)[1] for name, e in {**low_only, **best_of}.items()}
        tested = {**best_of, **low_only} if options.test_baselines else {}
        of, variant = best_structural_variant(ledger.done.values(), nfe,
                                              best_of if options.test_baselines else {})
        scores = SplitScores(math.nan, {}, {}) if stopped else \
            _test_scores(ctx, study, nfe, best, tested, (of, variant))
        per_nfe[nfe] = NFEResult(best=best.schedule, best_value=best.value, test_value=scores.searched,
                                 baselines=scores.baselines,
                                 evaluations=sum(1 for e in ledger.done.values() if e.nfe == nfe),
                                 validation_value=validation, test_extras=scores.extras, winner_source=best.source,
                                 winner_label=best.label,
                                 baseline_grids={n: grids[n] for n in scores.baselines if n in grids},
                                 structural_of=best_of[of].label if of and not stopped else "",
                                 structural_label=variant.label if variant is not None and not stopped else "",
                                 structural_value=scores.structural, model_calls=ctx.calls(nfe),
                                 low_evaluations=len(low.at(nfe)) if low is not None else 0)
    if not per_nfe:
        raise SearchFailed("no schedule was evaluated successfully; see the trials' error attributes")
    first = per_nfe.get(config.nfe[0]) or next(iter(per_nfe.values()))
    ctx.report("stopped" if stopped else "done", done=not stopped)
    return MultiNFEResult(best=first.best, best_value=first.best_value, test_value=first.test_value,
                          baselines=first.baselines, evaluations=ledger.count, per_nfe=per_nfe, stopped=stopped,
                          validation_value=first.validation_value, test_extras=first.test_extras,
                          winner_source=first.winner_source, winner_label=first.winner_label,
                          baseline_grids=first.baseline_grids, structural_of=first.structural_of,
                          structural_label=first.structural_label, structural_value=first.structural_value,
                          model_calls=ctx.calls(), low_evaluations=len(low.done) if low is not None else 0)

