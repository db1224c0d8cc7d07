"""Budget shares (the predictor loop keeps its share at small budgets) and predicted scores on the metric's scale."""

from __future__ import annotations

import collections
import math

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from predictors.base import kendall_tau
from s3search.search.config import SearchConfig
from s3search.search.options import SearchOptions
from s3search.search.run import run_search
from s3search.search.s3 import budget_shares, calibrator, loop_batch
from s3search.search.study import ATTR
from test_search import GaussianEvaluator

optuna.logging.set_verbosity(optuna.logging.WARNING)
LOOP = ("s3", "s3-local")
SMALL = {"population": 32, "children": 32, "generations": 2}


def _sources(budget: int, **options) -> collections.Counter:
    """Trial sources of a default-share search at NFE 5 on the EDM process (every baseline seeded, as on
    gmm-64d), with a cheap exact-Gaussian evaluator standing in for the model."""
    cfg = SearchConfig(model="gmm-8x4", nfe=(5,), metric="fd", n_samples=64, n_test_samples=64, budget=budget,
                       predictor="lightgbm-reg", seed=0,
                       options={**SMALL, "validate_top": 0, "test_baselines": False, **options})
    study = optuna.create_study()
    run_search(cfg, study, evaluator=GaussianEvaluator())
    return collections.Counter(t.user_attrs[ATTR.SOURCE] for t in study.get_trials())


def test_the_budget_splits_into_seeding_loop_and_refinement_shares():
    o = SearchOptions()
    for budget in (60, 200):
        s = budget_shares(o, budget)
        assert s.seed + s.loop + s.refine == budget
        assert s.loop >= 0.3 * budget and s.refine > 0
    # Rounds stay small enough that the loop's share at the demo's budget buys several of them.
    assert budget_shares(o, 60).loop // loop_batch(o, 60) >= 4
    assert loop_batch(o, 200) == o.batch_size
    old = SearchOptions(loop_share=0.0, refine_share=0.5)
    assert budget_shares(old, 60).loop == 0 and loop_batch(old, 60) == old.batch_size


@pytest.mark.parametrize("budget", [60, 200])
def test_the_predictor_loop_chooses_at_least_30_percent_and_every_baseline_runs(budget):
    sources = _sources(budget)
    assert sum(sources.values()) == budget
    assert sum(sources[s] for s in LOOP) >= 0.3 * budget, sources
    assert sources["baseline"] >= 23     # stage 1: every baseline at NFE 5 on its conventional grid
    assert sources["refine"] > 0


def test_the_old_shares_stay_reproducible_with_explicit_options():
    """loop_share 0 and refine_share 0.5 give the seeding before the loop had a share: at budget 60 it and the
    refinement take everything."""
    sources = _sources(60, loop_share=0.0, refine_share=0.5)
    assert sum(sources[s] for s in LOOP) == 0 and sources["variant"] > 0 and sources["baseline"] == 30


class _Linear:
    """A stand-in predictor whose raw score is an affine function of a schedule's first timestep."""

    def predict(self, schedules):
        return np.array([-3.0 + 0.01 * s for s in schedules])


def test_the_calibrator_maps_raw_scores_monotonically_onto_the_metric():
    scheds = [1.0, 2.0, 3.0, 4.0, 5.0]
    values = [0.2, 0.5, 0.4, 0.9, math.inf]      # a failure is left out of the fit
    to_metric = calibrator(_Linear(), scheds, values)
    raw = _Linear().predict([0.0, 1.5, 2.5, 3.5, 10.0])
    mapped = to_metric(raw)
    assert np.all(np.diff(mapped) >= 0)                            # never reorders
    assert mapped.min() >= 0.2 and mapped.max() <= 0.9             # on the metric's scale, clipped to the fit
    assert calibrator(_Linear(), [1.0], [0.3]) is None


def test_loop_trials_store_predicted_scores_on_the_metrics_scale():
    """A short real search (gmm-8x4, NFE 4): the predicted values of loop trials lie within the observed
    values; their Kendall tau with the true values is reported, not asserted."""
    cfg = SearchConfig(model="gmm-8x4", nfe=(4,), n_samples=256, n_test_samples=256, budget=40, seed=0,
                       options={**SMALL, "batch_size": 5, "baselines": ["ddim", "dpmpp_2m", "ipndm", "unipc_bh2_2"],
                                "top_baselines_on_grids": 1, "validate_top": 0, "test_baselines": False})
    study = optuna.create_study()
    run_search(cfg, study)
    done = [t for t in study.get_trials() if t.state == TrialState.COMPLETE]
    values = [t.value for t in done]
    loop = [t for t in done if t.user_attrs[ATTR.SOURCE] == "s3"]
    assert len(loop) >= 5
    predicted = [t.user_attrs[ATTR.PREDICTED] for t in loop]
    assert min(values) <= min(predicted) and max(predicted) <= max(values), (predicted, min(values), max(values))
    tau = kendall_tau(predicted, [t.value for t in loop])
    print(f"loop trials: {len(loop)}, Kendall tau (calibrated predicted vs true) {tau:.3f}; predicted "
          f"{min(predicted):.4g}..{max(predicted):.4g}, observed {min(values):.4g}..{max(values):.4g}")
