"""`s3search report` and the structural gain line: mean, spread and per-search ratios over the seeds of several
searches, the one-search table, refusal of mixed models or metrics, and the line that splits the winner's gain
over a baseline into what the structural rules give and what per-step choices add."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from s3search import plots
from s3search.cli import app
from s3search.cli.report import (format_seed_table, gain_line, geomean, report_text, rules_text, search_view,
                                 seed_gain_line, seed_rows, spread, structural_line)


def _doc(seed: int, winner: float, base: dict[str, float], variant: float | None = 0.8, model: str = "gmm-8x4",
         metric: str = "fd", source: str = "s3", label: str = "") -> dict:
    structural = None if variant is None else {
        "baseline": "deis", "label": "deis@edm+mean-x0/none" if math.isfinite(variant) else None,
        "first_step": "mean-x0", "final": "none", "value": variant if math.isfinite(variant) else None}
    return {"model": model, "metric": metric, "study": f"s{seed}", "seed": seed,
            "runs": [{"method": "s3", "nfe": 4, "value": winner, "source": source, "label": label,
                      "structural": structural}],
            "baselines": [{"name": n, "nfe": 4, "value": v, "grid": "edm"} for n, v in base.items()]}


def _results(*docs: dict) -> list[plots.Results]:
    return [plots.parse_results(d, f"d{i}") for i, d in enumerate(docs)]


def test_spread_is_mean_sample_std_and_range_and_ratios_summarise_by_geometric_mean():
    s = spread([1.0, 2.0, 3.0, math.inf])       # a failed score is left out
    assert (s.mean, s.std, s.lo, s.hi, s.n) == (2.0, 1.0, 1.0, 3.0, 3)
    assert spread([5.0]).std == 0.0 and spread([]).n == 0
    assert geomean([2.0, 0.5]) == pytest.approx(1.0) and geomean([4.0, 1.0]) == pytest.approx(2.0)


def test_seed_rows_take_the_ratio_per_search_then_summarise():
    searches = _results(_doc(0, 0.5, {"deis": 1.0, "ddim": 4.0}), _doc(1, 1.0, {"deis": 2.0, "ddim": 2.0}))
    views = [search_view(r, 4) for r in searches]
    rows = {r.name: r for r in seed_rows(views)}
    assert rows["searched (S3)"].values == (0.5, 1.0) and rows["searched (S3)"].ratios == (0.5, 0.5)
    assert rows["ddim@edm"].ratios == (4.0, 1.0) and geomean(rows["ddim@edm"].ratios) == pytest.approx(2.0)
    table = format_seed_table(views, 4)
    assert "test split, 2 searches (seeds 0, 1)" in table and "mean ± sample std" in table
    searched = next(line for line in table.splitlines() if line.startswith("searched (S3)"))
    assert "0.75 ± 0.354" in searched and "0.5-1" in searched and "0.500x [0.500x-0.500x]" in searched


def test_one_search_prints_the_single_search_table_with_its_gain_line():
    text = report_text(_results(_doc(0, 0.3, {"deis": 1.2, "ddim": 4.0}, variant=0.9)))
    assert "1 search;" in text and "NFE 4 - test split (fresh seeds" in text and "deis@edm" in text
    assert ("gain over deis@edm (test): structural rules (mean-x0 first step, no final denoise) 1.2 -> 0.9 "
            "(0.750x); per-step choices and grid 0.9 -> 0.3 (0.333x)") in text


def test_mixed_models_or_metrics_are_refused_naming_them():
    with pytest.raises(ValueError, match="mix models 'digits', 'gmm-8x4'.*--model"):
        report_text(_results(_doc(0, 1.0, {"deis": 1.0}), _doc(1, 1.0, {"deis": 1.0}, model="digits")))
    with pytest.raises(ValueError, match="mix metrics 'fd', 'nll'"):
        report_text(_results(_doc(0, 1.0, {"deis": 1.0}), _doc(1, 1.0, {"deis": 1.0}, metric="nll")))


def test_gain_lines_name_the_split_and_say_when_there_is_no_variant():
    assert rules_text("model", "none") == "no final denoise" and rules_text("zero-x0", "denoise") == \
        "zero-x0 first step"
    line = gain_line("deis@edm", 2.0, "no final denoise", math.nan, 0.5)
    assert line.startswith("gain over deis@edm (test): 2 -> 0.5 (0.250x); not split")
    lesser = gain_line("deis@edm", 2.0, "no final denoise", 1.0, 0.5, best_base=False)
    assert "(test; the best baseline with structural variants)" in lesser
    views = [search_view(r, 4) for r in _results(_doc(0, 0.5, {"deis": 1.0}, variant=0.8),
                                                  _doc(1, 0.5, {"deis": 2.0}, variant=1.0),
                                                  _doc(2, 0.5, {"deis": 2.0}, variant=math.inf))]
    many = seed_gain_line(views)
    assert "structural rules (mean-x0 first step, no final denoise) 0.632x [0.500x-0.800x]" in many
    assert "per-step choices and grid 0.559x [0.500x-0.625x]" in many and "1 of 3 searches left out" in many
    unmeasured = search_view(_results(_doc(0, 0.5, {"deis": 1.0}, variant=None))[0], 4)
    assert seed_gain_line([unmeasured]) is None and structural_line(unmeasured) is None


@pytest.fixture(scope="module")
def tiny_search(tmp_path_factory):
    """A real search small enough for a test, with the structural variants seeded."""
    folder = tmp_path_factory.mktemp("seeds")
    args = ["search", "--model", "gmm-8x4", "--nfe", "4", "--budget", "24", "--n-samples", "200",
            "--n-test-samples", "300", "--storage", f"sqlite:///{folder / 'r.db'}",
            "--options", '{"batch_size": 4, "baselines": ["ddim", "deis", "dpmpp_2m", "ipndm"]}']
    run = CliRunner().invoke(app, args)
    assert run.exit_code == 0, run.output
    return folder, run.stdout, run.stderr


def test_a_search_prints_and_records_the_structural_gain_at_one_test_evaluation(tiny_search):
    folder, out, err = tiny_search
    assert "test split scored (6 schedules)" in err      # the winner, four baselines and one variant
    line = next(x for x in out.splitlines() if x.startswith("gain over "))
    assert "(test" in line and " -> " in line
    doc = json.loads(next((folder / "results").glob("*.json")).read_text())
    st = doc["runs"][0]["structural"]
    assert doc["seed"] == 0 and st["baseline"] in {b["name"] for b in doc["baselines"]}
    assert all(b["grid"] for b in doc["baselines"]) and doc["runs"][0]["source"]
    # Seed 0 evaluates variants of the best baseline: the line shows the variant's test score.
    assert st["label"].startswith(st["baseline"] + "@") and f"-> {st['value']:.4g} (" in line
    assert line.startswith(f"gain over {st['label'].partition('+')[0]} (test)") and "structural rules (" in line


def test_the_report_command_reads_a_folder_and_a_database(tiny_search, tmp_path):
    folder = tiny_search[0]
    doc = json.loads(next((folder / "results").glob("*.json")).read_text())
    res = tmp_path / "res"
    res.mkdir()
    for seed, scale in ((0, 1.0), (1, 1.5)):
        other = dict(doc, seed=seed, study=f"s{seed}",
                     runs=[dict(r, value=r["value"] * scale) for r in doc["runs"]])
        (res / f"s{seed}.json").write_text(json.dumps(other))
    (res / "digits.json").write_text(json.dumps(dict(doc, model="digits")))
    run = CliRunner().invoke(app, ["report", "--results", str(res), "--model", "gmm-8x4"])
    assert run.exit_code == 0, run.output
    assert "2 searches (seeds 0, 1)" in run.stdout and "test mean ± std" in run.stdout
    assert "skipped digits.json" in run.stderr
    mixed = CliRunner().invoke(app, ["report", "--results", str(res)])
    assert mixed.exit_code == 2 and "mix models" in mixed.output
    one = CliRunner().invoke(app, ["report", "--results", str(folder / "r.db")])
    assert one.exit_code == 0 and "1 search;" in one.stdout and "NFE 4 - test split" in one.stdout
