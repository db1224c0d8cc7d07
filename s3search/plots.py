"""Plots of search results: metric against NFE, best-so-far against true evaluations, and sample grids.

They read the results format documented in docs/exports.md (one or more JSON files with "runs" and
"baselines"), so anything that writes that format — the search benchmark, a script over an Optuna study — can be
plotted with `s3search plots --results DIR --out DIR`. Lower metric values are better throughout.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

__all__ = ["Run", "Structural", "BaselineEntry", "Results", "load_results", "parse_results", "merge_documents",
           "read_documents",
           "best_so_far",
           "plot_metric_vs_nfe", "plot_best_so_far", "plot_sample_grid", "make_all"]


@dataclass(frozen=True)
class Structural:
    """The best structural variant of a search's best baseline, on the test split (label "": none evaluated)."""

    baseline: str
    label: str = ""
    first_step: str = ""
    final: str = ""
    value: float = math.inf


@dataclass(frozen=True)
class Run:
    method: str
    nfe: int
    value: float
    schedule: Optional[dict[str, Any]] = None
    history: tuple[float, ...] = ()          # metric of every true evaluation, in the order they were made
    source: str = ""                         # the trial source of the winner (baseline, variant, s3, ...)
    label: str = ""                          # the winner's baseline label when it is a baseline or variant
    structural: Optional[Structural] = None


@dataclass(frozen=True)
class BaselineEntry:
    name: str
    nfe: int
    value: float
    schedule: Optional[dict[str, Any]] = None
    grid: str = ""                           # the grid it was scored on, when the name does not say


@dataclass
class Results:
    model: str = ""
    metric: str = ""
    study: str = ""
    seed: Optional[int] = None               # of one search's document; None once several are merged
    runs: list[Run] = field(default_factory=list)
    baselines: list[BaselineEntry] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)   # documents left out: another model or metric


def _number(value: Any, path: str, *, allow_inf: bool = True) -> float:
    if value is None:
        return math.inf  # a failed evaluation
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{path}={value!r} must be a number")
    if math.isnan(value) or (not allow_inf and math.isinf(value)):
        raise ValueError(f"{path}={value!r} must be a finite number")
    return float(value)


def _nfe(value: Any, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{path}={value!r} must be a positive integer")
    return value


def _schedule_doc(value: Any, path: str) -> Optional[dict[str, Any]]:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"{path} is not valid JSON") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} must be a schedule object")
    return value


def _history(value: Any, path: str) -> tuple[float, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ValueError(f"{path} must be a list")
    out = []
    for i, item in enumerate(value):
        # Either bare values or {"value": ...} records (with optional extra keys such as "evaluation").
        v = item.get("value") if isinstance(item, dict) else item
        out.append(_number(v, f"{path}[{i}].value" if isinstance(item, dict) else f"{path}[{i}]"))
    return tuple(out)


def _structural(value: Any, path: str) -> Optional[Structural]:
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("baseline"), str):
        raise ValueError(f"{path} must be an object with a baseline")
    return Structural(baseline=value["baseline"], label=str(value.get("label") or ""),
                      first_step=str(value.get("first_step") or ""), final=str(value.get("final") or ""),
                      value=_number(value.get("value"), f"{path}.value"))


def parse_results(doc: Any, source: str = "results") -> Results:
    """Validate one results document (see docs/exports.md); ValueError names the bad field."""
    if not isinstance(doc, dict):
        raise ValueError(f"{source} must be a JSON object")
    runs_doc, base_doc = doc.get("runs", []), doc.get("baselines", [])
    if not isinstance(runs_doc, list) or not isinstance(base_doc, list):
        raise ValueError(f"{source}: runs and baselines must be lists")
    seed = doc.get("seed")
    res = Results(model=str(doc.get("model", "")), metric=str(doc.get("metric", "")),
                  study=str(doc.get("study") or ""), seed=seed if isinstance(seed, int) else None)
    for i, r in enumerate(runs_doc):
        path = f"{source}.runs[{i}]"
        if not isinstance(r, dict):
            raise ValueError(f"{path} must be an object")
        res.runs.append(Run(method=str(r.get("method", "s3")), nfe=_nfe(r.get("nfe"), f"{path}.nfe"),
                            value=_number(r.get("value"), f"{path}.value"),
                            schedule=_schedule_doc(r.get("schedule"), f"{path}.schedule"),
                            history=_history(r.get("history"), f"{path}.history"),
                            source=str(r.get("source") or ""), label=str(r.get("label") or ""),
                            structural=_structural(r.get("structural"), f"{path}.structural")))
    for i, b in enumerate(base_doc):
        path = f"{source}.baselines[{i}]"
        if not isinstance(b, dict) or not isinstance(b.get("name"), str):
            raise ValueError(f"{path} must be an object with a name")
        res.baselines.append(BaselineEntry(name=b["name"], nfe=_nfe(b.get("nfe"), f"{path}.nfe"),
                                           value=_number(b.get("value"), f"{path}.value"),
                                           schedule=_schedule_doc(b.get("schedule"), f"{path}.schedule"),
                                           grid=str(b.get("grid") or "")))
    return res


def _from_search_bench(doc: dict[str, Any], source: str) -> dict[str, Any]:
    """bench/search_bench.py's files in this module's format.

    quality (search_quality_<model>.json): runs = {"<nfe>": {test_value, schedule, curve (best so far),
    baselines_test: {"<name>@<grid>": value}}}; efficiency (search_efficiency_<model>_nfe<N>.json): curves =
    {method: {curve, test_value}} for unseeded searches, labelled "<method> (unseeded)".
    """
    out: dict[str, Any] = {"model": doc.get("model", ""), "metric": doc.get("metric", ""), "runs": [],
                           "baselines": []}
    if isinstance(doc.get("runs"), dict):
        for key, r in doc["runs"].items():
            if not isinstance(r, dict):
                raise ValueError(f"{source}.runs[{key!r}] must be an object")
            nfe = r.get("nfe", int(key) if str(key).isdigit() else key)
            out["runs"].append({"method": "s3", "nfe": nfe, "value": r.get("test_value"),
                                "schedule": r.get("schedule"), "history": r.get("curve")})
            for name, value in (r.get("baselines_test") or {}).items():
                out["baselines"].append({"name": name, "nfe": nfe, "value": value})
    if isinstance(doc.get("curves"), dict):
        for method, c in doc["curves"].items():
            if not isinstance(c, dict):
                raise ValueError(f"{source}.curves[{method!r}] must be an object")
            out["runs"].append({"method": f"{method} (unseeded)", "nfe": doc.get("nfe"), "value": c.get("test_value"),
                                "history": c.get("curve")})
    return out


def _document(doc: Any, source: str) -> Optional[dict[str, Any]]:
    """The document in this module's format, or None for another kind of JSON file (a summary, a config)."""
    if not isinstance(doc, dict) or not ({"runs", "baselines", "curves"} & set(doc)):
        return None
    if isinstance(doc.get("runs"), dict) or "curves" in doc:
        return _from_search_bench(doc, source)
    return doc


def merge_documents(docs: Sequence[tuple[str, Any]], model: Optional[str] = None) -> Results:
    """Results documents (source name, parsed JSON) merged into one Results for one model and metric.

    The model is `model`, else the first document's; documents of another model or metric are skipped and
    listed in `Results.skipped`, since one folder often holds several searches. ValueError names a bad field.
    """
    merged = Results(model=model or "")
    for source, raw in docs:
        doc = _document(raw, source)
        if doc is None:
            continue
        part = parse_results(doc, source)
        if merged.model and part.model and part.model != merged.model:
            merged.skipped.append(f"{source}: model {part.model!r}, not {merged.model!r}")
            continue
        if merged.metric and part.metric and part.metric != merged.metric:
            merged.skipped.append(f"{source}: metric {part.metric!r}, not {merged.metric!r}")
            continue
        # A merged document stands for one search only while it holds one.
        merged.study, merged.seed = (part.study, part.seed) if not merged.runs and not merged.baselines else ("", None)
        merged.model, merged.metric = merged.model or part.model, merged.metric or part.metric
        merged.runs.extend(part.runs)
        merged.baselines.extend(part.baselines)
    return merged


def read_documents(path: str | Path) -> list[tuple[str, Any]]:
    """(file name, parsed JSON) of one results file, or of every *.json file in a folder."""
    p = Path(path)
    files = sorted(p.glob("*.json")) if p.is_dir() else [p]
    if not files or not all(f.is_file() for f in files):
        raise ValueError(f"results={str(p)!r}: no results JSON file found")
    out = []
    for f in files:
        try:
            out.append((f.name, json.loads(f.read_text())))
        except UnicodeDecodeError:
            raise ValueError(f"{f.name} is not a JSON text file (an s3search.db? pass it as --results "
                             f"FILE.db or a storage URL)") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{f.name} is not valid JSON: {e}") from None
    return out


def load_results(path: str | Path, model: Optional[str] = None) -> Results:
    """One results file, or every *.json results file in a folder, merged (see merge_documents)."""
    merged = merge_documents(read_documents(path), model)
    if not merged.runs and not merged.baselines:
        skipped = f" ({len(merged.skipped)} of other models or metrics skipped)" if merged.skipped else ""
        raise ValueError(f"results={str(path)!r}: no runs or baselines found{skipped}")
    return merged


def best_so_far(history: Sequence[float]) -> list[float]:
    """Running minimum; failed evaluations (inf) never improve it."""
    out, best = [], math.inf
    for v in history:
        best = min(best, v)
        out.append(best)
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def _label(res: Results) -> str:
    return res.metric or "metric"


def plot_metric_vs_nfe(res: Results, out: str | Path) -> Path:
    """One line per search method (best value per NFE) and per baseline."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    series: dict[tuple[str, str], dict[int, float]] = {}
    for r in res.runs:
        d = series.setdefault(("searched", r.method), {})
        d[r.nfe] = min(d.get(r.nfe, math.inf), r.value)
    for b in res.baselines:
        d = series.setdefault(("baseline", b.name), {})
        d[b.nfe] = min(d.get(b.nfe, math.inf), b.value)
    positive = all(v > 0 for d in series.values() for v in d.values() if math.isfinite(v))
    for (kind, name), d in sorted(series.items()):
        xs = sorted(n for n in d if math.isfinite(d[n]))
        if not xs:
            continue
        style = dict(marker="o", linewidth=2.2, zorder=3) if kind == "searched" else \
            dict(marker=".", linewidth=1.0, linestyle="--", alpha=0.8)
        ax.plot(xs, [d[n] for n in xs], label=f"{name} (searched)" if kind == "searched" else name, **style)
    if positive:
        ax.set_yscale("log")
    ax.set_xlabel("NFE")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(f"{_label(res)} (lower is better)")
    ax.set_title(f"{res.model or 'model'}: {_label(res)} against NFE")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, out)


def plot_best_so_far(res: Results, out: str | Path) -> Path:
    """Best-so-far against true evaluations, per run, with the best baseline of the same NFE as a dotted line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    runs = [r for r in res.runs if r.history]
    if not runs:
        raise ValueError("no run has a history of evaluations to plot")
    best_base: dict[int, float] = {}
    for b in res.baselines:
        best_base[b.nfe] = min(best_base.get(b.nfe, math.inf), b.value)
    for r in runs:
        curve = best_so_far(r.history)
        xs = [i + 1 for i, v in enumerate(curve) if math.isfinite(v)]
        (line,) = ax.plot(xs, [curve[i - 1] for i in xs], drawstyle="steps-post", label=f"{r.method}, NFE {r.nfe}")
        base = best_base.get(r.nfe)
        if base is not None and math.isfinite(base):
            ax.axhline(base, color=line.get_color(), linestyle=":", linewidth=1.0)
    values = [v for r in runs for v in r.history if math.isfinite(v)] + list(best_base.values())
    if values and min(values) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("true evaluations")
    ax.set_ylabel(f"best {_label(res)} so far")
    ax.set_title("search progress (dotted: best baseline at the same NFE)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, out)


DEFAULT_GRID = "logsnr"


def _row_label(entry: BaselineEntry) -> str:
    # A baseline without its grid in the name is drawn on DEFAULT_GRID: the label says so.
    return entry.name if entry.schedule is not None or "@" in entry.name else f"{entry.name}@{DEFAULT_GRID}"


def _baseline_schedule(entry: BaselineEntry, process: Optional[str]) -> Optional[dict[str, Any]]:
    """The entry's schedule, or the baseline rebuilt on the grid its "<name>@<grid>" label names (default range;
    DEFAULT_GRID when the label names none)."""
    if entry.schedule is not None or process is None:
        return entry.schedule
    from . import baselines

    name, _, grid = _row_label(entry).partition("@")
    try:
        sched = baselines.for_nfe(name, entry.nfe, process, grid=grid)
    except (ValueError, KeyError):
        return None
    return sched.to_dict() if sched.nfe == entry.nfe else None


def _grid_rows(res: Results, nfe: int, process: Optional[str] = None,
               max_baselines: int = 6) -> list[tuple[str, dict[str, Any]]]:
    rows = []
    best_run = min((r for r in res.runs if r.nfe == nfe and r.schedule), key=lambda r: r.value, default=None)
    if best_run is not None:
        rows.append((f"searched ({best_run.method})", best_run.schedule))
    for b in sorted((b for b in res.baselines if b.nfe == nfe), key=lambda b: b.value):
        doc = _baseline_schedule(b, process) if len(rows) < max_baselines + 1 else None
        if doc is not None:
            rows.append((_row_label(b), doc))
    return rows


def plot_sample_grid(res: Results, nfe: int, model: Any, out: str | Path, n: int = 8, seed: int = 0) -> Path:
    """Samples of the searched schedule and every baseline at `nfe`, from the same x_T (rows share seeds).

    `model` is a ModelSpec with an image shape (C, H, W); x_T = sigma(t_0) z with z from the "test" seeds of
    `seed`, as the evaluator draws it.
    """
    import torch

    from .evaluation.seeds import sample_seeds
    from .exports import load_schedule
    from .integrator import sample
    from .noise import generators_for, randn_rows

    if len(model.shape) != 3:
        raise ValueError(f"model shape {model.shape} is not an image (C, H, W); sample grids need an image model")
    rows = _grid_rows(res, nfe, model.process.name)
    if not rows:
        raise ValueError(f"no schedule at nfe={nfe} in the results")
    plt = _pyplot()
    seeds = sample_seeds(seed, "test", n)
    fig, axes = plt.subplots(len(rows), n, figsize=(0.9 * n + 1.6, 0.95 * len(rows) + 0.3), squeeze=False)
    samples = []
    for _, doc in rows:
        sched = load_schedule(doc)
        gens = generators_for(seeds)
        like = torch.empty((n,) + tuple(model.shape))
        x_T = model.process.sigma(sched.timesteps[0]) * randn_rows(like, gens)
        samples.append(sample(model.denoiser, x_T, sched, gens).detach().cpu().float())
    # One grey scale for every row, so a washed-out or over-contrasted sampler shows as such.
    everything = torch.cat([x.reshape(-1) for x in samples])
    lo, hi = (float(q) for q in torch.quantile(everything, torch.tensor([0.005, 0.995])))
    for i, ((label, _), x) in enumerate(zip(rows, samples)):
        for j in range(n):
            img = x[j].permute(1, 2, 0).squeeze(-1).clamp(lo, hi).numpy()
            ax = axes[i][j]
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=lo, vmax=hi, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[i][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    fig.suptitle(f"{res.model or 'model'} samples at NFE {nfe} (same noise in every column)", fontsize=9)
    return _save(fig, out)


def _save(fig: Any, out: str | Path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def make_all(results: str | Path | Results, out_dir: str | Path, n_samples: int = 8, seed: int = 0,
             model_loader: Optional[Callable[[str], Any]] = None,
             on_plot: Optional[Callable[[Path], None]] = None,
             on_note: Optional[Callable[[str], None]] = None) -> list[Path]:
    """Every plot the results allow: metric_vs_nfe.png, best_so_far.png, samples_nfe{N}.png (image models).
    `on_plot` hears of each file as it is written (sample grids run the model, which takes a while); `on_note`
    of a plot left out and why (default: a warning)."""
    res = results if isinstance(results, Results) else load_results(results)
    if not res.runs and not res.baselines:
        raise ValueError("the results hold no runs or baselines")
    out = Path(out_dir)
    paths: list[Path] = []

    def note(text: str) -> None:
        if on_note is not None:
            on_note(text)
        else:
            warnings.warn(text, stacklevel=3)

    def done(path: Path) -> None:
        paths.append(path)
        if on_plot is not None:
            on_plot(path)

    done(plot_metric_vs_nfe(res, out / "metric_vs_nfe.png"))
    if any(r.history for r in res.runs):
        done(plot_best_so_far(res, out / "best_so_far.png"))
    if res.model:
        if model_loader is None:
            from .models import registry

            model_loader = registry.get
        try:
            model = model_loader(res.model)
        except (KeyError, FileNotFoundError) as e:  # unknown model, or weights not built on this machine
            note(f"sample grids skipped: {e}")
            return paths
        if getattr(model, "conditional", False):
            note(f"sample grids skipped: {res.model} is a conditional model, and the grids draw unconditional "
                 f"samples")
        elif len(model.shape) == 3:
            for nfe in sorted({r.nfe for r in res.runs if r.schedule}):
                done(plot_sample_grid(res, nfe, model, out / f"samples_nfe{nfe}.png", n=n_samples, seed=seed))
    return paths
