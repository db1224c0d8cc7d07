"""S3Scheduler inside a real DDPMPipeline (tiny locally-saved UNet) reproduces `sample` exactly."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel  # noqa: E402
from diffusers.schedulers.scheduling_utils import SchedulerOutput  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

from s3search import baselines  # noqa: E402
from s3search.integrations.diffusers_scheduler import S3Scheduler, pipeline_times  # noqa: E402
from s3search.integrator import sample  # noqa: E402
from s3search.processes import get as get_process  # noqa: E402
from s3search.schedule import SolverSchedule, StepSpec  # noqa: E402

SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory):
    torch.manual_seed(0)  # random weights: the test needs a real UNet, not a trained one
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    path = tmp_path_factory.mktemp("tiny-unet")
    unet.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def unet(unet_dir):
    return UNet2DModel.from_pretrained(unet_dir).eval()


def _grid(indices):
    return tuple((i + 1) / 1000 for i in indices)  # vp-discrete: training step n sits at t = (n + 1) / 1000


GRID = _grid([999, 760, 520, 330, 180, 70, 15])


def _schedules():
    named = pytest.importorskip("s3search.named")
    return {
        "ddim": baselines.get("ddim", timesteps=GRID, process="vp-discrete"),
        "dpmpp_2m": baselines.get("dpmpp_2m", timesteps=GRID, process="vp-discrete"),
        "unipc_bh2_3": baselines.get("unipc_bh2_3", timesteps=GRID, process="vp-discrete"),
        "sde_heun": baselines.get("dpmpp_2m_sde_heun", timesteps=GRID, process="vp-discrete"),
        "mixed": SolverSchedule("vp-discrete", GRID, (
            StepSpec(order=1, eta=0.5), StepSpec(order=2, derivative="bh2", corrector="unic"),
            StepSpec(order=3, corrector="implicit"), StepSpec(order=3, derivative="dpmpp", eta=1.0),
            StepSpec(order=2, prediction="noise"), StepSpec(order=1, corrector="unic")), first_step="zero-x0"),
        "final-none": SolverSchedule("vp-discrete", GRID, (StepSpec(order=1),) * 5
                                     + (StepSpec(order=2, derivative="bh1", corrector="unic"),), final="none"),
        "seeds_2": named.NamedSchedule(sampler="seeds_2", process="vp-discrete", timesteps=GRID[:4]),
    }


def _count_calls(unet):
    calls = []
    handle = unet.register_forward_hook(lambda m, args, out: calls.append(args[1]))
    return calls, handle


def _denoiser(unet, schedule=None, scheduler=None):
    """The UNet as s3search's model registry wraps it: eps -> x0 with the betas of the scheduler config."""
    scheduler = scheduler or S3Scheduler(schedule=schedule)
    return scheduler.denoiser(lambda x, t: unet(x, t).sample)


def _reference(unet, schedule, batch, seed):
    g = torch.Generator().manual_seed(seed)
    x_T = randn_tensor((batch,) + SHAPE, generator=g)  # what DDPMPipeline draws first
    D = _denoiser(unet, schedule)
    with torch.no_grad():
        x0 = sample(D, x_T, schedule, generator=g)
    return (x0 / 2 + 0.5).clamp(0, 1)  # DDPMPipeline's post-processing


@pytest.mark.parametrize("key", ["ddim", "dpmpp_2m", "unipc_bh2_3", "sde_heun", "mixed", "final-none", "seeds_2"])
def test_pipeline_reproduces_sample_exactly(unet, key):
    schedule = _schedules()[key]
    scheduler = S3Scheduler(schedule=schedule.to_dict())
    pipe = DDPMPipeline(unet=unet, scheduler=scheduler)
    calls, handle = _count_calls(unet)
    try:
        images = pipe(batch_size=3, generator=torch.Generator().manual_seed(7),
                      num_inference_steps=len(scheduler.timesteps), output_type="pt").images
    finally:
        handle.remove()
    ref = _reference(unet, schedule, 3, 7)
    assert torch.equal(images, ref)
    discarded = 1 if getattr(schedule, "first_step", "model") != "model" else 0
    assert len(calls) == schedule.nfe + discarded
    assert [float(t) for t in calls] == [float(t) for t in scheduler.timesteps]


def test_per_row_generators(unet):
    schedule = _schedules()["mixed"]
    pipe = DDPMPipeline(unet=unet, scheduler=S3Scheduler(schedule=schedule))
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    images = pipe(batch_size=2, generator=gens, output_type="pt").images
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    x_T = randn_tensor((2,) + SHAPE, generator=gens)
    D = _denoiser(unet, schedule)
    with torch.no_grad():
        ref = sample(D, x_T, schedule, generator=gens)
    assert torch.equal(images, (ref / 2 + 0.5).clamp(0, 1))


def test_timesteps_follow_the_evaluation_plan():
    s = _schedules()
    ddim = S3Scheduler(schedule=s["ddim"])
    assert ddim.timesteps.tolist() == [999, 760, 520, 330, 180, 70, 15]
    assert ddim.timesteps.dtype == torch.int64
    mixed = S3Scheduler(schedule=s["mixed"])
    # zero-x0: a discarded call at t_0; unic: the predicted point's evaluation; implicit: two at the same time.
    assert mixed.timesteps.tolist() == [999, 760, 520, 330, 330, 180, 70, 15]
    times, discard = pipeline_times(s["mixed"])
    assert discard and len(times) == s["mixed"].nfe


def test_plan_times_agree_with_a_dry_run_of_sample():
    from s3search.integrations.diffusers_scheduler import _dry_run_times, _plan_times

    for key in ("ddim", "unipc_bh2_3", "mixed", "final-none"):
        sched = _schedules()[key]
        (plan, plan_discard), (dry, dry_discard) = _plan_times(sched), _dry_run_times(sched)
        assert plan == pytest.approx(dry, rel=1e-12) and plan_discard == dry_discard


def test_save_and_load_round_trip(tmp_path, unet):
    schedule = _schedules()["unipc_bh2_3"]
    scheduler = S3Scheduler(schedule=schedule)
    scheduler.save_pretrained(tmp_path / "sched")
    loaded = S3Scheduler.from_pretrained(tmp_path / "sched")
    assert loaded.schedule == schedule
    public = lambda c: {k: v for k, v in dict(c).items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(scheduler.config)
    assert torch.equal(loaded.timesteps, scheduler.timesteps)
    # The usual way in: keep the pipeline's own beta settings, add the schedule.
    from_ddpm = S3Scheduler.from_config(DDPMScheduler(num_train_timesteps=1000).config, schedule=schedule.to_json())
    assert from_ddpm.schedule == schedule
    # A whole pipeline saved with its stock scheduler, reloaded, scheduler swapped.
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "pipe")
    pipe = DDPMPipeline.from_pretrained(tmp_path / "pipe")
    pipe.scheduler = S3Scheduler.from_config(pipe.scheduler.config, schedule=schedule.to_dict())
    images = pipe(batch_size=1, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert torch.equal(images, _reference(pipe.unet, schedule, 1, 0))


def test_step_returns_scheduler_output_and_tuple(unet):
    sched = S3Scheduler(schedule=_schedules()["ddim"])
    x = torch.randn((1,) + SHAPE)
    out = sched.step(torch.zeros_like(x), sched.timesteps[0], x)
    assert isinstance(out, SchedulerOutput)
    sched.set_timesteps()
    (prev,) = sched.step(torch.zeros_like(x), sched.timesteps[0], x, return_dict=False)
    assert torch.equal(prev, out.prev_sample)


def test_add_noise_and_scale_model_input():
    sched = S3Scheduler(schedule=_schedules()["ddim"])
    x0 = torch.randn(3, *SHAPE, dtype=torch.float64)
    eps = torch.randn(3, *SHAPE, dtype=torch.float64)
    steps = torch.tensor([0, 500, 999])
    proc = get_process("vp-discrete")
    out = sched.add_noise(x0, eps, steps)
    for row, n in enumerate(steps.tolist()):
        t = (n + 1) / 1000
        torch.testing.assert_close(out[row], proc.alpha(t) * x0[row] + proc.sigma(t) * eps[row])
    ref = DDPMScheduler().add_noise(x0.float(), eps.float(), steps)
    torch.testing.assert_close(out.float(), ref, rtol=1e-4, atol=1e-4)
    assert sched.scale_model_input(x0, 10) is x0
    # x_T = sigma(t_0) z, as the evaluator draws it (DDPM / DDIM pipelines do not apply it)
    assert sched.init_noise_sigma == proc.sigma(GRID[0])


@pytest.mark.parametrize("kwargs,match", [
    ({"schedule": None}, "schedule is required"),
    ({"schedule": "edm"}, "JSON"),
    ({"prediction_type": "flow"}, "prediction_type"),
    ({"beta_schedule": "exotic"}, "unsupported noise schedule"),
    ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
    ({"data_mean": "mean"}, "data_mean"),
    ({"data_mean": [float("nan")]}, "data_mean must be finite"),
])
def test_bad_configs_raise(kwargs, match):
    args = {"schedule": _schedules()["ddim"].to_dict(), **kwargs}
    with pytest.raises(ValueError, match=match):
        S3Scheduler(**args)


def test_other_betas_run_the_schedule_on_a_view_of_the_network():
    # Stable Diffusion's betas with a schedule on vp-discrete (the default DDPM betas): the latents stay on the
    # schedule's process and the network is called at the time of equal logSNR on its own.
    sd = S3Scheduler(schedule=_schedules()["ddim"], beta_schedule="scaled_linear", beta_start=0.00085,
                     beta_end=0.012)
    model = sd.model_process
    assert isinstance(model, type(get_process("vp-discrete"))) and model != get_process("vp-discrete")
    assert sd.timesteps.dtype == torch.float32
    ddpm = get_process("vp-discrete")
    for t, net_t in zip(GRID, sd.timesteps.tolist()):
        t_model = min(max(model.t_of_lambda(ddpm.lambda_(t)), model.t_min), model.t_max)
        assert net_t == pytest.approx(model.model_time(t_model), abs=1e-3)
        assert model.lambda_(t_model) == pytest.approx(ddpm.lambda_(t), abs=1e-6) or t_model in (model.t_min, 1.0)
    x = torch.ones(1, *SHAPE)
    scale = model.alpha(min(max(model.t_of_lambda(ddpm.lambda_(GRID[0])), model.t_min), 1.0)) / ddpm.alpha(GRID[0])
    assert torch.equal(sd.scale_model_input(x, sd.timesteps[0]), x * scale)
    # squaredcos_cap_v2 betas are computed by diffusers as for any of its schedulers
    assert S3Scheduler(schedule=_schedules()["ddim"], beta_schedule="squaredcos_cap_v2").model_process.betas[0] > 0


def test_a_pipeline_that_does_not_scale_its_input_is_refused_for_a_view(unet):
    edm = baselines.get("dpmpp_2m", timesteps=(14.0, 3.0, 0.5, 0.05), process="edm")
    pipe = DDPMPipeline(unet=unet, scheduler=S3Scheduler(schedule=edm))
    with pytest.raises(ValueError, match="did not call scale_model_input"):
        pipe(batch_size=1, generator=torch.Generator().manual_seed(0), output_type="pt")


def test_unsupported_schedules_raise():
    mean = SolverSchedule("vp-discrete", GRID[:3], (StepSpec(),) * 2, first_step="mean-x0")
    with pytest.raises(ValueError, match="mean-x0.*data_mean"):
        S3Scheduler(schedule=mean)
    with pytest.raises(ValueError, match="timesteps/sigmas"):
        S3Scheduler(schedule=_schedules()["ddim"]).set_timesteps(timesteps=[999, 0])
    with pytest.raises(ValueError, match="timesteps/sigmas"):
        S3Scheduler(schedule=_schedules()["ddim"]).set_timesteps(sigmas=[1.0, 0.3])
    with pytest.raises(ValueError, match="begin_index"):
        S3Scheduler(schedule=_schedules()["ddim"]).set_begin_index(2)


def test_mean_x0_takes_the_data_mean_from_the_config(unet, tmp_path):
    schedule = SolverSchedule("vp-discrete", GRID, (StepSpec(order=1), StepSpec(order=2, derivative="dpmpp"),
                                                    StepSpec(order=2, derivative="bh2", corrector="unic"),
                                                    StepSpec(order=3), StepSpec(order=1, eta=1.0),
                                                    StepSpec(order=2)), first_step="mean-x0")
    mean = torch.linspace(-0.5, 0.5, 64).reshape(SHAPE)
    scheduler = S3Scheduler(schedule=schedule, data_mean=mean)
    scheduler.save_pretrained(tmp_path / "sched")
    loaded = S3Scheduler.from_pretrained(tmp_path / "sched")
    assert torch.equal(torch.tensor(loaded.config.data_mean), mean)
    pipe = DDPMPipeline(unet=unet, scheduler=loaded)
    calls, handle = _count_calls(unet)
    try:
        images = pipe(batch_size=2, generator=torch.Generator().manual_seed(3), output_type="pt").images
    finally:
        handle.remove()
    g = torch.Generator().manual_seed(3)
    x_T = randn_tensor((2,) + SHAPE, generator=g)
    D = _denoiser(unet, scheduler=loaded)
    assert torch.equal(D.data_mean.float(), mean)
    ref = sample(D, x_T, schedule, generator=g)
    assert torch.equal(images, (ref / 2 + 0.5).clamp(0, 1))
    assert len(calls) == schedule.nfe + 1   # the pipeline's first call at x_T is not used


def test_ddim_pipeline_runs_the_schedule(unet):
    from diffusers import DDIMPipeline

    schedule = _schedules()["mixed"]
    pipe = DDIMPipeline(unet=unet, scheduler=DDPMScheduler())
    pipe.scheduler = S3Scheduler.from_config(pipe.scheduler.config, schedule=schedule.to_dict())
    images = pipe(batch_size=2, generator=torch.Generator().manual_seed(5), output_type="pt").images
    assert torch.equal(images, _reference(unet, schedule, 2, 5))
    with pytest.raises(ValueError, match="eta"):
        pipe(batch_size=1, eta=0.5, output_type="pt")


def test_misuse_of_step_raises():
    sched = S3Scheduler(schedule=_schedules()["dpmpp_2m"])
    x = torch.randn((1,) + SHAPE)
    with pytest.raises(ValueError, match="expected scheduler.timesteps"):
        sched.step(torch.zeros_like(x), sched.timesteps[1], x)  # img2img-style skipping
    prev = sched.step(torch.zeros_like(x), sched.timesteps[0], x).prev_sample
    with pytest.raises(ValueError, match="differs from the prev_sample"):
        sched.step(torch.zeros_like(x), sched.timesteps[1], prev + 1.0)
    with pytest.raises(ValueError, match="same generator"):
        sched.step(torch.zeros_like(x), sched.timesteps[1], prev, generator=torch.Generator())
    sched.set_timesteps()
    for t in sched.timesteps:
        x = sched.step(torch.zeros_like(x), t, x).prev_sample
    with pytest.raises(ValueError, match="network calls"):
        sched.step(torch.zeros_like(x), sched.timesteps[-1], x)


def test_a_named_run_left_unfinished_is_stopped():
    import threading

    named = _schedules()["seeds_2"]
    before = {t for t in threading.enumerate() if t.name == "s3search-named-run"}
    sched = S3Scheduler(schedule=named)
    x = torch.randn((1,) + SHAPE)
    sched.step(torch.zeros_like(x), sched.timesteps[0], x)
    running = [t for t in threading.enumerate() if t.name == "s3search-named-run" and t not in before]
    assert len(running) == 1
    sched.set_timesteps()   # a new run: the paused one is unwound
    running[0].join(timeout=5)
    assert not running[0].is_alive()


def test_flux_packing_is_the_pipelines():
    from diffusers import FluxPipeline

    from s3search.integrations.diffusers_scheduler import _pack, _unpack, _unpacked_size

    x = torch.randn(2, 16, 4, 6)          # latents of a non-square image
    packed = FluxPipeline._pack_latents(x, 2, 16, 4, 6)
    assert torch.equal(_pack(x), packed)
    assert torch.equal(_unpack(packed, (4, 6)), x)
    assert torch.equal(FluxPipeline._unpack_latents(packed, 4 * 8, 6 * 8, 8), x)
    assert _unpacked_size(packed, None) is None            # 6 patches: not a square, stays packed
    assert _unpacked_size(packed, (4, 6)) == (4, 6)
    assert _unpacked_size(FluxPipeline._pack_latents(torch.randn(1, 16, 6, 6), 1, 16, 6, 6), None) == (6, 6)
    with pytest.raises(ValueError, match="latent_size"):
        _unpacked_size(packed, (4, 4))
