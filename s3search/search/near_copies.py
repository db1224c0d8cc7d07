"""Near copies: candidates that differ from an evaluated schedule only by a grid or eta move too small to matter.

The S³ loop's local moves and the predictor both favour the incumbent's immediate neighbourhood, so a round can
spend several true evaluations on grids a few 1e-5 nats apart whose figures agree to the metric's noise
(digits-t2i-flow, NFE 5: seven trials within 0.001 of 118.766). Grid refinement does the fine tuning at the end;
the loop should spend its evaluations elsewhere. Two schedules are near copies when their steps agree in every
discrete choice (canonical form, eta aside; stochastic or not) and every time's half-logSNR and every eta differ
by less than NEAR_COPY_TOLERANCE.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace
from typing import Any, Iterable, Sequence

import numpy as np

from ..processes import NoiseProcess
from ..schedule import SolverSchedule

__all__ = ["NEAR_COPY_TOLERANCE", "NearCopies", "distinct"]

NEAR_COPY_TOLERANCE = 0.01   # nats of lambda per time, and eta per step


class NearCopies:
    """An index of schedules by their discrete choices, each with its (lambdas, etas) vector."""

    def __init__(self, process: NoiseProcess, schedules: Iterable[Any] = (),
                 tolerance: float = NEAR_COPY_TOLERANCE) -> None:
        self.process, self.tolerance = process, float(tolerance)
        self._vectors: dict[tuple, list[np.ndarray]] = defaultdict(list)
        for s in schedules:
            self.add(s)

    @staticmethod
    def _key(s: SolverSchedule) -> tuple:
        c = s.canonical()
        return (c.first_step, c.final, tuple((replace(st, eta=0.0), st.eta > 0) for st in c.steps))

    def _vector(self, s: SolverSchedule) -> np.ndarray:
        return np.array([self.process.lambda_(t) for t in s.timesteps] + [st.eta for st in s.steps])

    def near(self, s: Any) -> bool:
        """Whether s is a near copy of a schedule in the index (named samplers never are)."""
        if not isinstance(s, SolverSchedule):
            return False
        known = self._vectors.get(self._key(s))
        if not known:
            return False
        v = self._vector(s)
        return any(float(np.max(np.abs(v - k))) < self.tolerance for k in known)

    def add(self, s: Any) -> None:
        if isinstance(s, SolverSchedule):
            self._vectors[self._key(s)].append(self._vector(s))


def distinct(pairs: Sequence[tuple[Any, float]], index: NearCopies) -> list[tuple[Any, float]]:
    """The (schedule, score) pairs, in order, without near copies of the index or of an earlier pair; the kept
    schedules join the index."""
    out = []
    for s, p in pairs:
        if not index.near(s):
            index.add(s)
            out.append((s, p))
    return out
