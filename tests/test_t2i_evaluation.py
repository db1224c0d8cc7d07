"""Text-to-image evaluation end to end on a tiny random Stable Diffusion pipeline loaded through a registry file
with a prompt set: each row meets the same (prompt, noise) pair whatever the batching, the prompt set and the
guidance scale change the result, a job's fields reach the evaluator, and a short search runs on it."""

from __future__ import annotations

import math
import os
import textwrap
from pathlib import Path

import optuna
import pytest

from s3search import baselines
from s3search.evaluation.base import EvalRequest
from s3search.evaluation.local import LocalEvaluator
from s3search.models import registry
from s3search.models.base import single_threaded
from s3search.search.config import ConfigError, SearchConfig
from s3search.search.run import UnknownPromptSet, preflight, run_search

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from s3search.models.tiny_pipelines import tiny_pipeline  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def t2i_model(tmp_path_factory):
    """A registry file with one tiny SD pipeline and two prompt sets, active for this module."""
    root = tmp_path_factory.mktemp("t2i")
    with single_threaded():
        tiny_pipeline("sd", root / "parts").save_pretrained(root / "pipe", safe_serialization=True)
    (root / "digits.txt").write_text("a handwritten 7\nthe digit three\na bold 1\n")
    (root / "other.jsonl").write_text('{"prompt": "a cat", "negative_prompt": "blurry"}\n')
    (root / "models.toml").write_text(textwrap.dedent("""
        [models.tiny-sd]
        kind = "diffusers-pipeline"
        path = "pipe"
        height = 16
        width = 16
        guidance_scale = 5.0
        device = "cpu"
        prompts = { digits = "digits.txt", other = "other.jsonl" }
    """))
    old = os.environ.get("S3SEARCH_MODEL_REGISTRY")
    os.environ["S3SEARCH_MODEL_REGISTRY"] = str(root / "models.toml")
    registry.clear_cache()
    try:
        with single_threaded():
            yield registry.get("tiny-sd")
    finally:
        if old is None:
            os.environ.pop("S3SEARCH_MODEL_REGISTRY", None)
        else:
            os.environ["S3SEARCH_MODEL_REGISTRY"] = old
        registry.clear_cache()


def _schedule(spec, n: int = 3):
    return baselines.get("dpmpp_2m", timesteps=spec.scheduler_times(n), process=spec.process.name)


def test_the_model_carries_its_prompt_sets(t2i_model):
    assert t2i_model.conditional and t2i_model.default_prompt_set == "digits"
    assert [p.text for p in t2i_model.prompt_sets["digits"].prompts][0] == "a handwritten 7"
    assert "prompts:digits" in t2i_model.provenance


def test_rows_meet_the_same_prompt_and_noise_whatever_the_batching(t2i_model):
    sched = _schedule(t2i_model)
    request = EvalRequest("tiny-sd", "trajectory", 6, seed=1, split="search")
    whole = LocalEvaluator(batch_size=6, trajectory_steps=12).evaluate([sched], request)[0]
    pieces = LocalEvaluator(batch_size=2, trajectory_steps=12).evaluate([sched], request)[0]
    assert whole.ok and pieces.ok, (whole.error, pieces.error)
    assert math.isclose(whole.value, pieces.value, rel_tol=1e-4)


def test_prompt_set_and_guidance_change_the_evaluation(t2i_model):
    sched = _schedule(t2i_model)
    ev = LocalEvaluator(batch_size=4, trajectory_steps=12)
    values = {(ps, g): ev.evaluate([sched], EvalRequest("tiny-sd", "trajectory", 4, prompt_set=ps,
                                                         guidance_scale=g))[0]
              for ps, g in ((None, None), ("other", None), (None, 1.0))}
    assert all(r.ok for r in values.values()), {k: r.error for k, r in values.items()}
    assert len({round(r.value, 9) for r in values.values()}) == 3
    bad = ev.evaluate([sched], EvalRequest("tiny-sd", "trajectory", 4, prompt_set="nope"))[0]
    assert not bad.ok and "nope" in bad.error


def test_a_job_names_only_prompt_sets_the_model_has(t2i_model):
    assert preflight(SearchConfig(model="tiny-sd", nfe=(3,), prompt_set="other")).metric == "trajectory"
    with pytest.raises(UnknownPromptSet) as info:
        preflight(SearchConfig(model="tiny-sd", nfe=(3,), prompt_set="coco"))
    assert info.value.fields == ["prompt_set"] and "digits" in str(info.value)
    with pytest.raises(ConfigError):
        SearchConfig(model="tiny-sd", nfe=(3,), guidance_scale=-2.0)


def test_a_short_search_runs_on_the_pipeline(t2i_model, tmp_path):
    config = SearchConfig(model="tiny-sd", nfe=(3,), n_samples=4, n_test_samples=4, budget=6, predictor="ridge",
                          guidance_scale=3.0, options={"batch_size": 3, "validate_top": 0, "test_baselines": False,
                                                       "baselines": ["ddim", "dpmpp_2m"]})
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", direction="minimize")
    result = run_search(config, study, evaluator=LocalEvaluator(batch_size=4, trajectory_steps=12))
    assert result.evaluations == 6 and math.isfinite(result.test_value)
    assert {t.user_attrs["metric"] for t in study.trials} == {"trajectory"}


def test_the_command_line_searches_a_pipeline_with_a_prompt_set(t2i_model, tmp_path):
    from typer.testing import CliRunner

    from s3search.cli import app

    args = ["search", "--model", "tiny-sd", "--nfe", "3", "--budget", "4", "--n-samples", "4",
            "--n-test-samples", "4", "--predictor", "ridge", "--prompt-set", "other", "--guidance-scale", "2",
            "--storage", f"sqlite:///{tmp_path / 'cli.db'}",
            "--options", '{"batch_size": 2, "validate_top": 0, "test_baselines": false, "baselines": ["ddim"]}']
    run = CliRunner().invoke(app, args)
    assert run.exit_code == 0, run.output
    assert "metric trajectory" in run.output
    bad = CliRunner().invoke(app, [*args[:13], "--prompt-set", "coco", *args[15:]])
    assert bad.exit_code == 2 and "coco" in bad.output and "digits" in bad.output


def test_the_final_table_shows_fid_and_clip_score_side_by_side():
    from s3search.cli.search_cmd import format_table
    from s3search.search.config import SearchResult

    result = SearchResult(best=None, best_value=1.0, test_value=2.0, baselines={"ddim": 3.0, "deis": 2.5},
                          evaluations=3, test_extras={"searched": {"fid": 12.5, "clip_score": 30.1},
                                                      "ddim": {"fid": 20.0, "clip_score": 29.0}})
    lines = format_table(result, 5).splitlines()
    assert "CLIP score: higher is better" in lines[0] and lines[1].split()[-3:] == ["FID", "CLIP", "score"] or \
        ("FID" in lines[1] and "CLIP score" in lines[1])
    searched = next(line for line in lines if line.startswith("searched"))
    assert "12.5" in searched and "30.1" in searched
    plain = SearchResult(best=None, best_value=1.0, test_value=2.0, baselines={"ddim": 3.0}, evaluations=3)
    assert "FID" not in format_table(plain, 5)


def test_models_check_reports_prompt_sets_and_names_an_empty_prompt_file(t2i_model, tmp_path):
    import json
    import shutil

    from typer.testing import CliRunner

    from s3search.cli import app

    root = tmp_path / "reg"
    shutil.copytree(Path(os.environ["S3SEARCH_MODEL_REGISTRY"]).parent / "pipe", root / "pipe")
    (root / "empty.txt").write_text("# nothing here\n")
    registry_file = root / "models.toml"
    registry_file.write_text('[models.empty-prompts]\nkind = "diffusers-pipeline"\npath = "pipe"\nheight = 16\n'
                             'width = 16\ndevice = "cpu"\nprompts = "empty.txt"\n')
    good = CliRunner().invoke(app, ["models", "check", "tiny-sd"])
    assert good.exit_code == 0, good.output
    assert json.loads(good.output.strip().splitlines()[-1])["prompt_sets"] == {"digits": 3, "other": 1}
    old = os.environ["S3SEARCH_MODEL_REGISTRY"]
    try:
        bad = CliRunner().invoke(app, ["models", "check", "empty-prompts", "--registry", str(registry_file)])
    finally:
        os.environ["S3SEARCH_MODEL_REGISTRY"] = old
        registry.clear_cache()
    assert bad.exit_code == 1
    assert "models.empty-prompts.prompts" in bad.output and "holds no prompt" in bad.output
