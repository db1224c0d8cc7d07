"""`s3search search`: run a search on the embedded defaults (SQLite file, local evaluation) and print the best
schedule against every baseline on the test split. Rerunning with the same --study-name resumes the study."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from ..search.config import SearchConfig, field_default
from .report import format_table, summary_line, winner_notes

__all__ = ["register", "search", "format_table", "with_budget_options", "calls_line"]  # format_table: from .report


def _parse_nfe(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        raise typer.BadParameter(f"--nfe={text!r} must be an integer or a comma-separated list of integers")
    if not values or any(v < 1 for v in values):
        raise typer.BadParameter(f"--nfe={text!r} must hold positive integers")
    return values


def search(
    model: str = typer.Option(..., help="Model registry name, e.g. digits, gmm-64d."),
    nfe: str = typer.Option("5", help="NFE, or several separated by commas (the budget is split)."),
    budget: int = typer.Option(field_default("budget"), help="True evaluations in total (baselines included)."),
    budget_calls: Optional[int] = typer.Option(None, "--budget-calls",
                                               help="Budget in model calls (samples x NFE over every search "
                                                    "evaluation, low and full fidelity) instead of --budget "
                                                    "(options.budget_calls)."),
    low_samples: Optional[int] = typer.Option(None, "--low-samples",
                                              help="Multi-fidelity: score candidates on this many samples first "
                                                   "and evaluate only the best share in full "
                                                   "(options.fidelity.low_samples; docs/search.md)."),
    metric: Optional[str] = typer.Option(None, help="Metric name (default: the model's default metric)."),
    method: str = typer.Option(field_default("method"), help="s3 | random | tpe | cmaes"),
    predictor: str = typer.Option(field_default("predictor"), help="Predictor for method s3 (see predictors.names())."),
    seed: int = typer.Option(field_default("seed"), help="Seed of the search and of the search-split samples."),
    n_samples: int = typer.Option(field_default("n_samples"), help="Samples per search evaluation."),
    n_test_samples: int = typer.Option(field_default("n_test_samples"),
                                       help="Samples for the final test evaluation (fresh seeds)."),
    storage: str = typer.Option("sqlite:///s3search.db", help="Optuna storage URL (the study lives here)."),
    study_name: Optional[str] = typer.Option(None, help="Study name; an existing study is resumed."),
    prompt_set: Optional[str] = typer.Option(None, help="Text-to-image models: one of the model's prompt sets "
                                                        "(default: its first)."),
    guidance_scale: Optional[float] = typer.Option(None, help="Text-to-image models: classifier-free guidance "
                                                              "scale (default: the model's)."),
    options: str = typer.Option("{}", help="JSON object of search options (see docs/search.md; bad ones are "
                                           "refused naming the option)."),
    out: Optional[Path] = typer.Option(None, help="Write the best schedule JSON here."),
    results: Optional[Path] = typer.Option(None, help="Write the results file `s3search plots` reads here "
                                                      "(default: results/<study name>.json beside a SQLite "
                                                      "storage file, else in the current folder)."),
    quiet: bool = typer.Option(False, help="Print only the final table: no progress on stderr."),
) -> None:
    """Search a solver schedule for MODEL at NFE and compare it with every baseline."""
    import optuna

    from ..models import registry
    from ..search.config import ConfigError, Progress, SearchFailed
    from ..search.run import preflight, run_search

    nfes = _parse_nfe(nfe)
    try:
        opts = json.loads(options)
    except json.JSONDecodeError as e:
        raise typer.BadParameter(f"--options is not valid JSON: {e}")
    if not isinstance(opts, dict):
        raise typer.BadParameter("--options must be a JSON object")
    opts = with_budget_options(opts, budget_calls, low_samples)
    try:
        registry.get(model)
    except KeyError as e:
        raise typer.BadParameter(str(e))
    try:
        config = preflight(SearchConfig.from_dict(
            {"model": model, "nfe": list(nfes), "metric": metric, "n_samples": n_samples,
             "n_test_samples": n_test_samples, "budget": budget, "method": method, "predictor": predictor,
             "seed": seed, "options": opts, "prompt_set": prompt_set, "guidance_scale": guidance_scale}))
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    metric = config.metric
    name = study_name or f"{model}-nfe{'_'.join(map(str, nfes))}-{method}-{metric}-seed{seed}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=name, storage=storage, direction="minimize", load_if_exists=True)
    start = time.perf_counter()

    def progress(p: Progress) -> None:
        if quiet:
            return
        tau = f"  tau={p.predictor_tau:.2f}" if p.predictor_tau is not None else ""
        typer.echo(f"[{time.perf_counter() - start:7.1f}s] {100 * p.fraction:3.0f}% {p.evaluations:4d}/{p.budget} "
                   f"best(search split)={p.best_value:.6g}{tau}  {p.message}", err=True)

    from ..search.study_note import publish_study_note

    title = f"s3search study `{name}`"
    publish_study_note(study, config, None, title=title)   # optuna-dashboard shows what runs while it runs
    try:
        result = run_search(config, study, progress=progress)
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    except SearchFailed as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)
    if not result.stopped:
        publish_study_note(study, config, result, title=title)
    per_nfe = getattr(result, "per_nfe", None) or {nfes[0]: result}
    typer.echo(f"study {name!r} in {storage}: {result.evaluations} evaluations, metric {metric}")
    for n, r in sorted(per_nfe.items()):
        typer.echo("")
        typer.echo(format_table(r, n, method))
        typer.echo(summary_line(r, n))
        for note in winner_notes(r):
            typer.echo(note)
        line = calls_line(r, n)
        if line:
            typer.echo(line)
        typer.echo(f"best schedule (NFE {n}): {r.best.to_json()}")
    _write_results(study, results if results is not None else default_results_path(storage, name))
    if out is not None:
        out.write_text(json.dumps({str(n): json.loads(r.best.to_json()) for n, r in per_nfe.items()}, indent=1)
                       if len(per_nfe) > 1 else result.best.to_json(indent=1))
        typer.echo(f"wrote {out}")
    sys.stdout.flush()


def with_budget_options(opts: dict, budget_calls: Optional[int], low_samples: Optional[int]) -> dict:
    """--options with --budget-calls and --low-samples put in (a fidelity object of --options keeps its other
    fields)."""
    out = dict(opts)
    if budget_calls is not None:
        out["budget_calls"] = budget_calls
    if low_samples is not None:
        fidelity = out.get("fidelity")
        out["fidelity"] = {**(fidelity if isinstance(fidelity, dict) else {}), "low_samples": low_samples}
    return out


def calls_line(result, nfe: int) -> str:
    """The model calls an NFE's search spent (and its low-fidelity scores); '' for a result without them."""
    calls = getattr(result, "model_calls", 0)
    if not calls:
        return ""
    low = getattr(result, "low_evaluations", 0)
    text = f"model calls (NFE {nfe}, search split): {calls:,} in {result.evaluations} full evaluations"
    return text + (f" and {low} low-fidelity scores" if low else "")


def default_results_path(storage: str, study_name: str) -> Path:
    """results/<study>.json beside the SQLite file the study lives in (the current folder for other storage)."""
    folder = Path(".")
    if storage.startswith("sqlite:///") and storage != "sqlite:///:memory:":
        folder = Path(storage[len("sqlite:///"):]).parent
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in study_name)
    return folder / "results" / f"{safe}.json"


def _write_results(study, path: Path) -> None:
    """The study as the results file `s3search plots` reads; a stopped search (no test scores) writes none."""
    from ..search.results_doc import has_results, results_document

    if not has_results(study.user_attrs):
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results_document(study), indent=1))
    typer.echo(f"wrote {path} (plot it: s3search plots --results {path})")


def register(app: typer.Typer) -> None:
    app.command("search")(search)
