"""The evaluation contract shared by the local path, Ray workers, the search loop and the service.

An evaluator turns schedules into scores for one (model, metric, sample count, seeds) setting. Lower is better
for every metric. A failed evaluation is a result with `error` set, never an exception that ends a search.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol, Sequence

from ..schedule import SolverSchedule

__all__ = ["EvalRequest", "EvalResult", "Evaluator", "Split"]

# "search": the seeds a search optimises on; "test": fresh seeds and more samples, for the reported figure.
Split = Literal["search", "validation", "test"]


@dataclass(frozen=True)
class EvalRequest:
    model: str                    # a name in the model registry
    metric: str                   # a name in s3search.metrics
    n_samples: int
    seed: int = 0                 # sample i uses seed (seed, split, i); see evaluation.seeds
    split: Split = "search"
    # Text-to-image models: sample i's prompt comes from this set of the model's by the rule of
    # models.prompts (None: the model's default set), guided with this scale (None: the model's default).
    prompt_set: str | None = None
    guidance_scale: float | None = None


@dataclass(frozen=True)
class EvalResult:
    schedule_hash: str
    value: float                  # the metric; +inf when error is set
    nfe: int
    seconds: float
    error: str | None = None
    extras: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None


class Evaluator(Protocol):
    def evaluate(self, schedules: Sequence[SolverSchedule], request: EvalRequest) -> list[EvalResult]:
        """Score every schedule; results come back in the order given."""
        ...
