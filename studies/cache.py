"""The evaluation cache in the database: a (schedule, model, metric, sample count, split, seed) is paid once.

`CachedEvaluator` wraps any `Evaluator` (local or Ray) and only forwards the schedules it has not seen.

The key holds the model's fingerprint (`ModelSpec.fingerprint`: its weights and feature-network hashes,
process and shape) next to its name, so a changed model registered under an old name misses instead of reusing
the old model's values. A name the registry does not know is keyed by name alone; a model that cannot be built
bypasses the cache (its evaluations fail, and failures are never stored). Rows written before the fingerprint
was in the key are never matched again.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from s3search.evaluation.base import EvalRequest, EvalResult, Evaluator
from s3search.models import registry
from s3search.schedule import SolverSchedule

from .models import EvalCacheEntry

__all__ = ["metric_key", "model_fingerprint", "cache_get", "cache_put", "CachedEvaluator"]

# Hex digits of the model fingerprint kept in the key: 64 bits, and the key stays well inside its 200 characters.
_FINGERPRINT_CHARS = 16


def metric_key(request: EvalRequest, fingerprint: str = "") -> str:
    # The split stays last: readers select a split's rows with LIKE '%split=<split>'. The conditioning is part
    # of the key only when set, so unconditional rows keep their keys.
    conditioning = "".join(f"|{k}={v}" for k, v in (("prompts", request.prompt_set),
                                                    ("cfg", request.guidance_scale)) if v is not None)
    return (f"{request.metric}|n={request.n_samples}|model={fingerprint[:_FINGERPRINT_CHARS]}{conditioning}"
            f"|split={request.split}")


def model_fingerprint(name: str) -> Optional[str]:
    """The registered model's fingerprint; "" for a name the registry does not know, None if it cannot be built.

    The runner builds the model for its search anyway, and the registry keeps it, so this costs one hash.
    """
    try:
        return registry.get(name).fingerprint
    except registry.UnknownModelError:
        return ""
    except Exception:  # missing weights and the like: the evaluator reports them for every schedule
        return None


def cache_get(session: Session, schedule_hash: str, request: EvalRequest, fingerprint: str = ""
              ) -> Optional[EvalResult]:
    row = session.scalar(select(EvalCacheEntry).where(
        EvalCacheEntry.schedule_hash == schedule_hash, EvalCacheEntry.model == request.model,
        EvalCacheEntry.metric_key == metric_key(request, fingerprint), EvalCacheEntry.seed == request.seed))
    session.commit()
    if row is None:
        return None
    value = math.inf if row.value is None else row.value
    return EvalResult(schedule_hash=schedule_hash, value=value, nfe=row.nfe, seconds=row.seconds,
                      error=row.error, extras=dict(row.extras or {}))


def cache_put(session: Session, schedule_hash: str, result: EvalResult, request: EvalRequest,
              fingerprint: str = "") -> None:
    """Store a successful result; failures are not cached (a retry may succeed)."""
    if not result.ok or not math.isfinite(result.value):
        return
    session.add(EvalCacheEntry(schedule_hash=schedule_hash, model=request.model,
                               metric_key=metric_key(request, fingerprint), seed=request.seed,
                               value=float(result.value),
                               nfe=result.nfe, seconds=result.seconds, error=None,
                               extras={k: float(v) for k, v in result.extras.items()}))
    try:
        session.commit()
    except IntegrityError:
        session.rollback()   # another runner stored the same evaluation first


class CachedEvaluator:
    """`fingerprint(model_name)` gives the model part of the key (default: `model_fingerprint`, the registry's
    model); None sends the request straight to `inner`, unrecorded."""

    def __init__(self, inner: Evaluator, sessions: sessionmaker[Session],
                 fingerprint: Callable[[str], Optional[str]] = model_fingerprint):
        self.inner = inner
        self.sessions = sessions
        self.fingerprint = fingerprint
        self.hits = 0

    def evaluate(self, schedules: Sequence[SolverSchedule], request: EvalRequest) -> list[EvalResult]:
        fingerprint = self.fingerprint(request.model)
        if fingerprint is None:
            return self.inner.evaluate(schedules, request)
        out: list[Optional[EvalResult]] = []
        missing: list[int] = []
        with self.sessions() as session:
            for i, s in enumerate(schedules):
                hit = cache_get(session, s.canonical_hash(), request, fingerprint)
                out.append(hit)
                if hit is None:
                    missing.append(i)
        self.hits += len(schedules) - len(missing)
        if missing:
            fresh = self.inner.evaluate([schedules[i] for i in missing], request)
            with self.sessions() as session:
                for i, r in zip(missing, fresh):
                    out[i] = r
                    cache_put(session, schedules[i].canonical_hash(), r, request, fingerprint)
        return [r for r in out if r is not None]
