"""Warm start: (schedule, value) pairs from earlier Optuna studies, at any NFE, on any model of one process.

Reads trials written by the search (user attributes `schedule` holding the schedule JSON, the trial value as
the metric). Only COMPLETE trials with a finite value and a schedule of the solver-schedule type are returned;
studies whose `process` / `model` / `metric` user attribute differs from the one asked for are skipped (a
study that does not say passes). Values of different studies and NFE are not comparable: the caller groups
pairs by (study, NFE).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

import optuna
from optuna.trial import TrialState

from s3search.schedule import SolverSchedule

if TYPE_CHECKING:
    from .base import Predictor

__all__ = ["Pair", "load_pairs", "fit_from_studies", "outside_group", "is_outside_group", "SCHEDULE_ATTR"]

SCHEDULE_ATTR = "schedule"
_OUTSIDE = 10_000   # group ids from here on hold outside pairs; a search's own groups are its NFE


def outside_group(source: int, nfe: int) -> int:
    """The ranking group of the pairs at `nfe` from the `source`-th outside source (an earlier study, a saved
    predictor): compared only among themselves, never with a search's own values."""
    return _OUTSIDE * (1 + source) + nfe


def is_outside_group(group: int) -> bool:
    return group >= _OUTSIDE


@dataclass(frozen=True)
class Pair:
    schedule: SolverSchedule
    value: float
    study: str


def load_pairs(storage: str | optuna.storages.BaseStorage, study_names: Sequence[str], *,
               model: Optional[str] = None, metric: Optional[str] = None,
               nfe: Optional[Sequence[int]] = None, process: Optional[str] = None) -> list[Pair]:
    """Every usable pair of the named studies (missing studies raise ValueError naming them)."""
    if isinstance(storage, str):
        # One engine for all the studies, closed here: a runner reads warm starts for every job it runs.
        owned = optuna.storages.RDBStorage(storage)
        try:
            return load_pairs(owned, study_names, model=model, metric=metric, nfe=nfe, process=process)
        finally:
            owned.engine.dispose()
    out: list[Pair] = []
    for name in study_names:
        try:
            study = optuna.load_study(study_name=name, storage=storage)
        except KeyError:
            raise ValueError(f"studies: {name!r} does not exist in the storage") from None
        attrs = study.user_attrs
        if model is not None and attrs.get("model") not in (None, model):
            continue
        if process is not None and attrs.get("process") not in (None, process):
            continue
        if metric is not None and attrs.get("metric") not in (None, metric):
            continue
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            text = t.user_attrs.get(SCHEDULE_ATTR)
            if not text or t.value is None or not math.isfinite(t.value):
                continue
            try:
                doc = json.loads(text)
                if "sampler" in doc:        # a named sampler: no features for it
                    continue
                sched = SolverSchedule.from_dict(doc)
            except (ValueError, TypeError):
                continue
            if nfe is not None and sched.nfe not in nfe:
                continue
            out.append(Pair(sched, float(t.value), name))
    return out


def fit_from_studies(storage: str | optuna.storages.BaseStorage, study_names: Sequence[str], kind: str, *,
                     seed: int = 0, **params: object) -> "Predictor":
    """A predictor of `kind` fitted on every usable pair of the named studies, grouped by (study, NFE) as the
    search groups outside pairs: the form `Predictor.save` writes and a warm start loads."""
    from . import get

    pairs = load_pairs(storage, study_names)
    if len(pairs) < 4:
        raise ValueError(f"studies: {len(pairs)} usable (schedule, value) pairs; fitting needs at least 4")
    names = list(study_names)
    groups = [outside_group(names.index(p.study), p.schedule.nfe) for p in pairs]
    return get(kind, seed=seed, **params).fit([p.schedule for p in pairs], [p.value for p in pairs], groups)
