"""What a job may name: models, baselines, metrics, predictors. Each comes from its owning module, looked up
lazily so the service starts even when an optional part is not installed."""

from __future__ import annotations

import importlib
from typing import Optional

__all__ = ["model_names", "baseline_names", "metric_names", "predictor_names"]


def _names(module: str) -> Optional[list[str]]:
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
