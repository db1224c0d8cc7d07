"""Learned performance predictors for solver schedules: fit on (schedule, score), rank candidates.

    import predictors
    p = predictors.get("lightgbm-rank").fit(schedules, scores)
    best_first = p.rank(candidates)
    p.save("out/pred"); q = predictors.load("out/pred")
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from .base import CONFIG_FILE, Predictor, RankingQuality, kendall_tau, topk_recall
from .features import FeatureSpec
from .lgbm import LightGBMRanker, LightGBMRegressor
from .sklearn_baseline import RidgePredictor
from .torch_seq import TorchLSTMPredictor, TorchMLPPredictor

__all__ = ["Predictor", "RankingQuality", "FeatureSpec", "kendall_tau", "topk_recall", "names", "get", "load",
           "saved_names", "saved_path", "SAVED_NAME_PATTERN"]

# The name of a saved predictor inside a folder of them: one path component, so a name can never leave it.
SAVED_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"

_REGISTRY: dict[str, type[Predictor]] = {c.kind: c for c in (LightGBMRanker, LightGBMRegressor, TorchLSTMPredictor,
                                                             TorchMLPPredictor, RidgePredictor)}


def names() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str, **params: Any) -> Predictor:
    """A new, unfitted predictor of kind `name` (see `names()`)."""
    if name not in _REGISTRY:
        raise ValueError(f"predictor={name!r} is unknown; known predictors: {', '.join(names())}")
    return _REGISTRY[name](**params)


def load(path: str | Path) -> Predictor:
    """A predictor saved with `Predictor.save`."""
    folder = Path(path)
    try:
        doc = json.loads((folder / CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise ValueError(f"path={str(folder)!r} holds no {CONFIG_FILE}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{CONFIG_FILE} is not valid JSON: {e}") from None
    kind = doc.get("kind")
    if kind not in _REGISTRY:
        raise ValueError(f"kind={kind!r} is not a known predictor")
    return _REGISTRY[kind].from_config(folder, doc)


def saved_names(root: str | Path) -> list[str]:
    """The predictors saved in `root`: its subfolders holding a predictor config, by name."""
    folder = Path(root)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir()
                  if re.fullmatch(SAVED_NAME_PATTERN, p.name) and (p / CONFIG_FILE).is_file())


def saved_path(root: str | Path, name: str) -> Path:
    """The folder of the predictor saved in `root` as `name`; ValueError when the name is not a plain folder
    name or nothing is saved under it."""
    if not re.fullmatch(SAVED_NAME_PATTERN, name):
        raise ValueError(f"predictor={name!r} is not a saved predictor's name ({SAVED_NAME_PATTERN})")
    if name not in saved_names(root):
        raise ValueError(f"predictor={name!r} is not saved here; saved: {', '.join(saved_names(root)) or 'none'}")
    return Path(root) / name
