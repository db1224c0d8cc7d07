"""S3Scheduler with the trained text-to-image digits models (digits-t2i: StableDiffusionPipeline, scaled-linear
betas, searched on edm; digits-t2i-flow: StableDiffusion3Pipeline without T5, flow): the stock pipeline loaded
from the shipped folder with S3Scheduler gives bitwise what `sample` gives with the registry's own denoiser for
the same prompts and guidance, that is the very computation a search of these models evaluated."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

from s3search import processes  # noqa: E402
from s3search.integrations.diffusers_scheduler import S3Scheduler  # noqa: E402
from s3search.integrator import sample  # noqa: E402
from s3search.models import registry  # noqa: E402
from s3search.models.base import Conditions, single_threaded  # noqa: E402
from s3search.models.digits_t2i import FLOW_FOLDER, FLOW_SEQUENCE_LENGTH, SD_FOLDER  # noqa: E402
from s3search.schedule import SolverSchedule, StepSpec  # noqa: E402

PROMPTS = ("a handwritten 3", "the digit eight")
PER_PROMPT = 2
GUIDANCE = 5.0
STEPS = (StepSpec(order=1), StepSpec(order=2, derivative="dpmpp"), StepSpec(order=2, derivative="bh2",
                                                                          corrector="unic"),
         StepSpec(order=3), StepSpec(order=2, eta=0.6))


@pytest.fixture(autouse=True)
def _one_thread():
    with single_threaded():
        yield


def _pipe(name: str):
    if name == "digits-t2i":
        return diffusers.StableDiffusionPipeline.from_pretrained(SD_FOLDER, local_files_only=True), {}
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(FLOW_FOLDER, text_encoder_3=None, tokenizer_3=None,
                                                              local_files_only=True)
    return pipe, {"max_sequence_length": FLOW_SEQUENCE_LENGTH}


def _schedule(spec) -> SolverSchedule:
    # A grid of the model's own process and range, as a search would visit.
    proc = processes.get(spec.process.name)
    times = spec.scheduler_times(len(STEPS) + 1)
    return SolverSchedule(proc.name, tuple(times), STEPS)


@pytest.mark.parametrize("name", ["digits-t2i", "digits-t2i-flow"])
def test_stock_pipeline_with_s3scheduler_is_the_registry_models_sample(name: str) -> None:
    spec = registry.get(name)
    model = spec.decode.__self__
    schedule = _schedule(spec)
    assert schedule.process == ("edm" if name == "digits-t2i" else "flow")
    pipe, extra = _pipe(name)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = S3Scheduler.from_config(pipe.scheduler.config, schedule=schedule.to_dict())
    g = torch.Generator().manual_seed(3)
    pipe.scheduler.noise_generator = g          # SD3 passes step no generator; SD passes g itself
    got = pipe(prompt=list(PROMPTS), num_images_per_prompt=PER_PROMPT, guidance_scale=GUIDANCE,
               height=model.height, width=model.width, generator=g, output_type="latent",
               num_inference_steps=len(pipe.scheduler.timesteps), **extra).images

    denoiser = spec.denoiser_for(Conditions(PROMPTS, guidance_scale=GUIDANCE))
    g = torch.Generator().manual_seed(3)
    z = randn_tensor((len(PROMPTS) * PER_PROMPT, *spec.shape), generator=g, dtype=torch.float32)
    x_T = z if name == "digits-t2i-flow" else z * pipe.scheduler.init_noise_sigma
    want = sample(denoiser, x_T, schedule, generator=g)
    assert torch.equal(got, want)
