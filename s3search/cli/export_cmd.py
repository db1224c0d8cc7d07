"""`s3search export` (a local schedule file into a tool's format) and `s3search plots` (figures from results)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

__all__ = ["register", "export_command", "plots_command"]



def emit(text: str, out: Optional[Path]) -> None:
    """Print `text`, or write it to `out` and say so on stderr (the export commands' one output rule)."""
    if out is None:
        typer.echo(text)
    else:
        out.write_text(text + "\n")
        typer.echo(f"wrote {out}", err=True)

def export_command(
    schedule: Path = typer.Option(..., "--schedule", "-s", help="schedule JSON file (SolverSchedule or named)"),
    format: str = typer.Option("json", "--format", "-f", help="json | diffusers | k-diffusion | comfyui"),
    field: Optional[str] = typer.Option(None, "--field", help="print only this field, e.g. sigmas"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="write here instead of standard output"),
) -> None:
    """Export a local schedule file in a tool's conventions (grids, closest stock-sampler segments, notes)."""
    from .. import exports

    try:
        text = schedule.read_text()
    except OSError as e:
        raise typer.BadParameter(f"cannot read {schedule}: {e.strerror}", param_hint="--schedule") from None
    try:
        doc = exports.export(exports.load_schedule(text), format)
    except ValueError as e:
        hint = "--format" if str(e).startswith("format=") else "--schedule"
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


def plots_command(
    results: Path = typer.Option(..., "--results", "-r", help="results JSON file or folder (docs/exports.md)"),
    out: Path = typer.Option(Path("plots"), "--out", "-o", help="folder for the PNG files"),
    n_samples: int = typer.Option(8, "--samples", min=1, max=64, help="samples per row of the sample grids"),
    seed: int = typer.Option(0, "--seed", help="base seed of the sample grids"),
) -> None:
    """Draw metric-vs-NFE, best-so-far and (image models) sample grids from search results."""
    from .. import plots

    try:
        paths = plots.make_all(results, out, n_samples=n_samples, seed=seed)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--results") from None
    for p in paths:
        typer.echo(str(p))


def register(app: typer.Typer) -> None:
    # The service area's `export` (a job's schedule from the API) hands `--schedule FILE` to export_command;
    # register ours only where that command is absent.
    taken = {c.name or (c.callback.__name__.replace("_", "-") if c.callback else "") for c in app.registered_commands}
    if "export" not in taken:
        app.command("export")(export_command)
    app.command("plots")(plots_command)
