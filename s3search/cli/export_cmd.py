"""`s3search export` (a local schedule file into a tool's format) and `s3search plots` (figures from results)."""

from __future__ import annotations

import functools
import inspect
import json
import typing
from pathlib import Path
from typing import Any, Callable, Optional

import typer

__all__ = ["register", "export_command", "plots_command", "betas_option", "with_betas"]


def emit(text: str, out: Optional[Path]) -> None:
    """Print `text`, or write it to `out` and say so on stderr (the export commands' one output rule)."""
    if out is None:
        typer.echo(text)
    else:
        out.write_text(text + "\n")
        typer.echo(f"wrote {out}", err=True)


def betas_option(value: Optional[str]) -> Any:
    """--betas: a name (linear, scaled_linear), or a scheduler_config.json, or a folder holding one (a scheduler
    folder, or a pipeline folder with scheduler/scheduler_config.json)."""
    from .. import exports

    if value is None or value in exports.BETAS:
        return value
    path = Path(value)
    candidates = [path] if path.is_file() else [path / "scheduler_config.json",
                                                 path / "scheduler" / "scheduler_config.json"]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise typer.BadParameter(f"{value!r} is neither {' nor '.join(exports.BETAS)} nor a scheduler_config.json "
                                 "(or a folder holding one, or a pipeline folder with scheduler/)",
                                 param_hint="--betas")
    try:
        config = json.loads(found.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise typer.BadParameter(f"cannot read {found}: {e}", param_hint="--betas") from None
    if not isinstance(config, dict):
        raise typer.BadParameter(f"{found} is not a JSON object", param_hint="--betas")
    return config


def export_command(
    schedule: Path = typer.Option(..., "--schedule", "-s", help="schedule JSON file (SolverSchedule or named)"),
    format: str = typer.Option("json", "--format", "-f", help="json | diffusers | k-diffusion | comfyui"),
    field: Optional[str] = typer.Option(None, "--field", help="print only this field, e.g. sigmas"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="write here instead of standard output"),
    betas: Optional[str] = typer.Option(None, "--betas",
                                        help="the model's betas for the diffusers timesteps: linear (DDPM), "
                                             "scaled_linear (Stable Diffusion), or a scheduler_config.json / "
                                             "a folder holding one / a pipeline folder"),
) -> None:
    """Export a local schedule file in a tool's conventions (grids, closest stock-sampler segments, notes)."""
    from .. import exports

    # The service CLI's `export FILE` calls this function directly, where an omitted option is typer's
    # OptionInfo rather than None.
    betas_value = betas_option(betas if isinstance(betas, str) else None)

    try:
        text = schedule.read_text()
    except OSError as e:
        raise typer.BadParameter(f"cannot read {schedule}: {e.strerror}", param_hint="--schedule") from None
    try:
        doc = exports.export(exports.load_schedule(text), format, betas=betas_value)
    except ValueError as e:
        hint = "--format" if str(e).startswith("format=") else "--betas" if str(e).startswith("betas") \
            else "--schedule"
        raise typer.BadParameter(str(e), param_hint=hint) from None
    if field is not None:
        if field not in doc:
            raise typer.BadParameter(f"field={field!r} is not in the {format} export; fields: {', '.join(doc)}",
                                     param_hint="--field")
        value = doc[field]
        result = value if isinstance(value, str) else json.dumps(value)
    else:
        result = json.dumps(doc, indent=2)
    emit(result, out)


def _storage_url(results: str) -> Optional[str]:
    """The Optuna storage `--results` names, or None for a results JSON file or folder."""
    if "://" in results:
        return results
    path = Path(results)
    if path.is_file():
        with path.open("rb") as f:
            if f.read(16) == b"SQLite format 3\x00":    # the CLI's s3search.db, whatever its name
                return f"sqlite:///{path.resolve()}"
    return None


def _study_documents(url: str, study: Optional[str]) -> list[tuple[str, Any]]:
    import optuna

    from ..search.results_doc import results_document, studies_with_results

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    finished = studies_with_results(url)
    if study is not None and study not in finished:
        known = optuna.get_all_study_names(url)
        why = "has no test-split results yet" if study in known else "does not exist"
        raise ValueError(f"--study {study!r} {why} in {url}; finished studies: {', '.join(finished) or 'none'}")
    names = [study] if study else finished
    if not names:
        raise ValueError(f"no study in {url} holds test-split results yet")
    return [(f"study {n!r}", results_document(optuna.load_study(study_name=n, storage=url))) for n in names]


def plots_command(
    results: str = typer.Option(..., "--results", "-r",
                                help="results JSON file or folder (docs/exports.md), an s3search.db file, or an "
                                     "Optuna storage URL"),
    out: Path = typer.Option(Path("plots"), "--out", "-o", help="folder for the PNG files"),
    study: Optional[str] = typer.Option(None, "--study", help="with a database: the study to plot (default: "
                                                              "every finished one of the model)"),
    model: Optional[str] = typer.Option(None, "--model", help="plot this model's results only (default: the "
                                                              "first one found; the others are skipped)"),
    n_samples: int = typer.Option(8, "--samples", min=1, max=64, help="samples per row of the sample grids"),
    seed: int = typer.Option(0, "--seed", help="base seed of the sample grids"),
    quiet: bool = typer.Option(False, "--quiet", help="print only the files written"),
) -> None:
    """Draw metric-vs-NFE, best-so-far and (image models) sample grids from search results."""
    from .. import plots

    def say(text: str) -> None:
        if not quiet:
            typer.echo(text, err=True)

    try:
        url = _storage_url(results)
        if url is not None:
            say(f"reading the studies in {url}")
            docs = _study_documents(url, study)
        elif study is not None:
            raise ValueError("--study applies to a database (an s3search.db file or a storage URL)")
        else:
            docs = plots.read_documents(results)
        merged = plots.merge_documents(docs, model)
        for line in merged.skipped:
            say(f"skipped {line}")
        if not merged.runs and not merged.baselines:
            raise ValueError(f"results={results!r}: no runs or baselines found"
                             + (f" for model {model!r}" if model else ""))
        say(f"plotting {merged.model or 'the results'} ({merged.metric or 'metric'}): {len(merged.runs)} runs, "
            f"{len(merged.baselines)} baseline scores")
        paths = plots.make_all(merged, out, n_samples=n_samples, seed=seed,
                               on_plot=lambda p: say(f"wrote {p}"), on_note=say)
    except (ValueError, KeyError) as e:
        raise typer.BadParameter(str(e).strip("'\""), param_hint="--results") from None
    for p in paths:
        typer.echo(str(p))


def _betas_parameter() -> inspect.Parameter:
    default = inspect.signature(export_command).parameters["betas"].default
    return inspect.Parameter("betas", inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Optional[str])


def with_betas(service_export: Callable[..., None]) -> Callable[..., None]:
    """The service area's `export` with --betas added: it hands `--schedule FILE` to export_command without it."""
    hints = typing.get_type_hints(service_export)
    params = [p.replace(annotation=hints.get(name, p.annotation), kind=inspect.Parameter.KEYWORD_ONLY)
              for name, p in inspect.signature(service_export).parameters.items()]

    @functools.wraps(service_export)
    def export(**kwargs: Any) -> None:
        betas = kwargs.pop("betas", None)
        if betas is None:
            return service_export(**kwargs)
        if kwargs.get("schedule") is None or kwargs.get("job_id") is not None:
            raise typer.BadParameter("--betas applies to a local schedule file (--schedule FILE)",
                                     param_hint="--betas")
        export_command(schedule=kwargs["schedule"], format=kwargs["format"], field=kwargs.get("field"),
                       out=kwargs.get("out"), betas=betas)

    del export.__wrapped__   # typer reads the signature below, not the wrapped function's
    export.__signature__ = inspect.Signature([*params, _betas_parameter()])  # type: ignore[attr-defined]
    return export


def register(app: typer.Typer) -> None:
    # The service area's `export` (a job's schedule from the API) hands `--schedule FILE` to export_command;
    # register ours only where that command is absent, and give that one our --betas.
    commands = {c.name or (c.callback.__name__.replace("_", "-") if c.callback else ""): c
                for c in app.registered_commands}
    if "export" not in commands:
        app.command("export")(export_command)
    elif commands["export"].callback is not None and \
            "betas" not in inspect.signature(commands["export"].callback).parameters:
        commands["export"].callback = with_betas(commands["export"].callback)
    app.command("plots")(plots_command)
