"""NamedSchedule: validation naming the field, JSON round trips, NFE rules equal to the real model calls."""

from __future__ import annotations

import json

import pytest
import torch

from s3search import sample
from s3search.named import NamedSchedule, get_sampler, run_named, sampler_names

from gaussian_bed import denoiser

TS = (10.0, 3.0, 1.0, 0.3, 0.1)


def test_round_trip_and_hash():
    s = NamedSchedule(sampler="er_sde_3", process="edm", timesteps=TS, params={"phi": 2, "quadrature": "riemann"},
                      name="mine")
    doc = json.loads(s.to_json())
    assert doc["params"] == {"phi": 2, "quadrature": "riemann"} and doc["nfe"] == 5
    back = NamedSchedule.from_json(s.to_json())
    assert back == s and back.name == "mine"
    # Spelling out a default does not change what runs, nor the hash; changing a value does.
    same = NamedSchedule(sampler="er_sde_3", process="edm", timesteps=TS,
                         params={"phi": 2, "quadrature": "riemann", "s_noise": 1.0})
    assert same.canonical_hash() == s.canonical_hash()
    other = NamedSchedule(sampler="er_sde_3", process="edm", timesteps=TS, params={"phi": 3})
    assert other.canonical_hash() != s.canonical_hash()


def test_params_are_sorted_pairs():
    s = NamedSchedule(sampler="edm_heun", process="edm", timesteps=TS, params={"s_noise": 1.0, "s_churn": 5.0})
    assert s.params == (("s_churn", 5.0), ("s_noise", 1.0))
    assert s.resolved_params["s_tmax"] is None


@pytest.mark.parametrize("kwargs, field", [
    ({"sampler": "nope"}, "sampler"),
    ({"process": "nope"}, "process"),
    ({"timesteps": (10.0,)}, "timesteps"),
    ({"timesteps": (10.0, 20.0)}, "timesteps[1]"),
    ({"timesteps": (100.0, 1.0)}, "timesteps[0]"),
    ({"timesteps": (10.0, float("nan"))}, "timesteps[1]"),
    ({"params": {"phi": 9}}, "params.phi"),
    ({"params": {"bogus": 1}}, "params.bogus"),
    ({"params": {"phi": float("inf")}}, "params.phi"),
    ({"final": "none"}, "final"),
    ({"sampler": "seeds_2", "params": {"form": "noise", "eta": 0.5}}, "params.eta"),
    ({"params": {"phi": 3, "phi_eta": 1.0}}, "params.phi_eta"),
    ({"schema_version": 2}, "schema_version"),
])
def test_invalid_input_names_the_field(kwargs, field):
    base = {"sampler": "er_sde_2", "process": "edm", "timesteps": TS}
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        NamedSchedule(**{**base, **kwargs})


@pytest.mark.parametrize("doc, field", [
    ({"process": "edm", "timesteps": list(TS)}, "sampler"),
    ({"sampler": "deis", "process": "edm", "timesteps": list(TS), "extra": 1}, "extra"),
    ({"sampler": "deis", "process": "edm", "timesteps": list(TS), "nfe": 3}, "nfe"),
    ({"sampler": "deis", "process": "edm", "timesteps": "10,1"}, "timesteps"),
    ({"sampler": "deis", "process": "edm", "timesteps": list(TS), "params": [1]}, "params"),
])
def test_from_dict_rejects(doc, field):
    with pytest.raises(ValueError, match=field):
        NamedSchedule.from_dict(doc)
    with pytest.raises(ValueError, match="JSON"):
        NamedSchedule.from_json("{not json")


@pytest.mark.parametrize("name", sampler_names())
@pytest.mark.parametrize("process", ["edm", "vp-linear"])
def test_nfe_counts_the_model_calls(name, process):
    ts = TS if process == "edm" else (0.9, 0.6, 0.4, 0.2, 0.05)
    params = {"s_churn": 10.0} if name == "edm_heun" else {}
    s = NamedSchedule(sampler=name, process=process, timesteps=ts, params=params)
    calls: list[float] = []
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = sample(denoiser(process, calls), x, s, generator=torch.Generator().manual_seed(1))
    assert len(calls) == s.nfe
    assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()
    # The last call is the final denoise at t_N.
    assert calls[-1] == ts[-1]


@pytest.mark.parametrize("name", [n for n in sampler_names()])
def test_same_seed_same_sample_and_rows_batch_invariant(name):
    process = "edm"
    params = {"s_churn": 10.0} if name == "edm_heun" else {}
    s = NamedSchedule(sampler=name, process=process, timesteps=TS, params=params)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 10.0
    gens = lambda seeds: [torch.Generator().manual_seed(k) for k in seeds]
    full = run_named(denoiser(process), x, s, gens([5, 6, 7]))
    again = run_named(denoiser(process), x, s, gens([5, 6, 7]))
    alone = run_named(denoiser(process), x[1:2], s, gens([6]))
    assert torch.equal(full, again)
    torch.testing.assert_close(full[1:2], alone, rtol=1e-12, atol=1e-12)
    if get_sampler(name).stochastic(s.resolved_params):
        other = run_named(denoiser(process), x, s, gens([8, 9, 10]))
        assert not torch.allclose(full, other)


def test_float32_stays_float32():
    s = NamedSchedule(sampler="seeds_3", process="vp-linear", timesteps=(0.9, 0.5, 0.1))
    D = lambda x, t: x * 0.5
    out = run_named(D, torch.randn(2, 3), s, torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32
