"""Seeds, the reference-statistics cache and LocalEvaluator."""

from __future__ import annotations

import json
import math

import pytest
import torch

from s3search import grids, metrics, processes
from s3search.denoisers import Denoiser
from s3search.evaluation import reference, seeds
from s3search.evaluation.base import EvalRequest
from s3search.evaluation.local import LocalEvaluator
from s3search.integrator import sample
from s3search.models.base import ModelSpec
from s3search.models.mixtures import GaussianMixture, model_spec, mixture
from s3search.schedule import SolverSchedule, StepSpec


def schedule(process: str, n: int, order: int = 1, eta: float = 0.0, derivative: str = "taylor") -> SolverSchedule:
    ts = grids.logsnr(processes.get(process), n)
    steps = tuple(StepSpec(order=min(order, i + 1), eta=eta, derivative=derivative) for i in range(n))
    return SolverSchedule(process=process, timesteps=tuple(ts), steps=steps)


# ----- seeds -----------------------------------------------------------------------------------------------------
def test_seeds_are_distinct_disjoint_and_stable():
    search = seeds.sample_seeds(3, "search", 50_000)
    test = seeds.sample_seeds(3, "test", 50_000)
    other_base = seeds.sample_seeds(4, "test", 50_000)
    assert len(set(search)) == 50_000 and not set(search) & set(test) and not set(search) & set(other_base)
    # torch keeps only the low 32 bits of a seed: every seed must already fit.
    assert max(search + test) < 2**32
    assert seeds.sample_seeds(3, "search", 5, start=10) == search[10:15]
    assert seeds.reference_seed(3, "search") not in set(search) | set(test)
    assert seeds.reference_seed(3, "search") != seeds.reference_seed(3, "test")
    # The validation split (where the winner is chosen) shares no seed with the others, nor a reference draw.
    validation = seeds.sample_seeds(3, "validation", 50_000)
    assert len(set(validation)) == 50_000 and not set(validation) & (set(search) | set(test))
    refs = {seeds.reference_seed(3, s) for s in ("search", "test", "validation")}
    assert len(refs) == 3 and not refs & (set(search) | set(test) | set(validation))
    with pytest.raises(ValueError, match="split='reference'"):
        seeds.reference_seed(3, "reference")
    # Pinned: changing the scheme silently would invalidate every recorded evaluation.
    assert seeds.sample_seed(0, "search", 0) == 391467087


def test_seeds_reject_bad_input():
    with pytest.raises(ValueError, match="split"):
        seeds.sample_seed(0, "train", 0)
    with pytest.raises(ValueError, match="index"):
        seeds.sample_seed(0, "search", -1)
    with pytest.raises(ValueError, match="index"):
        seeds.sample_seed(0, "search", 2**30)


# ----- the reference cache -----------------------------------------------------------------------------------------
def _counting(spec: ModelSpec) -> list[int]:
    """Count the reference draws a spec makes (each is a cache miss: a hit reads the file instead)."""
    draws: list[int] = []
    sampler = spec.reference_sampler

    def counted(n: int, g: torch.Generator) -> torch.Tensor:
        draws.append(n)
        return sampler(n, g)

    spec.reference_sampler = counted
    return draws


def test_reference_cache_hits_the_same_model_and_misses_a_changed_one(tmp_path, monkeypatch):
    monkeypatch.setenv(reference.ENV_CACHE_DIR, str(tmp_path))
    spec = model_spec(mixture("gmm-8x8"), "gmm-8x8", "edm")
    draws = _counting(spec)
    sw2 = metrics.get("sw2")
    first = reference.load_or_compute(spec, sw2, 64, seed=1)
    prov = reference.provenance(spec, sw2, 64, 1)
    tensor_path, meta_path = reference.reference_paths(tmp_path, prov)
    assert tensor_path.exists() and json.loads(meta_path.read_text())["weights_sha256"] == spec.exact.fingerprint()
    assert reference.provenance_key(prov) in tensor_path.name
    # The same model, metric and request: read back, not drawn again.
    again = reference.load_or_compute(spec, sw2, 64, seed=1)
    assert draws == [64]
    torch.testing.assert_close(again["samples"], first["samples"], rtol=0, atol=0)
    # A different seed or split is a different reference draw.
    other = reference.load_or_compute(spec, sw2, 64, seed=1, split="test")
    assert not torch.equal(other["samples"], first["samples"]) and draws == [64, 64]

    # Other weights under the same name: a miss, computed and stored beside the first file, which still hits.
    changed = model_spec(mixture("gmm-8x4"), "gmm-8x8", "edm")
    changed_draws = _counting(changed)
    rebuilt = reference.load_or_compute(changed, sw2, 64, seed=1)
    assert changed_draws == [64] and not torch.equal(rebuilt["samples"], first["samples"])
    assert len(list((tmp_path / "reference" / "gmm-8x8").glob("sw2-n64-seed1-search-*.safetensors"))) == 2
    assert reference.load_or_compute(changed, sw2, 64, seed=1)["samples"].shape == (64, 2) and changed_draws == [64]
    reference.load_or_compute(spec, sw2, 64, seed=1)
    assert draws == [64, 64]

    # Another library version (or metric version): another key, so another miss.
    real_version = reference._version
    monkeypatch.setattr(reference, "_version", lambda lib: "0.0-other" if lib == "torch" else real_version(lib))
    reference.load_or_compute(spec, sw2, 64, seed=1)
    assert draws == [64, 64, 64]
    monkeypatch.setattr(reference, "_version", real_version)

    # recompute=True rebuilds a file that checks out.
    reference.load_or_compute(spec, sw2, 64, seed=1, recompute=True)
    assert draws == [64, 64, 64, 64]


def test_a_damaged_cached_reference_is_recomputed(tmp_path, caplog):
    spec = model_spec(mixture("gmm-8x8"), "gmm-8x8", "edm")
    draws = _counting(spec)
    sw2 = metrics.get("sw2")
    first = reference.load_or_compute(spec, sw2, 64, seed=1, root=tmp_path)
    tensor_path, meta_path = reference.reference_paths(tmp_path, reference.provenance(spec, sw2, 64, 1))
    # Tampered tensors: recomputed (the same draw), rewritten, then a hit again.
    tensor_path.write_bytes(tensor_path.read_bytes()[:-8] + b"\x00" * 8)
    with caplog.at_level("WARNING", logger=reference.__name__):
        again = reference.load_or_compute(spec, sw2, 64, seed=1, root=tmp_path)
    assert draws == [64, 64] and "sha256" in caplog.text
    torch.testing.assert_close(again["samples"], first["samples"], rtol=0, atol=0)
    reference.load_or_compute(spec, sw2, 64, seed=1, root=tmp_path)
    assert draws == [64, 64]
    # Provenance that does not match its own file name (an edit): recomputed too.
    doc = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**doc, "weights_sha256": "0" * 64}))
    reference.load_or_compute(spec, sw2, 64, seed=1, root=tmp_path)
    assert draws == [64, 64, 64] and json.loads(meta_path.read_text())["weights_sha256"] == doc["weights_sha256"]
    # An unreadable provenance file, or one missing beside its tensors: recomputed.
    meta_path.write_text("{not json")
    reference.load_or_compute(spec, sw2, 64, seed=1, root=tmp_path)
    meta_path.unlink()
    reference.load_or_compute(spec, sw2, 64, seed=1, root=tmp_path)
    assert draws == [64] * 5 and meta_path.exists()


def test_models_without_a_weights_hash_are_not_cached(tmp_path):
    spec = model_spec(mixture("gmm-8x8"), "gmm-8x8", "edm")
    spec.provenance = {}
    reference.load_or_compute(spec, metrics.get("mmd"), 32, root=tmp_path)
    assert not any(tmp_path.rglob("*.safetensors"))


def test_a_finite_data_set_is_its_own_reference_for_every_split(tmp_path):
    gm = mixture("gmm-8x8")
    data = gm.sample(300, torch.Generator().manual_seed(3))
    spec = model_spec(gm, "finite", "edm")
    spec.reference_set = lambda: data.clone()
    sw2 = metrics.get("sw2")
    stats = {(n, seed, split): reference.load_or_compute(spec, sw2, n, seed=seed, split=split, root=tmp_path)
             for n, seed, split in [(64, 0, "search"), (2000, 1, "test"), (10, 7, "validation")]}
    for got in stats.values():
        torch.testing.assert_close(got["samples"], data.to(torch.float64))
    # One cached file, named and labelled as the whole set.
    (meta,) = (tmp_path / "reference" / "finite").glob("*.json")
    doc = json.loads(meta.read_text())
    assert (doc["n"], doc["seed"], doc["split"]) == ("all", "all", "all") and "nall" in meta.name
    # Without a finite set, the splits draw different references.
    spec.reference_set = None
    a = reference.load_or_compute(spec, sw2, 64, split="search", root=tmp_path)["samples"]
    b = reference.load_or_compute(spec, sw2, 64, split="test", root=tmp_path)["samples"]
    assert a.shape == (64, 2) and not torch.equal(a, b)


# ----- LocalEvaluator ------------------------------------------------------------------------------------------------
@pytest.fixture()
def evaluator(tmp_path):
    return LocalEvaluator(cache_dir=str(tmp_path), batch_size=64)


def test_batch_size_does_not_change_results(tmp_path):
    sched = schedule("edm", 5, order=2, eta=0.5)
    req = EvalRequest("gmm-8x4", "sw2", 50, seed=2)
    small = LocalEvaluator(cache_dir=str(tmp_path), batch_size=7).evaluate([sched], req)[0]
    large = LocalEvaluator(cache_dir=str(tmp_path), batch_size=64).evaluate([sched], req)[0]
    assert small.ok and small.value == large.value and small.extras == large.extras
    assert small.nfe == sched.nfe and small.seconds > 0


def test_results_are_memoised_and_splits_use_fresh_seeds(tmp_path):
    calls = []

    def counting_sample(*args, **kwargs):
        calls.append(1)
        return sample(*args, **kwargs)

    ev = LocalEvaluator(cache_dir=str(tmp_path), sampler=counting_sample)
    sched = schedule("vp-linear", 6, order=2)
    req = EvalRequest("gmm-64d-vp", "fd", 200, seed=0)
    a = ev.evaluate([sched], req)[0]
    n_calls = len(calls)
    assert ev.evaluate([sched], req)[0] == a and len(calls) == n_calls
    test = ev.evaluate([sched], EvalRequest("gmm-64d-vp", "fd", 200, seed=0, split="test"))[0]
    other_seed = ev.evaluate([sched], EvalRequest("gmm-64d-vp", "fd", 200, seed=1))[0]
    assert test.ok and test.value != a.value and other_seed.value != a.value


def test_failures_become_error_results(evaluator, tmp_path):
    sched = schedule("edm", 4)
    # Unknown model / metric / unsupported metric: every schedule gets an error result.
    for req, text in [(EvalRequest("no-model", "fd", 10), "unknown"), (EvalRequest("gmm-8x8", "nope", 10), "unknown"),
                      (EvalRequest("gmm-8x8", "fd-features", 10), "feature network"),
                      (EvalRequest("gmm-8x8", "fd", 1), "n_samples")]:
        (res,) = evaluator.evaluate([sched], req)
        assert not res.ok and text in res.error and res.value == math.inf
    # Schedule on another process than the model's.
    (res,) = evaluator.evaluate([schedule("vp-linear", 4)], EvalRequest("gmm-8x8", "nll", 10))
    assert not res.ok and "process" in res.error
    # NaN samples, and the error is not memoised.
    gm = mixture("gmm-8x8")
    broken = ModelSpec("broken", Denoiser(lambda x, t: x * float("nan"), processes.get("edm")), (2,),
                       reference_sampler=lambda n, g: gm.sample(n, g))
    ev = LocalEvaluator(cache_dir=str(tmp_path), models={"broken": broken})
    (res,) = ev.evaluate([sched], EvalRequest("broken", "sw2", 10))
    assert not res.ok and "NaN" in res.error and not ev._results


def test_trajectory_error_shrinks_with_nfe_and_order_on_a_single_gaussian(tmp_path):
    # K = 1: the exact flow is closed-form; a 2nd-order multistep must beat DDIM, and both converge.
    single = GaussianMixture.from_covariances([1.0], [[0.5, -1.0, 0.2]],
                                              [[[0.3, 0.1, 0.0], [0.1, 0.2, 0.05], [0.0, 0.05, 0.1]]])
    ev = LocalEvaluator(cache_dir=str(tmp_path), models={"g1": model_spec(single, "g1", "edm")})
    req = EvalRequest("g1", "trajectory", 64)
    errs = {(n, o): ev.evaluate([schedule("edm", n, order=o)], req)[0].value for n in (5, 10, 40) for o in (1, 2)}
    assert errs[(10, 1)] < errs[(5, 1)] and errs[(40, 1)] < errs[(10, 1)]
    assert errs[(10, 2)] < errs[(10, 1)] and errs[(40, 2)] < 0.2 * errs[(40, 1)]


def test_many_steps_reach_the_target_and_exact_prior_runs(tmp_path):
    gm = mixture("gmm-6x6")
    ev = LocalEvaluator(cache_dir=str(tmp_path))
    req = EvalRequest("gmm-6x6", "nll", 2000, seed=5)
    fine = ev.evaluate([schedule("edm", 100, order=2)], req)[0]
    coarse = ev.evaluate([schedule("edm", 4, order=1)], req)[0]
    entropy = metrics.mixture.entropy_mc(gm, 20_000, torch.Generator().manual_seed(0))
    assert abs(fine.value - entropy) < 0.1 and coarse.value > fine.value + 0.1
    # Sampling floor for 2000 true samples: E TV ~ 1/2 sum_k sqrt(2 w_k (1 - w_k) / (pi n)) ~ 0.055 here.
    assert fine.extras["mode_tv"] < 0.1
    exact = LocalEvaluator(cache_dir=str(tmp_path), prior="exact").evaluate([schedule("edm", 100, order=2)], req)[0]
    assert exact.ok and abs(exact.value - entropy) < 0.1


def test_named_schedules_are_evaluated_batch_invariantly(tmp_path):
    from s3search import baselines

    sched = baselines.for_nfe("seeds_2", 9, "edm")   # a stochastic sampler outside the schedule space
    req = EvalRequest("gmm-8x4", "mode-tv", 40, seed=3)
    a = LocalEvaluator(cache_dir=str(tmp_path), batch_size=6).evaluate([sched], req)[0]
    b = LocalEvaluator(cache_dir=str(tmp_path), batch_size=40).evaluate([sched], req)[0]
    assert a.ok and a.nfe == 9 and a.value == b.value and a.extras == b.extras


def test_out_of_memory_halves_the_batch_and_retries_with_the_same_result():
    """A model that runs out of memory above 4 rows a batch: the evaluation retries with 512, 256, ... 4 rows and
    gives exactly what a 4-row evaluation gives (one generator per row)."""
    import dataclasses

    from s3search import baselines
    from s3search.models import registry

    base = registry.get("gmm-8x4")

    def picky(x, t):
        if len(x) > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return base.denoiser(x, t)

    spec = dataclasses.replace(base, name="picky", denoiser=Denoiser(picky, base.process, name="picky",
                                                                      data_mean=base.denoiser.data_mean))
    sched = baselines.get("dpmpp_2m", timesteps=grids.get("logsnr", process="edm", n=4), process="edm")
    request = EvalRequest("picky", "sw2", 10, seed=3)
    ev = LocalEvaluator(models={"picky": spec})
    (res,) = ev.evaluate([sched], request)
    assert res.ok, res.error
    assert ev.batch_size == 4
    (small,) = LocalEvaluator(batch_size=4, models={"picky": spec}).evaluate([sched], request)
    assert small.value == res.value
