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
from test_k_diffusion_integration import _x, denoise_ve, kd_model, our_denoiser


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
    # discrete models take integer training steps; flow models (FlowMatchEuler) take 1000 t
    kind = float if sched.process == "flow" else int
    assert len(out["timesteps"]) == n and all(type(t) is kind for t in out["timesteps"])
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
    # ComfyUI's flow models take the flow sigma t itself; everything else the VE sigma
    expected = exports.flow_sigmas(sched) + [0.0] * (sched.final == "denoise") if sched.process == "flow" \
        else kd["sigmas"]
    assert [float(v) for v in comfy["sigmas"].split(",")] == expected
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
        fn = getattr(ks, seg["k_diffusion"])
        y = fn(kd_model, y, torch.tensor(seg["sigmas"], dtype=torch.float64), disable=True, **seg["options"])
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


# ----- each tool's own convention (issue 18) ------------------------------------------------------------------
def _ays_sd15() -> SolverSchedule:
    return baselines.get("dpmpp_2m", timesteps=tuple(grids.ays("sd15", 10, get_process("edm"))), process="edm")


SD_SCHEDULER = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
                "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False, "steps_offset": 1}


def test_diffusers_timesteps_follow_the_models_betas():
    sched = _ays_sd15()
    assert exports.to_diffusers(sched)["timesteps"][:3] == [727, 608, 521]   # the DDPM betas, with a note
    assert any("no betas given" in n for n in exports.to_diffusers(sched)["notes"])
    sd = exports.export(sched, "diffusers", betas="scaled_linear")
    assert sd["timesteps"][:3] == [999, 850, 736]
    assert exports.to_diffusers(sched, betas=SD_SCHEDULER)["timesteps"] == sd["timesteps"]
    model = exports.betas_process("scaled_linear")
    assert exports.to_diffusers(sched, betas=list(model.betas))["timesteps"] == sd["timesteps"]
    # each integer step is the one of nearest sigma on the model's own betas
    for step, sigma in zip(sd["timesteps"], sd["sigmas"]):
        t = model.t_of_sigma_ve(min(max(sigma, model.sigma_ve(model.t_min)), model.sigma_ve(1.0)))
        assert abs(step - model.model_time(t)) <= 0.5 + 1e-9
    # the exact route in the export runs on the same model
    from s3search.integrations.diffusers_scheduler import S3Scheduler

    scheduler = S3Scheduler(**sd["scheduler"]["config"])
    np.testing.assert_allclose(scheduler.model_process.betas, model.betas, rtol=1e-6)
    with pytest.raises(ValueError, match="betas='cosine'"):
        exports.export(sched, "k-diffusion", betas="cosine")


def test_flow_exports_are_flow_sigmas_for_diffusers_and_comfyui():
    from diffusers import FlowMatchEulerDiscreteScheduler

    flow = get_process("flow")
    ts = grids.from_flow_sigmas([1.0, 0.8, 0.55, 0.3, 0.1, 0.02])
    sched = baselines.get("dpmpp_2m", timesteps=tuple(ts), process="flow")
    assert sched.timesteps[0] == flow.t_top
    out = exports.to_diffusers(sched)
    assert out["sigmas"] == [1.0, 0.8, 0.55, 0.3, 0.1, 0.02, 0.0]
    assert out["timesteps"] == pytest.approx([1000.0 * s for s in out["sigmas"][:-1]])
    # followed as the note says, FlowMatchEuler holds the very grid
    stock = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    stock.set_timesteps(sigmas=out["sigmas"][:-1])
    np.testing.assert_allclose(stock.sigmas.numpy(), out["sigmas"], rtol=1e-6)
    np.testing.assert_allclose(stock.timesteps.numpy(), out["timesteps"], rtol=1e-6)
    assert out["segments"][0]["diffusers"]["kwargs"]["prediction_type"] == "flow_prediction"
    comfy = exports.to_comfyui(sched)
    assert comfy["sigmas"].startswith("1.0, 0.8, ") and comfy["sigmas"].endswith(", 0.0")
    # k-diffusion stays on its VE scale
    assert exports.to_k_diffusion(sched)["sigmas"][1] == pytest.approx(0.8 / 0.2)


def _flow_model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """ComfyUI's convention for a flow model: x_t = (1 - t) x0 + t eps, sigma = t, returns E[x0 | x_t]."""
    t = sigma.reshape(-1, 1)
    return denoise_ve(x / (1 - t), (t / (1 - t)).reshape(-1))


def test_comfyui_on_flow_claims_euler_only_and_euler_is_exact():
    ks = k_diffusion_sampling()
    flow = get_process("flow")
    ts = tuple(grids.time_uniform(flow, 6))
    mixed = SolverSchedule("flow", ts, (S(1), S(1), S(2, "dpmpp"), S(2, "dpmpp"), S(1), S(1)))
    segs = exports.to_comfyui(mixed)["segments"]
    assert {s["sampler"] for s in segs if s["exact"]} == {"euler"}
    assert any(s["sampler"] == "dpmpp_2m" and not s["exact"] for s in segs)
    # k-diffusion's (and ComfyUI's) sample_euler on flow sigmas with a flow model is our DDIM on flow
    ddim = SolverSchedule("flow", ts, (S(1),) * 6)
    (seg,) = exports.to_comfyui(ddim)["segments"]
    assert seg["exact"] and seg["sampler"] == "euler"
    x = _x() * ts[0]
    y = ks.sample_euler(_flow_model, x.clone(), torch.tensor(seg["sigmas"], dtype=torch.float64), disable=True,
                        **seg["options"])

    def flow_denoiser(z, t):
        return denoise_ve(z / (1 - t), t / (1 - t))

    torch.testing.assert_close(y, sample(flow_denoiser, x, ddim), rtol=1e-12, atol=1e-12)


EXACT_BLOCKS = {  # steps that one stock sampler runs exactly, each from its warm-up
    "euler": (S(1), S(1)),
    "euler_ancestral": (S(1, eta=1.0), S(1, eta=1.0)),
    "dpmpp_2m": (S(1), S(2, "dpmpp"), S(2, "dpmpp")),
    "dpmpp_2m_sde": (S(1, eta=0.5), S(2, "dpmpp", eta=0.5), S(2, "dpmpp", eta=0.5)),
    "dpmpp_2m_sde_heun": (S(1, eta=0.8), S(2, eta=0.8), S(2, eta=0.8)),
    "dpmpp_3m_sde": (S(1, eta=0.3), S(2, eta=0.3), S(3, "dpmpp", eta=0.3), S(3, "dpmpp", eta=0.3)),
}


def _exact_block_schedule(order: list[str]) -> SolverSchedule:
    steps = tuple(st for name in order for st in EXACT_BLOCKS[name])
    return SolverSchedule("edm", tuple(grids.edm(get_process("edm"), len(steps))), steps)


def _sub_schedule(sched: SolverSchedule, seg: dict) -> SolverSchedule:
    """Our steps of one tool segment alone (history restarted, as the stock sampler restarts it)."""
    start, stop = seg["steps"]
    last = stop > sched.num_steps      # the segment ends with the tool's step to sigma 0: our final denoise
    stop = min(stop, sched.num_steps)
    return SolverSchedule(sched.process, sched.timesteps[start:stop + 1], sched.steps[start:stop],
                          final="denoise" if last else "none")


@pytest.mark.parametrize("order", [list(EXACT_BLOCKS), list(reversed(EXACT_BLOCKS))])
def test_every_exact_segment_is_its_k_diffusion_function_with_the_segments_options(order):
    ks = k_diffusion_sampling()
    sched = _exact_block_schedule(order)
    segs = exports.to_k_diffusion(sched)["segments"]
    assert {s["sampler"] for s in segs if s["exact"]} == set(EXACT_BLOCKS)
    for k, seg in enumerate(s for s in segs if s["exact"]):
        sub = _sub_schedule(sched, seg)
        x = _x(seed=k) * sub.timesteps[0]
        fn = getattr(ks, seg["k_diffusion"])
        # the same normal draws as the integrator's, one per stochastic step
        kd_noise = torch.Generator().manual_seed(100 + k)
        noise = {"noise_sampler": lambda s, s_next: torch.randn(x.shape, generator=kd_noise, dtype=x.dtype)} \
            if any(st.eta > 0 for st in sub.steps) else {}
        got = fn(kd_model, x.clone(), torch.tensor(seg["sigmas"], dtype=torch.float64), disable=True,
                 **seg["options"], **noise)
        want = sample(our_denoiser("edm"), x, sub, generator=torch.Generator().manual_seed(100 + k))
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, msg=lambda m: f"{seg['sampler']}: {m}")


def _all_segments():
    from s3search.space import SearchSpace

    rng = np.random.default_rng(3)
    for process in ("edm", "flow"):
        space = SearchSpace(process, [4, 6, 9])
        for _ in range(30):
            sched = space.random(rng)
            yield from exports.to_k_diffusion(sched)["segments"]
            yield from exports.to_comfyui(sched)["segments"]
            yield from exports.to_diffusers(sched)["segments"]
    for name in baselines.names():
        try:
            sched = baselines.get(name, timesteps=tuple(grids.edm(get_process("edm"), 6)), process="edm")
        except ValueError:
            continue
        yield from exports.to_k_diffusion(sched)["segments"]


def test_segment_options_are_keyword_arguments_of_the_named_function_and_class():
    import inspect

    import diffusers

    ks = k_diffusion_sampling()
    seen_options, seen_classes = set(), set()
    for seg in _all_segments():
        if seg["k_diffusion"] is None:
            assert seg["options"] == {}
        else:
            params = inspect.signature(getattr(ks, seg["k_diffusion"])).parameters
            assert set(seg["options"]) <= set(params) - {"model", "x", "sigmas"}, seg
            seen_options.update(seg["options"])
        if seg["diffusers"] is not None:
            cls = getattr(diffusers, seg["diffusers"]["class"])
            cls(**seg["diffusers"]["kwargs"])   # refuses an argument it does not take
            seen_classes.add(seg["diffusers"]["class"])
    assert {"eta", "solver_type"} <= seen_options and "order" not in seen_options
    assert {"FlowMatchEulerDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"} \
        <= seen_classes


def test_cli_betas_option(tmp_path):
    from typer.testing import CliRunner

    from s3search.cli import app

    path = tmp_path / "s.json"
    path.write_text(_ays_sd15().to_json())
    folder = tmp_path / "pipe" / "scheduler"
    folder.mkdir(parents=True)
    (folder / "scheduler_config.json").write_text(json.dumps(SD_SCHEDULER))
    runner = CliRunner()
    base = ["export", "--schedule", str(path), "--format", "diffusers", "--field", "timesteps"]
    for betas in ("scaled_linear", str(folder / "scheduler_config.json"), str(tmp_path / "pipe")):
        res = runner.invoke(app, base + ["--betas", betas])
        assert res.exit_code == 0, res.output
        assert json.loads(res.output)[:3] == [999, 850, 736]
    res = runner.invoke(app, base + ["--betas", str(tmp_path / "nowhere")])
    assert res.exit_code != 0 and "--betas" in res.output
