"""The search contract: what a job asks for, what progress looks like, what comes back."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from ..schedule import SolverSchedule

__all__ = ["SearchConfig", "Progress", "SearchResult", "ProgressFn", "StopFn"]


@dataclass(frozen=True)
class SearchConfig:
    model: str                          # model registry name, e.g. "digits", "gmm-64d"
    nfe: tuple[int, ...]                # one NFE or several
    metric: str = "fd"                  # metric name, lower is better
    n_samples: int = 1000               # samples per search evaluation
    n_test_samples: int = 5000          # samples for the final test evaluation (fresh seeds)
    budget: int = 200                   # true evaluations in total
    method: str = "s3"                  # "s3" | "random" | "tpe" | "cmaes"
    predictor: str = "lightgbm-rank"    # see predictors.names()
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Progress:
    evaluations: int                    # true evaluations done so far (this run plus resumed ones)
    budget: int
    best_value: float
    best_schedule: Optional[SolverSchedule]
    message: str = ""
    predictor_tau: Optional[float] = None


@dataclass(frozen=True)
class SearchResult:
    best: SolverSchedule
    best_value: float                   # on the search split
    test_value: float                   # on the test split
    baselines: dict[str, float]         # baseline name -> test value, at the same NFE
    evaluations: int
    validation_value: float = math.nan  # on the validation split, where the winner was chosen (nan: not run)


ProgressFn = Callable[[Progress], None]
StopFn = Callable[[], bool]
