"""options.target: a search for a runtime only yields schedules (and seeds baselines) that runtime runs exactly,
at the searched NFE; the exports carry what the runtime lacks (the data mean of first_step="mean-x0")."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from s3search import baselines, exports
from s3search.integrations.k_diffusion import sample_schedule
from s3search.integrator import sample
from s3search.search import baselines_seed
from s3search.search.config import ConfigError, SearchConfig, default_target
from s3search.search.run import build_space
from s3search.space import TARGETS

NFE = 5
MEAN = 0.3          # the data mean handed to mean-x0 schedules: any number shows whether it arrives


def _space(target: str, process: str, has_data_mean: bool = True):
    config = SearchConfig(model="gmm-64d", nfe=NFE, options={"target": target}).with_model_defaults("fd")
    return config, build_space(config, process, config.options, has_data_mean=has_data_mean)


def _draws(space, n: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    return [space.random(rng) for _ in range(n)]


# ----- the space and the baselines --------------------------------------------------------------------------
def test_only_the_diffusers_target_narrows_the_space_and_the_others_keep_mean_x0():
    firsts = {t: {s.first_step for s in _draws(_space(t, "edm")[1], 60)} for t in TARGETS}
    assert firsts["diffusers"] == {"model"}
    for target in ("any", "k-diffusion", "comfyui"):
        assert firsts[target] == {"model", "zero-x0", "mean-x0"}, target


def test_a_target_refuses_a_space_or_baseline_it_cannot_run_naming_the_field():
    with pytest.raises(ConfigError) as info:
        SearchConfig(model="gmm-64d", nfe=NFE, options={"target": "diffusers", "space": {
            "first_steps": ["model", "zero-x0"]}}).with_model_defaults("fd")
    assert info.value.fields == ["options.space"] and "zero-x0" in str(info.value)
    with pytest.raises(ConfigError) as info:
        SearchConfig(model="gmm-64d", nfe=NFE, options={"target": "diffusers", "baselines": [
            "ddim", "li_accelerated_ddpm"]}).with_model_defaults("fd")
    assert info.value.fields == ["options.baselines"] and "li_accelerated_ddpm" in str(info.value)


def test_resolving_the_target_twice_changes_nothing_and_round_trips():
    once = SearchConfig(model="gmm-64d", nfe=NFE, options={"target": "diffusers"}).with_model_defaults("fd")
    assert once.with_model_defaults("fd") == once
    assert SearchConfig.from_dict(once.to_dict()) == once


def test_the_default_target_is_diffusers_for_a_pipeline_folder_and_any_otherwise():
    from types import SimpleNamespace

    from s3search.models import digits_t2i

    assert {e.kind for e in digits_t2i.entries()} == {"diffusers-pipeline"}   # digits-t2i and -flow
    assert default_target(SimpleNamespace(provenance={"kind": "diffusers-pipeline"})) == "diffusers"
    assert default_target(SimpleNamespace(provenance={"kind": "diffusers-unet"})) == "any"
    assert default_target(SimpleNamespace(provenance={})) == "any"
    assert SearchConfig(model="gmm-64d", nfe=NFE).with_model_defaults("fd").options.target == "any"


def test_seeding_keeps_only_the_baselines_a_target_runs():
    every = baselines_seed.conventional(NFE, "vp-discrete")
    kept = baselines_seed.conventional(NFE, "vp-discrete", target="diffusers")
    dropped = {c.label.split("@")[0] for c in every} - {c.label.split("@")[0] for c in kept}
    assert dropped == {"li_accelerated_ddpm"}          # its first evaluation is not at x_T
    assert all(baselines_seed.runs_on(c.schedule, "diffusers") for c in kept)
    config = SearchConfig(model="gmm-64d", nfe=NFE, options={"target": "diffusers"}).with_model_defaults("fd")
    assert "li_accelerated_ddpm" not in config.options.baselines and "ddim" in config.options.baselines
    for target in ("any", "k-diffusion", "comfyui"):
        assert baselines_seed.conventional(NFE, "vp-discrete", target=target) == every


# ----- diffusers: S3Scheduler in a real pipeline -------------------------------------------------------------
@pytest.fixture(scope="module")
def unet():
    pytest.importorskip("diffusers")
    from diffusers import UNet2DModel

    torch.manual_seed(0)  # random weights: the run needs a real network, not a trained one
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4).eval()


def _pipeline_run(unet, schedule, data_mean=None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(DDPMPipeline's images with S3Scheduler, `sample`'s images for the same x_T, network calls made)."""
    from diffusers import DDPMPipeline
    from diffusers.utils.torch_utils import randn_tensor

    from s3search.integrations.diffusers_scheduler import S3Scheduler

    config = exports.export(schedule, "diffusers", data_mean=data_mean)["scheduler"]["config"]
    scheduler = S3Scheduler(**config)
    calls = []
    handle = unet.register_forward_hook(lambda m, args, out: calls.append(args[1]))
    try:
        images = DDPMPipeline(unet=unet, scheduler=scheduler)(
            batch_size=2, generator=torch.Generator().manual_seed(7), num_inference_steps=len(scheduler.timesteps),
            output_type="pt").images
    finally:
        handle.remove()
    g = torch.Generator().manual_seed(7)
    x_T = randn_tensor((2, 1, 8, 8), generator=g)
    with torch.no_grad():
        x0 = sample(scheduler.denoiser(lambda x, t: unet(x, t).sample), x_T, schedule, generator=g)
    return images, (x0 / 2 + 0.5).clamp(0, 1), len(calls)


def test_every_schedule_of_a_diffusers_space_runs_in_a_pipeline_exactly_at_its_nfe(unet):
    # DDPMPipeline calls no scale_model_input, so the schedules are on the network's own process.
    _, space = _space("diffusers", "vp-discrete")
    for schedule in _draws(space, 8, seed=1):
        images, reference, calls = _pipeline_run(unet, schedule)
        assert torch.equal(images, reference)
        assert calls == schedule.nfe == NFE


def test_without_the_target_a_pipeline_pays_a_discarded_call(unet):
    """What the diffusers target avoids: a schedule of the unrestricted space costs NFE + 1 network calls."""
    _, space = _space("any", "vp-discrete", has_data_mean=False)
    schedule = next(s for s in _draws(space, 40, seed=2) if s.first_step == "zero-x0")
    images, reference, calls = _pipeline_run(unet, schedule)
    assert torch.equal(images, reference) and calls == NFE + 1


def test_every_baseline_a_diffusers_search_seeds_makes_nfe_network_calls():
    pytest.importorskip("diffusers")
    from s3search.integrations.diffusers_scheduler import pipeline_times

    for c in baselines_seed.conventional(NFE, "vp-discrete", target="diffusers"):
        times, discarded = pipeline_times(c.schedule)
        assert not discarded and len(times) == NFE, c.label


# ----- k-diffusion / ComfyUI: sample_schedule with the export's data mean ------------------------------------
def _analytic(x: torch.Tensor, t: float) -> torch.Tensor:
    return x / (1.0 + t * t)          # E[x0 | x_t] for N(0, I) data on edm (t = sigma)


class _Denoiser:
    data_mean = torch.tensor(MEAN, dtype=torch.float64)

    def __call__(self, x: torch.Tensor, t: float) -> torch.Tensor:
        return _analytic(x, t)


@pytest.mark.parametrize("target", ["k-diffusion", "comfyui"])
def test_every_schedule_of_a_k_diffusion_space_runs_through_sample_schedule_as_sample_does(target):
    _, space = _space(target, "edm")
    drawn = _draws(space, 30, seed=3)
    assert any(s.first_step == "mean-x0" for s in drawn)
    for schedule in drawn:
        doc = exports.export(schedule, target, data_mean=_Denoiser.data_mean)
        assert ("data_mean" in doc) == (schedule.first_step == "mean-x0")
        x = torch.randn(3, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * schedule.timesteps[0]
        got = sample_schedule(lambda x, sigma: _analytic(x, float(sigma[0])), x, exports.k_diffusion_sigmas(schedule),
                              schedule, generator=torch.Generator().manual_seed(5), data_mean=doc.get("data_mean"))
        want = sample(_Denoiser(), x, schedule, generator=torch.Generator().manual_seed(5))
        assert torch.equal(got, want), schedule.to_dict()


def test_sample_schedule_refuses_mean_x0_without_the_data_mean():
    _, space = _space("k-diffusion", "edm")
    schedule = next(s for s in _draws(space, 40, seed=6) if s.first_step == "mean-x0")
    x = torch.randn(2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="data_mean"):
        sample_schedule(lambda x, sigma: x, x, exports.k_diffusion_sigmas(schedule), schedule)


def test_the_exports_carry_the_data_mean_of_a_mean_x0_schedule_and_say_when_they_lack_it(unet):
    _, space = _space("any", "vp-discrete")
    schedule = next(s for s in _draws(space, 40, seed=7) if s.first_step == "mean-x0")
    mean = torch.linspace(-0.5, 0.5, 64, dtype=torch.float64).reshape(1, 8, 8)
    doc = exports.export(schedule, "diffusers", data_mean=mean)
    np.testing.assert_array_equal(np.asarray(doc["scheduler"]["config"]["data_mean"]), mean.numpy())
    # The pipeline built from the export alone reproduces `sample` with that mean.
    images, reference, _ = _pipeline_run(unet, schedule, data_mean=mean)
    assert torch.equal(images, reference)
    for fmt in ("diffusers", "k-diffusion", "comfyui"):
        bare = exports.export(schedule, fmt)
        assert "data_mean" not in bare and "data_mean" not in bare.get("scheduler", {}).get("config", {})
        assert any("mean-x0 needs the model's data mean" in n for n in bare["notes"]), fmt
    plain = baselines.for_nfe("ddim", NFE, "vp-discrete")
    assert "data_mean" not in exports.export(plain, "k-diffusion", data_mean=mean)   # only where it is needed
    with pytest.raises(ValueError, match="data_mean"):
        exports.export(plain, "k-diffusion", data_mean=[float("nan")])
