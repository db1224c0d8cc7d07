"""`s3search baselines`: every named baseline's metric per NFE for one model, as a table (or the list of baselines)."""

from __future__ import annotations

import json
import math
import sys
from typing import Callable, Optional

import typer

__all__ = ["register", "baseline_table", "parse_nfe"]


def parse_nfe(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"nfe={text!r} must be comma-separated integers, e.g. 4,6,8") from None
    if not values or any(v < 1 for v in values):
        raise ValueError(f"nfe={text!r} must list positive integers")
    return values


def baseline_table(model: str, nfe: list[int], grid: str = "logsnr", metric: Optional[str] = None,
                   n_samples: int = 1000, seed: int = 0, only: Optional[list[str]] = None,
                   evaluator=None, progress: Optional[Callable[[int, int], None]] = None,
                   chunk: int = 4) -> dict[str, dict[int, Optional[float]]]:
    """{baseline: {nfe: metric value, or None where the baseline cannot make exactly that many evaluations,
    or nan where its evaluation failed}}. `progress(done, total)` hears after every `chunk` evaluations."""
    from .. import baselines
    from ..evaluation.base import EvalRequest
    from ..evaluation.local import LocalEvaluator
    from ..models import registry

    spec = registry.get(model)
    names = only or baselines.names()
    for name in names:
        baselines.info(name)
    request = EvalRequest(model=model, metric=metric or spec.default_metric, n_samples=n_samples, seed=seed,
                          split="test")
    evaluator = evaluator or LocalEvaluator()
    table: dict[str, dict[int, Optional[float]]] = {name: {} for name in names}
    jobs = []
    for k in nfe:
        for name in names:
            try:
                jobs.append((name, k, baselines.for_nfe(name, k, spec.process.name, grid=grid)))
            except ValueError:
                table[name][k] = None
    for start in range(0, len(jobs), chunk):
        part = jobs[start:start + chunk]
        for (name, k, _), result in zip(part, evaluator.evaluate([s for _, _, s in part], request)):
            table[name][k] = result.value if result.ok else math.nan
        if progress is not None:
            progress(start + len(part), len(jobs))
    return table


class _progress_bar:
    """A tqdm bar on stderr fed by baseline_table's progress(done, total); nothing under --quiet."""

    def __init__(self, quiet: bool) -> None:
        self.quiet, self.bar = quiet, None

    def __enter__(self) -> "_progress_bar":
        return self

    def __call__(self, done: int, total: int) -> None:
        if self.quiet:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="baselines", unit="eval", file=sys.stderr, leave=False)
        self.bar.update(done - self.bar.n)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


def _format(table: dict[str, dict[int, Optional[float]]], nfe: list[int]) -> str:
    width = max(len(n) for n in table) if table else 8
    lines = [f"{'baseline':<{width}}  " + "  ".join(f"{'NFE ' + str(k):>10}" for k in nfe)]
    for name, row in table.items():
        cells = []
        for k in nfe:
            v = row.get(k)
            cells.append(f"{'-':>10}" if v is None else f"{'failed':>10}" if math.isnan(v) else f"{v:>10.4g}")
        lines.append(f"{name:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


def register(app: typer.Typer) -> None:
    @app.command("baselines")
    def baselines_command(
        model: Optional[str] = typer.Option(None, "--model", help="model registry name, e.g. gmm-8x8"),
        nfe: str = typer.Option("4,6,8,10", "--nfe", help="comma-separated NFE budgets"),
        grid: str = typer.Option("logsnr", "--grid", help="timestep grid: logsnr, edm, time-uniform, ..."),
        metric: Optional[str] = typer.Option(None, "--metric", help="metric name (default: the model's)"),
        n_samples: int = typer.Option(1000, "--n-samples", help="samples per evaluation"),
        seed: int = typer.Option(0, "--seed"),
        only: Optional[str] = typer.Option(None, "--only", help="comma-separated baseline names"),
        as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
        list_only: bool = typer.Option(False, "--list", help="list the baselines and exit"),
        quiet: bool = typer.Option(False, "--quiet", help="no progress bar on stderr"),
    ) -> None:
        """Print every baseline's metric per NFE for a model (blank where a baseline cannot hit that NFE)."""
        from .. import baselines

        if list_only:
            entries = baselines.describe()
            if as_json:
                typer.echo(json.dumps(entries, indent=2))
            else:
                for e in entries:
                    typer.echo(f"{e['name']:<20} [{e['kind']}] {e['description']} -- {e['paper']}")
            return
        if model is None:
            raise typer.BadParameter("--model is required (or use --list)")
        try:
            budgets = parse_nfe(nfe)
            names = [n.strip() for n in only.split(",")] if only else None
            with _progress_bar(quiet) as bar:
                table = baseline_table(model, budgets, grid, metric, n_samples, seed, names,
                                       progress=bar)
        except (ValueError, KeyError) as e:
            raise typer.BadParameter(str(e)) from None
        if as_json:
            typer.echo(json.dumps({n: {str(k): v for k, v in row.items()} for n, row in table.items()}))
        else:
            typer.echo(_format(table, budgets))
