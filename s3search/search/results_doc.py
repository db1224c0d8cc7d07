"""A finished study as a results document: the format `s3search plots` reads (docs/exports.md, "Results").

`run_search` leaves everything a plot needs in the study itself: the model and metric as study attributes,
every true evaluation as a trial (NFE and value), and the test split's scores with the schedules they belong
to under the "test" attribute. So the document is rebuilt from any study, the CLI's SQLite file or the
service's database alike, and a resumed search rewrites it whole.
"""

from __future__ import annotations

import json
import math
from typing import Any, Optional

import optuna
from optuna.trial import TrialState

from .study import ATTR, chash, schedule_from_json

__all__ = ["results_document", "has_results", "studies_with_results"]


def _finite(value: Any) -> Optional[float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _history(study: optuna.Study, nfe: int) -> list[Optional[float]]:
    """Every true evaluation at this NFE, in the order they were made; None for a failed one."""
    out: list[Optional[float]] = []
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        if t.user_attrs.get(ATTR.NFE) != nfe or ATTR.DISCARDED in t.user_attrs or ATTR.STALE in t.user_attrs:
            continue
        if t.state == TrialState.COMPLETE:
            out.append(_finite(t.value))
        elif t.state == TrialState.FAIL and ATTR.ERROR in t.user_attrs:
            out.append(None)
    return out


def _calls(attrs: dict[str, Any], nfe: int) -> Optional[dict[str, Any]]:
    """What the search spent at this NFE in model calls (samples x NFE; full and low-fidelity evaluations, the
    call budget); None for a study written before it was recorded."""
    entry = (attrs.get("model_calls") or {}).get(str(nfe))
    return dict(entry) if isinstance(entry, dict) else None


def has_results(study_attrs: dict[str, Any]) -> bool:
    """Whether a study (by its user attributes) holds test-split scores to plot."""
    return isinstance(study_attrs.get("test"), dict) and bool(study_attrs["test"])


def _structural(entry: dict[str, Any], values: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The structural variant of the best baseline the search test-scored (label None: none was evaluated);
    None for a study that did not record one."""
    info = entry.get("structural")
    if not isinstance(info, dict):
        return None
    label, doc = info.get("label"), info.get("schedule")
    _, _, rules = (label or "").partition("+")
    first, _, final = rules.partition("/")
    return {"baseline": info.get("baseline"), "label": label, "first_step": first or None, "final": final or None,
            "value": _finite(values.get(info.get("key"))) if info.get("key") else None,
            "schedule": json.loads(doc) if doc else None}


def results_document(study: optuna.Study) -> dict[str, Any]:
    """{model, metric, study, seed, runs, baselines}: per NFE the winner's test value, schedule, origin and
    search history (full-fidelity evaluations only), the structural variant of the best baseline, the model
    calls spent, and every baseline's test value, grid and schedule. ValueError when the study holds no test
    scores yet."""
    attrs = study.user_attrs
    if not has_results(attrs):
        raise ValueError(f"study {study.study_name!r} has no test-split scores yet (unfinished or stopped)")
    method = str(attrs.get("method", "s3"))
    runs, base = [], []
    for key, entry in sorted(attrs["test"].items(), key=lambda kv: int(kv[0])):
        nfe, values = int(key), entry.get("values", {})
        best = entry.get("best_schedule")
        key = entry.get("best_key")
        if key is None and best is not None:       # studies written before best_key was stored
            key = "searched:" + chash(schedule_from_json(best))
        searched = values.get(key) if key else None
        runs.append({"method": method, "nfe": nfe, "value": _finite(searched),
                     "schedule": json.loads(best) if best else None, "history": _history(study, nfe),
                     "source": entry.get("winner_source", ""), "label": entry.get("winner_label", ""),
                     "structural": _structural(entry, values), "model_calls": _calls(attrs, nfe)})
        grids = entry.get("baseline_grids") or {}
        for name, doc in sorted((entry.get("baseline_schedules") or {}).items()):
            base.append({"name": name, "nfe": nfe, "value": _finite(values.get("baseline:" + name)),
                         "grid": grids.get(name, ""), "schedule": json.loads(doc)})
    seed = attrs.get("seed")
    return {"model": str(attrs.get("model", "")), "metric": str(attrs.get("metric", "")),
            "study": study.study_name, "seed": seed if isinstance(seed, int) else None, "runs": runs,
            "baselines": base}


def studies_with_results(storage: Any) -> list[str]:
    """Names of the studies in `storage` (a URL or an optuna storage) that hold test-split scores."""
    return [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)
            if has_results(s.user_attrs)]
