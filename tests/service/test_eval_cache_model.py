"""The database evaluation cache keys a model by its fingerprint as well as its name."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select

from s3search.evaluation.base import EvalRequest, EvalResult
from s3search.models import registry
from s3search.schedule import SolverSchedule, StepSpec
from studies.cache import CachedEvaluator, metric_key, model_fingerprint
from studies.models import EvalCacheEntry


class _Counting:
    """An evaluator that scores a schedule by its length and records what it was asked to pay for."""

    def __init__(self):
        self.seen: list[str] = []

    def evaluate(self, schedules, request):
        self.seen += [s.canonical_hash() for s in schedules]
        return [EvalResult(schedule_hash=s.canonical_hash(), value=float(len(s.timesteps)), nfe=s.nfe, seconds=0.0)
                for s in schedules]


def _schedule(n: int) -> SolverSchedule:
    return SolverSchedule(process="edm", timesteps=tuple(80.0 * 0.5**i for i in range(n + 1)),
                          steps=tuple(StepSpec() for _ in range(n)))


@pytest.fixture()
def registry_file(tmp_path, monkeypatch):
    """Write a registry file (entries override built-ins of the same name) and point the registry at it."""
    (tmp_path / "c15_cache_models.py").write_text(
        "from s3search import processes\nfrom s3search.denoisers import Denoiser\n\n"
        "def make():\n    return Denoiser(fn=lambda x, t: x, process=processes.get('edm'))\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    def use(entries: dict) -> None:
        path = tmp_path / "models.json"
        path.write_text(json.dumps({"models": entries}))
        monkeypatch.setenv(registry.ENV_REGISTRY, str(path))

    yield use
    registry.clear_cache()


def test_a_changed_model_under_the_same_name_misses(sessions, registry_file, monkeypatch):
    monkeypatch.delenv(registry.ENV_REGISTRY, raising=False)
    inner = _Counting()
    ev = CachedEvaluator(inner, sessions)
    req = EvalRequest(model="gmm-8x8", metric="fd", n_samples=10)
    builtin = registry.get("gmm-8x8").fingerprint
    assert model_fingerprint("gmm-8x8") == builtin and metric_key(req, builtin).endswith("|split=search")
    ev.evaluate([_schedule(3)], req)
    ev.evaluate([_schedule(3)], req)
    assert len(inner.seen) == 1 and ev.hits == 1            # the same model: paid once

    registry_file({"gmm-8x8": {"kind": "entrypoint", "path": "c15_cache_models:make", "shape": [2]}})
    assert model_fingerprint("gmm-8x8") not in ("", None, builtin)
    (other,) = ev.evaluate([_schedule(3)], req)
    assert len(inner.seen) == 2 and other.value == 4.0      # another model under the old name: paid again
    ev.evaluate([_schedule(3)], req)
    assert len(inner.seen) == 2 and ev.hits == 2            # and stored under its own key
    with sessions() as s:
        keys = {row.metric_key for row in s.scalars(select(EvalCacheEntry))}
    assert len(keys) == 2 and all(k.startswith("fd|n=10|model=") for k in keys)


def test_unknown_names_are_keyed_by_name_and_unbuildable_models_bypass_the_cache(sessions, registry_file):
    registry_file({"broken": {"kind": "entrypoint", "path": "c15_no_such_module:make", "shape": [2]}})
    assert model_fingerprint("not-registered") == "" and model_fingerprint("broken") is None
    inner = _Counting()
    ev = CachedEvaluator(inner, sessions)
    for _ in range(2):
        ev.evaluate([_schedule(2)], EvalRequest(model="not-registered", metric="fd", n_samples=10))
        ev.evaluate([_schedule(2)], EvalRequest(model="broken", metric="fd", n_samples=10))
    assert len(inner.seen) == 3 and ev.hits == 1
    with sessions() as s:
        assert [row.model for row in s.scalars(select(EvalCacheEntry))] == ["not-registered"]


def test_the_conditioning_of_a_request_is_part_of_its_cache_key():
    from studies.cache import metric_key

    plain = EvalRequest(model="m", metric="fid", n_samples=10)
    keys = {metric_key(plain, "f" * 64), metric_key(EvalRequest("m", "fid", 10, guidance_scale=7.5), "f" * 64),
            metric_key(EvalRequest("m", "fid", 10, guidance_scale=3.0), "f" * 64),
            metric_key(EvalRequest("m", "fid", 10, prompt_set="coco"), "f" * 64)}
    assert len(keys) == 4 and all(k.endswith("|split=search") for k in keys)
    assert metric_key(plain, "f" * 64) == f"fid|n=10|model={'f' * 16}|split=search"   # unchanged for old rows
