"""Exports: each tool's grid conventions, segments, and that segments marked exact really are (k-diffusion code)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from s3search import baselines, exports, grids
from s3search.integrator import sample
from s3search.processes import get as get_process
from s3search.schedule import SolverSchedule, StepSpec

from reference_libs import k_diffusion_sampling
from test_k_diffusion_integration import _x, kd_model, our_denoiser


def S(order: int, derivative: str = "taylor", **kw) -> StepSpec:
    return StepSpec(order=order, derivative=derivative, **kw)


def _ddpm_grid(indices: list[int]) -> tuple[float, ...]:
    # vp-discrete puts training step n at t = (n + 1) / 1000.
    return tuple((i + 1) / 1000 for i in indices)


MIXED = (S(1), S(2, "dpmpp"), S(2, "bh2", corrector="unic"), S(3, "taylor", corrector="implicit"),
         S(1, eta=0.4), S(2, "dpmpp", eta=0.4))

SCHEDULES = {
    "edm-mixed": SolverSchedule("edm", grids.edm(get_process("edm"), 6), MIXED),
    "vp-linear-mixed": SolverSchedule("vp-linear", grids.logsnr(get_process("vp-linear"), 6), MIXED),
    "ddpm-mixed": SolverSchedule("vp-discrete", _ddpm_grid([999, 800, 600, 400, 200, 90, 10]), MIXED),
    "flow-none": SolverSchedule("flow", grids.time_uniform(get_process("flow"), 3), (S(1),) * 3, final="none"),
    "zero-x0": SolverSchedule("edm", grids.edm(get_process("edm"), 3), (S(1),) * 3, first_step="zero-x0"),
}


def _named():
    from s3search.named import NamedSchedule

    return NamedSchedule(sampler="seeds_2", process="edm", timesteps=tuple(grids.edm(get_process("edm"), 4)))


@pytest.mark.parametrize("key", sorted(SCHEDULES))
def test_diffusers_conventions(key):
    sched = SCHEDULES[key]
    out = exports.to_diffusers(sched)
    n = len(sched.timesteps)
    assert len(out["timesteps"]) == n and all(type(t) is int for t in out["timesteps"])
    assert all(0 <= t < out["num_train_timesteps"] for t in out["timesteps"])
    assert out["timesteps"] == sorted(out["timesteps"], reverse=True)
    assert len(out["sigmas"]) == n + 1 and out["sigmas"][-1] == 0.0
    assert all(a > b for a, b in zip(out["sigmas"], out["sigmas"][1:]))
    assert out["num_inference_steps"] == n
    json.dumps(out)  # JSON-ready
    assert exports.load_schedule(out["schedule"]) == sched


def test_diffusers_timesteps_and_sigmas_of_a_ddpm_grid_match_diffusers_own_tables():
    from diffusers import DDPMScheduler

    indices = [999, 800, 600, 400, 200, 90, 10]
    out = exports.to_diffusers(SCHEDULES["ddpm-mixed"])
    assert out["timesteps"] == indices
    betas = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02).betas.double().numpy()
    # diffusers' Euler / DPM schedulers: sigma = sqrt((1 - alpha_bar) / alpha_bar); their float32 cumprod drifts
    # by 2e-5 at small sigma, so the product is taken here in float64.
    acp = np.cumprod(1.0 - betas)
    expected = np.sqrt((1 - acp[indices]) / acp[indices])
    np.testing.assert_allclose(out["sigmas"][:-1], expected, rtol=1e-6)
    assert not any("rounded" in note for note in out["notes"])


def test_diffusers_timesteps_of_a_continuous_process_are_mapped_by_sigma():
    out = exports.to_diffusers(SCHEDULES["edm-mixed"])
    ddpm = get_process("vp-discrete")
    for t_int, sigma in zip(out["timesteps"], out["sigmas"]):
        # The integer step is the one whose sigma is nearest (in the process's own time).
        t_exact = ddpm.model_time(ddpm.t_of_sigma_ve(min(max(sigma, ddpm.sigma_ve(ddpm.t_min)),
                                                         ddpm.sigma_ve(ddpm.t_max))))
        assert abs(t_int - t_exact) <= 0.5 + 1e-9
    assert any("nearest training step" in n for n in out["notes"])


@pytest.mark.parametrize("key", sorted(SCHEDULES))
def test_k_diffusion_and_comfyui_conventions(key):
    sched = SCHEDULES[key]
    kd = exports.to_k_diffusion(sched)
    tensor = exports.k_diffusion_sigmas(sched)
    n = len(sched.timesteps)
    if sched.final == "denoise":
        assert len(kd["sigmas"]) == n + 1 and kd["sigmas"][-1] == 0.0
    else:
        assert len(kd["sigmas"]) == n and kd["sigmas"][-1] > 0.0
    assert all(a > b for a, b in zip(kd["sigmas"], kd["sigmas"][1:]))
    assert tensor.dtype == torch.float32 and tensor.shape == (len(kd["sigmas"]),)
    np.testing.assert_allclose(tensor.numpy(), kd["sigmas"], rtol=1e-7)
    comfy = exports.to_comfyui(sched)
    assert [float(v) for v in comfy["sigmas"].split(",")] == kd["sigmas"]
    for seg in comfy["segments"]:
        assert [float(v) for v in seg["sigmas_string"].split(",")] == seg["sigmas"]


def test_sigmas_are_the_ve_noise_levels():
    sched = SCHEDULES["vp-linear-mixed"]
    proc = get_process("vp-linear")
    sig = exports.to_k_diffusion(sched)["sigmas"]
    np.testing.assert_allclose(sig[:-1], [np.exp(-proc.lambda_(t)) for t in sched.timesteps], rtol=1e-12)
    assert exports.to_k_diffusion(SCHEDULES["edm-mixed"])["sigmas"][:-1] == list(SCHEDULES["edm-mixed"].timesteps)


@pytest.mark.parametrize("key", sorted(SCHEDULES) + ["named"])
def test_segments_tile_the_grid(key):
    sched = _named() if key == "named" else SCHEDULES[key]
    out = exports.to_k_diffusion(sched)
    segs, sig = out["segments"], out["sigmas"]
    assert segs[0]["steps"][0] == 0 and segs[-1]["steps"][1] == len(sig) - 1
    for a, b in zip(segs, segs[1:]):
        assert a["steps"][1] == b["steps"][0]
        assert a["sigmas"][-1] == b["sigmas"][0]  # shared boundary, as SplitSigmas
    for s in segs:
        start, stop = s["steps"]
        assert stop > start and s["sigmas"] == sig[start:stop + 1]


def test_mixed_schedule_says_it_cannot_run_per_step():
    out = exports.to_comfyui(SCHEDULES["edm-mixed"])
    assert len(out["segments"]) > 1
    assert any("changes the solver per step" in n for n in out["notes"])
    names = [s["sampler"] for s in out["segments"]]
    assert names[0] == "dpmpp_2m" and out["segments"][0]["exact"]
    assert "uni_pc_bh2" in names and "euler_ancestral" not in names[:1]


def test_custom_lags_are_never_exact():
    steps = (S(1), S(1), S(2, "dpmpp", lags=(2,)), S(2, "dpmpp"))
    sched = SolverSchedule("edm", grids.edm(get_process("edm"), 4), steps)
    segs = exports.segments(sched)
    covering = [s for s in segs if s["steps"][0] <= 2 < s["steps"][1]]
    assert covering and covering[0]["exact"] is False


def test_zero_x0_first_segment_is_not_exact():
    out = exports.to_k_diffusion(SCHEDULES["zero-x0"])
    assert out["segments"][0]["exact"] is False
    assert any("first_step=zero-x0" in n for n in out["notes"])


@pytest.mark.parametrize("name,sampler", [("ddim", "euler"), ("dpmpp_2m", "dpmpp_2m"), ("dpmpp_3m", "dpmpp_3m_sde"),
                                          ("dpmpp_2m_sde", "dpmpp_2m_sde"),
                                          ("dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun")])
def test_baselines_export_as_one_exact_segment(name, sampler):
    sched = baselines.get(name, timesteps=grids.edm(get_process("edm"), 7), process="edm")
    segs = exports.segments(sched)
    assert [(s["sampler"], s["exact"]) for s in segs] == [(sampler, True)]


def test_exact_segments_chained_through_k_diffusion_reproduce_sample():
    ks = k_diffusion_sampling()
    steps = (S(1), S(2, "dpmpp"), S(2, "dpmpp"), S(1), S(1), S(1), S(2), S(2), S(1), S(2), S(3, "dpmpp"),
             S(3, "dpmpp"))
    sched = SolverSchedule("edm", grids.edm(get_process("edm"), len(steps)), steps)
    out = exports.to_k_diffusion(sched)
    segs = out["segments"]
    assert all(s["exact"] for s in segs) and len(segs) == 4
    x = _x() * sched.timesteps[0]
    y = x.clone()
    for seg in segs:
        kwargs = dict(seg["options"])
        if seg["sampler"] == "dpmpp_2m_sde_heun":
            kwargs["solver_type"] = "heun"
        fn = getattr(ks, seg["k_diffusion"])
        y = fn(kd_model, y, torch.tensor(seg["sigmas"], dtype=torch.float64), disable=True, **kwargs)
    ref = sample(our_denoiser("edm"), x, sched)
    torch.testing.assert_close(y, ref, rtol=1e-9, atol=1e-9)


def test_named_schedule_exports():
    sched = _named()
    out = exports.export(sched, "comfyui")
    assert out["segments"][0]["sampler"] == "seeds_2"
    assert out["sigmas"].endswith("0.0")
    assert exports.load_schedule(exports.export(sched, "json")) == sched


def test_export_dispatch_and_unknown_format():
    sched = SCHEDULES["edm-mixed"]
    assert exports.export(sched, "json") == sched.to_dict()
    assert exports.export(sched, "k-diffusion")["format"] == "k-diffusion"
    assert exports.export(sched, "diffusers")["format"] == "diffusers"
    with pytest.raises(ValueError, match="format='onnx'"):
        exports.export(sched, "onnx")


def test_load_schedule_rejects_bad_documents():
    with pytest.raises(ValueError, match="JSON"):
        exports.load_schedule("{not json")
    with pytest.raises(ValueError, match="object"):
        exports.load_schedule("[1, 2]")
    with pytest.raises(ValueError, match="timesteps"):
        exports.load_schedule({"process": "edm", "steps": []})
