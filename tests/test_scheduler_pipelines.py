"""S3Scheduler inside StableDiffusion, StableDiffusionXL, StableDiffusion3 and FLUX pipelines: the pipeline's own loop
(its prompt encoding, CFG, latents and scheduler calls) gives bitwise what `s3search.sample` gives on the same
latents with the denoiser s3search's model registry builds for that pipeline (`models.pipelines`, seen on edm by
logSNR for SD / SDXL as the registry exposes them). Tiny random-weight pipelines built from configs, as in
test_pipelines.py (whose builders are reused), nothing downloaded.
"""

from __future__ import annotations

import pytest
import torch

from s3search import grids, processes
from s3search.integrator import sample
from s3search.models.base import Conditions, single_threaded
from s3search.schedule import SolverSchedule, StepSpec

from test_pipelines import BUILDERS, HEIGHT, MAX_SEQUENCE_LENGTH, NEGATIVES, PER_PROMPT, PROMPTS, WIDTH, _eval

diffusers = pytest.importorskip("diffusers")

from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

from s3search.integrations.diffusers_scheduler import S3Scheduler  # noqa: E402
from s3search.models.local.noise import process_view  # noqa: E402
from s3search.models.pipelines import PipelineSettings, pipeline_model  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    with single_threaded():
        yield


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("scheduler-pipelines")
    built: dict = {}

    def get(family: str):
        if family not in built:
            built[family] = _eval(BUILDERS[family](root / family))
        return built[family]

    return get


def S(order: int = 1, derivative: str = "taylor", **kw) -> StepSpec:
    return StepSpec(order=order, derivative=derivative, **kw)


# Every kind of step: multistep orders, both corrector kinds, noise prediction, stochastic steps.
MIXED = (S(1), S(2, "dpmpp"), S(2, "bh2", corrector="unic"), S(3, corrector="implicit"), S(2, prediction="noise"),
         S(2, "dpmpp", eta=0.7))
EDM_TIMES = (14.0, 6.0, 2.4, 0.9, 0.35, 0.12, 0.03)   # inside SD's sigma range 0.03 .. 14.6


def _flow_times(pipe, n: int) -> tuple[float, ...]:
    """The shifted sigmas the pipeline's own scheduler would visit, as flow times (sigma 1 -> t_top)."""
    settings = PipelineSettings(height=HEIGHT, width=WIDTH, max_sequence_length=MAX_SEQUENCE_LENGTH)
    return tuple(grids.from_flow_sigmas(pipeline_model(pipe, settings).scheduler_times(n)))


def _schedules(family: str, pipe) -> dict[str, SolverSchedule]:
    if family in ("sd3", "flux"):
        ts = _flow_times(pipe, len(MIXED) + 1)
        return {"mixed": SolverSchedule("flow", ts, MIXED),
                "zero-x0": SolverSchedule("flow", ts[:4], (S(1, eta=1.0), S(2), S(2, "bh1", corrector="unic")),
                                          first_step="zero-x0", final="none")}
    out = {"mixed": SolverSchedule("edm", EDM_TIMES, MIXED),
           "zero-x0": SolverSchedule("edm", EDM_TIMES[:4], (S(1, eta=1.0), S(2), S(2, "bh1", corrector="unic")),
                                     first_step="zero-x0", final="none")}
    if family == "sd":
        # The default DDPM betas' process, viewed onto SD's scaled-linear betas the same way.
        out["vp-discrete"] = SolverSchedule("vp-discrete", tuple((n + 1) / 1000 for n in (999, 700, 400, 150, 30)),
                                            (S(1), S(2, "dpmpp"), S(2, "dpmpp"), S(1, eta=0.5)))
    return out


CASES = {  # family: guidance scale, true CFG (FLUX)
    "sd": (7.5, None), "sd-v": (4.0, None), "sdxl": (5.0, None), "sd3": (7.0, None), "flux": (3.5, 2.0),
}
RUNS = [(family, key) for family in CASES for key in ("mixed", "zero-x0")] + [("sd", "vp-discrete")]


def _reference(pipe, family: str, schedule: SolverSchedule, scheduler: S3Scheduler, seed: int) -> torch.Tensor:
    """`sample` with s3search's denoiser for this pipeline, from the noise the pipeline draws."""
    w, true_cfg = CASES[family]
    settings = PipelineSettings(height=HEIGHT, width=WIDTH, guidance_scale=w, max_sequence_length=MAX_SEQUENCE_LENGTH,
                                true_cfg_scale=true_cfg or 1.0, batch_size=len(PROMPTS) * PER_PROMPT)
    model = pipeline_model(pipe, settings)
    denoiser = model.denoiser_for(Conditions(PROMPTS, negative_prompts=NEGATIVES))
    if family not in ("sd3", "flux"):
        # SD's scaled-linear betas are no registered process: the registry shows the model through this view
        # (onto edm by default, or the entry's expose_process).
        denoiser = process_view(denoiser, schedule.process)
    g = torch.Generator().manual_seed(seed)
    z = randn_tensor((len(PROMPTS) * PER_PROMPT, *model.shape), generator=g, dtype=torch.float32)
    x_T = z if family in ("sd3", "flux") else z * scheduler.init_noise_sigma   # flow pipelines start from z
    return sample(denoiser, x_T, schedule, generator=g)


def _pipeline_latents(pipe, family: str, scheduler: S3Scheduler, seed: int) -> torch.Tensor:
    w, true_cfg = CASES[family]
    g = torch.Generator().manual_seed(seed)
    kwargs = dict(prompt=list(PROMPTS), negative_prompt=list(NEGATIVES), num_images_per_prompt=PER_PROMPT,
                  height=HEIGHT, width=WIDTH, guidance_scale=w, generator=g, output_type="latent",
                  num_inference_steps=len(scheduler.timesteps))
    if family in ("sd3", "flux"):
        kwargs["max_sequence_length"] = MAX_SEQUENCE_LENGTH
        scheduler.noise_generator = g   # these pipelines hand `step` no generator
    if family == "flux":
        kwargs["true_cfg_scale"] = true_cfg
    pipe.scheduler = scheduler
    latents = pipe(**kwargs).images
    if family == "flux":
        latents = pipe._unpack_latents(latents, HEIGHT, WIDTH, pipe.vae_scale_factor)
    return latents


@pytest.mark.parametrize("family, key", RUNS)
def test_pipeline_with_s3scheduler_is_sample(pipes, family, key) -> None:
    pipe = pipes(family)
    stock = pipe.scheduler
    schedule = _schedules(family, pipe)[key]
    try:
        scheduler = S3Scheduler.from_config(stock.config, schedule=schedule.to_dict())
        calls = []
        network = pipe.transformer if family in ("sd3", "flux") else pipe.unet
        handle = network.register_forward_pre_hook(lambda m, args: calls.append(1))
        try:
            got = _pipeline_latents(pipe, family, scheduler, seed=11)
        finally:
            handle.remove()
    finally:
        pipe.scheduler = stock
    want = _reference(pipe, family, schedule, scheduler, seed=11)
    assert torch.equal(got, want)
    true_cfg_calls = 2 if family == "flux" else 1     # FLUX's true CFG calls the transformer twice a step
    discarded = 1 if schedule.first_step != "model" else 0
    assert len(calls) == true_cfg_calls * (schedule.nfe + discarded)


def test_flow_scheduler_reads_a_flow_matching_config(pipes) -> None:
    pipe = pipes("flux")
    schedule = _schedules("flux", pipe)["mixed"]
    scheduler = S3Scheduler.from_config(pipe.scheduler.config, schedule=schedule.to_dict())
    assert scheduler.config.prediction_type == "flow_prediction"
    assert scheduler.model_process is processes.get("flow")
    # the transformer's timestep is 1000 t; the pipeline's sigma 1 is t_top = 1 - 1e-6
    assert scheduler.timesteps[0].item() == pytest.approx(1000 * processes.FLOW_T_TOP, abs=1e-3)
    assert schedule.timesteps[0] == processes.FLOW_T_TOP
    # FluxPipeline passes mu and its default sigmas to set_timesteps; both are ignored
    scheduler.set_timesteps(sigmas=[1.0, 0.5], mu=0.7)
    assert len(scheduler.timesteps) == schedule.nfe


def test_sd_scheduler_shows_the_timesteps_of_equal_logsnr(pipes) -> None:
    pipe = pipes("sd")
    schedule = _schedules("sd", pipe)["mixed"]
    scheduler = S3Scheduler.from_config(pipe.scheduler.config, schedule=schedule.to_dict())
    model = scheduler.model_process
    assert scheduler.init_noise_sigma == EDM_TIMES[0]
    # fractional training steps at the logSNR of each edm time, within the model's range
    first = scheduler.timesteps[0].item()
    assert scheduler.timesteps.dtype == torch.float32 and 990 < first < 999
    assert model.sigma_ve((first + 1) / 1000) == pytest.approx(EDM_TIMES[0], rel=1e-4)
