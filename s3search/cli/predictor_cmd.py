"""`s3search predictor save | list`: fit a predictor on finished studies and save it into a folder of saved
predictors (the folder a service names in S3S_PREDICTORS_DIR), and list that folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

__all__ = ["register"]


def save(
    study: list[str] = typer.Option(..., help="Study name whose (schedule, value) pairs train it; repeatable."),
    storage: str = typer.Option("sqlite:///s3search.db", help="Optuna storage URL of the studies."),
    name: str = typer.Option(..., help="The saved predictor's name (a folder name: letters, digits, _ and -)."),
    folder: Path = typer.Option(..., "--dir", help="The folder of saved predictors (S3S_PREDICTORS_DIR)."),
    predictor: Optional[str] = typer.Option(None, help="Predictor kind (default: the first study's own)."),
    seed: int = typer.Option(0, help="Seed of the fit."),
) -> None:
    """Fit a predictor on the studies' evaluated schedules (any NFE) and save it as DIR/NAME."""
    import optuna
    import re

    import predictors
    from predictors.warm_start import fit_from_studies

    if not re.fullmatch(predictors.SAVED_NAME_PATTERN, name):
        raise typer.BadParameter(f"--name {name!r} must match {predictors.SAVED_NAME_PATTERN}")
    kind = predictor
    if kind is None:
        try:
            kind = str(optuna.load_study(study_name=study[0], storage=storage).user_attrs.get("predictor")
                       or "lightgbm-rank")
        except KeyError:
            raise typer.BadParameter(f"--study {study[0]!r} does not exist in the storage") from None
    try:
        fitted = fit_from_studies(storage, study, kind, seed=seed)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    out = fitted.save(folder / name)
    typer.echo(json.dumps({"name": name, "path": str(out), "kind": kind, "pairs": fitted.n_train}))


def list_saved(folder: Path = typer.Option(..., "--dir", help="The folder of saved predictors.")) -> None:
    """The names of the predictors saved in DIR."""
    import predictors

    for n in predictors.saved_names(folder):
        typer.echo(n)


def register(app: typer.Typer) -> None:
    sub = typer.Typer(no_args_is_help=True, help="Save predictors fitted on studies; a warm start loads them.")
    sub.command("save")(save)
    sub.command("list")(list_saved)
    app.add_typer(sub, name="predictor")
