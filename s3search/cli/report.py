"""What `s3search search` prints at the end: the test-split table, the winner's origin and the notes a reader
needs to read the figures right (which split each number comes from, the gain the structural rules alone give,
a schedule that stops short of σ = 0); and what `s3search report` prints from results documents: the same for
one search, mean and spread over the seeds of several."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Sequence

if TYPE_CHECKING:
    from ..plots import Results

__all__ = ["format_table", "winner_name", "format_ratio", "winner_notes", "summary_line", "rules_text", "gain_line",
           "structural_line", "SearchView", "search_view", "Spread", "spread", "geomean", "check_comparable",
           "SeedRow", "seed_rows", "format_seed_table", "seed_notes", "seed_gain_line", "report_text"]

METHOD_TITLES = {"s3": "S3", "random": "random", "tpe": "TPE", "cmaes": "CMA-ES"}
EXTRA_TITLES = {"fid": "FID", "clip_score": "CLIP score"}


def format_ratio(value: float, best: float) -> str:
    """value / best as `0.302x`; below 0.01 in scientific notation, so a tiny ratio never reads `0.000x`."""
    if not (math.isfinite(value) and math.isfinite(best)) or best <= 0:
        return "-"
    ratio = value / best
    return f"{ratio:.3f}x" if ratio >= 0.01 else f"{ratio:.2e}x"


def winner_name(result: Any, method: str = "s3") -> str:
    """The table's name for the winner: the method that found it, or the baseline it is."""
    source = getattr(result, "winner_source", "") or ""
    label = getattr(result, "winner_label", "") or ""
    title = METHOD_TITLES.get(method, method)
    if source == "baseline":
        return f"winner = baseline {label}" if label else "winner = a baseline"
    if source == "variant":
        return f"winner = variant {label}" if label else "winner = a baseline variant"
    if source == "refine":
        return f"searched ({title}, grid refinement)"
    return f"searched ({title})"


def _baseline_of(label: str) -> str:
    return label.partition("@")[0]


def format_table(result: Any, nfe: int, method: str = "s3") -> str:
    """The winner vs every baseline on its best grid (named `baseline@grid`), test split, best first; with the
    other metrics the
    evaluations reported (FID and CLIP score of a text-to-image model) as extra columns."""
    searched = winner_name(result, method)
    extras = getattr(result, "test_extras", {}) or {}
    columns = sorted({k for row in extras.values() for k in row})
    rows = [(searched, result.test_value, extras.get("searched", {}), True)]
    grids = getattr(result, "baseline_grids", {}) or {}
    rows += [(f"{name}@{grids[name]}" if grids.get(name) else name, value, extras.get(name, {}), False)
             for name, value in result.baselines.items()]
    rows.sort(key=lambda r: r[1] if math.isfinite(r[1]) else math.inf)
    best_base = min((v for _, v, _, mine in rows if not mine and math.isfinite(v)), default=math.nan)
    width = max(24, max(len(r[0]) for r in rows) + 2)
    head = (f"{'sampler':<{width}}{'test':>14}{'vs best baseline':>18}"
            + "".join(f"{EXTRA_TITLES.get(c, c):>14}" for c in columns))
    higher = "; CLIP score: higher is better" if "clip_score" in columns else ""
    lines = [f"NFE {nfe} - test split (fresh seeds; lower is better{higher})", head]
    for name, value, row, _ in rows:
        lines.append(f"{name:<{width}}{value:>14.6g}{format_ratio(value, best_base):>18}"
                     + "".join(f"{row.get(c, math.nan):>14.6g}" for c in columns))
    return "\n".join(lines)


def summary_line(result: Any, nfe: int) -> str:
    """The winner's score on each split, labelled: the search split chose the candidates, the validation split
    the winner, and only the test split is an unbiased figure."""
    parts = [f"search split {result.best_value:.6g}"]
    if math.isfinite(getattr(result, "validation_value", math.nan)):
        parts.append(f"validation split {result.validation_value:.6g}")
    parts.append(f"test split {result.test_value:.6g}")
    return f"winner (NFE {nfe}): " + ", ".join(parts)


def winner_notes(result: Any) -> list[str]:
    """Lines a reader of the table needs: the gain split into structural rules and per-step choices, a baseline
    winner, and a schedule that ends without a final denoise."""
    gain = structural_line(result)
    notes = [gain] if gain else []
    source, label = getattr(result, "winner_source", ""), getattr(result, "winner_label", "")
    if source == "baseline":
        name = _baseline_of(label)
        notes.append(f"note: the winner is the baseline {label or name} itself: no searched schedule beat it on the "
                     f"validation split, so its row and the row of {name} (its best grid) may be the same schedule")
    elif source == "variant":
        base, _, rules = label.partition("+")
        first, _, final = rules.partition("/")
        notes.append(f"note: the winner is a structural variant of the baseline {base or 'it was seeded with'}: "
                     f"first step {first or '?'}, final rule {final or '?'}, with any evaluation that frees spent on "
                     f"another step")
    best = result.best
    if getattr(best, "final", "denoise") == "none":
        from .. import processes

        t_end = best.timesteps[-1]
        try:
            sigma = processes.get(best.process).sigma(t_end)
            level = f" (sigma = {sigma:.3g})"
        except (KeyError, ValueError, AttributeError):
            level = ""
        notes.append(f"note: the winner stops at its last time t = {t_end:.4g}{level} without a final denoising step "
                     f"(final: none): its samples are returned at that noise level")
    return notes


# ----- the structural gain line ------------------------------------------------------------------------------
def rules_text(first_step: str, final: str) -> str:
    """The structural rules of a variant in words, naming only those a conventional sampler does not use."""
    parts = []
    if first_step and first_step != "model":
        parts.append(f"{first_step} first step")
    if final == "none":
        parts.append("no final denoise")
    elif final and final != "denoise":
        parts.append(f"final {final}")
    return ", ".join(parts) or "model first step, final denoise"


def _step(a: float, b: float) -> str:
    return f"{a:.4g} -> {b:.4g} ({format_ratio(b, a)})"


def gain_line(baseline: str, base: float, rules: str, variant: float, winner: float, best_base: bool = True
              ) -> str:
    """Baseline -> its best structural variant -> the winner, all on the test split; variant nan: none was
    evaluated, so the gain is given whole. best_base False: a lesser baseline, the best that had variants."""
    which = "" if best_base else "; the best baseline with structural variants"
    head = f"gain over {baseline} (test{which}): "
    if not math.isfinite(variant):
        return head + f"{_step(base, winner)}; not split: no structural variant of {baseline} has a test score"
    return head + (f"structural rules ({rules}) {_step(base, variant)}; "
                   f"per-step choices and grid {_step(variant, winner)}")


def structural_line(result: Any) -> str | None:
    """The gain line of a search result (NFEResult or SearchView); None when the search did not measure it."""
    of = getattr(result, "structural_of", "") or ""
    base = (getattr(result, "baselines", {}) or {}).get(_baseline_of(of))
    if not of or base is None:
        return None
    label = getattr(result, "structural_label", "") or ""
    variant = getattr(result, "structural_value", math.nan) if label else math.nan
    best = min((v for v in result.baselines.values() if math.isfinite(v)), default=base)
    return gain_line(of, base, _rules_of(label), variant, result.test_value, best_base=base <= best)


def _rules_of(label: str) -> str:
    # A variant's label is `<baseline label>+<first step>/<final>` (s3.seed_variants).
    first, _, final = label.partition("+")[2].partition("/")
    return rules_text(first, final)


# ----- several searches (seeds) from their results documents -------------------------------------------------
@dataclass(frozen=True)
class SearchView:
    """One search's test-split figures at one NFE, read from its results document; format_table and
    structural_line read it as they read an NFEResult."""

    method: str
    test_value: float
    baselines: dict[str, float]
    baseline_grids: dict[str, str] = field(default_factory=dict)
    seed: Optional[int] = None
    winner_source: str = ""
    winner_label: str = ""
    structural_of: str = ""          # best baseline label, `name@grid`
    structural_label: str = ""
    structural_value: float = math.nan
    test_extras: dict[str, dict[str, float]] = field(default_factory=dict)


def _labelled(name: str, grid: str) -> str:
    return f"{name}@{grid}" if grid and "@" not in name else name


def search_view(res: "Results", nfe: int) -> Optional[SearchView]:
    """The view of one search's document at `nfe`; None when it holds no run at that NFE."""
    run = next((r for r in res.runs if r.nfe == nfe), None)
    if run is None:
        return None
    base = {b.name: b.value for b in res.baselines if b.nfe == nfe}
    grids = {b.name: b.grid for b in res.baselines if b.nfe == nfe and b.grid}
    st = run.structural
    return SearchView(method=run.method, test_value=run.value, baselines=base, baseline_grids=grids, seed=res.seed,
                      winner_source=run.source, winner_label=run.label,
                      structural_of=_labelled(st.baseline, grids.get(st.baseline, "")) if st else "",
                      structural_label=st.label if st else "",
                      structural_value=st.value if st and st.label else math.nan)


@dataclass(frozen=True)
class Spread:
    mean: float
    std: float       # sample standard deviation; 0 for one value
    lo: float
    hi: float
    n: int           # finite values summarised


def spread(values: Sequence[float]) -> Spread:
    """Mean, sample standard deviation and range of the finite values (a failed score is left out)."""
    xs = [v for v in values if math.isfinite(v)]
    if not xs:
        return Spread(math.nan, math.nan, math.nan, math.nan, 0)
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return Spread(mean, std, min(xs), max(xs), len(xs))


def geomean(values: Sequence[float]) -> float:
    """Geometric mean of the finite positive values: the summary of ratios (a 2x and a 0.5x average to 1x)."""
    xs = [v for v in values if math.isfinite(v) and v > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else math.nan


def check_comparable(searches: Sequence["Results"]) -> None:
    """ValueError unless every search has one model and one metric: a mean over seeds of different problems
    means nothing."""
    for what in ("model", "metric"):
        found = sorted({getattr(r, what) for r in searches})
        if len(found) > 1:
            named = ", ".join(f"{r.study or '?'}: {getattr(r, what)}" for r in searches)
            raise ValueError(f"the results mix {what}s {', '.join(map(repr, found))} ({named}); a summary over "
                             f"seeds needs one model and one metric: pass --model or --study, or one folder each")


@dataclass(frozen=True)
class SeedRow:
    name: str
    values: tuple[float, ...]        # test value per search (nan: the search has no such row)
    ratios: tuple[float, ...]        # value / that search's best baseline, per search
    searched: bool = False


def _best_baseline(view: SearchView) -> float:
    return min((v for v in view.baselines.values() if math.isfinite(v)), default=math.nan)


def _ratio(value: float, best: float) -> float:
    return value / best if math.isfinite(value) and math.isfinite(best) and best > 0 else math.nan


def _grids_label(name: str, views: Sequence[SearchView]) -> str:
    # Each search scores a baseline on the grid that was best for it on its search split: name them all.
    grids = sorted({v.baseline_grids.get(name, "") for v in views if name in v.baselines} - {""})
    return _labelled(name, "|".join(grids))


def seed_rows(views: Sequence[SearchView]) -> list[SeedRow]:
    """One row per search method and per baseline, with its value and ratio in each search; best mean first."""
    best = [_best_baseline(v) for v in views]
    rows = []
    for method in sorted({v.method for v in views}):
        vals = tuple(v.test_value if v.method == method else math.nan for v in views)
        rows.append(SeedRow(f"searched ({METHOD_TITLES.get(method, method)})", vals,
                            tuple(_ratio(x, b) for x, b in zip(vals, best)), True))
    for name in sorted({n for v in views for n in v.baselines}):
        vals = tuple(v.baselines.get(name, math.nan) for v in views)
        rows.append(SeedRow(_grids_label(name, views), vals, tuple(_ratio(x, b) for x, b in zip(vals, best))))
    return sorted(rows, key=lambda r: (m if math.isfinite(m := spread(r.values).mean) else math.inf, not r.searched))


def _seeds_text(views: Sequence[SearchView]) -> str:
    seeds = [str(v.seed) if v.seed is not None else "?" for v in views]
    return f"{len(views)} searches (seeds {', '.join(seeds)})"


def _ratio_text(ratios: Sequence[float]) -> str:
    r = spread(ratios)
    if r.n == 0:
        return "-"
    return f"{format_ratio(geomean(ratios), 1.0)} [{format_ratio(r.lo, 1.0)}-{format_ratio(r.hi, 1.0)}]"


def format_seed_table(views: Sequence[SearchView], nfe: int) -> str:
    """Per row the test value's mean ± sample std, its range and count, and the ratio to each search's best
    baseline (taken per search, then summarised by its geometric mean and range)."""
    rows = seed_rows(views)
    width = max(24, max(len(r.name) for r in rows) + 2)
    lines = [f"NFE {nfe} - test split, {_seeds_text(views)}; mean ± sample std, lower is better",
             f"{'sampler':<{width}}{'test mean ± std':>20}{'min-max':>20}{'n':>3}"
             f"{'vs best baseline: geomean [range]':>36}"]
    for r in rows:
        s = spread(r.values)
        lines.append(f"{r.name:<{width}}{f'{s.mean:.4g} ± {s.std:.3g}':>20}{f'{s.lo:.4g}-{s.hi:.4g}':>20}"
                     f"{s.n:>3}{_ratio_text(r.ratios):>36}")
    return "\n".join(lines)


def seed_notes(views: Sequence[SearchView]) -> list[str]:
    """The searches whose winner is a baseline or a variant of one: their `searched` figure is that schedule."""
    return [f"note: in the search with seed {v.seed if v.seed is not None else '?'} the winner is the "
            f"{'baseline' if v.winner_source == 'baseline' else 'baseline variant'} {v.winner_label or '?'}"
            for v in views if v.winner_source in ("baseline", "variant")]


def _is_best_baseline(view: SearchView) -> bool:
    return view.baselines[_baseline_of(view.structural_of)] <= _best_baseline(view)


def seed_gain_line(views: Sequence[SearchView]) -> Optional[str]:
    """The structural gain line over several searches: per search baseline -> variant and variant -> winner
    ratios, summarised; None when no search measured it."""
    measured = [v for v in views if v.structural_of and _baseline_of(v.structural_of) in v.baselines]
    if not measured:
        return None
    split = [v for v in measured if math.isfinite(v.structural_value)]
    structural = [_ratio(v.structural_value, v.baselines[_baseline_of(v.structural_of)]) for v in split]
    steps = [_ratio(v.test_value, v.structural_value) for v in split]
    named = ", ".join(sorted({v.structural_of for v in measured}))
    which = "" if all(_is_best_baseline(v) for v in measured) else "; the best baseline with structural variants"
    rules = "; ".join(sorted({_rules_of(v.structural_label) for v in split})) or "-"
    line = (f"gain over {named} (test{which}; geomean [range] of per-search ratios): structural rules ({rules}) "
            f"{_ratio_text(structural)}; per-step choices and grid {_ratio_text(steps)}")
    left = len(views) - len(split)
    return line + (f"; {left} of {len(views)} searches left out (no structural variant test-scored)" if left else "")


def report_text(searches: Sequence["Results"]) -> str:
    """The report of one or several searches of one model and metric: per NFE the single-search table, or with
    several searches the seed table; each followed by its gain line."""
    if not searches:
        raise ValueError("no search results to report")
    check_comparable(searches)
    first = searches[0]
    out = [f"{first.model or 'model'}, metric {first.metric or '?'}: {len(searches)} search"
           f"{'es' if len(searches) > 1 else ''}; every figure is on the test split (fresh seeds)"]
    for nfe in sorted({r.nfe for s in searches for r in s.runs}):
        views = [v for s in searches if (v := search_view(s, nfe)) is not None]
        gain = structural_line(views[0]) if len(views) == 1 else seed_gain_line(views)
        if len(views) == 1:
            out += ["", format_table(views[0], nfe, views[0].method)] + ([gain] if gain else [])
        else:
            out += ["", format_seed_table(views, nfe)] + ([gain] if gain else []) + seed_notes(views)
    return "\n".join(out)
