"""What optuna-dashboard shows beside a study's own plots: a markdown note, and a history split by NFE.

`study_note` renders the note from the search's config and, once there is one, its result (a `SearchResult`,
or the service's stored result document): the configuration, the winner of each NFE as a table with one row
per step, and the test split's table of the winner against the baselines. It is pure, so the CLI and the
service render the same note. `save_study_note` writes it, and the history figure, to the study.

The dashboard's own History plot puts every NFE on one linear axis, where a few diverging schedules (values
thousands of times the best) flatten everything else; its "Log y scale" switch is off on every page load.
`history_figure` is the same history with one trace per NFE, the best so far of each, and a log axis; the
dashboard draws it on the study's page next to the parameter importance.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import optuna
from optuna.trial import TrialState

from .. import processes
from ..schedule import SolverSchedule
from .config import ConfigError, SearchConfig, SearchResult
from .study import ATTR, AnySchedule, schedule_from_json

__all__ = ["NfeOutcome", "study_note", "schedule_table", "schedule_json", "baseline_table", "outcomes",
           "history_figure", "param_importances", "save_study_note", "save_history_plot", "publish_study_note",
           "HISTORY_PLOT_ID"]

HISTORY_PLOT_ID = "s3search-history-by-nfe"

ResultLike = Union[SearchResult, Mapping[str, Any]]


@dataclass(frozen=True)
class NfeOutcome:
    """One NFE's result, from a SearchResult or from the service's result document alike."""

    nfe: int
    best: AnySchedule
    best_value: float
    validation_value: float
    test_value: float
    baselines: Mapping[str, float]
    evaluations: int
    test_extras: Mapping[str, Mapping[str, float]]


def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def _fmt(v: Any, digits: int = 4) -> str:
    x = _num(v)
    return f"{x:.{digits}g}" if math.isfinite(x) else "—"


def _outcome_from_doc(doc: Mapping[str, Any], nfe: Optional[int]) -> NfeOutcome:
    best = schedule_from_json(json.dumps(doc["best"]))
    return NfeOutcome(nfe=int(nfe if nfe is not None else best.nfe), best=best, best_value=_num(doc.get("best_value")),
                      validation_value=_num(doc.get("validation_value")), test_value=_num(doc.get("test_value")),
                      baselines={str(k): _num(v) for k, v in (doc.get("baselines") or {}).items()},
                      evaluations=int(doc.get("evaluations") or 0), test_extras=dict(doc.get("test_extras") or {}))


def _outcome_from_result(r: SearchResult, nfe: Optional[int]) -> NfeOutcome:
    return NfeOutcome(nfe=int(nfe if nfe is not None else r.best.nfe), best=r.best, best_value=_num(r.best_value),
                      validation_value=_num(r.validation_value), test_value=_num(r.test_value),
                      baselines={str(k): _num(v) for k, v in r.baselines.items()}, evaluations=int(r.evaluations),
                      test_extras=dict(r.test_extras or {}))


def outcomes(result: ResultLike) -> list[NfeOutcome]:
    """Every NFE's outcome, in NFE order (a single-NFE result has no per-NFE table: it is its own)."""
    if isinstance(result, Mapping):
        per = result.get("per_nfe") or {}
        if not per:
            return [_outcome_from_doc(result, None)]
        return sorted((_outcome_from_doc(d, int(n)) for n, d in per.items()), key=lambda o: o.nfe)
    per_nfe = getattr(result, "per_nfe", None) or {}
    if not per_nfe:
        return [_outcome_from_result(result, None)]
    return sorted((_outcome_from_result(r, int(n)) for n, r in per_nfe.items()), key=lambda o: o.nfe)


def _times(process: Optional[processes.NoiseProcess], t: float) -> tuple[str, str]:
    # On the EDM process t is sigma; elsewhere sigma is what compares across processes and papers.
    if process is None:
        return _fmt(t), "—"
    return _fmt(t), _fmt(process.sigma_ve(t))


def schedule_table(schedule: AnySchedule) -> str:
    """The schedule as markdown: a line of its rules, then one table row per step."""
    try:
        proc: Optional[processes.NoiseProcess] = processes.get(schedule.process)
    except (KeyError, ValueError):
        proc = None
    ts = [float(t) for t in schedule.timesteps]
    sigma_only = proc is not None and proc.name == "edm"
    span = "σ" if sigma_only else "t"
    if isinstance(schedule, SolverSchedule):
        lines = [f"process `{schedule.process}`, NFE {schedule.nfe}, {len(schedule.steps)} steps; first step "
                 f"`{schedule.first_step}`, final `{schedule.final}`", ""]
        # Lags are shown only where a step sets its own (the default, the latest order-1 points, goes unsaid).
        lags = any(s.lags for s in schedule.steps)
        head = ["step", span] + ([] if sigma_only else ["σ"]) + ["order", "prediction", "derivative", "corrector",
                                                                  "eta"] + (["lags"] if lags else [])
        rows = []
        for i, s in enumerate(schedule.steps):
            (t0, s0), (t1, s1) = _times(proc, ts[i]), _times(proc, ts[i + 1])
            cells = [str(i + 1), f"{t0} → {t1}"] + ([] if sigma_only else [f"{s0} → {s1}"])
            cells += [str(s.order), s.prediction, s.derivative, s.corrector, _fmt(s.eta, 3)]
            rows.append(cells + ([", ".join(map(str, s.lags)) or "—"] if lags else []))
    else:  # a named sampler: its own rule per step, so the table lists its grid
        params = ", ".join(f"{k}={v}" for k, v in sorted(dict(getattr(schedule, "params", ()) or {}).items()))
        lines = [f"named sampler `{getattr(schedule, 'sampler', '?')}`" + (f" ({params})" if params else "")
                 + f", process `{schedule.process}`, NFE {schedule.nfe}, {len(ts) - 1} steps", ""]
        head = ["step", span] + ([] if sigma_only else ["σ"])
        rows = []
        for i in range(len(ts) - 1):
            (t0, s0), (t1, s1) = _times(proc, ts[i]), _times(proc, ts[i + 1])
            rows.append([str(i + 1), f"{t0} → {t1}"] + ([] if sigma_only else [f"{s0} → {s1}"]))
    return "\n".join(lines + _table(head, rows))


def schedule_json(schedule: AnySchedule) -> str:
    """The schedule's JSON document, one key (and one step) a line: one long line does not fit a note."""
    doc = schedule.to_dict()
    lines = []
    for key, value in doc.items():
        if key == "steps" and value:
            inner = ",\n".join("    " + json.dumps(step) for step in value)
            lines.append(f'  "steps": [\n{inner}\n  ]')
        else:
            lines.append(f"  {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(lines) + "\n}"


def _table(head: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def baseline_table(outcome: NfeOutcome, metric: str = "value") -> str:
    """The test split's scores, best first: the searched winner among the baselines (bold)."""
    rows = [("**searched**", outcome.test_value, outcome.test_extras.get("searched", {}))]
    rows += [(f"`{name}`", v, outcome.test_extras.get(name, {})) for name, v in outcome.baselines.items()]
    rows.sort(key=lambda r: (not math.isfinite(r[1]), r[1]))
    extras = sorted({k for _, _, e in rows for k in e})
    head = ["rank", "schedule", f"test {metric}"] + extras
    body = [[str(i + 1), name, _fmt(v)] + [_fmt(e.get(k)) for k in extras] for i, (name, v, e) in enumerate(rows)]
    return "\n".join(_table(head, body))


def _config(config: Union[SearchConfig, Mapping[str, Any]]) -> tuple[Optional[SearchConfig], dict[str, Any]]:
    if isinstance(config, SearchConfig):
        return config, config.to_dict()
    try:
        return SearchConfig.from_dict(config), dict(config)
    except (ConfigError, TypeError, ValueError):   # an older spec: shown as it is
        return None, dict(config)


def _config_rows(cfg: Optional[SearchConfig], doc: Mapping[str, Any]) -> list[list[str]]:
    def get(key: str) -> Any:
        return getattr(cfg, key) if cfg is not None else doc.get(key)

    nfe = get("nfe")
    nfe_text = ", ".join(map(str, nfe)) if isinstance(nfe, (list, tuple)) else str(nfe)
    method = str(get("method"))
    if method == "s3":
        method += f" (predictor `{get('predictor')}`)"
    rows = [["model", f"`{get('model')}`"], ["NFE", nfe_text],
            ["metric", (f"`{get('metric')}`" if get("metric") else "the model's default") + " (lower is better)"],
            ["method", method],
            ["budget", f"{get('budget')} evaluations, shared by the NFE"],
            ["samples", f"{get('n_samples')} per evaluation, {get('n_test_samples')} on the test split"],
            ["seed", str(get("seed"))]]
    for key in ("prompt_set", "guidance_scale"):
        if get(key) is not None:
            rows.append([key.replace("_", " "), str(get(key))])
    if cfg is not None:
        default = type(cfg.options)().to_dict()
        changed = {k: v for k, v in cfg.options.to_dict().items() if v != default.get(k)}
        if changed:
            rows.append(["options", ", ".join(f"`{k}={json.dumps(v, sort_keys=True)}`"
                                              for k, v in sorted(changed.items()))])
    return rows


def importance_table(importance: Mapping[str, float]) -> str:
    rows = [[f"`{name}`", f"{value:.3f}"] for name, value in importance.items()]
    return "\n".join(_table(["param", "importance"], rows))


def study_note(config: Union[SearchConfig, Mapping[str, Any]], result: Optional[ResultLike] = None, *,
               title: str = "s3search search", spec: Optional[Mapping[str, Any]] = None,
               importances: Optional[Mapping[int, Mapping[str, float]]] = None) -> str:
    """The study's markdown note: the search's config and, once `result` is given, its outcome per NFE.

    `config` is a SearchConfig or a job spec (the service's `SearchConfig.to_dict` document); `spec`, when
    given, is also shown verbatim as JSON (the service does, so the exact submitted document is at hand).
    `importances` (`param_importances` of the study) adds each NFE's most important params.
    """
    cfg, doc = _config(config)
    metric = str((cfg.metric if cfg is not None else doc.get("metric")) or "value")
    lines = [f"# {title}", "", "## Search", ""] + _table(["", ""], _config_rows(cfg, doc)) + [""]
    # The dashboard renders no HTML (a <details> block shows as text), so the spec goes last, after the result.
    tail = ["## Spec, as submitted", "", "```json", json.dumps(spec, indent=2, sort_keys=True), "```", ""] \
        if spec is not None else []
    if result is None:
        lines += ["The winner and the test-split table of the baselines appear here when the search ends.", ""]
        return "\n".join(lines + tail)
    stopped = bool(result.get("stopped") if isinstance(result, Mapping) else getattr(result, "stopped", False))
    if stopped:
        lines += ["The search was stopped before its end: the best so far is shown, not validated nor tested.", ""]
    for o in outcomes(result):
        lines += [f"## NFE {o.nfe}", "",
                  f"Winner: {_fmt(o.best_value)} on the search split, {_fmt(o.validation_value)} on validation, "
                  f"**{_fmt(o.test_value)}** on the test split ({o.evaluations} evaluations at this NFE).", "",
                  "### Winning schedule", "", schedule_table(o.best), "",
                  "```json", schedule_json(o.best), "```", ""]
        if o.baselines or math.isfinite(o.test_value):
            lines += ["### Test split (fresh seeds)", "", baseline_table(o, metric), ""]
        if importances and importances.get(o.nfe):
            lines += ["### What mattered", "",
                      "Optuna's PED-ANOVA importance of the schedule's params over this NFE's complete trials "
                      "(the dashboard's importance plot pools every NFE):", "", importance_table(importances[o.nfe]),
                      ""]
    return "\n".join(lines + tail)


def param_importances(study: optuna.Study, top: int = 10) -> dict[int, dict[str, float]]:
    """The `top` most important params of each NFE's complete trials (PED-ANOVA); NFE with too few trials, or
    whose params vary too little to tell anything apart, are left out."""
    by_nfe: dict[int, list[optuna.trial.FrozenTrial]] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        nfe = t.user_attrs.get(ATTR.NFE)
        if isinstance(nfe, int) and t.params:
            by_nfe.setdefault(nfe, []).append(t)
    out: dict[int, dict[str, float]] = {}
    for nfe, trials in sorted(by_nfe.items()):
        if len(trials) < 4:
            continue
        # One NFE at a time, on an in-memory copy: step params of other NFE would only dilute it.
        shadow = optuna.create_study(direction="minimize")
        shadow.add_trials(trials)
        seen: dict[str, set] = {}
        for t in trials:
            for k, v in t.params.items():
                seen.setdefault(k, set()).add(v)
        # PED-ANOVA gives a param that never changed a share of importance: only those that did are assessed.
        varied = sorted(k for k, values in seen.items() if len(values) > 1)
        if not varied:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")   # "some regimes have less than 2 trials": expected on a short search
                imp = optuna.importance.get_param_importances(
                    shadow, params=varied, evaluator=optuna.importance.PedAnovaImportanceEvaluator())
        except (ValueError, RuntimeError, ZeroDivisionError):
            continue
        ranked = [(k, float(v)) for k, v in sorted(imp.items(), key=lambda kv: -kv[1]) if math.isfinite(v) and v > 0]
        if ranked:
            out[nfe] = dict(ranked[:top])
    return out


# ----- the history, by NFE ------------------------------------------------------------------------------
def history_figure(trials: Iterable[optuna.trial.FrozenTrial], metric: str = "value") -> dict[str, Any]:
    """Plotly figure JSON of the complete trials' values against trial number: per NFE, every evaluation
    (markers) and its best so far (a line); a log axis when every value is positive."""
    by_nfe: dict[int, list[tuple[int, float, str]]] = {}
    for t in trials:
        if t.state != TrialState.COMPLETE or t.value is None or not math.isfinite(t.value):
            continue
        nfe = t.user_attrs.get(ATTR.NFE)
        label = str(t.user_attrs.get(ATTR.BASELINE) or t.user_attrs.get(ATTR.SOURCE) or "")
        by_nfe.setdefault(int(nfe) if isinstance(nfe, int) else -1, []).append((t.number, float(t.value), label))
    data: list[dict[str, Any]] = []
    values: list[float] = []
    palette = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
    for k, (nfe, pts) in enumerate(sorted(by_nfe.items())):
        pts.sort()
        name = f"NFE {nfe}" if nfe >= 0 else "NFE ?"
        color = palette[k % len(palette)]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        values += ys
        best, run = [], math.inf
        for y in ys:
            run = min(run, y)
            best.append(run)
        data.append({"type": "scatter", "mode": "markers", "name": name, "x": xs, "y": ys,
                     "text": [f"#{p[0]} {p[2]}" for p in pts], "hovertemplate": "%{text}<br>%{y:.4g}<extra></extra>",
                     "marker": {"color": color, "size": 6, "opacity": 0.6}, "legendgroup": name})
        data.append({"type": "scatter", "mode": "lines", "name": f"{name} best", "x": xs, "y": best,
                     "line": {"color": color, "width": 2, "shape": "hv"}, "legendgroup": name,
                     "hovertemplate": "best %{y:.4g}<extra></extra>"})
    log = bool(values) and min(values) > 0
    yaxis: dict[str, Any] = {"title": {"text": f"{metric} (log scale)" if log else metric}}
    if log:
        yaxis["type"] = "log"
        if max(values) / min(values) > 30:
            # Over decades, plotly labels every digit between the powers of ten: too many to read.
            yaxis["dtick"] = 1
    elif values:
        # Without a log axis, keep the axis on the bulk of the values: a diverging schedule would flatten it.
        lo, hi = min(values), sorted(values)[max(0, int(0.9 * (len(values) - 1)))]
        pad = 0.1 * (hi - lo or 1.0)
        yaxis["range"] = [lo - pad, hi + pad]
    # Title at the left: the dashboard's plot toolbar takes the top right.
    return {"data": data, "layout": {"title": {"text": "History by NFE", "x": 0.02, "xanchor": "left"},
                                     "xaxis": {"title": {"text": "trial"}},
                                     "yaxis": yaxis, "legend": {"orientation": "h", "y": -0.2},
                                     "margin": {"l": 60, "r": 20, "t": 50, "b": 40}}}


class _FigureJSON:
    """What optuna-dashboard's save_plotly_graph_object reads of a plotly Figure, without plotly."""

    def __init__(self, figure: Mapping[str, Any]) -> None:
        self._text = json.dumps(figure, allow_nan=False)

    def to_json(self) -> str:
        return self._text


def save_history_plot(study: optuna.Study, metric: Optional[str] = None) -> bool:
    """Write `history_figure` of the study to its dashboard page; False when optuna-dashboard is missing or
    the study has no complete trial yet. Storage errors propagate (the caller knows which it may ignore)."""
    try:
        from optuna_dashboard import save_plotly_graph_object
    except ImportError:
        return False
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not trials:
        return False
    name = metric or str(study.user_attrs.get("metric") or "value")
    save_plotly_graph_object(study, _FigureJSON(history_figure(trials, name)),  # type: ignore[arg-type]
                             graph_object_id=HISTORY_PLOT_ID)
    return True


def save_study_note(study: optuna.Study, text: str, *, history: bool = True) -> bool:
    """Write `text` as the study's dashboard note, name its objective after the study's metric and, with
    `history`, refresh the history-by-NFE figure.

    False when optuna-dashboard is not installed (the note is a convenience, the study is complete without
    it); storage errors propagate, so a caller that must tell a lost claim from a hiccup can.
    """
    try:
        from optuna_dashboard import save_note
    except ImportError:
        return False
    save_note(study, text)
    metric = study.user_attrs.get("metric")
    if isinstance(metric, str) and metric and study.metric_names != [metric]:
        # The dashboard's own plots then name the axis after the metric instead of "Objective 0".
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)   # stable since optuna 3.2
            study.set_metric_names([metric])
    if history:
        save_history_plot(study)
    return True


def publish_study_note(study: optuna.Study, config: Union[SearchConfig, Mapping[str, Any]],
                       result: Optional[ResultLike] = None, *, title: str = "s3search search",
                       spec: Optional[Mapping[str, Any]] = None) -> bool:
    """Render the study's note (with each NFE's param importance once there is a result) and save it with the
    history-by-NFE figure: the one call the CLI and the service make. False without optuna-dashboard."""
    importances = param_importances(study) if result is not None else None
    return save_study_note(study, study_note(config, result, title=title, spec=spec, importances=importances))
