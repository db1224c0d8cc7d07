"""Plots and the export / plots commands, on a small synthetic results file."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from s3search import baselines, grids, plots
from s3search.cli import app
from s3search.denoisers import Denoiser
from s3search.models.base import ModelSpec
from s3search.processes import get as get_process

EDM = get_process("edm")


def _results(tmp_path, model="toy-images"):
    ts = grids.edm(EDM, 4)
    doc = {
        "format": "s3search-results", "version": 1, "model": model, "metric": "fd",
        "runs": [
            {"method": "s3", "nfe": 4, "value": 1.5,
             "schedule": baselines.get("dpmpp_2m", timesteps=ts, process="edm").to_dict(),
             "history": [9.0, None, 4.0, 5.0, 1.5]},
            {"method": "random", "nfe": 4, "value": 2.5, "history": [{"evaluation": 1, "value": 7.0},
                                                                      {"evaluation": 2, "value": 2.5}]},
            {"method": "s3", "nfe": 6, "value": 0.9, "history": [3.0, 0.9]},
        ],
        "baselines": [
            {"name": "ddim", "nfe": 4, "value": 6.0,
             "schedule": baselines.get("ddim", timesteps=ts, process="edm").to_json()},
            {"name": "ddim", "nfe": 6, "value": 3.0},
            {"name": "unipc_bh2_3", "nfe": 4, "value": 2.0},
        ],
    }
    path = tmp_path / "results" / "run1.json"
    path.parent.mkdir()
    path.write_text(json.dumps(doc))
    (tmp_path / "results" / "notes.json").write_text(json.dumps({"comment": "not a results file"}))
    return path


def _toy_model(name: str) -> ModelSpec:
    # Data: N(0, 0.25 I) images of shape (1, 4, 4); exact VE denoiser.
    den = Denoiser(fn=lambda x, t: x * 0.25 / (0.25 + t * t), process=EDM, name="toy")
    return ModelSpec(name=name, denoiser=den, shape=(1, 4, 4))


def test_best_so_far_ignores_failures():
    assert plots.best_so_far([3.0, math.inf, 5.0, 1.0]) == [3.0, 3.0, 3.0, 1.0]
    assert plots.best_so_far([math.inf]) == [math.inf]


def test_load_merges_a_folder_and_skips_other_json(tmp_path):
    path = _results(tmp_path)
    res = plots.load_results(path.parent)
    assert (res.model, res.metric) == ("toy-images", "fd")
    assert len(res.runs) == 3 and len(res.baselines) == 3
    assert res.runs[0].history[1] == math.inf
    assert res.runs[1].history == (7.0, 2.5)


@pytest.mark.parametrize("doc,match", [
    ({"runs": [{"nfe": 0, "value": 1.0}]}, r"runs\[0\]\.nfe"),
    ({"runs": [{"nfe": 4, "value": "x"}]}, r"runs\[0\]\.value"),
    ({"runs": [{"nfe": 4, "value": 1.0, "history": [1.0, "a"]}]}, r"history\[1\]"),
    ({"baselines": [{"nfe": 4, "value": 1.0}]}, r"baselines\[0\]"),
    ({"runs": {"nfe": 4}}, "must be lists"),
])
def test_bad_results_name_the_field(doc, match):
    with pytest.raises(ValueError, match=match):
        plots.parse_results(doc)


def test_make_all_draws_three_plots(tmp_path):
    path = _results(tmp_path)
    out = plots.make_all(path.parent, tmp_path / "out", n_samples=3, model_loader=_toy_model)
    names = sorted(p.name for p in out)
    assert names == ["best_so_far.png", "metric_vs_nfe.png", "samples_nfe4.png"]
    for p in out:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 2000


def test_sample_grid_rows_are_searched_then_baselines_by_value(tmp_path):
    res = plots.load_results(_results(tmp_path))
    rows = plots._grid_rows(res, 4)
    assert [label for label, _ in rows] == ["searched (s3)", "ddim"]  # unipc has no schedule in the file
    # A baseline named without its grid is rebuilt on the default grid, and its row label says which.
    assert [label for label, _ in plots._grid_rows(res, 6, process="edm")] == ["ddim@logsnr"]
    with pytest.raises(ValueError, match="nfe=8"):
        plots.plot_sample_grid(res, 8, _toy_model("t"), tmp_path / "x.png")
    with pytest.raises(ValueError, match="image"):
        plots.plot_sample_grid(res, 4, ModelSpec(name="v", denoiser=_toy_model("t").denoiser, shape=(2,)),
                               tmp_path / "x.png")


def test_unknown_model_skips_grids_with_a_warning(tmp_path):
    path = _results(tmp_path, model="no-such-model")
    with pytest.warns(UserWarning, match="sample grids skipped"):
        out = plots.make_all(path, tmp_path / "out")
    assert sorted(p.name for p in out) == ["best_so_far.png", "metric_vs_nfe.png"]


runner = CliRunner()


def test_cli_export_formats(tmp_path):
    sched = baselines.get("dpmpp_2m", timesteps=grids.edm(EDM, 5), process="edm")
    f = tmp_path / "s.json"
    f.write_text(sched.to_json())
    res = runner.invoke(app, ["export", "--schedule", str(f), "--format", "k-diffusion"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["sigmas"][-1] == 0.0 and len(doc["sigmas"]) == 7
    res = runner.invoke(app, ["export", "--schedule", str(f), "--format", "comfyui", "--field", "sigmas"])
    assert res.exit_code == 0 and res.stdout.strip().endswith("0.0")
    res = runner.invoke(app, ["export", "--schedule", str(f), "--format", "onnx"])
    assert res.exit_code != 0 and "format" in res.output
    f.write_text('{"process": "edm"}')
    res = runner.invoke(app, ["export", "--schedule", str(f)])
    assert res.exit_code != 0 and "timesteps" in res.output


def test_cli_plots(tmp_path):
    path = _results(tmp_path, model="no-such-model")
    res = runner.invoke(app, ["plots", "--results", str(path.parent), "--out", str(tmp_path / "figs")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "figs" / "metric_vs_nfe.png").exists()
    res = runner.invoke(app, ["plots", "--results", str(tmp_path / "missing"), "--out", str(tmp_path / "f")])
    assert res.exit_code != 0


def _search_bench_files(tmp_path):
    """Files in the formats bench/search_bench.py writes (quality and efficiency)."""
    ts = grids.edm(EDM, 4)
    quality = {"model": "toy-images", "metric": "fd", "seed": 0, "reference": 0.1, "runs": {
        "4": {"nfe": 4, "test_value": 1.1, "search_value": 1.0, "curve": [5.0, 3.0, 3.0, 1.0],
              "schedule": baselines.get("dpmpp_2m", timesteps=ts, process="edm").to_dict(),
              "baselines_test": {"ddim@logsnr": 4.0, "dpmpp_2m@edm": 2.0, "nonsense@nogrid": 9.0}}}}
    efficiency = {"model": "toy-images", "nfe": 4, "curves": {
        "s3": {"budget": 3, "curve": [4.0, 2.0, 2.0], "test_value": 2.1},
        "random": {"budget": 3, "curve": [6.0, 6.0, 3.0], "test_value": 3.3}}, "random_pairs": []}
    d = tmp_path / "bench"
    d.mkdir()
    (d / "search_quality_toy-images.json").write_text(json.dumps(quality))
    (d / "search_efficiency_toy-images_nfe4.json").write_text(json.dumps(efficiency))
    (d / "search_predictors_toy-images_nfe4.json").write_text(json.dumps({"model": "toy-images", "results": {}}))
    return d


def test_reads_search_bench_outputs(tmp_path):
    res = plots.load_results(_search_bench_files(tmp_path))
    methods = sorted(r.method for r in res.runs)
    assert methods == ["random (unseeded)", "s3", "s3 (unseeded)"]
    s3 = next(r for r in res.runs if r.method == "s3")
    assert (s3.nfe, s3.value, s3.history) == (4, 1.1, (5.0, 3.0, 3.0, 1.0))
    assert sorted(b.name for b in res.baselines) == ["ddim@logsnr", "dpmpp_2m@edm", "nonsense@nogrid"]
    # Baselines are rebuilt from "<name>@<grid>" for the sample grid; unknown ones are left out.
    rows = plots._grid_rows(res, 4, "edm")
    assert [label for label, _ in rows] == ["searched (s3)", "dpmpp_2m@edm", "ddim@logsnr"]
    expected = baselines.for_nfe("ddim", 4, "edm", grid="logsnr").to_dict()
    assert rows[2][1] == expected
    out = plots.make_all(tmp_path / "bench", tmp_path / "figs", n_samples=2, model_loader=_toy_model)
    assert sorted(p.name for p in out) == ["best_so_far.png", "metric_vs_nfe.png", "samples_nfe4.png"]
