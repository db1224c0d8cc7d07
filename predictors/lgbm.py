"""LightGBM predictors: a lambdarank ranker and a regressor on the fixed-length feature vector.

Saved with LightGBM's own text model format (`model.txt`) beside predictor.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Sequence

import lightgbm as lgb
import numpy as np

from s3search.schedule import SolverSchedule

from . import features
from .base import Predictor

__all__ = ["LightGBMRanker", "LightGBMRegressor", "relevance_labels"]

_MODEL_FILE = "model.txt"


def relevance_labels(targets: np.ndarray, groups: np.ndarray, levels: int) -> np.ndarray:
    """Integer relevance per group for lambdarank: the best (lowest target) gets levels - 1."""
    rel = np.zeros(len(targets), dtype=np.int64)
    for g in np.unique(groups):
        m = np.flatnonzero(groups == g)
        order = np.argsort(np.argsort(targets[m], kind="stable"), kind="stable")   # 0 = best
        pct = order / max(1, len(m) - 1)
        rel[m] = np.floor((1.0 - pct) * (levels - 1) + 1e-9).astype(np.int64)
    return rel


class _LightGBM(Predictor):
    objective: ClassVar[str]
    defaults: ClassVar[dict[str, Any]] = {"num_boost_round": 200, "learning_rate": 0.05, "num_leaves": 15,
                                          "min_data_in_leaf": 3, "feature_fraction": 0.8, "bagging_fraction": 0.9,
                                          "lambda_l2": 1.0, "levels": 20}

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.booster: lgb.Booster | None = None

    def _lgb_params(self) -> dict[str, Any]:
        p = self.params
        return {"objective": self.objective, "learning_rate": p["learning_rate"], "num_leaves": p["num_leaves"],
                "min_data_in_leaf": p["min_data_in_leaf"], "feature_fraction": p["feature_fraction"],
                "bagging_fraction": p["bagging_fraction"], "bagging_freq": 1, "lambda_l2": p["lambda_l2"],
                "min_data_in_bin": 1, "verbosity": -1, "num_threads": 1, "seed": self.seed,
                "deterministic": True, "force_row_wise": True}

    def _dataset(self, x: np.ndarray, targets: np.ndarray, groups: np.ndarray) -> lgb.Dataset:
        raise NotImplementedError

    def _fit(self, schedules: Sequence[SolverSchedule], targets: np.ndarray, groups: np.ndarray) -> None:
        x = features.matrix(schedules, self.feature_spec)
        order = np.argsort(groups, kind="stable")          # lambdarank needs each query contiguous
        data = self._dataset(x[order], targets[order], groups[order])
        self.booster = lgb.train(self._lgb_params(), data, num_boost_round=int(self.params["num_boost_round"]))

    def _raw(self, schedules: Sequence[SolverSchedule]) -> np.ndarray:
        assert self.booster is not None
        return np.asarray(self.booster.predict(features.matrix(schedules, self.feature_spec)))

    def _save_model(self, folder: Path) -> dict[str, Any]:
        assert self.booster is not None
        self.booster.save_model(str(folder / _MODEL_FILE))
        return {"model_file": _MODEL_FILE}

    def _load_model(self, folder: Path, state: dict[str, Any]) -> None:
        self.booster = lgb.Booster(model_file=str(folder / state.get("model_file", _MODEL_FILE)))


class LightGBMRanker(_LightGBM):
    """Lambdarank with one query per group; relevance is the within-group rank, binned to `levels`."""

    kind = "lightgbm-rank"
    objective = "lambdarank"
    # Picked by 5-fold cross-validation on the training half of the gmm-64d NFE 5 benchmark (docs/bench/predictors.md).
    defaults: ClassVar[dict[str, Any]] = {**_LightGBM.defaults, "num_boost_round": 300, "num_leaves": 7,
                                          "min_data_in_leaf": 5, "feature_fraction": 0.5, "levels": 31}

    def _lgb_params(self) -> dict[str, Any]:
        levels = int(self.params["levels"])
        return {**super()._lgb_params(), "label_gain": [float(i) for i in range(levels)],
                "lambdarank_truncation_level": 10_000}

    def _dataset(self, x: np.ndarray, targets: np.ndarray, groups: np.ndarray) -> lgb.Dataset:
        levels = int(self.params["levels"])
        if not 2 <= levels <= 31:
            raise ValueError(f"levels={levels} must be from 2 to 31")
        _, sizes = np.unique(groups, return_counts=True)   # groups are sorted here
        return lgb.Dataset(x, label=relevance_labels(targets, groups, levels), group=sizes,
                           params={"verbosity": -1})

    def _predict(self, schedules: Sequence[SolverSchedule]) -> np.ndarray:
        return -self._raw(schedules)   # LightGBM's relevance: higher is better


class LightGBMRegressor(_LightGBM):
    """L2 regression on the per-group standardised log score."""

    kind = "lightgbm-reg"
    objective = "regression"
    # Picked by 5-fold cross-validation on the training half of the gmm-64d NFE 5 benchmark (docs/bench/predictors.md).
    defaults: ClassVar[dict[str, Any]] = {**_LightGBM.defaults, "num_boost_round": 600, "learning_rate": 0.02,
                                          "min_data_in_leaf": 5, "feature_fraction": 0.5}

    def _dataset(self, x: np.ndarray, targets: np.ndarray, groups: np.ndarray) -> lgb.Dataset:
        return lgb.Dataset(x, label=targets, params={"verbosity": -1})

    def _predict(self, schedules: Sequence[SolverSchedule]) -> np.ndarray:
        return self._raw(schedules)
