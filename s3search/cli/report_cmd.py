"""`s3search report`: the final table again from results documents; over several searches of one model and
metric (different seeds), each figure's mean, spread and range, and ratios to the best baseline per search."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import typer

__all__ = ["register", "report_command", "searches_of"]


def searches_of(docs: Sequence[tuple[str, Any]], model: Optional[str] = None) -> tuple[list[Any], list[str]]:
    """(one plots.Results per search document, the documents left out for another model)."""
    from .. import plots

    searches, skipped = [], []
    for doc in docs:
        res = plots.merge_documents([doc], model)
        skipped += res.skipped
        if res.runs:
            searches.append(res)
    return searches, skipped


def report_command(
    results: str = typer.Option(..., "--results", "-r",
                                help="results JSON file or folder (docs/exports.md), an s3search.db file, or an "
                                     "Optuna storage URL"),
    study: Optional[str] = typer.Option(None, "--study", help="with a database: the study to report (default: "
                                                              "every finished one)"),
    model: Optional[str] = typer.Option(None, "--model", help="report this model's searches only"),
) -> None:
    """Print the test-split table of one search, or mean ± std over the seeds of several."""
    from .. import plots
    from .export_cmd import _storage_url, _study_documents
    from .report import report_text

    try:
        url = _storage_url(results)
        if url is None and study is not None:
            raise ValueError("--study applies to a database (an s3search.db file or a storage URL)")
        docs = _study_documents(url, study) if url is not None else plots.read_documents(results)
        searches, skipped = searches_of(docs, model)
        for line in skipped:
            typer.echo(f"skipped {line}", err=True)
        if not searches:
            raise ValueError(f"results={results!r}: no search runs found" + (f" for model {model!r}" if model else ""))
        text = report_text(searches)
    except (ValueError, KeyError) as e:
        raise typer.BadParameter(str(e).strip("'\""), param_hint="--results") from None
    typer.echo(text)


def register(app: typer.Typer) -> None:
    app.command("report")(report_command)
