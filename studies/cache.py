"""The evaluation cache in the database: a (schedule, model, metric, sample count, split, seed) is paid once.

`CachedEvaluator` wraps any `Evaluator` (local or Ray) and only forwards the schedules it has not seen.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from s3search.evaluation.base import EvalRequest, EvalResult, Evaluator
from s3search.schedule import SolverSchedule

from .models import EvalCacheEntry

__all__ = ["metric_key", "cache_get", "cache_put", "CachedEvaluator"]


def metric_key(request: EvalRequest) -> str:
    return f"{request.metric}|n={request.n_samples}|split={request.split}"


def cache_get(session: Session, schedule_hash: str, request: EvalRequest) -> Optional[EvalResult]:
    row = session.scalar(select(EvalCacheEntry).where(
        EvalCacheEntry.schedule_hash == schedule_hash, EvalCacheEntry.model == request.model,
        EvalCacheEntry.metric_key == metric_key(request), EvalCacheEntry.seed == request.seed))
    session.commit()
    if row is None:
        return None
    value = math.inf if row.value is None else row.value
    return EvalResult(schedule_hash=schedule_hash, value=value, nfe=row.nfe, seconds=row.seconds,
                      error=row.error, extras=dict(row.extras or {}))


def cache_put(session: Session, schedule_hash: str, result: EvalResult, request: EvalRequest) -> None:
    """Store a successful result; failures are not cached (a retry may succeed)."""
    if not result.ok or not math.isfinite(result.value):
        return
    session.add(EvalCacheEntry(schedule_hash=schedule_hash, model=request.model,
                               metric_key=metric_key(request), seed=request.seed, value=float(result.value),
                               nfe=result.nfe, seconds=result.seconds, error=None,
                               extras={k: float(v) for k, v in result.extras.items()}))
    try:
        session.commit()
    except IntegrityError:
        session.rollback()   # another runner stored the same evaluation first


class CachedEvaluator:
    def __init__(self, inner: Evaluator, sessions: sessionmaker[Session]):
        self.inner = inner
        self.sessions = sessions
        self.hits = 0

    def evaluate(self, schedules: Sequence[SolverSchedule], request: EvalRequest) -> list[EvalResult]:
        out: list[Optional[EvalResult]] = []
        missing: list[int] = []
        with self.sessions() as session:
            for i, s in enumerate(schedules):
                hit = cache_get(session, s.canonical_hash(), request)
                out.append(hit)
                if hit is None:
                    missing.append(i)
        self.hits += len(schedules) - len(missing)
        if missing:
            fresh = self.inner.evaluate([schedules[i] for i in missing], request)
            with self.sessions() as session:
                for i, r in zip(missing, fresh):
                    out[i] = r
                    cache_put(session, schedules[i].canonical_hash(), r, request)
        return [r for r in out if r is not None]
