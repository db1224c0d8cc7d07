"""Kind diffusers-pipeline with a single-file checkpoint: a tiny random StableDiffusionPipeline written as ONE
original-layout (LDM) safetensors file (tests/ldm_layout.py), loaded with diffusers' from_single_file and the
entry's config folder (the saved pipeline folder without weights). Nothing is downloaded.

The loaded weights must equal the original pipeline's exactly, and the registry model's denoiser, decoder and
schedule must equal those of the same pipeline loaded from its folder. Pickled checkpoints and broken config
folders are refused naming the entry, the field and the file.
"""

from __future__ import annotations

import json
import os
import shutil
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from s3search.models import local
from s3search.models.base import Conditions, single_threaded

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from ldm_layout import ldm_state_dict, sd3_state_dict  # noqa: E402
from s3search.models.local import diffusers_pipeline  # noqa: E402
from s3search.models.tiny_pipelines import tiny_pipeline  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
MODULES = ("unet", "vae", "text_encoder")
PROMPTS = ("a cat", "dog")


@pytest.fixture(autouse=True)
def _one_thread():
    with single_threaded():
        yield


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Any]:
    """The tiny pipeline, its saved folder, the config folder (that folder less its weights) and the checkpoint."""
    root = tmp_path_factory.mktemp("single-file")
    pipe = tiny_pipeline("sd", root / "work")
    _write_checkpoint(pipe, root, "tiny-sd.safetensors")
    return {"pipe": pipe, "root": root}


def _tiny_sdxl(workdir: Path) -> Any:
    """tiny_pipelines' SDXL, but with a second text encoder of another width (48): from_single_file tells SDXL's
    two CLIP encoders apart by their width, as the released ones (768, 1280) differ."""
    import transformers

    from s3search.models.tiny_pipelines import _clip, _unet, _vae, clip_tokenizer, eval_mode

    torch.manual_seed(0)
    tok, vocab = clip_tokenizer(workdir / "tok")
    wide = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=48, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, vocab_size=vocab, max_position_embeddings=77, projection_dim=32))
    # cross attention sees both encoders' hidden states (32 + 48); the added embedding the pooled 32 and 6 time ids
    unet = _unet(cross_attention_dim=80, use_linear_projection=True, addition_embed_type="text_time",
                 addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
                 projection_class_embeddings_input_dim=32 + 6 * 8)
    scheduler = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                 steps_offset=1, timestep_spacing="leading")
    return eval_mode(diffusers.StableDiffusionXLPipeline(vae=_vae(), text_encoder=_clip(vocab), tokenizer=tok,
                                                         text_encoder_2=wide, tokenizer_2=tok, unet=unet,
                                                         scheduler=scheduler, add_watermarker=False))


def _tiny_sd3(workdir: Path) -> Any:
    """An SD3 pipeline of two MMDiT blocks (the last one's text stream differs) with T5. As in the released
    checkpoints, CLIP-L's projection is the identity (from_single_file sets it so) and CLIP-G is wider than
    CLIP-L (48 vs 32), which is how from_single_file tells the two apart."""
    import transformers

    from s3search.models.tiny_pipelines import _clip, _t5, _vae, clip_tokenizer, eval_mode, t5_tokenizer

    torch.manual_seed(0)
    tok, vocab = clip_tokenizer(workdir / "tok")
    t5_tok, t5_vocab = t5_tokenizer(workdir / "t5tok")
    clip_l = _clip(vocab, projection_dim=32)
    with torch.no_grad():
        clip_l.text_projection.weight.copy_(torch.eye(32))
    clip_g = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=48, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, vocab_size=vocab, max_position_embeddings=77, projection_dim=32))
    transformer = diffusers.SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, out_channels=4,
                                                  num_layers=2, attention_head_dim=8, num_attention_heads=4,
                                                  caption_projection_dim=32, joint_attention_dim=32,
                                                  pooled_projection_dim=64)
    return eval_mode(diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(shift_factor=0.0609, scaling_factor=1.5035), text_encoder=clip_l, tokenizer=tok,
        text_encoder_2=clip_g, tokenizer_2=tok, text_encoder_3=_t5(t5_vocab), tokenizer_3=t5_tok))


def _write_checkpoint(pipe: Any, root: Path, name: str) -> None:
    """`pipe` saved as a folder, a config folder (the same less its weights) and one original-layout checkpoint."""
    pipe.save_pretrained(root / "folder", safe_serialization=True)
    shutil.copytree(root / "folder", root / "config", ignore=shutil.ignore_patterns("*.safetensors"))
    state = sd3_state_dict(pipe) if hasattr(pipe, "transformer") else ldm_state_dict(pipe)
    safetensors_torch.save_file(state, str(root / name))


def _registry(root: Path, body: str) -> Path:
    path = root / "models.toml"
    path.write_text(textwrap.dedent(body))
    return path


def _entry(root: Path, **fields: Any) -> local.LocalModelEntry:
    lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in {"kind": "diffusers-pipeline", "device": "cpu",
                                                            **fields}.items())
    (entry,) = local.parse_registry(_registry(root, f"[models.m]\n{lines}\n"))
    return entry


def _both(root: Path, checkpoint: str = "tiny-sd.safetensors") -> dict[str, local.LocalModelEntry]:
    common = 'kind = "diffusers-pipeline"\ndevice = "cpu"\nguidance_scale = 3.0\nprompt = "a cat"\n' \
             'negative_prompt = "blurry"'
    path = _registry(root, f"""
[models.folder]
path = "folder"
{common}

[models.single]
path = "{checkpoint}"
config = "config"
{common}
""")
    return {e.name: e for e in local.parse_registry(path)}


def test_config_folder_holds_no_weights(built) -> None:
    config = built["root"] / "config"
    assert (config / "model_index.json").is_file()
    assert not [p for p in config.rglob("*") if p.suffix in (".safetensors", ".bin")]


def test_single_file_loads_the_original_weights_exactly(built) -> None:
    entries = _both(built["root"])
    model, files = diffusers_pipeline.load(entries["single"])
    assert type(model.pipe).__name__ == "StableDiffusionPipeline"
    for name in MODULES:
        want, got = getattr(built["pipe"], name).state_dict(), getattr(model.pipe, name).state_dict()
        assert set(got) == set(want), name
        for key, tensor in want.items():
            assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), f"{name}.{key}"
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(model.pipe.scheduler.config) == public(built["pipe"].scheduler.config)
    assert model.pipe.tokenizer("a cat").input_ids == built["pipe"].tokenizer("a cat").input_ids
    assert model.pipe.safety_checker is None and model.pipe.feature_extractor is None
    # hashed: the config folder's files and the checkpoint, never a weights file of the folder entry
    assert built["root"] / "tiny-sd.safetensors" in files
    assert all(built["root"] / "config" in p.parents or p.name == "tiny-sd.safetensors" for p in files)


def test_single_file_model_equals_the_folder_model(built) -> None:
    entries = _both(built["root"])
    folder, single = local.build_model(entries["folder"]), local.build_model(entries["single"])
    _same_model(folder, single)
    assert single.provenance["config"] == "config" and single.provenance["path"] == "tiny-sd.safetensors"
    assert single.provenance["weights_sha256"] != folder.provenance["weights_sha256"]


def _same_model(folder: Any, single: Any) -> None:
    """The two specs' denoisers (with CFG, two prompts, a negative prompt), decoders and schedules agree exactly."""
    assert single.shape == folder.shape and single.denoiser.process.name == folder.denoiser.process.name
    assert single.scheduler_times(6) == folder.scheduler_times(6)
    x = torch.randn(4, *folder.shape, generator=torch.Generator().manual_seed(3))
    proc = folder.denoiser.process
    conditions = Conditions(PROMPTS, guidance_scale=3.0)
    for t in (proc.t_min * 4, 0.5 * (proc.t_min + proc.t_max), proc.t_max * 0.5):
        xt = proc.sigma(t) * x
        assert torch.equal(single.denoiser_for(conditions)(xt, t), folder.denoiser_for(conditions)(xt, t)), t
        assert torch.equal(single.denoiser(xt, t), folder.denoiser(xt, t))
    assert torch.equal(single.decode(x[:2]), folder.decode(x[:2]))


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_sdxl_and_sd3_single_files_equal_the_folder_models(tmp_path, family) -> None:
    pipe = {"sdxl": _tiny_sdxl, "sd3": _tiny_sd3}[family](tmp_path / "work")
    _write_checkpoint(pipe, tmp_path, f"tiny-{family}.safetensors")
    entries = _both(tmp_path, f"tiny-{family}.safetensors")
    model, _ = diffusers_pipeline.load(entries["single"])
    assert type(model.pipe) is type(pipe)
    modules = [n for n, c in pipe.components.items() if isinstance(c, torch.nn.Module)]
    assert len(modules) == {"sdxl": 4, "sd3": 5}[family]
    for name in modules:
        want, got = getattr(pipe, name).state_dict(), getattr(model.pipe, name).state_dict()
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want), name
    _same_model(local.build_model(entries["folder"]), local.build_model(entries["single"]))


def test_weights_hash_follows_the_checkpoint(built, tmp_path) -> None:
    root = tmp_path
    shutil.copytree(built["root"] / "config", root / "config")
    state = ldm_state_dict(built["pipe"])
    safetensors_torch.save_file(state, str(root / "a.safetensors"))
    first = local.build_model(_entry(root, path="a.safetensors", config="config")).provenance["weights_sha256"]
    key = next(k for k in state if k.startswith("model.diffusion_model."))
    state[key] = state[key] + 1.0
    safetensors_torch.save_file(state, str(root / "a.safetensors"))
    second = local.build_model(_entry(root, path="a.safetensors", config="config")).provenance["weights_sha256"]
    assert first != second


# ----- refusals ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["v1-5-pruned.ckpt", "model.bin", "model.pt"])
def test_pickled_checkpoint_is_refused_naming_file_and_field(tmp_path, name) -> None:
    (tmp_path / name).write_bytes(b"not read")
    for fields in ({"config": "config"}, {}):
        with pytest.raises(ValueError, match=rf"models\.m\.path='{name}' is a pickled checkpoint") as e:
            _entry(tmp_path, path=name, **fields)
        assert "safetensors" in str(e.value)


def test_safetensors_file_without_config_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"models\.m\.config is required with the single-file checkpoint "
                                         r"'sd15\.safetensors'"):
        _entry(tmp_path, path="sd15.safetensors")


def test_config_needs_a_safetensors_path_and_no_variant(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"models\.m\.path='folder' must be a \.safetensors single-file"):
        _entry(tmp_path, path="folder", config="config")
    with pytest.raises(ValueError, match=r"models\.m\.variant applies to pipeline folders"):
        _entry(tmp_path, path="sd15.safetensors", config="config", variant="fp16")
    with pytest.raises(ValueError, match=r"models\.m\.config must be a non-empty path"):
        _entry(tmp_path, path="sd15.safetensors", config=" ")
    with pytest.raises(ValueError, match=r"models\.m\.config applies to kind=diffusers-pipeline only"):
        local.parse_registry(_registry(tmp_path, '[models.m]\nkind = "diffusers-unet"\npath = "x"\n'
                                                 'config = "c"\n'))


def test_missing_config_folder_is_refused_naming_the_field(built, tmp_path) -> None:
    shutil.copy(built["root"] / "tiny-sd.safetensors", tmp_path)
    entry = _entry(tmp_path, path="tiny-sd.safetensors", config="no-such-folder")
    with pytest.raises(FileNotFoundError, match=r"models\.m\.config: .*no-such-folder does not exist"):
        local.build_model(entry)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"models\.m\.config: .*empty holds no model_index\.json"):
        local.build_model(_entry(tmp_path, path="tiny-sd.safetensors", config="empty"))


def test_missing_checkpoint_is_refused_naming_path(built, tmp_path) -> None:
    shutil.copytree(built["root"] / "config", tmp_path / "config")
    entry = _entry(tmp_path, path="gone.safetensors", config="config")
    with pytest.raises(FileNotFoundError, match=r"models\.m\.path: .*gone\.safetensors does not exist"):
        local.build_model(entry)


def test_unsupported_family_in_config_is_refused(built, tmp_path) -> None:
    shutil.copytree(built["root"] / "config", tmp_path / "config")
    shutil.copy(built["root"] / "tiny-sd.safetensors", tmp_path)
    index = json.loads((tmp_path / "config" / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionImg2ImgPipeline"
    (tmp_path / "config" / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"models\.m\.config: .*model_index\.json names "
                                         r"'StableDiffusionImg2ImgPipeline'; kind=diffusers-pipeline loads "
                                         r"StableDiffusionPipeline"):
        local.build_model(_entry(tmp_path, path="tiny-sd.safetensors", config="config"))


def test_pickled_weights_in_config_folder_are_refused(built, tmp_path) -> None:
    shutil.copytree(built["root"] / "config", tmp_path / "config")
    shutil.copy(built["root"] / "tiny-sd.safetensors", tmp_path)
    (tmp_path / "config" / "text_encoder" / "pytorch_model.bin").write_bytes(b"never read")
    with pytest.raises(FileNotFoundError, match=r"models\.m\.config: .*pytorch_model\.bin is pickled weights"):
        local.build_model(_entry(tmp_path, path="tiny-sd.safetensors", config="config"))


@pytest.mark.parametrize("drop, named", [("first_stage_model.", "Failed to load AutoencoderKL"),
                                         ("model.diffusion_model.out.2.bias", "lacks 1 weight(s) of the "
                                                                              "StableDiffusionPipeline (first: "
                                                                              "unet.conv_out.bias)")])
def test_checkpoint_lacking_weights_is_refused(built, tmp_path, drop, named) -> None:
    """A whole component missing is diffusers' error; one weight missing would be left random without accelerate,
    so it is looked for."""
    shutil.copytree(built["root"] / "config", tmp_path / "config")
    state = {k: v for k, v in ldm_state_dict(built["pipe"]).items() if not k.startswith(drop)}
    safetensors_torch.save_file(state, str(tmp_path / "part.safetensors"))
    with pytest.raises(ValueError, match=r"models\.m\.path: .*part\.safetensors") as e:
        local.build_model(_entry(tmp_path, path="part.safetensors", config="config"))
    assert named in str(e.value)


def test_models_check_reports_a_missing_config_folder(built, tmp_path, monkeypatch) -> None:
    import typer
    from typer.testing import CliRunner

    from s3search.cli import models_cmd
    from s3search.models import registry

    shutil.copy(built["root"] / "tiny-sd.safetensors", tmp_path)
    shutil.copytree(built["root"] / "config", tmp_path / "config")
    path = _registry(tmp_path, """
        [models.good]
        kind = "diffusers-pipeline"
        path = "tiny-sd.safetensors"
        config = "config"
        device = "cpu"
        [models.bad]
        kind = "diffusers-pipeline"
        path = "tiny-sd.safetensors"
        config = "missing-config"
        device = "cpu"
    """)
    app = typer.Typer()
    models_cmd.register(app)
    monkeypatch.setenv(registry.ENV_REGISTRY, str(path))
    registry.clear_cache()
    try:
        result = CliRunner().invoke(app, ["models", "check", "--quiet", "good", "bad"])
        assert result.exit_code == 1
        assert json.loads(result.stdout.splitlines()[0])["name"] == "good"
        assert "models.bad.config" in result.output and "missing-config does not exist" in result.output
    finally:
        registry.clear_cache()
