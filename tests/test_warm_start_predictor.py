"""Warm start on the search side: pairs of earlier studies at another NFE teach the predictor, a saved
predictor seeds a search, `s3search predictor save` writes one, and a request cannot name a path."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState
from typer.testing import CliRunner

import predictors
from predictors.warm_start import fit_from_studies, load_pairs
from s3search.cli import app
from s3search.search.options import ConfigError, SearchOptions
from s3search.search.run import run_search

from test_search import GaussianEvaluator, config  # tests/ is on sys.path (tests/conftest.py)


@pytest.fixture()
def earlier(tmp_path):
    """An earlier study at NFE 5 (the searches below run at NFE 4) on a SQLite file."""
    db = f"sqlite:///{tmp_path / 'w.db'}"
    old = optuna.create_study(study_name="old", storage=db)
    run_search(config(14, "random", nfe=(5,), seed_baselines=False), old, evaluator=GaussianEvaluator())
    return db, old


def test_pairs_of_another_nfe_are_used(earlier):
    db, old = earlier
    new = optuna.create_study(study_name="new", storage=db)
    result = run_search(config(16, warm_start={"studies": ["old"]}), new, evaluator=GaussianEvaluator())
    assert new.user_attrs["warm_start_pairs"] == len(load_pairs(db, ["old"])) > 0
    assert result.evaluations == 16
    sources = {t.user_attrs.get("source") for t in new.get_trials(states=(TrialState.COMPLETE,))}
    assert "warm" in sources                     # the random seeds went to the warm-started predictor's picks


def test_a_study_of_another_process_gives_no_pairs(earlier):
    db, old = earlier
    old.set_user_attr("process", "flow")
    new = optuna.create_study(study_name="new", storage=db)
    run_search(config(10, warm_start={"studies": ["old"]}), new, evaluator=GaussianEvaluator())
    assert new.user_attrs["warm_start_pairs"] == 0


def test_a_saved_predictor_seeds_a_search(earlier, tmp_path):
    db, _ = earlier
    saved = fit_from_studies(db, ["old"], "ridge").save(tmp_path / "preds" / "gauss")
    assert predictors.saved_names(tmp_path / "preds") == ["gauss"]
    new = optuna.create_study(study_name="seeded", storage=db)
    result = run_search(config(16, warm_start={"predictor_path": str(saved)}), new, evaluator=GaussianEvaluator())
    assert result.evaluations == 16
    assert new.user_attrs["warm_start_predicted"] > 0 and new.user_attrs["warm_start_pairs"] == 0
    sources = [t.user_attrs.get("source") for t in new.get_trials(states=(TrialState.COMPLETE,))]
    assert "warm" in sources


def test_predictor_save_command_writes_a_loadable_folder(earlier, tmp_path):
    db, _ = earlier
    out = CliRunner().invoke(app, ["predictor", "save", "--study", "old", "--storage", db, "--name", "g1",
                                   "--dir", str(tmp_path / "preds"), "--predictor", "ridge"])
    assert out.exit_code == 0, out.output
    assert predictors.load(tmp_path / "preds" / "g1").fitted
    listed = CliRunner().invoke(app, ["predictor", "list", "--dir", str(tmp_path / "preds")])
    assert listed.output.split() == ["g1"]
    bad = CliRunner().invoke(app, ["predictor", "save", "--study", "old", "--storage", db, "--name", "../x",
                                   "--dir", str(tmp_path / "preds")])
    assert bad.exit_code != 0


def test_a_saved_name_never_leaves_its_folder(tmp_path):
    for name in ("../etc", "a/b", "", ".hidden"):
        with pytest.raises(ValueError):
            predictors.saved_path(tmp_path, name)


@pytest.mark.parametrize("warm, field", [
    ({"studies": ["x"]}, "options.warm_start.studies"),
    ({"storage": "sqlite:///x.db"}, "options.warm_start.storage"),
    ({"predictor_path": "/tmp/p"}, "options.warm_start.predictor_path"),
    ({"predictor": "../p"}, "options.warm_start.predictor"),
    ({"jobs": ["nope"]}, "options.warm_start.jobs[0]"),
])
def test_a_request_names_only_jobs_and_predictor_names(warm, field):
    with pytest.raises(ConfigError) as e:
        SearchOptions.from_dict({"warm_start": warm}, allow_server_only=False)
    assert field in e.value.fields
    ok = SearchOptions.from_dict({"warm_start": {"jobs": ["a" * 32], "predictor": "p1"}}, allow_server_only=False)
    assert ok.to_dict(include_server_only=False)["warm_start"] == {"jobs": ["a" * 32], "predictor": "p1"}
