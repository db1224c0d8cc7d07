"""The model registry: built-in test beds from provider modules plus models named in a server registry file.

Providers expose `builtin_models() -> dict[str, Callable[[], ModelSpec]]`; a missing provider module (one not
written yet) is skipped. The file named by $S3SEARCH_MODEL_REGISTRY is read by `s3search.models.local`, never
from a request. Models are built on first use and cached.

`metric_error(model, metric)` says before any sampling whether a metric can be computed for a model.
"""

from __future__ import annotations

import importlib
import os
from typing import Callable, Optional

from .base import ModelSpec

__all__ = ["UnknownModelError", "names", "get", "factories", "clear_cache", "metric_error", "ENV_REGISTRY"]

ENV_REGISTRY = "S3SEARCH_MODEL_REGISTRY"
_PROVIDERS = ("s3search.models.mixtures", "s3search.models.digits", "s3search.models.digits_t2i")

_SPECS: dict[tuple[str, str], ModelSpec] = {}


class UnknownModelError(KeyError):
    """A model name that no provider and no registry file defines."""

    def __init__(self, name: str, known: list[str]):
        super().__init__(name)
        self.name = name
        self.known = known

    def __str__(self) -> str:
        return f"model={self.name!r} is unknown; known models: {', '.join(self.known) or '(none)'}"


def _provider_models() -> dict[str, Callable[[], ModelSpec]]:
    out: dict[str, Callable[[], ModelSpec]] = {}
    for module_name in _PROVIDERS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:  # the provider exists but one of its own imports is missing
                raise
            continue
        out.update(module.builtin_models())
    return out


def _file_models() -> dict[str, Callable[[], ModelSpec]]:
    path = os.environ.get(ENV_REGISTRY, "").strip()
    if not path:
        return {}
    local = importlib.import_module("s3search.models.local")
    return dict(local.load_registry_file(path))


def factories() -> dict[str, Callable[[], ModelSpec]]:
    """Every known name and its factory; registry-file entries override built-ins of the same name."""
    return {**_provider_models(), **_file_models()}


def names() -> list[str]:
    return sorted(factories())


def get(name: str) -> ModelSpec:
    """The model registered under `name`, built once per (name, registry file)."""
    key = (name, os.environ.get(ENV_REGISTRY, ""))
    if key not in _SPECS:
        table = factories()
        if name not in table:
            raise UnknownModelError(name, sorted(table))
        _SPECS[key] = table[name]()
    return _SPECS[key]


def clear_cache() -> None:
    _SPECS.clear()


def metric_error(model_name: str, metric: str) -> Optional[str]:
    """Why `metric` cannot be computed for the model `model_name`, or None when it can.

    Builds the model (once, as `get` does; what `get` raises for a model that cannot be built propagates) but
    samples nothing: it checks what the metric needs (an exact density, a feature network, Inception features
    and their weights file, reference samples; for a text-to-image model, reference statistics for fid and a
    CLIP folder for clip-score) against what the model has. The message names the metrics the model can compute.
    """
    from .. import metrics  # here, not at the top: metrics imports the models package

    try:
        wanted = metrics.get(metric)
    except metrics.UnknownMetricError as e:
        return str(e)
    try:
        spec = get(model_name)
    except UnknownModelError as e:
        return str(e)
    problem = wanted.model_problem(spec)
    if problem is None:
        return None
    able = [name for name in metrics.names() if metrics.get(name).model_problem(spec) is None]
    return f"{problem} (metrics it can compute: {', '.join(able) or 'none'})"

