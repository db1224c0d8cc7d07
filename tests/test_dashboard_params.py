"""What optuna-dashboard gets from a search study: each trial's choices as Optuna params (so importance and
slice plots have data), the note the CLI and the service share, and the history split by NFE."""

from __future__ import annotations

import json
import math
import sys
from types import SimpleNamespace
from wsgiref.util import setup_testing_defaults

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from s3search.evaluation.base import EvalRequest, EvalResult
from s3search.schedule import SolverSchedule
from s3search.search import baselines_seed
from s3search.search.config import SearchConfig, SearchResult
from s3search.search.run import run_search
from s3search.search.study import ATTR, Candidate, Ledger, chash, schedule_from_json, schedule_params
from s3search.search.study_note import (HISTORY_PLOT_ID, history_figure, param_importances, publish_study_note,
                                        save_study_note, schedule_table, study_note)

MODEL = "gmm-8x4"
CONFIG = SearchConfig(model=MODEL, nfe=(4,), budget=16, n_samples=64, n_test_samples=64, seed=0,
                      options={"validate_top": 2, "validation_samples": 64})


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """A short real search (the local evaluator) into a SQLite study: (study, result)."""
    db = tmp_path_factory.mktemp("dashboard-params") / "study.db"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="short", storage=f"sqlite:///{db}", direction="minimize")
    result = run_search(CONFIG, study)
    return study, result


def _complete(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


# ----- params -------------------------------------------------------------------------------------------
def test_every_trial_carries_its_schedules_choices_as_params(searched):
    study, _ = searched
    trials = _complete(study)
    assert len(trials) == CONFIG.budget
    solver = 0
    for t in trials:
        sched = schedule_from_json(t.user_attrs[ATTR.SCHEDULE])
        n = len(sched.timesteps) - 1
        assert t.params["nfe4.n_steps"] == n and t.params["final"] == sched.final
        assert t.params["grid.t_start"] == pytest.approx(sched.timesteps[0])
        assert sum(t.params[f"nfe4.step{i + 1}.lambda_share"] for i in range(n)) == pytest.approx(1.0)
        if isinstance(sched, SolverSchedule):
            solver += 1
            assert t.params["first_step"] == sched.first_step
            for i, step in enumerate(sched.steps):
                assert t.params[f"nfe4.step{i + 1}.order"] == step.canonical().order
                assert t.params[f"nfe4.step{i + 1}.corrector"] == step.corrector
        else:   # a named baseline: only what the space's params can say about it
            assert "first_step" not in t.params and "nfe4.step1.order" not in t.params
    assert solver >= CONFIG.budget // 2


def test_one_distribution_per_param_name(searched):
    study, _ = searched
    seen: dict[str, object] = {}
    for t in study.get_trials(deepcopy=False):
        for name, dist in t.distributions.items():
            assert seen.setdefault(name, dist) == dist, name


def test_importance_is_computable_on_the_finished_study(searched):
    study, _ = searched
    importance = optuna.importance.get_param_importances(study)
    assert any(name.startswith("nfe4.step1.") for name in importance)
    assert all(math.isfinite(v) and v >= 0 for v in importance.values()) and sum(importance.values()) > 0


def _wsgi_get(app, path: str) -> tuple[str, object]:
    env: dict = {}
    setup_testing_defaults(env)
    env.update(PATH_INFO=path, REQUEST_METHOD="GET")
    got: dict = {}
    body = b"".join(app(env, lambda status, headers, exc=None: got.setdefault("status", status)))
    return got["status"], json.loads(body)


def test_the_dashboards_importance_names_the_schedule_choices(searched):
    """The dashboard falls back to equal importance for every param when Optuna computes none: real figures
    differ from one another."""
    pytest.importorskip("optuna_dashboard")
    from studies.dashboard import dashboard_app

    study, _ = searched
    status, doc = _wsgi_get(dashboard_app(study._storage), f"/api/studies/{study._study_id}/param_importances")
    assert status.startswith("200"), doc
    rows = doc["param_importances"][0]
    names = {r["name"] for r in rows}
    assert {"first_step", "final", "nfe4.step1.order"} <= names
    assert len({round(r["importance"], 9) for r in rows}) > 1


class _Constant:
    def evaluate(self, schedules, request):
        return [EvalResult(chash(s), 1.0 + i, s.nfe, 0.0) for i, s in enumerate(schedules)]


def test_a_study_that_cannot_take_a_param_still_gets_its_trial_evaluated(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'old.db'}")
    # A study an older version wrote: "final" already held with another distribution.
    study.add_trial(create_trial(params={"final": 0.5}, distributions={"final": FloatDistribution(0, 1)}, value=9.0))
    ledger = Ledger(study, _Constant(), EvalRequest(MODEL, "nll", 8))
    sched = baselines_seed.conventional(4, "edm")[0].schedule
    done = ledger.evaluate([Candidate(sched, source="baseline", label="x")])
    assert [e.value for e in done] == [1.0]
    trial = study.trials[-1]
    assert trial.state == TrialState.COMPLETE and trial.params == {}


def test_a_schedule_params_cannot_describe_carries_none():
    odd = SimpleNamespace(process="no-such-process", nfe=4, timesteps=(1.0, 0.5), final="denoise")
    assert schedule_params(odd) == ({}, {})


def test_per_nfe_names_keep_step_positions_apart():
    a = baselines_seed.conventional(4, "edm")[3].schedule
    b = baselines_seed.conventional(6, "edm")[3].schedule
    pa, pb = schedule_params(a)[0], schedule_params(b)[0]
    assert "nfe4.step1.order" in pa and "nfe6.step1.order" in pb
    assert not any(k.startswith("nfe6.") for k in pa) and not any(k.startswith("nfe4.") for k in pb)


# ----- the note -----------------------------------------------------------------------------------------
def _step_rows(table: str) -> list[str]:
    return [line for line in table.splitlines() if line.startswith("| ") and line.split("|")[1].strip().isdigit()]


def test_the_schedule_table_names_every_step(searched):
    _, result = searched
    best = result.best
    table = schedule_table(best)
    rows = _step_rows(table)
    assert [r.split("|")[1].strip() for r in rows] == [str(i + 1) for i in range(len(best.timesteps) - 1)]
    if isinstance(best, SolverSchedule):
        for row, step in zip(rows, best.steps):
            cells = [c.strip() for c in row.split("|")]
            assert step.prediction in cells and step.derivative in cells and step.corrector in cells
            assert str(step.order) in cells


def test_a_named_schedule_gets_its_grid_table():
    named = next(c.schedule for c in baselines_seed.conventional(4, "edm") if not isinstance(c.schedule, SolverSchedule))
    table = schedule_table(named)
    assert named.sampler in table and len(_step_rows(table)) == len(named.timesteps) - 1


def test_cli_note_shows_the_config_the_winner_and_the_test_table(searched):
    _, result = searched
    note = study_note(CONFIG, result, title="s3search study `short`")
    assert note.startswith("# s3search study `short`")
    for text in (f"`{MODEL}`", "## NFE 4", "### Winning schedule", "### Test split", "**searched**"):
        assert text in note, text
    for name in result.baselines:
        assert f"`{name}`" in note
    assert "validate_top=2" in note        # options that differ from the defaults are listed
    # The JSON block reads back as the winner.
    block = note.split("```json\n", 1)[1].split("\n```", 1)[0]
    assert schedule_from_json(block) == result.best


def test_the_published_note_names_what_mattered_at_each_nfe(searched):
    pytest.importorskip("optuna_dashboard")
    from optuna_dashboard import get_note

    study, result = searched
    imp = param_importances(study)
    assert list(imp) == [4] and 0 < len(imp[4]) <= 10
    assert all(not k.startswith("nfe") or k.startswith("nfe4.") for k in imp[4])
    assert list(imp[4].values()) == sorted(imp[4].values(), reverse=True)
    assert publish_study_note(study, CONFIG, result, title="short")
    note = get_note(study)
    assert "### What mattered" in note and f"`{next(iter(imp[4]))}`" in note


def test_param_importances_leave_out_params_that_never_changed():
    """PED-ANOVA hands a constant param a share of importance; the note's table must not list it."""
    study = optuna.create_study()
    dists = {"a": FloatDistribution(0, 4), "c": FloatDistribution(0, 2)}
    for i in range(12):
        study.add_trial(create_trial(value=float(i % 4) + 0.01 * i, params={"a": float(i % 4), "c": 1.0},
                                     distributions=dists, user_attrs={ATTR.NFE: 4}))
    imp = param_importances(study)
    assert "a" in imp[4] and "c" not in imp[4]


def test_note_before_a_result_says_what_comes():
    note = study_note(CONFIG.to_dict())
    assert "## Search" in note and "## NFE" not in note and "when the search ends" in note


def test_service_note_through_the_runner(searched, tmp_path):
    """The runner's `_note` renders the job's spec and its stored result document with the same builder."""
    pytest.importorskip("optuna_dashboard")
    from optuna_dashboard import get_note

    from studies.runner import Runner, _result_doc

    _, result = searched
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'job.db'}", study_name="s3s-job-x")
    study.set_user_attr("metric", "nll")
    job = SimpleNamespace(id="job-123", spec=CONFIG.to_dict())
    Runner._note(study, job, None)
    assert "job-123" in get_note(study) and "when the search ends" in get_note(study)
    Runner._note(study, job, _result_doc(result))
    note = get_note(study)
    assert "job-123" in note and f'"model": "{MODEL}"' in note and "### Winning schedule" in note
    assert len(_step_rows(note.split("### Winning schedule", 1)[1].split("###", 1)[0])) == len(result.best.timesteps) - 1
    assert study.metric_names == ["nll"]


def test_multi_nfe_result_documents_get_a_section_per_nfe(searched):
    from studies.runner import _result_doc

    _, result = searched
    per = {4: result, 6: SearchResult(best=baselines_seed.conventional(6, "edm")[3].schedule, best_value=2.0,
                                      test_value=2.5, baselines={"ddim": 9.0}, evaluations=3)}
    doc = _result_doc(SimpleNamespace(**{**result.__dict__, "per_nfe": per, "stopped": False}))
    note = study_note({**CONFIG.to_dict(), "nfe": [4, 6]}, doc)
    assert note.index("## NFE 4") < note.index("## NFE 6") and "| 1 | **searched** | 2.5 |" in note


# ----- history by NFE -----------------------------------------------------------------------------------
def _trial(number: int, nfe: int, value: float):
    t = create_trial(value=value, user_attrs={ATTR.NFE: nfe, ATTR.SOURCE: "s3"})
    t.number = number
    return t


def test_history_figure_has_one_trace_and_one_best_line_per_nfe_on_a_log_axis():
    trials = [_trial(0, 4, 80_000.0), _trial(1, 4, 2.0), _trial(2, 6, 5.0), _trial(3, 6, 1.0), _trial(4, 4, 3.0)]
    fig = history_figure(trials, "fd")
    names = [d["name"] for d in fig["data"]]
    assert names == ["NFE 4", "NFE 4 best", "NFE 6", "NFE 6 best"]
    assert fig["data"][1]["y"] == [80_000.0, 2.0, 2.0] and fig["data"][0]["x"] == [0, 1, 4]
    assert fig["layout"]["yaxis"]["type"] == "log"


def test_history_figure_without_positive_values_clips_the_outliers_off_a_linear_axis():
    trials = [_trial(i, 4, v) for i, v in enumerate([-1.0, -0.5, 0.0, 0.2, 0.1, -0.2, 0.3, -0.4, 0.0, 0.1, 5e4])]
    axis = history_figure(trials)["layout"]["yaxis"]
    assert "type" not in axis and axis["range"][1] < 10


def test_save_study_note_writes_the_note_and_the_history(tmp_path):
    pytest.importorskip("optuna_dashboard")
    from optuna_dashboard import get_note

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}")
    study.add_trial(create_trial(value=1.0, user_attrs={ATTR.NFE: 4}))
    assert save_study_note(study, "# hello")
    assert get_note(study) == "# hello"
    assert any(HISTORY_PLOT_ID in k for k in study._storage.get_study_system_attrs(study._study_id))


def test_save_study_note_without_optuna_dashboard_is_a_no_op(monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna_dashboard", None)     # import then raises ImportError
    assert save_study_note(optuna.create_study(), "# hello") is False
