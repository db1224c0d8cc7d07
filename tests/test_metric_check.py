"""registry.metric_error: whether a metric can be computed for a model, known before anything is sampled."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from s3search import grids, metrics, processes
from s3search.evaluation.base import EvalRequest
from s3search.evaluation.local import LocalEvaluator
from s3search.models import registry
from s3search.schedule import SolverSchedule, StepSpec


@pytest.mark.parametrize("model, metric, expected", [
    ("gmm-64d", "fid", "needs a feature network; model='gmm-64d' has none"),
    ("gmm-64d", "fd-features", "needs a feature network"),
    ("digits", "nll", "needs a model with an exact density"),
    ("digits", "mode-tv", "needs a model with an exact density"),
    ("digits", "fid", "needs Inception features"),
    ("no-such-model", "fd", "model='no-such-model' is unknown"),
    ("gmm-64d", "no-such-metric", "metric='no-such-metric' is unknown"),
])
def test_metric_error_names_what_is_missing(model, metric, expected):
    assert expected in (registry.metric_error(model, metric) or "")


def test_metric_error_lists_what_the_model_can_compute():
    message = registry.metric_error("digits", "nll")
    able = message.split("(metrics it can compute: ")[1].rstrip(")").split(", ")
    assert able == ["fd", "fd-features", "mmd", "sw2", "trajectory"]
    assert all(registry.metric_error("digits", name) is None for name in able)
    for name in ("nll", "mode-tv", "outlier-rate", "fd", "sw2", "trajectory"):
        assert registry.metric_error("gmm-8x8-vp", name) is None


def _two_steps(process: str) -> SolverSchedule:
    ts = grids.logsnr(processes.get(process), 2)
    return SolverSchedule(process=process, timesteps=tuple(ts), steps=(StepSpec(order=1), StepSpec(order=2)))


@pytest.mark.parametrize("model", ["gmm-8x8", "digits"])
def test_metric_error_agrees_with_evaluation(model, tmp_path):
    # What the check accepts evaluates to a finite value; what it refuses fails in the evaluator, for the same
    # reason. Together this pins the check to what evaluation actually needs. The trajectory metric needs
    # nothing from a model and its high-NFE reference run costs seconds, so it is left out.
    evaluator = LocalEvaluator(cache_dir=str(tmp_path), extras=False)
    schedule = _two_steps(registry.get(model).process.name)
    for name in [m for m in metrics.names() if m != "trajectory"]:
        (result,) = evaluator.evaluate([schedule], EvalRequest(model, name, n_samples=24))
        problem = registry.metric_error(model, name)
        if problem is None:
            assert result.ok and math.isfinite(result.value), (name, result.error)
        else:
            assert not result.ok and result.error.split(": ", 1)[1] in problem, (name, result.error, problem)


@pytest.fixture()
def inception_model(tmp_path, monkeypatch):
    """A registry-file model with Inception features whose weights file is named but not there yet."""
    (tmp_path / "c15_models.py").write_text(
        "from s3search import processes\nfrom s3search.denoisers import Denoiser\n\n"
        "def make():\n    return Denoiser(fn=lambda x, t: x / (1.0 + t * t), process=processes.get('edm'))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    np.save(tmp_path / "ref.npy", np.zeros((4, 3, 8, 8), dtype=np.uint8))
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"models": [{
        "name": "img", "kind": "entrypoint", "path": "c15_models:make", "shape": [3, 8, 8],
        "reference": "ref.npy", "features": "inception", "inception_weights": "inception.pth"}]}))
    monkeypatch.setenv(registry.ENV_REGISTRY, str(path))
    registry.clear_cache()
    yield tmp_path / "inception.pth"
    registry.clear_cache()


def test_metric_error_checks_the_inception_weights_file(inception_model):
    for name in ("fid", "fd-features"):
        message = registry.metric_error("img", name)
        assert "needs its Inception weights file" in message and "inception.pth" in message
        assert "(metrics it can compute: fd, mmd, sw2, trajectory)" in message
    assert "exact density" in registry.metric_error("img", "nll")
    inception_model.write_bytes(b"weights")   # only its presence is checked: loading it is evaluation
    assert registry.metric_error("img", "fid") is None and registry.metric_error("img", "fd-features") is None
