"""Multi-fidelity search (issue 19 item 2): options refused naming the field, a search that stays within its
model-call budget, low-fidelity trials stored with their fidelity and never winning, promotion of the right share.

The evaluator is test_search.py's closed-form Gaussian test bed run through the real integrator; it records every
request.
"""

from __future__ import annotations

import math

import optuna
import pytest
from optuna.trial import TrialState

from s3search.evaluation.base import EvalRequest, EvalResult
from s3search.schedule import SolverSchedule, StepSpec
from s3search.search.config import ConfigError, SearchConfig
from s3search.search.fidelity import FIDELITY, LOW, LOW_VALUE, PROMOTED, LowLedger, n_promoted
from s3search.search.options import Fidelity, SearchOptions
from s3search.search.run import preflight, run_search
from s3search.search.study import ATTR, Candidate

from test_search import GaussianEvaluator

optuna.logging.set_verbosity(optuna.logging.WARNING)
MODEL = "gmm-8x4"            # an EDM-process model of the registry; only its process is used here
SMALL = {"population": 32, "children": 32, "generations": 2, "batch_size": 6, "baselines": ["ddim", "dpmpp_2m"],
         "top_baselines_on_grids": 1, "validate_top": 3}
N, LOW_N, NFE = 256, 32, 4


def config(budget_calls=None, method: str = "s3", **options) -> SearchConfig:
    opts = {**SMALL, "fidelity": {"low_samples": LOW_N, "keep": 1 / 3}, "budget_calls": budget_calls, **options}
    return SearchConfig(model=MODEL, nfe=(NFE,), metric="fd", n_samples=N, n_test_samples=512, budget=60,
                        method=method, predictor="lightgbm-reg", seed=0, options=opts)


# ----- options ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options, field", [
    ({"fidelity": {"low_samples": 1}}, "options.fidelity.low_samples"),
    ({"fidelity": {"low_samples": 10.5}}, "options.fidelity.low_samples"),
    ({"fidelity": {"keep": 0.5}}, "options.fidelity.low_samples"),
    ({"fidelity": {"low_samples": 10, "keep": 0}}, "options.fidelity.keep"),
    ({"fidelity": {"low_samples": 10, "keep": 1.5}}, "options.fidelity.keep"),
    ({"fidelity": {"low_samples": 10, "rungs": 3}}, "options.fidelity.rungs"),
    ({"fidelity": {"low_samples": 10, "seed_keep": -0.1}}, "options.fidelity.seed_keep"),
    ({"fidelity": 100}, "options.fidelity"),
    ({"budget_calls": 0}, "options.budget_calls"),
    ({"budget_calls": 2.5}, "options.budget_calls"),
])
def test_bad_fidelity_options_are_refused_naming_the_field(options, field):
    with pytest.raises(ConfigError) as err:
        SearchOptions.from_dict(options)
    assert field in err.value.fields, err.value.fields
    assert field in str(err.value)


def test_fidelity_options_round_trip_and_check_against_the_job():
    opts = SearchOptions.from_dict({"fidelity": {"low_samples": 50}, "budget_calls": 12345})
    assert opts.fidelity == Fidelity(low_samples=50, keep=1 / 3, seed_keep=1 / 9) and opts.budget_calls == 12345
    assert SearchOptions.from_dict(opts.to_dict()) == opts
    assert SearchOptions().fidelity is None and SearchOptions().budget_calls is None
    cases = [(SearchConfig(model=MODEL, nfe=(NFE,), metric="fd", n_samples=N,
                           options={"fidelity": {"low_samples": N}}), "options.fidelity.low_samples"),
        (SearchConfig(model=MODEL, nfe=(NFE,), metric="fd", n_samples=N, method="random",
                      options={"fidelity": {"low_samples": LOW_N}}), "options.fidelity"),
        (SearchConfig(model=MODEL, nfe=(NFE, 6), metric="fd", n_samples=N,
                      options={"budget_calls": N * 6 * 2 - 1}), "options.budget_calls")]
    for cfg, field in cases:
        with pytest.raises(ConfigError) as err:
            preflight(cfg)
        assert err.value.fields == [field], err.value.fields
    preflight(SearchConfig(model=MODEL, nfe=(NFE, 6), metric="fd", n_samples=N, options={"budget_calls": N * 12}))


# ----- promotion -------------------------------------------------------------------------------------------------
def test_promotion_keeps_the_best_share_of_each_batch():
    assert [n_promoted(1 / 3, n) for n in (0, 1, 2, 3, 6, 9, 10)] == [0, 1, 1, 1, 2, 3, 4]
    assert n_promoted(1.0, 7) == 7 and n_promoted(0.5, 7) == 4

    class ByFirstTime:   # the score is the first time, so the order is known; one schedule fails
        def __init__(self):
            self.n = []

        def evaluate(self, schedules, request):
            self.n.append(request.n_samples)
            return [EvalResult(s.canonical_hash(), math.inf if s.timesteps[0] == 9.0 else s.timesteps[0], s.nfe, 0.0,
                               error="refused" if s.timesteps[0] == 9.0 else None) for s in schedules]

    scheds = [SolverSchedule(process="edm", timesteps=(float(t0), 1.0, 0.1), steps=(StepSpec(), StepSpec()))
              for t0 in (5, 9, 3, 8, 2, 7, 4, 6, 10)]
    study = optuna.create_study()
    ev = ByFirstTime()
    low = LowLedger.for_search(study, ev, EvalRequest(MODEL, "fd", N), Fidelity(low_samples=LOW_N, keep=1 / 3))
    scored, up = low.screen([Candidate(s, source="s3") for s in scheds], keep=1 / 3)
    assert ev.n == [LOW_N] and len(scored) == 9
    assert [e.schedule.timesteps[0] for e in up] == [2.0, 3.0, 4.0]
    _, capped = low.screen([Candidate(s, source="s3") for s in scheds], keep=1 / 3)
    assert capped == [] and ev.n == [LOW_N]        # scored once: nothing new to score or promote
    trials = study.get_trials()
    assert len(trials) == 9 and all(t.state == TrialState.PRUNED for t in trials)
    assert sorted(t.user_attrs[LOW_VALUE] for t in trials if t.user_attrs[PROMOTED]) == [2.0, 3.0, 4.0]
    failed = next(t for t in trials if t.user_attrs[LOW_VALUE] is None)
    assert not failed.user_attrs[PROMOTED] and ATTR.ERROR in failed.user_attrs and not failed.intermediate_values
    assert all(t.intermediate_values == {LOW_N: t.user_attrs[LOW_VALUE]} for t in trials if t is not failed)
    # A fresh ledger on the same study reads them back (resume).
    again = LowLedger.for_search(study, ev, EvalRequest(MODEL, "fd", N), Fidelity(low_samples=LOW_N))
    assert again.load() == 9 and len(again.promoted) == 3


# ----- the search ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def searched():
    ev = GaussianEvaluator()
    study = optuna.create_study()
    budget = 30 * N * NFE          # the calls of 30 full evaluations
    result = run_search(config(budget), study, evaluator=ev)
    return ev, study, result, budget


def test_a_multi_fidelity_search_spends_no_more_than_its_model_calls(searched):
    ev, study, result, budget = searched
    assert 0 < result.model_calls <= budget
    assert ev.search_calls() == result.model_calls          # every search-split call is counted, once
    # Most of the budget is spent (less than one full evaluation is left over).
    assert budget - result.model_calls < N * NFE
    record = study.user_attrs["model_calls"][str(NFE)]
    assert record["calls"] == result.model_calls and record["low_samples"] == LOW_N
    assert record["low_evaluations"] == result.low_evaluations > result.evaluations == record["full_evaluations"]
    # Both fidelities ran on the search split, with their own sample counts only.
    assert {(s, n) for s, n, _ in ev.requests if s == "search"} == {("search", LOW_N), ("search", N)}


def test_low_fidelity_trials_are_stored_with_their_fidelity_and_never_win(searched):
    ev, study, result, _ = searched
    trials = study.get_trials()
    low = [t for t in trials if t.user_attrs.get(FIDELITY) == LOW]
    full = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(low) == result.low_evaluations and all(t.state == TrialState.PRUNED for t in low)
    assert all(t.user_attrs[ATTR.N_SAMPLES] == LOW_N for t in low)
    assert all(t.user_attrs[ATTR.N_SAMPLES] == N and FIDELITY not in t.user_attrs for t in full)
    assert study.best_trial.state == TrialState.COMPLETE
    full_hashes = {t.user_attrs[ATTR.HASH] for t in full}
    # Every full evaluation (the refinement's too) is a promoted low-fidelity candidate, and every promoted
    # candidate was evaluated in full.
    promoted = {t.user_attrs[ATTR.HASH] for t in low if t.user_attrs[PROMOTED]}
    assert promoted == full_hashes and any(t.user_attrs[ATTR.SOURCE] == "refine" for t in full)
    # A low-fidelity score is never the winner, a validation contender or a value of the final table.
    assert result.best.canonical_hash() in full_hashes
    assert set(study.user_attrs["validation"][str(NFE)]) <= full_hashes
    test = study.user_attrs["test"][str(NFE)]
    assert test["best_key"] == "searched:" + result.best.canonical_hash()
    assert result.best_value == next(t.value for t in full if t.user_attrs[ATTR.HASH] == result.best.canonical_hash())
    # Every seeded baseline has its row, scored on the test split.
    assert set(result.baselines) == {"ddim", "dpmpp_2m"} and all(math.isfinite(v) for v in result.baselines.values())


def test_promotion_keeps_the_share_in_the_search(searched):
    _, study, _, _ = searched
    low = [t for t in study.get_trials() if t.user_attrs.get(FIDELITY) == LOW]
    # Each loop round promotes ceil(keep x its batch) (the last one may be cut short by the calls left).
    rounds: dict[int, list] = {}
    for t in low:
        if t.user_attrs[ATTR.SOURCE] in ("s3", "s3-local"):
            rounds.setdefault(t.user_attrs[ATTR.GENERATION], []).append(bool(t.user_attrs[PROMOTED]))
    assert len(rounds) >= 2
    shares = [(sum(r), n_promoted(1 / 3, len(r))) for _, r in sorted(rounds.items())]
    assert all(up == want for up, want in shares[:-1]) and shares[-1][0] <= shares[-1][1], shares
    # A seeding stage is screened as one batch and promotes at most its best seed_keep (1/9) share.
    seeded = [t for t in low if t.user_attrs[ATTR.SOURCE] == "baseline"]
    n_up = sum(bool(t.user_attrs[PROMOTED]) for t in seeded)
    stages = 3
    assert 1 <= n_up <= n_promoted(1 / 9, len(seeded)) + stages - 1, (n_up, len(seeded))
    # The refinement promotes one proposal a round: far fewer than it scores.
    refined = [bool(t.user_attrs[PROMOTED]) for t in low if t.user_attrs[ATTR.SOURCE] == "refine"]
    assert 1 <= sum(refined) <= len(refined) / 2


def test_a_rerun_resumes_without_scoring_again(searched):
    ev, study, result, budget = searched
    before = list(ev.requests)
    again = run_search(config(budget), study, evaluator=ev)
    assert [r for r in ev.requests[len(before):] if r[0] == "search"] == []
    assert again.model_calls == result.model_calls and again.low_evaluations == result.low_evaluations
    assert again.best.canonical_hash() == result.best.canonical_hash()


def test_a_call_budget_without_fidelity_buys_full_evaluations():
    ev = GaussianEvaluator()
    cfg = config(12 * N * NFE + N, fidelity=None, validate_top=0, test_baselines=False)
    result = run_search(cfg, optuna.create_study(), evaluator=ev)
    assert result.evaluations == 12 and result.low_evaluations == 0 and result.model_calls == 12 * N * NFE


# ----- REST --------------------------------------------------------------------------------------------------------
REST_GOOD = {"model": "gmm-64d", "nfe": 5, "budget": 3, "n_samples": 16, "n_test_samples": 16, "predictor": "ridge"}


@pytest.mark.parametrize("options, field", [
    ({"fidelity": {"low_samples": 1}}, "options.fidelity.low_samples"),
    ({"fidelity": {"keep": 0.5}}, "options.fidelity.low_samples"),
    ({"fidelity": {"low_samples": 8, "keep": 2}}, "options.fidelity.keep"),
    ({"fidelity": {"low_samples": 8, "seed_keep": 0}}, "options.fidelity.seed_keep"),
    ({"fidelity": {"low_samples": 8, "rungs": 2}}, "options.fidelity.rungs"),
    ({"fidelity": {"low_samples": 16}}, "options.fidelity.low_samples"),          # not below n_samples
    ({"budget_calls": 0}, "options.budget_calls"),
    ({"budget_calls": 79}, "options.budget_calls"),                               # not one evaluation (16 x 5)
    ({"budget_calls": 100 * 16 * 5 + 1}, "options.budget_calls"),                 # above max_budget's worth
])
def test_rest_refuses_bad_fidelity_options_naming_the_field(tmp_path, options, field):
    from fastapi.testclient import TestClient

    from api import Settings, create_app
    from studies import jobs as repo
    from studies.keys import create_key

    app = create_app(Settings(database_url=f"sqlite:///{tmp_path / 'api.db'}", max_budget=100, max_samples=1000))
    with app.state.sessions() as s:
        key = create_key(s, "alice")[1]
    with TestClient(app) as client:
        r = client.post("/v1/jobs", json={**REST_GOOD, "options": options}, headers={"X-API-Key": key})
        assert r.status_code == 422, r.text
        assert field in [e["field"] for e in r.json()["errors"]], r.text
        good = {"fidelity": {"low_samples": 8}, "budget_calls": 20 * 16 * 5}
        ok = client.post("/v1/jobs", json={**REST_GOOD, "options": good}, headers={"X-API-Key": key})
        assert ok.status_code == 202, ok.text
        spec = client.get(ok.headers["Location"], headers={"X-API-Key": key}).json()
    with app.state.sessions() as s:
        assert repo.count_jobs(s) == 1
    assert spec["spec"]["options"]["fidelity"] == {"low_samples": 8, "keep": 1 / 3, "seed_keep": 1 / 9}
    assert spec["spec"]["options"]["budget_calls"] == 20 * 16 * 5


# ----- command line ------------------------------------------------------------------------------------------------
def test_the_command_line_takes_a_call_budget_and_low_samples(tmp_path):
    from typer.testing import CliRunner

    from s3search.cli import app
    from s3search.cli.search_cmd import with_budget_options

    assert with_budget_options({"fidelity": {"keep": 0.5}}, 10, 20) == {"fidelity": {"keep": 0.5, "low_samples": 20},
                                                                       "budget_calls": 10}
    db = f"sqlite:///{tmp_path / 'cli.db'}"
    calls = 12 * 200 * 4
    args = ["search", "--model", "gmm-8x4", "--nfe", "4", "--budget-calls", str(calls), "--low-samples", "40",
            "--n-samples", "200", "--n-test-samples", "400", "--storage", db, "--study-name", "cli", "--quiet",
            "--results", str(tmp_path / "r.json"),
            "--options", '{"population": 32, "children": 32, "generations": 2, "batch_size": 4, '
                         '"baselines": ["ddim", "dpmpp_2m"], "validate_top": 2}']
    run = CliRunner().invoke(app, args)
    assert run.exit_code == 0, run.output
    line = next(s for s in run.output.splitlines() if s.startswith("model calls (NFE 4, search split): "))
    spent = int(line.split(": ")[1].split(" ")[0].replace(",", ""))
    assert 0 < spent <= calls and "low-fidelity scores" in line
    import json

    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["runs"][0]["model_calls"]["calls"] == spent and doc["runs"][0]["model_calls"]["low_samples"] == 40
    bad = CliRunner().invoke(app, args[:-2] + ["--low-samples", "200"])
    assert bad.exit_code == 2 and "options.fidelity.low_samples" in bad.output


def test_a_search_whose_low_fidelity_evaluations_all_fail_alike_stops_at_once():
    from s3search.search.config import SearchFailed

    class Broken:
        def __init__(self):
            self.n = 0

        def evaluate(self, schedules, request):
            self.n += len(schedules)
            return [EvalResult(s.canonical_hash(), math.inf, s.nfe, 0.0, error="FileNotFoundError: weights.pth")
                    for s in schedules]

    ev = Broken()
    study = optuna.create_study()
    with pytest.raises(SearchFailed, match="low-fidelity evaluations all failed.*weights.pth"):
        run_search(config(30 * N * NFE), study, evaluator=ev)
    assert 2 <= ev.n <= 40      # the first stage's batch, not the whole budget
    assert all(t.state == TrialState.PRUNED for t in study.get_trials())
