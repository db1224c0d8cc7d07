"""`s3search ays`: optimise an Align Your Steps grid for one model and NFE, and write it as JSON."""

from __future__ import annotations

import json
import sys
import time
from typing import Optional

import typer

__all__ = ["register", "make_grid"]


def make_grid(model: str, nfe: int, settings, t_start: Optional[float] = None, t_end: Optional[float] = None,
              quiet: bool = False) -> dict:
    """The grid document of `ays.grid_document`, plus the seconds it took; progress on stderr unless quiet."""
    from .. import ays
    from ..search import baselines_seed

    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 3:
        raise ValueError(f"nfe={nfe!r} must be an integer >= 3 (an AYS grid needs an interior point)")
    callback = None if quiet else ays.progress_printer(sys.stderr, every=max(1, settings.iterations // 10))
    start = time.perf_counter()
    result = baselines_seed.ays_result(model, nfe, t_start=t_start, t_end=t_end, settings=settings,
                                       callback=callback)
    doc = ays.grid_document(result, model, nfe, settings)
    doc["seconds"] = round(time.perf_counter() - start, 3)
    return doc


def register(app: typer.Typer) -> None:
    @app.command("ays")
    def ays_command(
        model: str = typer.Option(..., "--model", help="model registry name, e.g. gmm-64d"),
        nfe: int = typer.Option(..., "--nfe", help="evaluations of the sampler the grid is for (steps: nfe - 1)"),
        iterations: Optional[int] = typer.Option(None, "--iterations", help="coordinate updates (default 10: the early stop)"),
        n_samples: Optional[int] = typer.Option(None, "--n-samples", help="data samples per KLUB estimate"),
        sigma_floor: Optional[float] = typer.Option(None, "--sigma-floor",
                                                    help="VE sigma below which intervals cost nothing"),
        c: Optional[float] = typer.Option(None, "--c", help="scale of the importance density"),
        seed: int = typer.Option(0, "--seed"),
        t_start: Optional[float] = typer.Option(None, "--t-start", help="first (noisiest) time; default the process's"),
        t_end: Optional[float] = typer.Option(None, "--t-end", help="last time; default the process's"),
        out: Optional[str] = typer.Option(None, "--out", help="write the grid JSON here (default: stdout)"),
        quiet: bool = typer.Option(False, "--quiet", help="no progress on stderr"),
    ) -> None:
        """Optimise a timestep grid for MODEL by KLUB coordinate search (Align Your Steps) and write it as JSON."""
        from .. import ays

        given = {"iterations": iterations, "n_samples": n_samples, "sigma_floor": sigma_floor, "c": c}
        try:
            settings = ays.AYSSettings(seed=seed, **{k: v for k, v in given.items() if v is not None})
            doc = make_grid(model, nfe, settings, t_start, t_end, quiet)
        except (ValueError, KeyError) as e:
            raise typer.BadParameter(str(e)) from None
        text = json.dumps(doc, indent=2)
        if out:
            with open(out, "w", encoding="utf-8") as f:
                f.write(text + "\n")
            if not quiet:
                typer.echo(f"wrote {out}: {doc['steps']} steps, sigmas "
                           + ", ".join(f"{s:.4g}" for s in doc["sigmas"]), err=True)
        else:
            typer.echo(text)
