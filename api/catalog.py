"""What a job may name: models, baselines, metrics, predictors. Each comes from its owning module, looked up
lazily so the service starts even when an optional part is not installed."""

from __future__ import annotations

import importlib
import time
from typing import Optional

__all__ = ["model_names", "baseline_names", "metric_names", "predictor_names", "clear_cache"]


_TTL_S = 10.0
_cache: dict[str, tuple[float, Optional[list[str]]]] = {}


def _names(module: str) -> Optional[list[str]]:
    """Names from `module.names()`, remembered for a few seconds: a submission checks four lists, and the
    model registry re-reads its file each time."""
    hit = _cache.get(module)
    now = time.monotonic()
    if hit is not None and now - hit[0] < _TTL_S:
        return hit[1]
    names = _load_names(module)
    _cache[module] = (now, names)
    return names


def clear_cache() -> None:
    _cache.clear()


def _load_names(module: str) -> Optional[list[str]]:
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):
            return None      # that part of the project is not there
        raise
    return sorted(mod.names())


def model_names() -> list[str]:
    return _names("s3search.models.registry") or []


def baseline_names() -> list[str]:
    return _names("s3search.baselines") or []


def metric_names() -> Optional[list[str]]:
    return _names("s3search.metrics")


def predictor_names() -> Optional[list[str]]:
    return _names("predictors")
