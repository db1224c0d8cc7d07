"""A stand-in evaluator with a closed-form score, for testing and benchmarking the Ray machinery alone.

It follows the `Evaluator` protocol and costs a chosen wall time per candidate, so Ray's own overhead can be
measured against a known evaluation time. Failure switches (by schedule name) exercise the error paths:
`raise_on` raises inside `evaluate`, `nan_on` returns NaN, and `log_path` records start-ups and evaluation
starts (with the process id) so a test can kill the process mid-evaluation and count retries.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Sequence

from ..evaluation.base import EvalRequest, EvalResult

__all__ = ["ToyEvaluator", "toy_score"]


def toy_score(schedule: Any, seed: int = 0) -> float:
    """A smooth function of the per-step choices: squared log-step sizes discounted by order, plus a seed term.

    The seed term makes "same seeds, same value" a checkable property of the distributed path.
    """
    ts = schedule.timesteps
    # A NamedSchedule (a named sampler on a grid) has no per-step choices: count it as order 2, eta 0.
    steps = getattr(schedule, "steps", None) or [None] * (len(ts) - 1)
    total = 0.0
    for i, step in enumerate(steps):
        order, eta = (2, 0.0) if step is None else (step.order, step.eta)
        gap = math.log1p(ts[i]) - math.log1p(ts[i + 1])   # t may be 0 at the end; log1p keeps it finite
        total += gap ** (order + 1) / math.factorial(order + 1) + 1e-3 * eta
    return total + 1e-6 * (seed % 997)


def _burn(work: int) -> None:
    """CPU-bound work (`work` 192x192 float32 matmuls), so contention between workers shows in benchmarks."""
    if work:
        import torch

        a = torch.ones(192, 192) / 192.0
        for _ in range(work):
            a = a @ a


class ToyEvaluator:
    def __init__(self, sleep_s: float = 0.0, raise_on: Sequence[str] = (), nan_on: Sequence[str] = (),
                 log_path: str | None = None, load_s: float = 0.0, work: int = 0) -> None:
        if not math.isfinite(sleep_s) or sleep_s < 0:
            raise ValueError(f"sleep_s={sleep_s!r} must be a finite number >= 0")
        if isinstance(work, bool) or not isinstance(work, int) or work < 0:
            raise ValueError(f"work={work!r} must be an integer >= 0")
        self.sleep_s = float(sleep_s)
        self.work = work
        self.raise_on = set(raise_on)
        self.nan_on = set(nan_on)
        self.log_path = log_path
        time.sleep(load_s)                       # stands in for loading a model once per process
        self._log("load")

    def _log(self, event: str, detail: str = "") -> None:
        if self.log_path:
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(f"{event} {os.getpid()} {detail}\n")
                f.flush()
                os.fsync(f.fileno())

    def evaluate(self, schedules: Sequence[Any], request: EvalRequest) -> list[EvalResult]:
        results = []
        for s in schedules:
            self._log("start", f"{s.name}@{s.canonical_hash()}@{request.split}")
            t0 = time.perf_counter()
            if s.name in self.raise_on:
                raise RuntimeError(f"toy failure for schedule {s.name!r}")
            time.sleep(self.sleep_s)
            _burn(self.work)
            value = math.nan if s.name in self.nan_on else toy_score(s, request.seed)
            results.append(EvalResult(schedule_hash=s.canonical_hash(), value=value, nfe=s.nfe,
                                      seconds=time.perf_counter() - t0))
        return results
