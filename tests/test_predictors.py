"""Predictors: learn a known ranking, survive a save / load round trip bit for bit, report honest quality."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import optuna
import pytest

import predictors
from predictors import features
from predictors.base import prepare_targets
from predictors.probe import probe_errors
from predictors.warm_start import load_pairs
from s3search import processes
from s3search.schedule import SolverSchedule, StepSpec
from s3search.space import SearchSpace

FAST = {"torch-lstm": {"epochs": 60, "hidden": 24}, "torch-mlp": {"epochs": 60, "hidden": 24},
        "lightgbm-rank": {"num_boost_round": 80}, "lightgbm-reg": {"num_boost_round": 80}, "ridge": {}}


def hidden_score(s) -> float:
    """A smooth function of the grid and the step choices that a good predictor can learn."""
    p = processes.get(s.process)
    lam = np.array([p.lambda_(t) for t in s.timesteps])
    h = np.diff(lam)
    target = np.linspace(1.5, 0.5, len(h))
    target = target / target.sum() * (lam[-1] - lam[0])
    v = float(((h - target) ** 2).sum())
    for st in s.steps:
        v += 0.3 * (3 - min(st.order, 3)) + (0.5 if st.prediction == "noise" else 0.0) + 0.4 * st.eta
    return v + (0.5 if s.final == "none" else 0.0)


@pytest.fixture(scope="module")
def data():
    space = SearchSpace("vp-linear", (5, 6))
    rng = np.random.default_rng(0)
    scheds = [space.random(rng) for _ in range(260)]
    return scheds, [hidden_score(s) for s in scheds]


@pytest.mark.parametrize("name", sorted(FAST))
def test_learns_the_ranking_and_round_trips(name, data, tmp_path):
    scheds, values = data
    p = predictors.get(name, **FAST[name]).fit(scheds[:160], values[:160])
    q = p.evaluate(scheds[160:], values[160:], k=10)
    assert q.n == 100
    assert q.kendall_tau > 0.5, q
    # Predictions are better than chance at picking the top: recall of a random pick would be ~0.1.
    assert q.topk_recall >= 0.3, q
    folder = p.save(tmp_path / name)
    doc = json.loads((folder / "predictor.json").read_text())
    assert doc["kind"] == name
    for f in folder.iterdir():      # text, JSON or safetensors only: nothing pickled
        assert f.suffix in (".json", ".txt", ".safetensors"), f
        assert not f.read_bytes().startswith(b"\x80")
    back = predictors.load(folder)
    assert type(back) is type(p)
    np.testing.assert_array_equal(back.predict(scheds[160:]), p.predict(scheds[160:]))
    assert back.rank(scheds[160:]) == p.rank(scheds[160:])


def test_one_predictor_serves_several_nfe(data):
    scheds, values = data
    p = predictors.get("lightgbm-reg", **FAST["lightgbm-reg"]).fit(scheds[:160], values[:160])
    for nfe in (5, 6):
        idx = [i for i in range(160, 260) if scheds[i].nfe == nfe]
        q = p.evaluate([scheds[i] for i in idx], [values[i] for i in idx])
        assert q.kendall_tau > 0.4, (nfe, q)


def test_ranking_quality_figures_are_exact():
    assert predictors.kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert predictors.kendall_tau([1, 2, 3, 4], [40, 30, 20, 10]) == pytest.approx(-1.0)
    assert predictors.kendall_tau([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
    assert predictors.topk_recall([1, 2, 3, 4], [1, 2, 3, 4], k=2) == 1.0
    assert predictors.topk_recall([1, 2, 3, 4], [4, 3, 2, 1], k=2) == 0.0
    assert predictors.topk_recall([1, 5, 2, 4], [1, 2, 3, 4], k=2) == 0.5


def test_failed_evaluations_become_the_worst_of_their_group():
    y = prepare_targets([1.0, 10.0, math.inf, 100.0, 5.0, float("nan")], [0, 0, 0, 1, 1, 1])
    assert y[2] > max(y[0], y[1]) and y[5] > max(y[3], y[4])
    assert y[0] < y[1] and y[4] < y[3]
    for g in (slice(0, 3), slice(3, 6)):
        assert abs(y[g].mean()) < 1e-12 and abs(y[g].std() - 1) < 1e-12


def test_fixed_vector_has_one_length_for_every_nfe():
    rng = np.random.default_rng(1)
    dims = set()
    for nfe in (3, 5, 8, 10):
        s = SearchSpace("edm", nfe).random(rng)
        v = features.vector(s)
        dims.add(v.shape)
        assert np.isfinite(v).all()
        rows, glob = features.sequence(s)
        assert rows.shape == (len(s.steps), len(features.STEP_NAMES))
        assert glob.shape == (len(features.GLOBAL_NAMES),)
        # lambda increments in the rows add up to the grid's span
        lam = [processes.get("edm").lambda_(t) for t in s.timesteps]
        assert rows[:, features.STEP_NAMES.index("h")].sum() == pytest.approx(lam[-1] - lam[0])
    assert dims == {(features.FeatureSpec().vector_dim,)}


def test_bad_arguments_raise_value_errors(tmp_path, data):
    scheds, values = data
    with pytest.raises(ValueError, match="predictor"):
        predictors.get("xgboost")
    with pytest.raises(ValueError, match="bogus"):
        predictors.get("ridge", bogus=1)
    with pytest.raises(ValueError, match="values"):
        predictors.get("ridge").fit(scheds[:5], values[:4])
    with pytest.raises(ValueError, match="not fitted"):
        predictors.get("ridge").predict(scheds[:2])
    with pytest.raises(ValueError, match="predictor.json"):
        predictors.load(tmp_path)
    (tmp_path / "predictor.json").write_text(json.dumps({"kind": "pickle", "format_version": 1}))
    with pytest.raises(ValueError, match="kind"):
        predictors.load(tmp_path)


def test_warm_start_reads_pairs_of_earlier_studies(tmp_path, data):
    scheds, values = data
    url = f"sqlite:///{tmp_path / 'warm.db'}"
    for name, model in (("old-a", "digits"), ("old-b", "gmm-64d")):
        study = optuna.create_study(study_name=name, storage=url)
        study.set_user_attr("model", model)
        for s, v in zip(scheds[:6], values[:6]):
            t = study.ask()
            t.set_user_attr("schedule", s.to_json())
            study.tell(t, v)
        t = study.ask()                                   # a failed evaluation is not a pair
        t.set_user_attr("schedule", scheds[7].to_json())
        study.tell(t, state=optuna.trial.TrialState.FAIL)
    pairs = load_pairs(url, ["old-a", "old-b"], model="digits")
    assert [p.study for p in pairs] == ["old-a"] * 6
    assert [p.schedule for p in pairs] == scheds[:6] and [p.value for p in pairs] == values[:6]
    assert len(load_pairs(url, ["old-a", "old-b"])) == 12
    with pytest.raises(ValueError, match="old-c"):
        load_pairs(url, ["old-c"])


# ----- the error-analysis features ------------------------------------------------------------------------------
def _logsnr_schedule(n: int, order: int = 1, **step) -> SolverSchedule:
    proc = processes.get("edm")
    lam = np.linspace(proc.lambda_(proc.t_max), proc.lambda_(proc.t_min), n + 1)
    ts = [proc.t_of_lambda(float(x)) for x in lam]
    ts[0], ts[-1] = proc.t_max, proc.t_min
    steps = [StepSpec(order=min(order, i + 1), **step) for i in range(n)]
    return SolverSchedule("edm", tuple(ts), tuple(steps))


def _global(s, name: str) -> float:
    return float(features.global_features(s)[features.GLOBAL_NAMES.index(name)])


def _step(s, i: int, name: str) -> float:
    return float(features.step_features(s)[i, features.STEP_NAMES.index(name)])


def test_error_features_follow_the_choice_they_describe():
    base = _logsnr_schedule(6, order=3)
    stoch = replace(base, steps=base.steps[:4] + (replace(base.steps[4], eta=0.5),) + base.steps[5:])
    assert _step(base, 4, "eta_x_h") == 0.0 and _step(stoch, 4, "eta_x_h") > 0.0
    assert _step(stoch, 4, "noise_injected") > 0.0
    assert _global(stoch, "sum_eta_x_h") > _global(base, "sum_eta_x_h")
    # a corrector adds the new point: one order more, and a corrector-weighted h
    corr = replace(base, steps=base.steps[:2] + (replace(base.steps[2], corrector="unic"),) + base.steps[3:])
    assert _step(corr, 2, "effective_order") == _step(base, 2, "effective_order") + 1
    assert _step(base, 2, "corrector_x_h") == 0.0 < _step(corr, 2, "corrector_x_h")
    # reaching further back for a multistep node: a farther node, another extrapolation constant (on a uniform
    # grid, sum |l_j(1)| over the nodes 0, -1, -2 is 3 + 3 + 1; over 0, -1, -3 it is 8/3 + 2 + 1/3)
    far = replace(base, steps=base.steps[:4] + (replace(base.steps[4], lags=(1, 3)),) + base.steps[5:])
    assert _step(base, 4, "log_far_node") == pytest.approx(math.log(2))
    assert _step(far, 4, "log_far_node") == pytest.approx(math.log(3))
    assert _step(base, 4, "log_extrapolation") == pytest.approx(math.log(7))
    assert _step(far, 4, "log_extrapolation") == pytest.approx(math.log(5))
    # high order on long steps: stretching the grid's first step raises the order-3 maximum of h
    assert _global(base, "max_h_order3") > 0.0 == _global(_logsnr_schedule(6, order=2), "max_h_order3")
    # final='none' keeps the last noise level; 'denoise' removes it
    assert _global(replace(base, final="none"), "last_residual_sigma") == pytest.approx(math.log(0.002))
    assert _global(base, "last_residual_sigma") == 0.0
    assert _global(replace(base, first_step="zero-x0"), "first_step_skip_x_h") > 0.0
    assert _global(base, "first_step_skip_x_h") == 0.0


def test_probe_error_falls_with_order_and_steps_and_is_deterministic():
    total = features.GLOBAL_NAMES.index("probe_log_err_total")
    err = {(n, p): features.global_features(_logsnr_schedule(n, order=p))[total] for n in (8, 16) for p in (1, 2)}
    # On Gaussian data a convergent method's error must drop with more steps and with higher order.
    assert err[(16, 1)] < err[(8, 1)] and err[(16, 2)] < err[(8, 2)]
    assert err[(8, 2)] < err[(8, 1)] and err[(16, 2)] < err[(16, 1)]
    # second order: halving h cuts the error (squared, so ~h^4) by well over the first-order factor
    assert err[(8, 2)] - err[(16, 2)] > err[(8, 1)] - err[(16, 1)]
    stoch = _logsnr_schedule(8, order=1, eta=1.0)
    np.testing.assert_array_equal(probe_errors(stoch), probe_errors(stoch))
    assert np.isfinite(probe_errors(stoch)).all()


def test_a_predictor_saved_with_older_feature_columns_is_refused(tmp_path, data):
    scheds, values = data
    folder = predictors.get("ridge").fit(scheds[:20], values[:20]).save(tmp_path / "p")
    doc = json.loads((folder / "predictor.json").read_text())
    doc["feature_spec"].pop("version")                   # as written before the columns were versioned
    (folder / "predictor.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="feature_spec.version"):
        predictors.load(folder)
