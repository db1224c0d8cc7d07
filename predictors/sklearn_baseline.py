"""A scikit-learn ridge regression on standardised features: the simple baseline every predictor must beat.

Saved as JSON (scaler mean / scale, coefficients, intercept); a linear model needs nothing else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
from sklearn.linear_model import Ridge
from sklearn.preprocessing import StandardScaler

from s3search.schedule import SolverSchedule

from . import features
from .base import Predictor

__all__ = ["RidgePredictor"]


class RidgePredictor(Predictor):
    kind = "ridge"
    defaults: ClassVar[dict[str, Any]] = {"alpha": 100.0}   # 5-fold CV on a training half (docs/bench/predictors.md)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.mean: np.ndarray | None = None
        self.scale: np.ndarray | None = None
        self.coef: np.ndarray | None = None
        self.intercept = 0.0

    def _fit(self, schedules: Sequence[SolverSchedule], targets: np.ndarray, groups: np.ndarray) -> None:
        x = features.matrix(schedules, self.feature_spec)
        scaler = StandardScaler().fit(x)
        model = Ridge(alpha=float(self.params["alpha"])).fit(scaler.transform(x), targets)
        self.mean, self.scale = scaler.mean_, scaler.scale_
        self.coef, self.intercept = np.asarray(model.coef_), float(model.intercept_)

    def _predict(self, schedules: Sequence[SolverSchedule]) -> np.ndarray:
        assert self.coef is not None and self.mean is not None and self.scale is not None
        x = features.matrix(schedules, self.feature_spec)
        return ((x - self.mean) / self.scale) @ self.coef + self.intercept

    def _save_model(self, folder: Path) -> dict[str, Any]:
        assert self.coef is not None and self.mean is not None and self.scale is not None
        return {"mean": self.mean.tolist(), "scale": self.scale.tolist(), "coef": self.coef.tolist(),
                "intercept": self.intercept}

    def _load_model(self, folder: Path, state: dict[str, Any]) -> None:
        dim = self.feature_spec.vector_dim
        for key in ("mean", "scale", "coef"):
            if len(state.get(key, ())) != dim:
                raise ValueError(f"state.{key} must hold {dim} numbers")
        self.mean = np.asarray(state["mean"], dtype=np.float64)
        self.scale = np.asarray(state["scale"], dtype=np.float64)
        self.coef = np.asarray(state["coef"], dtype=np.float64)
        self.intercept = float(state["intercept"])
