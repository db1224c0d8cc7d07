"""What the command line prints and writes: labelled splits, ratios that never read 0.000x, the winner's origin,
the σ_min note, progress on stderr (none under --quiet), and a results file `s3search plots` reads back."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from s3search.cli import app
from s3search.cli.report import format_ratio, format_table, summary_line, winner_name, winner_notes
from s3search.schedule import SolverSchedule, StepSpec
from s3search.search.run import NFEResult


def _schedule(final: str = "denoise") -> SolverSchedule:
    return SolverSchedule(process="edm", timesteps=(80.0, 1.0, 0.002), steps=(StepSpec(), StepSpec()), final=final)


def _result(source: str = "s3", label: str = "", final: str = "denoise", test: float = 0.5) -> NFEResult:
    return NFEResult(best=_schedule(final), best_value=0.4, test_value=test, baselines={"ddim": 2.0, "deis": 1.0},
                     evaluations=10, validation_value=0.45, winner_source=source, winner_label=label,
                     baseline_grids={"deis": "logsnr"})


def test_small_ratios_are_written_in_scientific_notation_never_as_zero():
    assert format_ratio(0.302, 1.0) == "0.302x"
    assert format_ratio(2.3e-5, 1.0) == "2.30e-05x"
    assert "0.000x" not in format_table(_result(test=1e-7), 4)
    assert format_ratio(1.0, 0.0) == "-" and format_ratio(math.inf, 1.0) == "-"


@pytest.mark.parametrize("source, label, method, expected", [
    ("s3", "", "s3", "searched (S3)"),
    ("s3-local", "", "s3", "searched (S3)"),
    ("refine", "", "s3", "searched (S3, grid refinement)"),
    ("tpe", "", "tpe", "searched (TPE)"),
    ("cmaes", "", "cmaes", "searched (CMA-ES)"),
    ("random", "", "random", "searched (random)"),
    ("baseline", "deis@logsnr", "cmaes", "winner = baseline deis@logsnr"),
    ("variant", "deis@logsnr+mean-x0/denoise", "s3", "winner = variant deis@logsnr+mean-x0/denoise"),
])
def test_the_winner_row_names_the_method_or_the_baseline_it_is(source, label, method, expected):
    assert winner_name(_result(source, label), method) == expected
    table = format_table(_result(source, label), 4, method)
    assert any(line.startswith(expected) for line in table.splitlines()), table


def test_a_baseline_winner_is_told_and_the_table_labels_its_split():
    result = _result("baseline", "deis@logsnr", test=1.0)
    table = format_table(result, 4, "cmaes")
    assert table.splitlines()[0].startswith("NFE 4 - test split")
    assert any(line.startswith("deis@logsnr ") for line in table.splitlines())    # each baseline names its grid
    assert any(line.startswith("ddim ") for line in table.splitlines())           # (where the result knows it)
    notes = winner_notes(result)
    assert any("the baseline deis@logsnr itself" in n and "row of deis" in n for n in notes)
    assert summary_line(result, 4) == "winner (NFE 4): search split 0.4, validation split 0.45, test split 1"
    assert winner_notes(_result("s3")) == []


def test_a_winner_without_a_final_denoise_gets_a_note():
    notes = winner_notes(_result(final="none"))
    assert len(notes) == 1 and "final: none" in notes[0] and "0.002" in notes[0]


def _search(tmp_path, *extra: str):
    db = f"sqlite:///{tmp_path / 'cli.db'}"
    args = ["search", "--model", "gmm-8x4", "--nfe", "4", "--budget", "12", "--n-samples", "200",
            "--n-test-samples", "300", "--storage", db, "--study-name", "out", "--method", "tpe",
            "--options", '{"batch_size": 4, "baselines": ["ddim", "deis", "dpmpp_2m"]}', *extra]
    return db, CliRunner().invoke(app, args)


def test_search_labels_splits_writes_a_results_file_and_plots_read_it_and_the_database(tmp_path):
    db, run = _search(tmp_path)
    assert run.exit_code == 0, run.output
    assert "best(search split)=" in run.stderr and "scored on the test split" in run.stderr
    assert "winner (NFE 4): search split" in run.stdout and "test split" in run.stdout
    results = tmp_path / "results" / "out.json"          # beside the SQLite file
    doc = json.loads(results.read_text())
    assert doc["model"] == "gmm-8x4" and doc["runs"][0]["method"] == "tpe" and len(doc["runs"][0]["history"]) == 12
    assert {b["name"] for b in doc["baselines"]} == {"ddim", "deis", "dpmpp_2m"}
    SolverSchedule.from_dict(doc["runs"][0]["schedule"])

    from_file = CliRunner().invoke(app, ["plots", "--results", str(results), "--out", str(tmp_path / "a")])
    assert from_file.exit_code == 0, from_file.output
    assert "wrote" in from_file.stderr and (tmp_path / "a" / "best_so_far.png").stat().st_size > 1000
    from_db = CliRunner().invoke(app, ["plots", "--results", str(tmp_path / "cli.db"), "--out", str(tmp_path / "b")])
    assert from_db.exit_code == 0, from_db.output
    assert (tmp_path / "b" / "metric_vs_nfe.png").is_file() and (tmp_path / "b" / "best_so_far.png").is_file()
    by_url = CliRunner().invoke(app, ["plots", "--results", db, "--study", "out", "--out", str(tmp_path / "c"),
                                      "--quiet"])
    assert by_url.exit_code == 0 and by_url.stderr == "", by_url.output
    missing = CliRunner().invoke(app, ["plots", "--results", db, "--study", "nope", "--out", str(tmp_path / "d")])
    assert missing.exit_code != 0 and "nope" in missing.output


def test_plots_skip_other_models_in_a_folder_with_a_message(tmp_path):
    folder = tmp_path / "res"
    folder.mkdir()
    run = {"method": "s3", "nfe": 4, "value": 1.0}
    (folder / "a.json").write_text(json.dumps({"model": "gmm-8x4", "metric": "nll", "runs": [run]}))
    (folder / "b.json").write_text(json.dumps({"model": "digits", "metric": "fd-features", "runs": [run]}))
    out = CliRunner().invoke(app, ["plots", "--results", str(folder), "--out", str(tmp_path / "p")])
    assert out.exit_code == 0, out.output
    assert "skipped b.json: model 'digits', not 'gmm-8x4'" in out.stderr
    only = CliRunner().invoke(app, ["plots", "--results", str(folder), "--model", "digits", "--out",
                                    str(tmp_path / "q")])
    assert only.exit_code == 0 and "skipped a.json" in only.stderr
    none = CliRunner().invoke(app, ["plots", "--results", str(folder), "--model", "gmm-64d", "--out",
                                    str(tmp_path / "r")])
    assert none.exit_code == 2 and "gmm-64d" in none.output


def test_plots_name_a_binary_file_instead_of_a_decode_error(tmp_path):
    junk = tmp_path / "x.json"
    junk.write_bytes(b"\xff\xfe\x00binary")
    out = CliRunner().invoke(app, ["plots", "--results", str(junk), "--out", str(tmp_path / "p")])
    assert out.exit_code == 2 and "not a JSON text file" in out.output


def test_baselines_show_a_progress_bar_unless_quiet():
    args = ["baselines", "--model", "gmm-8x4", "--nfe", "4", "--only", "ddim,deis", "--n-samples", "100"]
    loud = CliRunner().invoke(app, args)
    assert loud.exit_code == 0 and "baselines" in loud.stderr and "ddim" in loud.stdout
    quiet = CliRunner().invoke(app, [*args, "--quiet"])
    assert quiet.exit_code == 0 and quiet.stderr == "" and "deis" in quiet.stdout


def test_a_cli_study_gets_the_dashboard_note_with_the_winning_schedule(tmp_path):
    import optuna
    from optuna_dashboard import get_note

    db, run = _search(tmp_path, "--results", str(tmp_path / "r.json"))
    assert run.exit_code == 0, run.output
    study = optuna.load_study(study_name="out", storage=db)
    note = get_note(study)
    assert note and "gmm-8x4" in note and "NFE 4" in note
    assert "| step" in note.lower() or "|step" in note.lower(), note[:2000]     # the schedule as a table


def test_a_variant_winner_names_its_baseline_and_rules():
    notes = winner_notes(_result("variant", "dpmpp_2m@logsnr+mean-x0/none"))
    assert notes == [notes[0]] and "variant of the baseline dpmpp_2m@logsnr" in notes[0]
    assert "first step mean-x0" in notes[0] and "final rule none" in notes[0]
