"""`s3search ays` writes a valid grid; the `ays_grids` option seeds baselines on the job model's AYS grid; bad
values are refused."""

from __future__ import annotations

import json

import optuna
import pytest
from typer.testing import CliRunner

from s3search import ays, processes
from s3search.cli import app
from s3search.search import baselines_seed
from s3search.search.options import ConfigError, SearchOptions
from s3search.search.run import run_search

from test_search import GaussianEvaluator, config

optuna.logging.set_verbosity(optuna.logging.WARNING)
TINY = ays.AYSSettings(iterations=4, n_samples=64, n_times=8)


def test_command_writes_a_monotone_grid_in_the_process_range(tmp_path):
    out = tmp_path / "grid.json"
    res = CliRunner().invoke(app, ["ays", "--model", "gmm-8x4", "--nfe", "5", "--iterations", "4",
                                   "--n-samples", "64", "--out", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    proc = processes.get(doc["process"])
    assert (doc["model"], doc["nfe"], doc["steps"]) == ("gmm-8x4", 5, 4)
    assert len(doc["sigmas"]) == len(doc["timesteps"]) == 5
    assert all(a > b for a, b in zip(doc["sigmas"], doc["sigmas"][1:]))
    assert all(proc.t_min <= t <= proc.t_max for t in doc["timesteps"])
    assert doc["timesteps"][0] == proc.t_max and doc["timesteps"][-1] == proc.t_min
    assert doc["settings"]["iterations"] == 4 and doc["iterations"] <= 4 and doc["model_rows"] > 0
    assert "ays stage 0" in res.stderr   # progress on stderr without --quiet


def test_command_quiet_prints_only_the_json():
    res = CliRunner().invoke(app, ["ays", "--model", "gmm-8x4", "--nfe", "4", "--iterations", "2",
                                   "--n-samples", "64", "--quiet"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["steps"] == 3 and res.stderr == ""


@pytest.mark.parametrize("args, says", [(["--model", "no-such-model", "--nfe", "4"], "no-such-model"),
                                        (["--model", "gmm-8x4", "--nfe", "2"], "nfe=2"),
                                        (["--model", "gmm-8x4", "--nfe", "4", "--n-samples", "0"], "n_samples"),
                                        (["--model", "gmm-8x4", "--nfe", "4", "--sigma-floor", "-1"],
                                         "sigma_floor")])
def test_command_refuses_bad_arguments(args, says):
    res = CliRunner().invoke(app, ["ays", *args, "--quiet"])
    assert res.exit_code != 0 and says in res.output


def test_option_is_validated():
    assert SearchOptions.from_dict({"ays_grids": True}).ays_grids is True
    with pytest.raises(ConfigError) as e:
        SearchOptions.from_dict({"ays_grids": "yes"})
    assert e.value.fields == ["options.ays_grids"]


def test_option_seeds_baselines_on_the_ays_grid_once_per_model(tmp_path, monkeypatch):
    monkeypatch.setattr(baselines_seed, "AYS_SETTINGS", TINY)
    baselines_seed.clear_ays_cache()
    calls = []
    real = ays.optimise_with
    monkeypatch.setattr(ays, "optimise_with", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    cfg = config(14, baselines=["ddim", "dpmpp_2m"], top_baselines_on_grids=2, baseline_grids=["logsnr"],
                 ays_grids=True, max_seed_fraction=1.0, loop_share=0.0, refine_share=0.0)
    study = optuna.create_study()
    run_search(cfg, study, evaluator=GaussianEvaluator())
    labels = {t.user_attrs.get("baseline") for t in study.trials}
    assert calls == [3]   # one optimisation, at nfe - 1 = 3 steps
    assert {"ddim@ays-opt", "dpmpp_2m@ays-opt"} <= labels
    run_search(cfg, optuna.create_study(), evaluator=GaussianEvaluator())
    assert calls == [3]   # the second search reuses the cached grid


def test_ays_grid_source_builds_baselines_at_their_own_step_counts(monkeypatch):
    monkeypatch.setattr(baselines_seed, "AYS_SETTINGS", TINY)
    baselines_seed.clear_ays_cache()
    extra = baselines_seed.ays_grid_sources("gmm-8x4", 5)
    cands = baselines_seed.on_grids(["dpmpp_2m", "edm_heun"], 5, "edm", grid_names=["ays-opt"], extra_grids=extra)
    assert [c.label for c in cands] == ["dpmpp_2m@ays-opt", "edm_heun@ays-opt"]
    assert all(c.schedule.nfe == 5 for c in cands)
    grid = baselines_seed.ays_result("gmm-8x4", 5).timesteps
    assert cands[0].schedule.timesteps == grid
