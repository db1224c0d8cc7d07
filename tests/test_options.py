"""The typed search contract: every option is checked once, in SearchOptions, with an error naming it; the
same document round-trips through from_dict / to_dict; preflight finds what a runner would fail on; a search
whose first evaluations all fail the same way stops at once with that error."""

from __future__ import annotations

import math

import optuna
import pytest

from s3search.evaluation.base import EvalResult
from s3search.search.config import ConfigError, Limits, SearchConfig, SearchFailed, check_limits
from s3search.search.options import SearchOptions, option_rules
from s3search.search.run import preflight, run_search

optuna.logging.set_verbosity(optuna.logging.WARNING)

# (options, the field the error must name): every case a user reported accepted or crashing, and more.
BAD_OPTIONS = [
    ({"batch_size": 0}, "options.batch_size"), ({"batch_size": -3}, "options.batch_size"),
    ({"batch_size": "abc"}, "options.batch_size"), ({"batch_size": 2.5}, "options.batch_size"),
    ({"batch_size": True}, "options.batch_size"), ({"population": 1e9}, "options.population"),
    ({"population": 10**9}, "options.population"), ({"children": 10**9}, "options.children"),
    ({"validate_top": 10**9}, "options.validate_top"), ({"generations": -5}, "options.generations"),
    ({"init_random": -1}, "options.init_random"), ({"space": {"bogus": 1}}, "options.space"),
    ({"space": {"max_order": 9}}, "options.space"), ({"space": "all"}, "options.space"),
    ({"t_min": "x"}, "options.t_min"), ({"t_min": 0}, "options.t_min"), ({"t_min": 50, "t_max": 1}, "options.t_max"),
    ({"max_seed_fraction": "x"}, "options.max_seed_fraction"), ({"max_seed_fraction": 2}, "options.max_seed_fraction"),
    ({"direct": -0.1}, "options.direct"), ({"explore": 1.5}, "options.explore"),
    ({"niche_within": 0.5}, "options.niche_within"), ({"refine_share": 1.0}, "options.refine_share"),
    ({"refine_method": "adam"}, "options.refine_method"), ({"refine_arms": 17}, "options.refine_arms"),
    ({"refine_box": 0}, "options.refine_box"), ({"refine_sigma": math.inf}, "options.refine_sigma"),
    ({"refine_population": 1}, "options.refine_population"), ({"seed_baselines": "yes"}, "options.seed_baselines"),
    ({"baselines": ["ddim", "nope"]}, "options.baselines"), ({"baselines": []}, "options.baselines"),
    ({"baseline_grids": ["spiral"]}, "options.baseline_grids"), ({"validation_samples": 1},
                                                                  "options.validation_samples"),
    ({"predictor_params": [1]}, "options.predictor_params"), ({"predictor_params": {"a": math.nan}},
                                                               "options.predictor_params"),
    ({"warm_start": "older"}, "options.warm_start"), ({"bogus": 1}, "options.bogus"),
    ({"top_baselines_on_grids": -1}, "options.top_baselines_on_grids"),
    ({"variants_of_best": 1000}, "options.variants_of_best"), ({"test_baselines": None}, "options.test_baselines"),
    ({"target": "cuda"}, "options.target"), ({"target": 3}, "options.target"),
]


@pytest.mark.parametrize("options, field", BAD_OPTIONS, ids=[str(o) for o, _ in BAD_OPTIONS])
def test_each_bad_option_raises_naming_its_field(options, field):
    with pytest.raises(ConfigError) as info:
        SearchOptions.from_dict(options)
    assert field in info.value.fields, str(info.value)
    assert field.split(".")[1] in str(info.value)


def test_every_error_of_a_document_is_named_at_once():
    with pytest.raises(ConfigError) as info:
        SearchConfig.from_dict({"model": "gmm-64d", "nfe": [0], "budget": 0, "method": "annealing",
                                "options": {"batch_size": 0, "population": -1}})
    assert set(info.value.fields) == {"nfe", "budget", "method", "options.batch_size", "options.population"}


def test_server_only_options_are_refused_where_asked():
    doc = {"model": "gmm-64d", "nfe": 5, "options": {"evaluator": {"device": "cuda"}}}
    assert SearchConfig.from_dict(doc).options.evaluator == {"device": "cuda"}
    with pytest.raises(ConfigError) as info:
        SearchConfig.from_dict(doc, allow_server_only=False)
    assert info.value.fields == ["options.evaluator"] and "set by the server" in str(info.value)


def test_documents_round_trip_and_defaults_live_in_one_place():
    config = SearchConfig.from_dict({"model": "gmm-64d", "nfe": [4, 6], "budget": 30,
                                     "options": {"batch_size": 4, "space": {"max_order": 2},
                                                 "baselines": ["ddim", "dpmpp_2m"],
                                                 "warm_start": {"studies": ["a"]}}})
    again = SearchConfig.from_dict(config.to_dict())
    assert again == config and again.to_dict() == config.to_dict()
    assert config.options.batch_size == 4 and config.options.population == SearchOptions().population
    assert config.options.baselines == ("ddim", "dpmpp_2m") and config.options.warm_start.studies == ("a",)
    assert set(config.to_dict()["options"]) == set(option_rules())
    assert "evaluator" not in config.to_dict(include_server_only=False)["options"]


def test_limits_are_applied_in_one_function():
    config = SearchConfig(model="gmm-64d", nfe=(5,), n_samples=500, budget=20,
                          options={"validation_samples": 20_000})
    check_limits(config, Limits())
    with pytest.raises(ConfigError) as info:
        check_limits(config, Limits(max_samples=100, max_test_samples=100, max_budget=10, max_nfe=4))
    assert set(info.value.fields) == {"nfe", "n_samples", "n_test_samples", "options.validation_samples", "budget"}


def test_preflight_fills_the_models_metric_and_refuses_one_it_cannot_compute():
    assert preflight(SearchConfig(model="digits", nfe=(5,))).metric == "fd-features"
    assert preflight(SearchConfig(model="gmm-64d", nfe=(5,))).metric == "fd"
    with pytest.raises(ConfigError) as info:
        preflight(SearchConfig(model="gmm-64d", nfe=(5,), metric="fid"))
    assert info.value.fields == ["metric"]
    with pytest.raises(ConfigError) as info:
        preflight(SearchConfig(model="gmm-64d", nfe=(5,), predictor="ridge", options={"predictor_params":
                                                                                      {"no_such": 1}}))
    assert info.value.fields == ["options.predictor_params"]


class BrokenEvaluator:
    """Fails every candidate the same way, as a missing weights file would."""

    def __init__(self) -> None:
        self.evaluated = 0

    def evaluate(self, schedules, request):
        self.evaluated += len(schedules)
        return [EvalResult(s.canonical_hash(), math.inf, s.nfe, 0.0, error="FileNotFoundError: weights.pth")
                for s in schedules]


def test_a_search_whose_evaluations_all_fail_alike_stops_within_one_batch(tmp_path):
    ev = BrokenEvaluator()
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", direction="minimize")
    config = SearchConfig(model="gmm-8x4", nfe=(4,), n_samples=64, n_test_samples=64, budget=60,
                          predictor="ridge", options={"batch_size": 5})
    with pytest.raises(SearchFailed, match="FileNotFoundError: weights.pth"):
        run_search(config, study, evaluator=ev)
    failed = study.get_trials(states=(optuna.trial.TrialState.FAIL,))
    assert 2 <= ev.evaluated <= 5 and len(failed) == ev.evaluated


def test_the_docs_list_every_option_with_its_default():
    import json
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "search.md").read_text()
    defaults = SearchOptions().to_dict()
    missing = [name for name in option_rules() if f"| `{name}` | `{json.dumps(defaults[name])}` |" not in text]
    assert not missing, f"docs/search.md's options table lacks or misstates: {missing}"


def test_the_cli_stops_at_once_with_one_line_when_every_evaluation_fails(tmp_path, monkeypatch):
    """An unwritable cache makes every real evaluation fail the same way: one line, exit code 1."""
    from typer.testing import CliRunner

    from s3search.cli import app

    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    monkeypatch.setenv("S3SEARCH_CACHE_DIR", str(not_a_dir))
    args = ["search", "--model", "gmm-8x4", "--nfe", "4", "--budget", "40", "--n-samples", "64",
            "--n-test-samples", "64", "--metric", "fd", "--storage", f"sqlite:///{tmp_path / 'cli.db'}"]
    run = CliRunner().invoke(app, args)
    assert run.exit_code == 1, run.output
    errors = [line for line in run.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "NotADirectoryError" in errors[0] and "Traceback" not in run.output
    study = optuna.load_study(study_name="gmm-8x4-nfe4-s3-fd-seed0", storage=f"sqlite:///{tmp_path / 'cli.db'}")
    assert len(study.get_trials(states=(optuna.trial.TrialState.FAIL,))) <= 10     # one batch, not the budget


def test_progress_fraction_counts_validation_and_test_and_reaches_one_only_at_the_end(tmp_path):
    from test_search import GaussianEvaluator, config

    reports = []
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'f.db'}", direction="minimize")
    run_search(config(12), study, evaluator=GaussianEvaluator(), progress=reports.append)
    fractions = [p.fraction for p in reports]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and reports[-1].message == "done"
    budget_spent = next(p for p in reports if p.evaluations == 12)
    assert budget_spent.fraction < 0.9                # validation and test, at more samples, are still to come
    assert all(f < 1.0 for f in fractions[:-1])
