"""Kind diffusers-pipeline: tiny random-weight SD, SDXL, SD3 and FLUX pipelines built from configs here, saved as
safetensors in tmp_path and loaded through a registry file. Nothing is downloaded: the tokenizers are written
from a small vocabulary in the test.

Each reference repeats, for one step, what the pipeline's __call__ does: its encode_prompt, scheduler input
scaling, network call, guidance combination, and its scheduler's x0 (pred_original_sample for SD / SDXL, x - σ v
for the flow models, whose Euler step to σ = 0 is exactly that).
"""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytest
import torch

from s3search import processes
from s3search.models import local
from s3search.models.base import Conditions, single_threaded

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

HEIGHT = WIDTH = 16          # pixels; the tiny VAEs downsample by 2, so latents are 8 x 8
N_STEPS = 5
MAX_SEQUENCE_LENGTH = 16     # T5 tokens (SD3, FLUX)
PROMPTS = ("a cat", "dog")
NEGATIVES = ("blurry", "cat")
PER_PROMPT = 2               # rows of x per prompt, as num_images_per_prompt


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny networks: thread hand-offs cost more than the arithmetic (20 ms a call on one thread, 0.1-0.5 s on two
    threads of a busy two-core machine)."""
    with single_threaded():
        yield


# ----- tiny components (shipped: s3search.models.tiny_pipelines) ------------------------------------------------
from s3search.models.tiny_pipelines import FAMILIES as BUILDERS  # noqa: E402
from s3search.models.tiny_pipelines import _sd  # noqa: E402
from s3search.models.tiny_pipelines import eval_mode as _eval  # noqa: E402


@pytest.fixture(scope="module")
def _built(tmp_path_factory) -> dict[str, Any]:
    return {"root": tmp_path_factory.mktemp("pipelines")}


@pytest.fixture()
def saved(_built, tmp_path):
    """family -> (pipeline, its folder): built and saved once per module, each test getting its own copy."""

    def make(family: str) -> tuple[Any, Path]:
        if family not in _built:
            root = _built["root"] / family
            pipe = _eval(BUILDERS[family](root / "parts"))
            pipe.save_pretrained(root / "pipe", safe_serialization=True)
            _built[family] = (pipe, root / "pipe")
        pipe, folder = _built[family]
        shutil.copytree(folder, tmp_path / "pipe")
        return pipe, tmp_path / "pipe"

    return make


def _registry(tmp_path: Path, body: str, name: str = "m") -> Path:
    path = tmp_path / "models.toml"
    path.write_text(f"[models.{name}]\nkind = \"diffusers-pipeline\"\npath = \"pipe\"\n" + textwrap.dedent(body))
    return path


def _spec(tmp_path: Path, body: str = "", name: str = "m"):
    return local.load_registry_file(_registry(tmp_path, body, name))[name]()


# ----- references: one step of each pipeline's __call__ ---------------------------------------------------------
def _sd_reference(pipe, x: torch.Tensor, i: int, w: float,
                  negatives: Optional[list[str]]) -> tuple[torch.Tensor, float]:
    """x0 from latents x (in the scheduler's own scaling) at the i-th of N_STEPS timesteps; and the step's sigma."""
    sdxl = isinstance(pipe, diffusers.StableDiffusionXLPipeline)
    scheduler = pipe.scheduler
    scheduler.set_timesteps(N_STEPS)
    t = scheduler.timesteps[i]
    cfg = w > 1
    if sdxl:
        cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
            prompt=list(PROMPTS), device="cpu", num_images_per_prompt=PER_PROMPT, do_classifier_free_guidance=cfg,
            negative_prompt=negatives)
        time_ids = pipe._get_add_time_ids((HEIGHT, WIDTH), (0, 0), (HEIGHT, WIDTH), dtype=cond.dtype,
                                          text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
        added = {"text_embeds": torch.cat([uncond_pooled, pooled]),
                 "time_ids": torch.cat([time_ids, time_ids]).repeat(len(PROMPTS) * PER_PROMPT, 1)}
    else:
        cond, uncond = pipe.encode_prompt(list(PROMPTS), "cpu", PER_PROMPT, cfg, negatives)
        added = None
    model_input = scheduler.scale_model_input(torch.cat([x, x]), t)
    out = pipe.unet(model_input, t, encoder_hidden_states=torch.cat([uncond, cond]), timestep_cond=None,
                    added_cond_kwargs=added, return_dict=False)[0]
    out_u, out_c = out.chunk(2)
    x0 = scheduler.step(out_u + w * (out_c - out_u), t, x).pred_original_sample
    if sdxl:  # Euler's latents are x_t / alpha_t, at sigma = sigma_t / alpha_t
        return x0, float(scheduler.sigmas[i])
    abar = float(scheduler.alphas_cumprod[int(t)].double())
    return x0, ((1 - abar) / abar) ** 0.5


def _sd3_reference(pipe, x: torch.Tensor, i: int, w: float,
                   negatives: Optional[list[str]]) -> tuple[torch.Tensor, float]:
    scheduler = pipe.scheduler
    scheduler.set_timesteps(N_STEPS)
    t, sigma = scheduler.timesteps[i], scheduler.sigmas[i]
    cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
        prompt=list(PROMPTS), prompt_2=None, prompt_3=None, device="cpu", num_images_per_prompt=PER_PROMPT,
        do_classifier_free_guidance=True, negative_prompt=negatives, max_sequence_length=MAX_SEQUENCE_LENGTH)
    model_input = torch.cat([x, x])
    out = pipe.transformer(hidden_states=model_input, timestep=t.expand(model_input.shape[0]),
                           encoder_hidden_states=torch.cat([uncond, cond]),
                           pooled_projections=torch.cat([uncond_pooled, pooled]), return_dict=False)[0]
    out_u, out_c = out.chunk(2)
    return x - sigma * (out_u + w * (out_c - out_u)), float(sigma)


def _flux_reference(pipe, x: torch.Tensor, i: int, w: float, negatives: Optional[list[str]],
                    true_cfg: float) -> tuple[torch.Tensor, float]:
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    b, c, h, wd = x.shape
    encode = dict(prompt_2=None, device="cpu", num_images_per_prompt=PER_PROMPT,
                  max_sequence_length=MAX_SEQUENCE_LENGTH)
    cond, pooled, text_ids = pipe.encode_prompt(prompt=list(PROMPTS), **encode)
    uncond, uncond_pooled, uncond_ids = pipe.encode_prompt(prompt=negatives, **encode)
    latents = pipe._pack_latents(x, b, c, h, wd)
    image_ids = pipe._prepare_latent_image_ids(b, h // 2, wd // 2, "cpu", cond.dtype)
    config = pipe.scheduler.config
    mu = calculate_shift(latents.shape[1], config.base_image_seq_len, config.max_image_seq_len, config.base_shift,
                         config.max_shift)
    timesteps, _ = retrieve_timesteps(pipe.scheduler, N_STEPS, "cpu",
                                      sigmas=np.linspace(1.0, 1 / N_STEPS, N_STEPS), mu=mu)
    timestep = timesteps[i].expand(b).to(latents.dtype)
    guidance = torch.full([1], w, dtype=torch.float32).expand(b)

    def call(embeds, pooled_embeds, ids):
        return pipe.transformer(hidden_states=latents, timestep=timestep / 1000, guidance=guidance,
                                pooled_projections=pooled_embeds, encoder_hidden_states=embeds, txt_ids=ids,
                                img_ids=image_ids, return_dict=False)[0]

    out, out_u = call(cond, pooled, text_ids), call(uncond, uncond_pooled, uncond_ids)
    v = pipe._unpack_latents(out_u + true_cfg * (out - out_u), HEIGHT, WIDTH, pipe.vae_scale_factor)
    sigma = float(pipe.scheduler.sigmas[i])
    return x - sigma * v, sigma


CASES = {  # family: (registry lines, guidance scale, negative prompts or None for the pipeline's default)
    "sd": ("guidance_scale = 7.5\n", 7.5, list(NEGATIVES)),
    "sd-v": ("guidance_scale = 4.0\nnegative_prompt = \"ugly\"\n", 4.0, ["ugly"] * 2),
    "sdxl": ("", 5.0, None),                      # no negative prompt: SDXL's zeroed negative embeddings
    "sd3": (f"max_sequence_length = {MAX_SEQUENCE_LENGTH}\n", 7.0, list(NEGATIVES)),
    "sd3-no-t5": (f"max_sequence_length = {MAX_SEQUENCE_LENGTH}\nguidance_scale = 3.0\n", 3.0, list(NEGATIVES)),
    "flux": (f"max_sequence_length = {MAX_SEQUENCE_LENGTH}\ntrue_cfg_scale = 2.0\n", 3.5, list(NEGATIVES)),
}


@pytest.mark.parametrize("family", list(CASES))
def test_denoiser_is_the_pipelines_own_step(saved, tmp_path, family) -> None:
    lines, w, negatives = CASES[family]
    pipe, _ = saved(family)
    spec = _spec(tmp_path, f"height = {HEIGHT}\nwidth = {WIDTH}\n" + lines)
    flow = family.startswith(("sd3", "flux"))
    assert spec.conditional and spec.process is processes.get("flow" if flow else "edm")
    assert spec.shape == (4, 8, 8)
    # sd-v takes its negative prompt from the entry; sdxl has none, so its pipeline zeroes the negative embeddings
    given = tuple(negatives) if negatives is not None and family != "sd-v" else None
    denoiser = spec.denoiser_for(Conditions(PROMPTS, negative_prompts=given))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for i in (1, 2, N_STEPS - 1):  # flow step 0 is at t = 1, beyond the flow process (alpha = 0)
            x = torch.randn(len(PROMPTS) * PER_PROMPT, *spec.shape, generator=generator)
            if family == "flux":
                expected, t = _flux_reference(pipe, x, i, w, negatives, true_cfg=2.0)
            elif flow:
                expected, t = _sd3_reference(pipe, x, i, w, negatives)
            else:
                expected, t = _sd_reference(pipe, x, i, w, negatives)
                if family != "sdxl":  # DDIM holds x_t; s3search's edm view takes x_t / alpha_t at sigma_t / alpha_t
                    x = x * (1 + t * t) ** 0.5
            got = denoiser(x, t)
            # The flow models run the very same float32 operations. The vp-discrete ones differ by ~1e-5 of the
            # scale: s3search's alphas are float64 from the scheduler's float32 betas, the scheduler's are float32
            # products, and the edm view recovers t from sigma.
            tol = 1e-6 if flow else 5e-5
            torch.testing.assert_close(got, expected, rtol=tol, atol=tol * float(expected.abs().max()))


def test_one_prompt_serves_any_batch_and_rows_follow_prompts(saved, tmp_path) -> None:
    saved("sd")
    spec = _spec(tmp_path, "prompt = \"a cat\"\nbatch_size = 3\n")
    x = torch.randn(5, *spec.shape, generator=torch.Generator().manual_seed(2))
    one = spec.denoiser_for(Conditions(("a cat",)))
    torch.testing.assert_close(spec.denoiser(x, 1.5), one(x, 1.5))   # the default denoiser is at the entry's prompt
    pair = spec.denoiser_for(Conditions(("a cat", "dog")))
    both = pair(x[:4], 1.5)
    # batches of other sizes differ in the last bits of the network's arithmetic
    torch.testing.assert_close(both[:2], one(x[:2], 1.5), rtol=1e-4, atol=1e-4)
    dog = spec.denoiser_for(Conditions(("dog",)))(x[2:4], 1.5)
    torch.testing.assert_close(both[2:], dog, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(both[2:], one(x[2:4], 1.5))
    with pytest.raises(ValueError, match="5 rows cannot be shared evenly between 2 prompts"):
        pair(x, 1.5)


def test_prompt_embeddings_are_encoded_once_per_prompt_tuple(saved, tmp_path) -> None:
    saved("sd")
    spec = _spec(tmp_path)
    model = spec.decode.__self__
    calls = []
    model.pipe.text_encoder.register_forward_hook(lambda *args: calls.append(1))
    x = torch.randn(2, *spec.shape)
    first = spec.denoiser_for(Conditions(PROMPTS))(x, 2.0)
    encoded = len(calls)
    assert encoded > 0
    again = spec.denoiser_for(Conditions(list(PROMPTS)))(x, 2.0)
    spec.denoiser_for(Conditions(PROMPTS))(x, 0.5)
    assert len(calls) == encoded
    torch.testing.assert_close(first, again)
    spec.denoiser_for(Conditions(PROMPTS, guidance_scale=1.0))(x, 2.0)   # no CFG: a new key, without negatives
    assert len(calls) > encoded


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
def test_decode_matches_the_pipeline_output(saved, tmp_path, family) -> None:
    pipe, _ = saved(family)
    spec = _spec(tmp_path, f"height = {HEIGHT}\nwidth = {WIDTH}\n")
    final = {}

    def keep(pipeline, i, t, kwargs):
        final["latents"] = kwargs["latents"]
        return {}

    images = pipe("a cat", height=HEIGHT, width=WIDTH, num_inference_steps=2, output_type="pt",
                  generator=torch.Generator().manual_seed(0), callback_on_step_end=keep).images
    latents = final["latents"]
    if family == "flux":
        latents = pipe._unpack_latents(latents, HEIGHT, WIDTH, pipe.vae_scale_factor)
    decoded = spec.decode(latents)
    assert decoded.shape == (1, 3, HEIGHT, WIDTH) and decoded.min() >= -1 and decoded.max() <= 1
    torch.testing.assert_close(decoded * 0.5 + 0.5, images, rtol=1e-5, atol=1e-5)


def test_scheduler_times_follow_the_pipelines_shift(saved, tmp_path) -> None:
    pipe, _ = saved("flux")
    path = tmp_path / "models.toml"
    path.write_text(textwrap.dedent(f"""
        [models.small]
        kind = "diffusers-pipeline"
        path = "pipe"
        height = 16
        width = 16
        max_sequence_length = {MAX_SEQUENCE_LENGTH}
        [models.large]
        kind = "diffusers-pipeline"
        path = "pipe"
        height = 32
        width = 32
        max_sequence_length = {MAX_SEQUENCE_LENGTH}
    """))
    factories = local.load_registry_file(path)
    seen = []
    for name, size in (("small", HEIGHT), ("large", 32)):
        spec = factories[name]()
        pipe("a cat", height=size, width=size, num_inference_steps=4, output_type="latent",
             max_sequence_length=MAX_SEQUENCE_LENGTH)
        shipped = [min(float(s), processes.get("flow").t_max) for s in pipe.scheduler.sigmas[:-1]]
        assert spec.scheduler_times(4) == pytest.approx(shipped, abs=1e-7)
        assert "dynamic shift mu=" in spec.provenance["shift"]
        seen.append(spec.scheduler_times(4))
    assert seen[0] != pytest.approx(seen[1])   # the shift grows with the image's token count


def test_sd_scheduler_times_are_the_shipped_timesteps_on_edm(saved, tmp_path) -> None:
    pipe, _ = saved("sd")
    spec = _spec(tmp_path)
    pipe.scheduler.set_timesteps(N_STEPS)
    abar = pipe.scheduler.alphas_cumprod.double()
    shipped = [float(((1 - abar[int(t)]) / abar[int(t)]) ** 0.5) for t in pipe.scheduler.timesteps]
    assert spec.scheduler_times(N_STEPS) == pytest.approx(shipped, rel=1e-5)


def test_bfloat16_runs_in_bfloat16_and_returns_the_input_dtype(saved, tmp_path) -> None:
    saved("sd")
    exact = _spec(tmp_path)
    half = _spec(tmp_path, "dtype = \"bfloat16\"\n")
    model = half.decode.__self__
    assert model.network.dtype == torch.bfloat16 and model.pipe.text_encoder.dtype == torch.bfloat16
    x = torch.randn(2, *half.shape, generator=torch.Generator().manual_seed(3))
    c = Conditions(PROMPTS)
    got, want = half.denoiser_for(c)(x, 1.0), exact.denoiser_for(c)(x, 1.0)
    assert got.dtype == torch.float32
    assert float((got - want).abs().max()) < 0.1 * float(want.abs().max())
    assert half.provenance["dtype"] == "bfloat16" and half.fingerprint != exact.fingerprint


# ----- folders: what is loaded, skipped and refused -------------------------------------------------------------
def _edit_index(folder: Path, **changes: Any) -> None:
    index = json.loads((folder / "model_index.json").read_text())
    index.update(changes)
    (folder / "model_index.json").write_text(json.dumps(index))


def test_safety_checker_and_feature_extractor_are_skipped(saved, tmp_path) -> None:
    _, folder = saved("sd")
    # Garbage in both: loading either would fail.
    for name, config in (("safety_checker", "config.json"), ("feature_extractor", "preprocessor_config.json")):
        (folder / name).mkdir()
        (folder / name / config).write_text("{not json")
    (folder / "safety_checker" / "pytorch_model.bin").write_bytes(b"\x80not a pickle")
    _edit_index(folder, safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
                feature_extractor=["transformers", "CLIPImageProcessor"], requires_safety_checker=True)
    spec = _spec(tmp_path)
    out = spec.denoiser(torch.randn(1, *spec.shape), 1.0)
    assert torch.isfinite(out).all()
    assert spec.decode.__self__.pipe.safety_checker is None


def test_pickled_component_is_refused_by_name(saved, tmp_path) -> None:
    _, folder = saved("sd")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").rename(folder / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=r"models\.m\.path: .*unet/diffusion_pytorch_model\.bin is pickled"):
        _spec(tmp_path)


def test_fp16_variant_files_load_with_variant(tmp_path) -> None:
    pipe = _eval(_sd(tmp_path / "parts")).to(torch.float16)
    pipe.save_pretrained(tmp_path / "pipe", safe_serialization=True, variant="fp16")
    assert (tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert not (tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors").exists()
    with pytest.raises(FileNotFoundError, match=r"models\.m\.variant: .* holds only fp16 variant weights "
                                                r"\(.*\.fp16\.safetensors\); set variant = \"fp16\""):
        _spec(tmp_path)
    spec = _spec(tmp_path, "variant = \"fp16\"\ndtype = \"float32\"\n")
    model = spec.decode.__self__
    assert model.network.dtype == torch.float32
    unet = model.network.state_dict()
    saved = pipe.unet.state_dict()
    assert all(torch.equal(unet[k], saved[k].float()) for k in saved)
    assert torch.isfinite(spec.denoiser(torch.randn(2, *spec.shape), 1.0)).all()


@pytest.mark.parametrize("breakage, error, match", [
    ("rm text_encoder", FileNotFoundError, r"models\.m\.path: .*text_encoder is missing \(model_index\.json lists "
                                           r"text_encoder = CLIPTextModel\)"),
    ("rm vae", FileNotFoundError, r"models\.m\.path: .*vae is missing"),
    ("null vae", ValueError, r"models\.m\.path: .*model_index\.json lists no vae; StableDiffusionPipeline needs"),
    ("null text_encoder", ValueError, r"models\.m\.path: .*lists no text_encoder"),
    ("class KandinskyPipeline", ValueError, r"models\.m\.path: .*names 'KandinskyPipeline'; "
                                            r"kind=diffusers-pipeline loads StableDiffusionPipeline"),
    ("rm model_index.json", FileNotFoundError, r"models\.m\.path: .*holds no model_index\.json"),
    ("rm unet/diffusion_pytorch_model.safetensors", FileNotFoundError,
     r"models\.m\.path: .*unet holds a config\.json but no \.safetensors weights"),
])
def test_broken_folders_name_entry_and_field(saved, tmp_path, breakage, error, match) -> None:
    _, folder = saved("sd")
    action, what = breakage.split(" ", 1)
    if action == "rm":
        target = folder / what
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    elif action == "null":
        _edit_index(folder, **{what: [None, None]})
    else:
        _edit_index(folder, _class_name=what)
    with pytest.raises(error, match=match):
        _spec(tmp_path)


def test_size_the_pipeline_would_refuse_names_height(saved, tmp_path) -> None:
    saved("sd")
    with pytest.raises(ValueError, match=r"models\.m\.height: height=12 and width=16 must be multiples of 8"):
        _spec(tmp_path, "height = 12\nwidth = 16\n")


@pytest.mark.parametrize("body, match", [
    ('dtype = "float64"', r"models\.m\.dtype='float64' must be one of float32, float16, bfloat16"),
    ("height = 0", r"models\.m\.height=0 must be a positive integer"),
    ("batch_size = true", r"models\.m\.batch_size=True must be a positive integer"),
    ('variant = "fp.16"', r"models\.m\.variant='fp\.16' must be a variant name"),
    ('guidance_scale = "high"', r"models\.m\.guidance_scale='high' must be a finite number"),
    ("true_cfg_scale = nan", r"models\.m\.true_cfg_scale=nan must be a finite number"),
    ("negative_prompt = 3", r"models\.m\.negative_prompt=3 must be a string"),
    ("class_label = 1", r"models\.m\.class_label does not apply to kind=diffusers-pipeline"),
    ("shape = [4, 8, 8]", r"models\.m\.shape does not apply to kind=diffusers-pipeline"),
])
def test_bad_pipeline_fields_name_entry_and_field(tmp_path, body, match) -> None:
    with pytest.raises(ValueError, match=match):
        local.load_registry_file(_registry(tmp_path, body + "\n"))


def test_pipeline_fields_are_refused_on_other_kinds(tmp_path) -> None:
    path = tmp_path / "models.toml"
    path.write_text('[models.ts]\nkind = "torchscript"\npath = "x.pt"\nprocess = "edm"\nprediction_type = "eps"\n'
                    'shape = [2]\nheight = 16\n')
    with pytest.raises(ValueError, match=r"models\.ts\.height applies to kind=diffusers-pipeline only"):
        local.load_registry_file(path)


def test_conditions_are_checked() -> None:
    assert Conditions("a cat").prompts == ("a cat",)
    assert Conditions(["a", "b"], negative_prompts="x").negative_prompts == ("x", "x")
    with pytest.raises(ValueError, match="prompts"):
        Conditions(())
    with pytest.raises(ValueError, match="negative_prompts must be one string or 2"):
        Conditions(("a", "b"), negative_prompts=("x", "y", "z"))
    with pytest.raises(ValueError, match="guidance_scale=inf must be a finite number"):
        Conditions(("a",), guidance_scale=float("inf"))


def test_provenance_and_fingerprint_follow_weights_and_settings(saved, tmp_path) -> None:
    _, folder = saved("sd")
    a = _spec(tmp_path, "guidance_scale = 3.0\n")
    b = _spec(tmp_path, "guidance_scale = 4.0\n")
    assert a.provenance["pipeline"] == "StableDiffusionPipeline" and a.provenance["guidance_scale"] == "3.0"
    assert a.default_metric == "trajectory" and "viewed on edm" in a.provenance["process_note"]
    assert a.fingerprint != b.fingerprint
    before = a.provenance["weights_sha256"]
    config = json.loads((folder / "vae" / "config.json").read_text())
    config["scaling_factor"] = 0.5
    (folder / "vae" / "config.json").write_text(json.dumps(config))
    assert _spec(tmp_path, "guidance_scale = 3.0\n").provenance["weights_sha256"] != before
