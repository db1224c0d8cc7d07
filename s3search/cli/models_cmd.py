"""`s3search models`: list the models a search can use, and check that registry-file models load and run."""

from __future__ import annotations

import json
import os
import time
from typing import Any, Optional

import typer

__all__ = ["register", "describe_models", "check_model"]


def describe_models() -> list[dict[str, Any]]:
    """Name and origin of every model; nothing is loaded."""
    from ..models import registry

    file_models: set[str] = set()
    path = os.environ.get(registry.ENV_REGISTRY, "").strip()
    if path:
        from ..models import local

        file_models = {entry.name for entry in local.parse_registry(path)}
    return [{"name": name, "source": "registry file" if name in file_models else "built-in"}
            for name in registry.names()]


def check_model(name: str, batch: int = 4) -> dict[str, Any]:
    """Build the model and call its denoiser (and decoder, feature network, CLIP model) once on a small batch;
    raises on failure."""
    import torch

    from ..models import registry

    start = time.perf_counter()
    spec = registry.get(name)
    proc = spec.process
    t_mid = proc.t_of_lambda(0.5 * (proc.lambda_(proc.t_min) + proc.lambda_(proc.t_max)))
    x = proc.sigma(t_mid) * torch.randn(batch, *spec.shape, generator=torch.Generator().manual_seed(0))
    out = spec.denoiser(x, t_mid)
    if tuple(out.shape) != tuple(x.shape) or not torch.isfinite(out).all():
        raise ValueError(f"model={name!r}: D(x, t) returned shape {tuple(out.shape)} "
                         f"(expected {tuple(x.shape)}) or non-finite values")
    report: dict[str, Any] = {"name": name, "process": proc.name, "shape": list(spec.shape),
                              "default_metric": spec.default_metric, "t_checked": t_mid,
                              "reference": spec.reference_sampler is not None}
    if spec.prompt_sets:
        report["prompt_sets"] = {n: len(ps.prompts) for n, ps in spec.prompt_sets.items()}
    # A latent model's features and CLIP see images: the decoded x0 estimates stand in for samples here.
    images = spec.decode(out[:2]) if spec.decode is not None else None
    if spec.features is not None:
        sample = out[:2] if images is None else images
        if images is None and spec.reference_sampler is not None:
            sample = spec.reference_sampler(2, torch.Generator().manual_seed(0))
        report["feature_dim"] = int(spec.features(sample).reshape(len(sample), -1).shape[1])
    if spec.image_reference is not None:
        ref = spec.image_reference
        report["reference_stats"] = {"path": str(ref.path), "kind": ref.kind, "shape": list(ref.shape)}
    if spec.clip is not None and images is not None:
        scores = spec.clip.row_scores(images, [spec.provenance.get("prompt", "")] * len(images))
        if not torch.isfinite(scores).all():
            raise ValueError(f"model={name!r}: the CLIP model {spec.clip.folder} gave non-finite scores")
        report["clip"] = str(spec.clip.folder)
    report["seconds"] = round(time.perf_counter() - start, 3)
    report["provenance"] = dict(spec.provenance)
    return report


def register(app: typer.Typer) -> None:
    models = typer.Typer(no_args_is_help=True, help="The models a search can use (built-in and registry file).")

    @models.command("list")
    def list_cmd(as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
        """List model names; registry-file models come from $S3SEARCH_MODEL_REGISTRY."""
        rows = describe_models()
        if as_json:
            typer.echo(json.dumps(rows, indent=2))
            return
        for row in rows:
            typer.echo(f"{row['name']:<24} {row['source']}")

    @models.command("check")
    def check_cmd(name: Optional[list[str]] = typer.Argument(None, help="models to check (default: all)"),
                  registry_file: Optional[str] = typer.Option(None, "--registry",
                                                              help="a registry file (else $S3SEARCH_MODEL_REGISTRY)"),
                  quiet: bool = typer.Option(False, "--quiet", help="no progress lines on stderr")
                  ) -> None:
        """Load each model, run its denoiser once at mid noise, and its decoder, features and CLIP where it has
        them."""
        from ..models import registry

        if registry_file:
            os.environ[registry.ENV_REGISTRY] = registry_file
        failed = 0
        models_to_check = list(name or registry.names())
        for i, model in enumerate(models_to_check, 1):
            if not quiet:   # loading a pipeline's weights can take a while: say which one is loading
                typer.echo(f"[{i}/{len(models_to_check)}] checking {model} ...", err=True)
            try:
                typer.echo(json.dumps(check_model(model)))
            except Exception as e:  # report every model, then fail
                failed += 1
                typer.echo(json.dumps({"name": model, "error": f"{type(e).__name__}: {e}"}), err=True)
        if failed:
            raise typer.Exit(code=1)

    app.add_typer(models, name="models")
