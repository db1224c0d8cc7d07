"""The shipped text-to-image digits test beds (digits-t2i, digits-t2i-flow): they load through the registry's
diffusers-pipeline kind, run in the stock diffusers pipelines with their stock schedulers, offline, follow their
prompts (classifier-free guidance raises the prompted digit's probability), and match their provenance hashes."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from s3search.models import registry  # noqa: E402
from s3search.models.base import Conditions  # noqa: E402
from s3search.models.digits import load_digits_data, to_model_range  # noqa: E402
from s3search.models.digits_features import load_classifier  # noqa: E402
from s3search.models.digits_t2i import FLOW_FOLDER, FLOW_SEQUENCE_LENGTH, SD_FOLDER  # noqa: E402

MODELS = {"digits-t2i": SD_FOLDER, "digits-t2i-flow": FLOW_FOLDER}
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These networks are tiny: on a busy 2-core machine two threads spend ~10x longer in contention than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()[0]


def _stock(name: str):
    """The folder loaded by the stock pipeline class, as a user would, with nothing but diffusers."""
    folder = MODELS[name]
    if name == "digits-t2i":
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
        extra: dict = {}
    else:  # SD3 without T5, the way diffusers documents it
        pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None,
                                                                  local_files_only=True)
        extra = {"max_sequence_length": FLOW_SEQUENCE_LENGTH}
    pipe.set_progress_bar_config(disable=True)
    return pipe, extra


@pytest.fixture(scope="module", params=list(MODELS))
def stock(request):
    return (request.param, *_stock(request.param))


@pytest.mark.parametrize("name", list(MODELS))
def test_weights_match_their_provenance(name: str) -> None:
    folder = MODELS[name]
    provenance = json.loads((folder / "provenance.json").read_text())
    files = {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "provenance.json"}
    assert files == provenance["sha256"]      # every file listed, none unlisted, none changed
    weights = [p for p in folder.rglob("*.safetensors")]
    assert len(weights) >= 3 and sum(p.stat().st_size for p in weights) < 8e6     # a few MB at most
    assert not [p for p in folder.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]


@pytest.mark.parametrize("name", list(MODELS))
def test_loads_through_the_registry_and_follows_prompts(name: str, classifier) -> None:
    """Real digits, noised to SNR 1 in the model's latent space, denoised in one call of the registry's denoiser
    under the right prompt and under a wrong one: the decoded estimate is read as the prompted digit."""
    spec = registry.get(name)
    assert spec.provenance["kind"] == "diffusers-pipeline"
    assert spec.shape == (4, 4, 4)
    assert len(spec.prompt_sets["digits"].prompts) == 40
    vae = diffusers.AutoencoderKL.from_pretrained(MODELS[name] / "vae")
    images, labels = load_digits_data()
    gen = torch.Generator().manual_seed(0)
    pick = torch.randperm(len(labels), generator=gen)[:50]
    x, y = to_model_range(images[pick.numpy()]), torch.as_tensor(labels[pick.numpy()])
    with torch.no_grad():
        z = (vae.encode(x).latent_dist.mean - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor
    process = spec.denoiser.process
    t = process.t_of_lambda(0.0)
    xt = process.alpha(t) * z + process.sigma(t) * torch.randn(z.shape, generator=gen)

    def accuracy(digits: torch.Tensor) -> float:
        # one prompt per row: rows are consecutive per prompt, so a batch of 50 prompts for 50 rows
        den = spec.denoiser_for(Conditions(tuple(f"the digit {WORDS[d]}" for d in digits.tolist())))
        with torch.no_grad():
            decoded = spec.decode(den(xt, t))
        assert decoded.shape == (50, 1, 8, 8)
        return float((classifier(decoded).argmax(1) == y).float().mean())

    right, wrong = accuracy(y), accuracy((y + 5) % 10)
    assert right > 0.8 and wrong < right - 0.3, (right, wrong)


def test_stock_pipelines_sample_with_stock_schedulers(stock) -> None:
    name, pipe, extra = stock
    expected = {"digits-t2i": diffusers.DDIMScheduler, "digits-t2i-flow": diffusers.FlowMatchEulerDiscreteScheduler}
    assert type(pipe.scheduler) is expected[name]
    out = pipe(prompt=["a bold 3", "number 8"], num_inference_steps=4, guidance_scale=7.5, output_type="pt",
               generator=torch.Generator().manual_seed(0), **extra).images
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0 and float(out.std()) > 0.1   # not a blank image


def test_guidance_raises_prompt_accuracy(stock, classifier) -> None:
    """100 samples with the stock scheduler at 10 steps: the classifier's mean probability of the prompted digit
    is well above chance without guidance, and guidance 7.5 at least halves what it misses (1 - probability)."""
    name, pipe, extra = stock
    digits = torch.arange(100) % 10
    prompts = [f"a handwritten {d}" for d in digits.tolist()]

    def mean_probability(guidance: float) -> float:
        with torch.no_grad():
            out = pipe(prompt=prompts, num_inference_steps=10, guidance_scale=guidance, output_type="pt",
                       generator=torch.Generator().manual_seed(1), **extra).images
            prob = classifier(out * 2 - 1).softmax(1)
        return float(prob[torch.arange(100), digits].double().mean())

    plain, guided = mean_probability(1.0), mean_probability(7.5)
    assert plain > 0.3 and 1 - guided < 0.5 * (1 - plain), (name, plain, guided)


# ----- prompt-accuracy and fd-per-digit (s3search.metrics.digits_prompts) ---------------------------------------
def test_prompts_name_their_digit() -> None:
    from s3search.metrics.digits_prompts import prompted_digit

    assert [prompted_digit(p) for p in ("a handwritten 7", "the digit Seven", "a bold 0", "number 9")] == [7, 7, 0, 9]
    for bad in ("a cat", "number 10", "a 3 and a 4", "sevenfold"):
        with pytest.raises(ValueError, match="exactly one digit"):
            prompted_digit(bad)
    assert prompted_digit("a 3, three") == 3      # the same digit twice is still one digit


def _real(n: int):
    images, labels = load_digits_data()
    return to_model_range(images[:n]), torch.as_tensor(labels[:n])


def test_prompt_accuracy_and_fd_per_digit_on_real_digits() -> None:
    """Real digits under their own prompts score near the floor; under another digit's prompts, near the worst."""
    from s3search import metrics
    from s3search.metrics import MetricContext

    x, y = _real(600)
    right = tuple(f"the digit {WORDS[d]}" for d in y.tolist())
    wrong = tuple(f"a bold {(d + 1) % 10}" for d in y.tolist())
    spec = registry.get("digits-t2i")
    acc, fd = metrics.get("prompt-accuracy"), metrics.get("fd-per-digit")
    assert acc.compute(x, MetricContext(spec, prompts=right)) < 0.05        # 1 - mean probability
    assert acc.compute(x, MetricContext(spec, prompts=wrong)) > 0.9
    near, far = fd.compute(x, MetricContext(spec, prompts=right)), fd.compute(x, MetricContext(spec, prompts=wrong))
    assert near < 0.2 * far, (near, far)
    with pytest.raises(ValueError, match="one prompt per sample"):
        acc.compute(x, MetricContext(spec, prompts=right[:-1]))


def test_digit_metrics_are_offered_to_text_to_image_digits_only() -> None:
    for metric in ("prompt-accuracy", "fd-per-digit"):
        assert registry.metric_error("digits-t2i", metric) is None
        assert registry.metric_error("digits-t2i-flow", metric) is None
        assert "not a text-to-image model" in registry.metric_error("digits", metric)


@pytest.mark.slow
def test_a_short_search_beats_ddim_at_nfe_5_on_the_test_split(tmp_path) -> None:
    """Issue 17's smallest claim, measured on the shipped model: a budget-16 search (300 samples an evaluation)
    at guidance 7.5 ends ahead of DDIM on DDIM's best grid, on 1000 fresh test samples."""
    import optuna

    from s3search.search.config import SearchConfig
    from s3search.search.run import preflight, run_search

    config = preflight(SearchConfig.from_dict({
        "model": "digits-t2i", "nfe": [5], "metric": "fd-per-digit", "budget": 16, "n_samples": 300,
        "n_test_samples": 1000, "guidance_scale": 7.5, "seed": 0,
        "options": {"baselines": ["ddim", "dpmpp_2m"], "batch_size": 4}}))
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", study_name="short")
    result = run_search(config, study)
    assert result.baselines["ddim"] > 0 and result.test_value < result.baselines["ddim"], \
        (result.test_value, result.baselines)
