"""The predictor interface: fit on (schedule, score) pairs, rank candidates, save / load, ranking quality.

Scores follow the metric's direction: lower is better, and `predict` returns numbers where lower is better.
Predictions are only comparable within a *group* (by default the NFE): training targets are standardised per
group, so studies of different NFE, metrics or sample counts can share one predictor (warm start).

Saved predictors are a directory: `predictor.json` (kind, parameters, feature spec, normalisation) plus the
model's own file in a text or safetensors format. Nothing is pickled.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
from scipy import stats

from s3search.schedule import SolverSchedule

from .features import FeatureSpec

__all__ = ["Predictor", "RankingQuality", "kendall_tau", "topk_recall", "prepare_targets", "default_groups",
           "CONFIG_FILE"]

CONFIG_FILE = "predictor.json"
_FORMAT_VERSION = 1


@dataclass(frozen=True)
class RankingQuality:
    kendall_tau: float
    topk_recall: float
    k: int
    n: int

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def kendall_tau(predicted: Sequence[float], true: Sequence[float]) -> float:
    """Kendall tau-b between predicted and true scores (1 = same order); nan with fewer than 2 distinct pairs."""
    p, t = np.asarray(predicted, dtype=np.float64), np.asarray(true, dtype=np.float64)
    if len(p) < 2:
        return float("nan")
    tau = stats.kendalltau(p, t).statistic
    return float(tau)


def topk_recall(predicted: Sequence[float], true: Sequence[float], k: int) -> float:
    """Fraction of the true k best (lowest) that are among the predicted k best."""
    p, t = np.asarray(predicted, dtype=np.float64), np.asarray(true, dtype=np.float64)
    k = min(k, len(p))
    if k < 1:
        return float("nan")
    return len(set(np.argsort(p, kind="stable")[:k]) & set(np.argsort(t, kind="stable")[:k])) / k


def default_groups(schedules: Sequence[SolverSchedule]) -> np.ndarray:
    return np.array([s.nfe for s in schedules], dtype=np.int64)


def prepare_targets(values: Sequence[float], groups: Sequence[int]) -> np.ndarray:
    """Per-group standardised log scores (lower = better); failed (non-finite) scores become the group's worst.

    Metrics such as FID span orders of magnitude between a good and a bad schedule; the log keeps a few
    diverging schedules from dominating a squared loss.
    """
    v = np.asarray(values, dtype=np.float64)
    g = np.asarray(groups)
    out = np.zeros_like(v)
    for grp in np.unique(g):
        m = g == grp
        x = v[m]
        ok = np.isfinite(x)
        if ok.any():
            lo = float(x[ok].min())
            # A shift keeps the log defined for metrics that can be zero or negative (e.g. NLL).
            shift = 0.0 if lo > 0 else (1e-6 - lo + 1e-3 * (float(np.abs(x[ok]).max()) + 1.0))
            y = np.log(np.where(ok, x, 1.0) + shift)
            worst = float(y[ok].max()) + max(1.0, float(y[ok].std()))
            y = np.where(ok, y, worst)
        else:
            y = np.zeros_like(x)
        sd = float(y.std())
        out[m] = (y - y.mean()) / (sd if sd > 0 else 1.0)
    return out


class Predictor(ABC):
    """Base class: subclasses implement `_fit`, `_predict`, `_save_model`, `_load_model`."""

    kind: ClassVar[str]

    def __init__(self, *, feature_spec: FeatureSpec | None = None, seed: int = 0, **params: Any) -> None:
        self.feature_spec = feature_spec or FeatureSpec()
        self.seed = int(seed)
        self.params: dict[str, Any] = self._check_params(params)
        self.fitted = False
        self.n_train = 0

    # ----- subclass hooks ---------------------------------------------------------------------------------
    defaults: ClassVar[dict[str, Any]] = {}

    def _check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise ValueError(f"{unknown[0]} is not a parameter of predictor {self.kind!r} "
                             f"(known: {', '.join(sorted(self.defaults)) or 'none'})")
        return {**self.defaults, **params}

    @abstractmethod
    def _fit(self, schedules: Sequence[SolverSchedule], targets: np.ndarray, groups: np.ndarray) -> None: ...

    @abstractmethod
    def _predict(self, schedules: Sequence[SolverSchedule]) -> np.ndarray: ...

    @abstractmethod
    def _save_model(self, folder: Path) -> dict[str, Any]:
        """Write the model's files into `folder`; return extra JSON state for predictor.json."""

    @abstractmethod
    def _load_model(self, folder: Path, state: dict[str, Any]) -> None: ...

    # ----- public API -------------------------------------------------------------------------------------
    def fit(self, schedules: Sequence[SolverSchedule], values: Sequence[float],
            groups: Sequence[int] | None = None) -> "Predictor":
        if len(schedules) != len(values):
            raise ValueError(f"values has {len(values)} entries; schedules has {len(schedules)}")
        if len(schedules) < 2:
            raise ValueError(f"schedules has {len(schedules)} entries; fitting needs at least 2")
        g = default_groups(schedules) if groups is None else np.asarray(groups, dtype=np.int64)
        if len(g) != len(schedules):
            raise ValueError(f"groups has {len(g)} entries; schedules has {len(schedules)}")
        self._fit(list(schedules), prepare_targets(values, g), g)
        self.fitted = True
        self.n_train = len(schedules)
        return self

    def predict(self, schedules: Sequence[SolverSchedule]) -> np.ndarray:
        """Predicted scores, lower is better; comparable within one group."""
        if not self.fitted:
            raise ValueError(f"predictor {self.kind!r} is not fitted")
        if len(schedules) == 0:
            return np.zeros(0)
        return np.asarray(self._predict(list(schedules)), dtype=np.float64)

    def rank(self, schedules: Sequence[SolverSchedule]) -> list[int]:
        """Indices of `schedules`, predicted best first."""
        return [int(i) for i in np.argsort(self.predict(schedules), kind="stable")]

    def evaluate(self, schedules: Sequence[SolverSchedule], values: Sequence[float], k: int = 10) -> RankingQuality:
        """Ranking quality on held-out pairs: Kendall tau and top-k recall (failed evaluations left out)."""
        v = np.asarray(values, dtype=np.float64)
        ok = np.isfinite(v)
        sel = [s for s, o in zip(schedules, ok) if o]
        p = self.predict(sel)
        return RankingQuality(kendall_tau(p, v[ok]), topk_recall(p, v[ok], k), k, int(ok.sum()))

    def save(self, path: str | Path) -> Path:
        if not self.fitted:
            raise ValueError(f"predictor {self.kind!r} is not fitted; nothing to save")
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        state = self._save_model(folder)
        doc = {"format_version": _FORMAT_VERSION, "kind": self.kind, "params": self.params, "seed": self.seed,
               "feature_spec": self.feature_spec.to_dict(), "n_train": self.n_train, "state": state}
        (folder / CONFIG_FILE).write_text(json.dumps(doc, indent=1, default=_json_default))
        return folder

    @classmethod
    def from_config(cls, folder: Path, doc: dict[str, Any]) -> "Predictor":
        if doc.get("format_version") != _FORMAT_VERSION:
            raise ValueError(f"format_version={doc.get('format_version')!r} is not supported")
        obj = cls(feature_spec=FeatureSpec.from_dict(doc["feature_spec"]), seed=doc.get("seed", 0),
                  **doc.get("params", {}))
        obj._load_model(folder, doc.get("state", {}))
        obj.fitted = True
        obj.n_train = int(doc.get("n_train", 0))
        return obj


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")
